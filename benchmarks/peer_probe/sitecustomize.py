"""Loaded at start-up by every process `benchmarks/peers.py` runs (it is put first on PYTHONPATH): records what the
transformers Trainer did, the same way whichever tool drove it, into the JSON file LORAKIT_BENCH_PROBE names.

It waits for `transformers.trainer` to be imported (by the tool, as it would be anyway) and then wraps
`Trainer.train` on that class. Inside one `train` call it counts, for every micro-batch the trainer hands to
`training_step`: real tokens (attention-mask entries that are not 0 (packed masks number their rows 1, 2, ...), or
every input id when a padding-free batch has no mask) and trained tokens (labels other than -100). The clock runs
from the start to the end of `train`, so each tool's own data loading inside training is counted, its start-up is
not. It also notes the resident size when training starts (libraries, data and weights loaded) and the peak at its
end, for the memory check. Nothing else of the tool is changed.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
import time

OUT = os.environ.get("LORAKIT_BENCH_PROBE")
if OUT and int(os.environ.get("WORLD_SIZE", "1")) > 1:
    OUT += f".rank{os.environ.get('RANK', '0')}"  # one file per training process (benchmarks/peers.py adds them up)


def count(inputs, counts: dict) -> None:
    ids = inputs.get("input_ids")
    mask = inputs.get("attention_mask")
    labels = inputs.get("labels")
    if mask is not None and mask.dim() == 2:
        counts["real_tokens"] += int((mask != 0).sum())
    elif ids is not None:
        counts["real_tokens"] += int(ids.numel())
    if labels is not None:
        counts["trained_tokens"] += int((labels != -100).sum())
    if ids is not None:
        counts["padded_tokens"] += int(ids.numel())
    counts["micro_batches"] += 1


def describe(trainer) -> dict:
    import torch

    args = trainer.args
    model = trainer.model
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if not p.requires_grad})
    return {
        "bf16_autocast": bool(getattr(args, "bf16", False)), "fp16_autocast": bool(getattr(args, "fp16", False)),
        "frozen_dtypes": dtypes,
        "checkpointing": bool(getattr(args, "gradient_checkpointing", False)
                              or getattr(model, "is_gradient_checkpointing", False)),
        "micro_batch": args.per_device_train_batch_size, "accumulation": args.gradient_accumulation_steps,
        "learning_rate": args.learning_rate, "optimizer": str(getattr(args, "optim", "")),
        "scheduler": str(getattr(args, "lr_scheduler_type", "")), "torch_threads": torch.get_num_threads(),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None),
    }


def memory_status() -> dict:
    """The process's resident size now and its peak so far (Linux), in bytes."""
    try:
        with open("/proc/self/status") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
    except OSError:
        return {}
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM") if key in fields}


def patch(trainer_class) -> None:
    original = trainer_class.train

    def train(self, *args, **kwargs):
        counts = {"real_tokens": 0, "trained_tokens": 0, "padded_tokens": 0, "micro_batches": 0}
        step = self.training_step

        def training_step(model, inputs, *more, **options):
            count(inputs, counts)
            return step(model, inputs, *more, **options)

        self.training_step = training_step  # the instance's own, whatever subclass the tool uses
        at_start = memory_status()
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            elapsed = time.perf_counter() - started
            history = self.state.log_history
            record = {"train_seconds": elapsed, **counts, "steps": self.state.global_step,
                      "losses": [entry["loss"] for entry in history if "loss" in entry], "settings": describe(self),
                      "rss_at_train_start": at_start.get("VmRSS"), "peak_before_train": at_start.get("VmHWM"),
                      "peak_at_train_end": memory_status().get("VmHWM")}
            with open(OUT, "w", encoding="utf-8") as handle:
                json.dump(record, handle)

    trainer_class.train = train


class _WaitForTrainer(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            patch(module.Trainer)

        spec.loader.exec_module = exec_module
        return spec


if OUT:
    sys.meta_path.insert(0, _WaitForTrainer())

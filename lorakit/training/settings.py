"""What lorakit decides for every training command's Trainer arguments, whichever config class takes them.

`sft` (trl.SFTConfig), `dpo` (trl.DPOConfig) and `classify` (transformers.TrainingArguments) start from the
recipe's `training:` section as the user wrote it, with these settings filled in where the recipe is silent;
each command then adds its own (packing, the metric to keep the best adapter by, ...).
"""

from __future__ import annotations

from typing import Any


def machine_settings(training: dict, placement, quantized: bool) -> dict[str, Any]:
    """A copy of `training:` with the device, precision, checkpointing and lorakit's own guarantees filled in."""
    settings = dict(training)
    on_gpu = placement.device in ("cuda", "xpu")
    if placement.device == "cpu":
        settings["use_cpu"] = True
    if not quantized:
        # Mixed precision only where there are kernels for it; a CPU run keeps the weights' own dtype.
        settings.setdefault("bf16", placement.dtype == "bfloat16" and on_gpu)
        settings.setdefault("fp16", placement.dtype == "float16" and on_gpu)
    else:
        # bitsandbytes computes in the dtype the base was loaded in: autocast must agree with it.
        settings.setdefault("bf16", placement.dtype == "bfloat16")
        settings.setdefault("fp16", False)
    # Checkpointing trades ~30% speed for activation memory; on CPU memory is rarely the limit (measured 20x slower).
    # `gradient_checkpointing` is transformers' deprecated alias of `activation_checkpointing`; a recipe may use either.
    alias = settings.pop("gradient_checkpointing", None)
    settings.setdefault("activation_checkpointing", on_gpu if alias is None else alias)
    settings.setdefault("per_device_eval_batch_size", settings.get("per_device_train_batch_size", 8))
    # lorakit prunes checkpoints itself, and only once a newer one is complete (guards.MarkCompleteCheckpoints).
    settings.pop("save_total_limit", None)
    # lorakit's retry keeps the global batch (guards.train); transformers' own would shrink it 10% per retry.
    settings.pop("auto_find_batch_size", None)
    # A NaN loss is a failure to report (guards.StopOnDivergence), not a value to smooth over in the log.
    settings.setdefault("logging_nan_inf_filter", False)
    # Every LoRA weight takes part in every step; looking for unused ones costs a graph traversal per step.
    settings.setdefault("ddp_find_unused_parameters", False)
    return settings


def eval_on_loss(settings: dict, recipe) -> None:
    """sft's and dpo's evaluation schedule: every quarter of the run, or every tenth with early stopping, which
    keeps the adapter with the lowest eval loss."""
    if recipe.early_stopping:
        settings.setdefault("eval_strategy", "steps")
        settings.setdefault("eval_steps", 0.1)
        settings.setdefault("save_strategy", settings["eval_strategy"])
        settings.setdefault("save_steps", settings["eval_steps"])
        settings.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    elif recipe.has_eval:
        settings.setdefault("eval_strategy", "steps")
        settings.setdefault("eval_steps", 0.25)

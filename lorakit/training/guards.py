"""What keeps a training run trustworthy: stop signals, divergence, complete checkpoints, running out of memory.

Three trainer callbacks and the call that runs training:
- `StopOnSignal`: the first SIGTERM/SIGINT saves a checkpoint at the next step boundary and stops (exit 75);
  a second one exits at once.
- `StopOnDivergence`: a NaN or infinite loss, gradient norm or weight stops the run before it is saved.
- `StopOnStall`: a gradient norm of exactly 0, or a logged loss that no longer moves, for `STALL_STEPS` steps
  stops the run the same way: a dead run must not end "done" and be pushed.
- `MarkCompleteCheckpoints`: a checkpoint counts for resuming only once lorakit's marker is written, after
  every other file of it; old checkpoints are pruned only after the new one is marked.
- `train`: trainer.train(), turning a CUDA out-of-memory error into advice (or a retry with a smaller
  micro-batch and the same global batch, when the recipe sets training.auto_find_batch_size).
"""

from __future__ import annotations

import gc
import math
import os
import signal
import threading
from pathlib import Path
from typing import Any

import click

from lorakit.training import run_dir
from lorakit.training.launch import is_main_process
from lorakit.errors import (EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_OUT_OF_MEMORY, OutOfMemory,  # noqa: F401
                            RunInterrupted, TrainingDiverged, TrainingStalled)

class Callback:
    """transformers.TrainerCallback's interface without importing transformers when lorakit starts.

    The Trainer calls every event on every callback; events a guard does not define do nothing.
    """

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return _ignore_event
        raise AttributeError(name)


def _ignore_event(*args: Any, **kwargs: Any) -> None:
    return None


# ---------------------------------------------------------------- preemption


class StopOnSignal(Callback):
    """SIGTERM or SIGINT: finish the optimizer step under way, save a resumable checkpoint, stop. Again: exit now.

    Use as a context manager around training; handlers are only installed from the main thread (Python's rule).
    Under torchrun every process gets the signal, possibly during different steps, so the processes agree at
    each step end (one all-reduce of a flag) and all stop at the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self.stopped_at_step: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            _say(f"lorakit: second {name}: stopping now, without a checkpoint; the rerun resumes from the last "
                 "complete one\n")
            os._exit(128 + signum)  # what a shell reports for a process the signal ended
        self.received = signum
        if is_main_process():  # a launcher signals every process: the main one says it once
            _say(f"lorakit: {name} received: saving a checkpoint at the end of this step, then stopping "
                 f"(send {name} again to stop at once)\n")

    def on_step_end(self, args, state, control, **kwargs):
        if _on_any_process(self.received is not None, args.device):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at_step = state.global_step
        return control


def _say(text: str) -> None:
    # os.write, not print: a signal handler may run while the main code is inside a print to the same stream,
    # and Python's buffered streams refuse that re-entry with an error.
    try:
        os.write(2, text.encode())
    except OSError:
        pass


def _on_any_process(flag: bool, device: Any) -> bool:
    """True when `flag` is true on any process of a distributed run; `flag` itself otherwise."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# ---------------------------------------------------------------- divergence


class StopOnDivergence(Callback):
    """Raise TrainingDiverged at the first non-finite loss, gradient norm or trainable weight.

    Gradients are checked every optimizer step, before the optimizer applies them, whatever logging_steps is:
    a NaN or infinite loss always makes the gradients non-finite, so the step it happens at is named and no
    checkpoint of it is written. With fp16 the loss scaler skips steps with infinite gradients by design, so
    there only the weights (every step) and the logged loss are checked.
    """

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16 or model is None:
            return
        norm = _gradient_norm(model)
        if _on_any_process(norm is not None and not math.isfinite(norm), args.device):
            raise self.diverged(state.global_step + 1, f"the gradient norm is {norm}", args)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and _on_any_process(not _weights_finite(model), args.device):
            raise self.diverged(state.global_step, "trainable weights became NaN or infinite", args)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise self.diverged(state.global_step, f"the logged {key.replace('_', ' ')} is {value}", args)

    @staticmethod
    def diverged(step: int, what: str, args) -> TrainingDiverged:
        last = run_dir.latest_complete_checkpoint(args.output_dir)
        kept = (f"the last good checkpoint, {last.name}, is kept" if last else "no checkpoint was saved before it")
        return TrainingDiverged(
            f"training diverged at step {step}: {what}. Nothing of that step was saved; {kept}, and the output "
            "folder is marked failed. Usual causes: a learning rate too high for this model (try "
            "training.learning_rate 10x lower), fp16 overflow (prefer bf16), or broken rows in the data.")


# ---------------------------------------------------------------- a run that stopped learning

# Optimizer steps in a row with a gradient norm of exactly 0, or steps over which the logged loss has not changed,
# after which a run counts as dead. A learning rate of 1e8 saturates a small model's activations at step 1: from
# then on every gradient is exactly 0 and the loss sits at ln(vocabulary size), with nothing NaN to notice. A live
# run never repeats its loss exactly over different batches, nor has a gradient of exactly 0 for 10 steps.
STALL_STEPS = 10
STALL_LOGS = 3  # logged losses, at least, before an unchanged loss counts
STALL_LOSS_TOLERANCE = 1e-5  # relative: a dead model's loss still wobbles in float32's last digits


class StopOnStall(Callback):
    """Raise TrainingStalled when the gradient norm has been exactly 0, or the logged loss the same, for
    `steps` steps in a row."""

    def __init__(self, steps: int | None = None) -> None:
        self.steps = steps or STALL_STEPS
        self.zero_since: int | None = None  # first step of the current stretch of zero gradient norms
        self.loss: float | None = None
        self.loss_since: int | None = None  # step at which the logged loss took its current value
        self.loss_logs = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        norm = _gradient_norm(model)
        if norm is None:  # gradients not visible to callbacks (DeepSpeed): the loss check remains
            return
        step = state.global_step + 1
        if _on_any_process(norm != 0.0, args.device):
            self.zero_since = None
            return
        self.zero_since = self.zero_since or step
        if step - self.zero_since + 1 >= self.steps:
            raise self.stalled(step, f"the gradient norm has been exactly 0 for {step - self.zero_since + 1} "
                                     f"optimizer steps in a row (since step {self.zero_since})", args, model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        loss = (logs or {}).get("loss")
        if not isinstance(loss, (int, float)):
            return
        if self.loss is None or abs(loss - self.loss) > STALL_LOSS_TOLERANCE * max(1.0, abs(self.loss)):
            self.loss, self.loss_since, self.loss_logs = loss, state.global_step, 1
            return
        self.loss_logs += 1
        if self.loss_logs >= STALL_LOGS and state.global_step - self.loss_since >= self.steps:
            raise self.stalled(state.global_step, f"the logged loss has stayed at {loss:.4f} since step "
                                                  f"{self.loss_since} ({self.loss_logs} logs in a row)", args, model)

    def stalled(self, step: int, what: str, args, model) -> TrainingStalled:
        vocabulary = getattr(getattr(model, "config", None), "vocab_size", None)
        uniform = ""
        if self.loss is not None and vocabulary and abs(self.loss - math.log(vocabulary)) < 0.01:
            uniform = (f"; the loss sits at {self.loss:.3f}, ln of the vocabulary size ({vocabulary}): the model "
                       "gives every token the same probability")
        return TrainingStalled(
            f"training stalled at step {step}: {what}{uniform}. The model has stopped learning. Likely cause: a "
            f"learning rate far too high (training.learning_rate is {args.learning_rate:g}; LoRA usually takes "
            "1e-5 to 1e-2) saturated the model in its first steps; or the trained weights receive no gradient. "
            "The output folder is marked failed, so push refuses it; its checkpoints hold the stalled adapter, so "
            "start over with a lower learning rate (--no-resume --overwrite).")


def _gradient_norm(model) -> float | None:
    """The global L2 norm of the trainable parameters' gradients, None when none are visible (DeepSpeed).

    Summed in float64: finite exactly when every gradient element is (float32 squares cannot overflow it).
    """
    import torch

    grads = [p.grad.detach() for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return None
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])
    return float(torch.linalg.vector_norm(norms))


def _weights_finite(model) -> bool:
    import torch

    checks = [torch.isfinite(p.detach()).all() for p in model.parameters() if p.requires_grad]
    return bool(torch.stack(checks).all()) if checks else True


# ---------------------------------------------------------------- complete checkpoints


class MarkCompleteCheckpoints(Callback):
    """After transformers has written a checkpoint (model, optimizer, scheduler, RNG, trainer state: on_save comes
    after all of them), flush it and write lorakit's marker; then prune old complete checkpoints to `keep`.

    Must come after StopOnSignal among the callbacks: it looks at the save that callback may have asked for.
    """

    def __init__(self, keep: int | None) -> None:
        self.keep = keep

    def on_step_end(self, args, state, control, **kwargs):
        self._withdraw_marker_if_saving(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._withdraw_marker_if_saving(args, state, control)

    def _withdraw_marker_if_saving(self, args, state, control) -> None:
        # A save at a step that already has a complete checkpoint (the step a run was resumed from) rewrites its
        # files in place: withdraw the marker first, so a kill during that save cannot leave a trusted mix.
        if control.should_save and state.is_world_process_zero:
            run_dir.unmark(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every process has written its part (each writes its own RNG state)
        if state.is_world_process_zero:
            run_dir.mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)
            run_dir.prune_checkpoints(args.output_dir, self.keep, protect=state.best_model_checkpoint)


# ---------------------------------------------------------------- training, out of memory


def train(trainer, resume_from: Path | None, recipe, *, retry_smaller_batch: bool) -> Any:
    """trainer.train() from `resume_from`; out of memory ends in advice naming what to change, or, with
    `retry_smaller_batch`, in a retry with a smaller micro-batch and more accumulation (the same global batch),
    from the last complete checkpoint, or from the start with the adapter's initial weights restored.
    """
    initial_weights = _trainable_weights(trainer.model) if retry_smaller_batch else None
    try:
        while True:
            try:
                return trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                args = trainer.args
                smaller = smaller_micro_batch(args.per_device_train_batch_size)
                if initial_weights is None or smaller is None or args.world_size > 1:
                    raise OutOfMemory(out_of_memory_advice(recipe, trainer, trainer.state.global_step + 1)) from None
            # Retried outside the except block, so the failed attempt's frames and their tensors are freed.
            resume_from = _shrink_micro_batch(trainer, smaller, initial_weights)
    finally:
        # What the run writes from here on (adapter, tokenizer, card, plot) goes into its manifest (run_dir).
        if trainer.is_world_process_zero():
            run_dir.mark_training_ended(trainer.args.output_dir)


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    # MPS and some XPU builds raise a plain RuntimeError
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def smaller_micro_batch(micro_batch: int) -> int | None:
    """The largest divisor below `micro_batch` (8 -> 4, 6 -> 3, 3 -> 1), so the global batch stays exact."""
    for candidate in range(micro_batch // 2, 0, -1):
        if micro_batch % candidate == 0:
            return candidate
    return None


def _shrink_micro_batch(trainer, smaller: int, initial_weights: dict) -> Path | None:
    import torch

    args = trainer.args
    before, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    global_batch = before * accumulation
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    args.per_device_train_batch_size = smaller
    args.gradient_accumulation_steps = global_batch // smaller
    # transformers reads the per-step batch from this attribute (its own auto_find_batch_size sets it the same way)
    trainer._train_batch_size = args.train_batch_size
    trainer.optimizer, trainer.lr_scheduler = None, None  # rebuilt for the new attempt
    _restore_trainable_weights(trainer.model, initial_weights)
    resume_from = run_dir.latest_complete_checkpoint(args.output_dir)
    click.echo(f"lorakit: out of memory with micro-batch {before}; retrying with {smaller} x "
               f"{args.gradient_accumulation_steps} accumulation (global batch {global_batch} unchanged), "
               + (f"from {resume_from.name}" if resume_from else "from the start"))
    run_dir.update_record(args.output_dir, micro_batch={
        "per_device_train_batch_size": smaller, "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "reason": f"out of memory with per_device_train_batch_size {before}"})
    return resume_from


def _trainable_weights(model) -> dict:
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def _restore_trainable_weights(model, weights: dict) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in weights:
                p.copy_(weights[name].to(p.device))
            p.grad = None


def out_of_memory_advice(recipe, trainer, step: int) -> str:
    """What to change, most effective first, written as the overrides to type."""
    args = trainer.args
    micro, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    max_length, truncation = recipe.data["max_length"], recipe.data["truncation"]
    quantization = recipe.quantization or {}
    checkpointing = bool(getattr(args, "activation_checkpointing", None)
                         or getattr(args, "gradient_checkpointing", None))
    bits = "4-bit" if quantization.get("load_in_4bit") else "8-bit" if quantization.get("load_in_8bit") else "no"
    lines = [f"out of memory at step {step} (micro-batch {micro} x {max_length} tokens"
             + (" packed" if getattr(args, "packing", False) else "")
             + f", gradient checkpointing {'on' if checkpointing else 'off'}, {bits} quantization). "
             "Try, in this order:"]
    smaller = smaller_micro_batch(micro)
    if smaller:
        lines.append(f"  training.per_device_train_batch_size={smaller} "
                     f"training.gradient_accumulation_steps={micro * accumulation // smaller} "
                     f"(the same {micro * accumulation} sequences per step and process)")
    if not checkpointing:
        lines.append("  training.activation_checkpointing=true (keeps far fewer activations, about 30% slower)")
    cut = {"truncate": "truncated", "drop": "left out", "error": "refused"}[truncation]
    lines.append(f"  data.max_length={max(8, max_length // 2)} (longer rows are then {cut}: data.truncation)")
    if not quantization.get("load_in_4bit"):
        lines.append("  quantization.load_in_4bit=true (QLoRA: the base weights in 4 bits, about a quarter of the "
                     "memory)")
    if smaller and not recipe.training.get("auto_find_batch_size"):
        lines.append("Or set training.auto_find_batch_size: true: lorakit then halves the micro-batch by itself and "
                     "raises gradient accumulation to keep the global batch.")
    last = run_dir.latest_complete_checkpoint(args.output_dir)
    if last:
        lines.append(f"The last complete checkpoint, {last.name}, is kept; a changed recipe resumes from it only "
                     "with --resume-changed.")
    return "\n".join(lines)

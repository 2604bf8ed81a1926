"""The LM head on a CPU: only the positions that are trained, through PyTorch's own log-softmax.

trl's SFTTrainer and DPOTrainer replace the model's forward with a fused LM head (trl.trainer.utils.
add_fused_lm_head) that returns per-token log-probabilities without materializing the logits. On a GPU with Triton
it scores only the positions whose label is not -100 with fused kernels. Without Triton (the CPU) it scores every
position (prompt and padding included, so that tile shapes stay fixed for compilers that would otherwise
recompile) in tiles of 4,096 tokens x 32,768 vocabulary entries, each folded by about ten separate torch
operations and recomputed in the backward pass. Measured on this project's 2-core CPU (benchmarks/lm_head.py),
that head takes 3-4x the time and several times the memory of the same log-probabilities computed on the trained
positions alone with one matrix product and ATen's log-softmax.

`score_trained_positions_only` wraps trl's forward: a call with `fused_lm_head=True` on a plain LM head (no logit
soft-capping or scaling, no router logits, no pre-shifted labels) runs the backbone, takes the hidden states of the
trained positions, and returns what trl's head returns (trl's `FusedCausalLMOutput`: per-token log-probabilities,
zero where the label is -100, and the statistics its trainers log), so trl's losses, metrics and normalization are
untouched. Everything else goes to trl's forward unchanged.
"""

from __future__ import annotations

import functools
import types
from typing import Any

# Rows of log-probabilities folded at once into the logged statistics: bounds their temporaries to a slice.
STATISTICS_ROWS = 1024
# Config fields with which a model scales or caps its logits before the softmax (trl's head applies them).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")


def score_trained_positions_only(trainer: Any, outputs: tuple[str, ...]) -> list[Any]:
    """Wrap the fused LM head trl gave the trainer's model (and its separate reference model, if any) so that on a
    CPU only trained positions are scored. `outputs`: the per-token fields the trainer reads besides the
    log-probabilities. Returns the models wrapped (none where trl's head is not there or the model is not plain)."""
    from peft import PeftModel

    models = [trainer.model, getattr(trainer, "ref_model", None)]
    wrapped = []
    for model in models:
        if model is None:
            continue
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        if wraps_cleanly(base):
            base.forward = types.MethodType(trained_positions_forward(base.forward, outputs, type(base).forward), base)
            wrapped.append(base)
    return wrapped


def wraps_cleanly(model: Any) -> bool:
    """trl's fused head is installed (an instance-level forward), the head sits on the CPU, and the logits are the
    head's output as is (what this module computes)."""
    head = model.get_output_embeddings()
    if "forward" not in vars(model) or head is None or head.weight.device.type != "cpu":
        return False
    config = model.config.get_text_config()
    if getattr(config, "output_router_logits", False):
        return False
    return all(getattr(config, name, None) in (None, 1, 1.0) for name in LOGIT_TRANSFORMS)


def trained_positions_forward(trl_forward: Any, outputs: tuple[str, ...], signature_of: Any) -> Any:
    @functools.wraps(signature_of)  # generate() checks its keyword arguments against the model's own signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or shift_labels is not None or kwargs.get("output_router_logits"):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        return score_positions(self.get_output_embeddings(), hidden, labels, outputs, num_items_in_batch)

    return forward


def score_positions(head: Any, hidden: Any, labels: Any, outputs: tuple[str, ...], num_items_in_batch: Any) -> Any:
    """trl's FusedCausalLMOutput for next-token `labels` ([batch, positions], -100 where not trained)."""
    import torch
    import torch.nn.functional as F
    from trl.trainer.utils import FusedCausalLMOutput

    mask = labels != -100
    targets = labels[mask]
    # The projection in trl's compute dtype (autocast's, else the hidden states'; the head may differ, e.g. a QLoRA
    # base's), the log-softmax in float32, as trl's head accumulates: a bfloat16 log-softmax loses the loss's digits.
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    bias = None if head.bias is None else head.bias.to(dtype)
    logits = F.linear(hidden[mask].to(dtype), head.weight.to(dtype), bias).float()
    with torch.no_grad():
        mean_logits = logits.mean(-1) if "mean_logits" in outputs else None
    log_probs_all = logits.log_softmax(-1)
    del logits  # the log-softmax's backward needs only its output: the logits' memory goes now
    picked = log_probs_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    statistics = {**position_statistics(log_probs_all.detach(), targets, outputs), "mean_logits": mean_logits}
    # masked_scatter keeps the result connected to the graph even when no position is trained (a zero loss).
    log_probs = picked.new_zeros(mask.shape).masked_scatter(mask, picked)
    per_token = {name: (None if value is None else value.new_zeros(mask.shape).masked_scatter(mask, value))
                 for name, value in statistics.items()}
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, label_mask=mask, **per_token)


def position_statistics(log_probs: Any, targets: Any, outputs: tuple[str, ...]) -> dict[str, Any]:
    """Entropy, log(sum p^2) and whether the target is the first most probable token, as trl's head returns them
    for the trainers' metrics (None where not in `outputs`); without gradients, a slice of rows at a time."""
    import torch

    folds = {"entropy": lambda rows, _: -(rows.exp() * rows).sum(-1),
             "log_sum_sq_probs": lambda rows, _: torch.logsumexp(2 * rows, dim=-1),
             "is_top1": lambda rows, row_targets: rows.argmax(-1) == row_targets}  # argmax: the first maximum
    result = {}
    with torch.no_grad():
        for name, fold in folds.items():
            if name not in outputs:
                result[name] = None
                continue
            parts = [fold(rows, row_targets) for rows, row_targets
                     in zip(log_probs.split(STATISTICS_ROWS), targets.split(STATISTICS_ROWS))]
            result[name] = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool if name == "is_top1"
                                                                           else log_probs.dtype)
    return result

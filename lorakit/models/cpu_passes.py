"""Fewer passes over memory in a CPU training step: RMSNorm, rotary embeddings and LoRA's scaled sum.

On a CPU, a LoRA step's matrix products already run at the core's BLAS rate; what is left is the element-wise
work around them, bound by memory bandwidth, where each separate torch operation is one more pass over a tensor
of the whole micro-batch. On GPUs Liger's Triton kernels fuse these (`benchmarks/gpu.py` measures them); nothing
does on a CPU without compiling (torch.compile's start-up costs more than a short run gains). Here, with the same
arithmetic in fewer, in-place passes:

    RMSNorm (transformers' Llama form, frozen weight)  5 passes forward, ~10 backward  ->  2 forward, 3 backward
    rotary embedding (`apply_rotary_pos_emb`)          q*cos + cat(-q2, q1)*sin          ->  one product + 2 addcmul
    LoRA (peft's Linear): base + B(A(x)) * scaling     a product, a scaling, a sum     ->  one addmm with alpha

Measured on the packed benchmark job, one thread, alternating step by step: 1.05x (benchmarks/cpu_passes.py;
docs/benchmarks.md). Each replacement is checked first against the original on a probe input, forward and
backward, and applies only where they agree; anything else at run time (another dtype, a trained norm weight,
DoRA, several adapters, partial rotary) takes the original path. Only for float32 training on a CPU, and undone
when the run ends.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any

PROBE_TOLERANCE = 1e-5  # relative: float32 rounding of a differently ordered sum


class Replaced:
    """What was replaced (names for the run summary); leaving the `with` block puts the originals back."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._undo: list[Any] = []

    def __enter__(self) -> Replaced:
        return self

    def __exit__(self, *exc: Any) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def use_fewer_passes(model: Any, placement: Any) -> Replaced:
    """Replace, in `model`, what this module computes in fewer passes (CPU, float32 only)."""
    replaced = Replaced()
    if placement.device != "cpu" or placement.dtype != "float32":
        return replaced
    import torch

    with torch.random.fork_rng():  # the probes draw random numbers; the run's seed stays where it was
        torch.manual_seed(0)
        for name, install in (("RMSNorm", install_rms_norm), ("rotary embeddings", install_rotary),
                              ("LoRA sum", install_lora_sum)):
            if install(model, replaced):
                replaced.names.append(name)
    return replaced


# RMSNorm ---------------------------------------------------------------------------------------------------------

def rms_norm_function() -> Any:
    import torch

    class FrozenWeightRMSNorm(torch.autograd.Function):
        """y = w * x / sqrt(mean(x^2) + eps); the gradient for x only (the weight is frozen)."""

        @staticmethod
        def forward(ctx, x, weight, eps):
            inverse = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps)
            inverse.rsqrt_()
            ctx.save_for_backward(x, inverse, weight)
            return (x * inverse).mul_(weight)

        @staticmethod
        def backward(ctx, grad):
            x, inverse, weight = ctx.saved_tensors
            scaled = grad * weight
            coefficient = torch.linalg.vecdot(scaled, x).unsqueeze_(-1).mul_(inverse.pow(3)).div_(x.shape[-1])
            return scaled.mul_(inverse).addcmul_(x, coefficient, value=-1), None, None

    return FrozenWeightRMSNorm


def install_rms_norm(model: Any, replaced: Replaced) -> bool:
    import torch

    function = rms_norm_function()
    agreed: dict[type, bool] = {}
    count = 0
    for module in model.modules():
        kind = type(module)
        if not kind.__name__.endswith("RMSNorm") or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if not isinstance(eps, float) or module.weight.dim() != 1 or "forward" in vars(module):
            continue
        if kind not in agreed:  # one probe per class: Gemma's (1 + weight), for one, does not agree and is left
            agreed[kind] = probe_agrees(module.forward, lambda x, m=module, e=eps: function.apply(x, m.weight, e),
                                        (torch.randn(2, 3, module.weight.shape[0]),))
        if agreed[kind]:
            original = module.forward
            module.forward = types.MethodType(rms_norm_forward(function, eps, original), module)
            replaced._undo.append(lambda m=module: vars(m).pop("forward", None))
            count += 1
    return count > 0


def rms_norm_forward(function: Any, eps: float, original: Any) -> Any:
    import torch

    def forward(self, hidden_states):
        weight = self.weight
        if hidden_states.dtype != torch.float32 or weight.dtype != torch.float32 or weight.requires_grad:
            return original(hidden_states)
        return function.apply(hidden_states, weight, eps)

    return forward


# Rotary embeddings -----------------------------------------------------------------------------------------------

ROTARY_PARAMETERS = ["q", "k", "cos", "sin", "unsqueeze_dim"]


def rotary_function() -> Any:
    import torch

    class Rotary(torch.autograd.Function):
        """x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1); cos and sin are not trained."""

        @staticmethod
        def forward(ctx, x, cos, sin):
            half = x.shape[-1] // 2
            out = x * cos
            out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
            out[..., half:].addcmul_(x[..., :half], sin[..., half:])
            ctx.save_for_backward(cos, sin)
            return out

        @staticmethod
        def backward(ctx, grad):
            cos, sin = ctx.saved_tensors
            half = grad.shape[-1] // 2
            result = grad * cos
            result[..., :half].addcmul_(grad[..., half:], sin[..., half:])
            result[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
            return result, None, None

    return Rotary


def plain_function(candidate: Any) -> Any:
    """The Python function behind `candidate`. Where the `kernels` package is installed (transformers 5.25 requires
    it), `@use_kernel_forward_from_hub` turns a modeling function into a module instance that calls the function
    unless a hub kernel was swapped in; its signature is then (*args, **kwargs), so look at the function it wraps."""
    if inspect.isfunction(candidate) or not hasattr(type(candidate), "kernel_layer_name"):
        return candidate
    return inspect.getclosurevars(type(candidate).forward).nonlocals.get("func", candidate)


def install_rotary(model: Any, replaced: Replaced) -> bool:
    """The model's own modeling module's `apply_rotary_pos_emb` (looked up there at each call by its attention)."""
    import torch

    modeling = sys.modules.get(type(unwrap(model)).__module__)
    original = getattr(modeling, "apply_rotary_pos_emb", None)
    if original is None or getattr(original, "_lorakit_original", None) is not None:
        return False
    try:
        if list(inspect.signature(plain_function(original)).parameters) != ROTARY_PARAMETERS:
            return False  # partial rotary and other variants take other arguments
    except (TypeError, ValueError):
        return False
    function = rotary_function()

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if (q.dtype != torch.float32 or k.dtype != torch.float32 or cos.requires_grad or sin.requires_grad
                or cos.shape[-1] != q.shape[-1] or k.shape[-1] != q.shape[-1] or q.shape[-1] % 2):
            return original(q, k, cos, sin, unsqueeze_dim)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return function.apply(q, cos, sin), function.apply(k, cos, sin)

    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    angles = torch.randn(2, 5, 4)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    if not probe_agrees(lambda q, k: original(q, k, cos, sin), lambda q, k: apply_rotary_pos_emb(q, k, cos, sin),
                        (q, k)):
        return False
    apply_rotary_pos_emb._lorakit_original = original
    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb
    replaced._undo.append(lambda: setattr(modeling, "apply_rotary_pos_emb", original))
    return True


# LoRA's scaled sum -----------------------------------------------------------------------------------------------

def install_lora_sum(model: Any, replaced: Replaced) -> bool:
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if type(module) is Linear and "forward" not in vars(module):  # peft's plain Linear, not a quantized one
            module.forward = types.MethodType(lora_sum_forward(module.forward), module)
            replaced._undo.append(lambda m=module: vars(m).pop("forward", None))
            count += 1
    return count > 0


def lora_sum_forward(original: Any) -> Any:
    import torch

    def forward(self, x, *args, **kwargs):
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return original(x, *args, **kwargs)
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant:
            return original(x, *args, **kwargs)  # DoRA and the other variants
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        if lora_b.bias is not None or x.dtype != torch.float32 or lora_a.weight.dtype != torch.float32:
            return original(x, *args, **kwargs)  # a LoRA bias, other dtypes
        result = self.base_layer(x)
        if result.dtype != torch.float32:
            return original(x, *args, **kwargs)
        middle = lora_a(self.lora_dropout[name](x))
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), middle.reshape(-1, middle.shape[-1]),
                           lora_b.weight.t(), alpha=self.scaling[name])
        return flat.view(result.shape)

    return forward


# Shared ----------------------------------------------------------------------------------------------------------

def probe_agrees(original: Any, replacement: Any, inputs: tuple) -> bool:
    """Same outputs and the same input gradients, within float32 rounding, on a random probe."""
    import torch

    results = []
    for run in (original, replacement):
        leaves = [tensor.clone().requires_grad_() for tensor in inputs]
        try:
            outputs = run(*leaves)
        except Exception:  # noqa: BLE001 - a probe that does not run means "does not agree"
            return False
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        torch.autograd.backward(outputs, [torch.ones_like(output).mul_(0.5).add_(output.detach())
                                          for output in outputs])
        results.append([*(output.detach() for output in outputs), *(leaf.grad for leaf in leaves)])
    return len(results[0]) == len(results[1]) and all(
        a is not None and b is not None and a.shape == b.shape
        and float((a - b).abs().max()) <= PROBE_TOLERANCE * max(1.0, float(a.abs().max()))
        for a, b in zip(*results))


def unwrap(model: Any) -> Any:
    """The transformers model inside a peft wrapper."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model

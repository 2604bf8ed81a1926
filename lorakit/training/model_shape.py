"""The sizes of a model with its LoRA adapter, counted from its config alone.

The model is built on PyTorch's meta device (no memory, no download of weights) and wrapped by peft with the
recipe's own LoraConfig, so the parameter counts are exact and LoRA's targets follow peft's own matching rules
(all-linear, exclude_modules, modules_to_save, ...). lorakit.training.memory sizes a training step from them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any


@dataclass
class ModelShape:
    """Sizes of a model with its LoRA adapter, counted on the meta device."""

    total_params: int  # the base model's parameters (tied weights once)
    quantizable_params: int  # in the linear layers bitsandbytes quantizes (all but the output head)
    quantizable_rows: int  # their output features: 8-bit keeps one float32 scale per row
    largest_linear: int  # elements of the biggest of those: a quantized weight is dequantized one at a time
    trainable_params: int  # LoRA weights (and modules_to_save copies)
    layers: int
    layer_params: int  # one decoder layer's parameters
    layer_quantizable_params: int
    hidden: int
    intermediate: int
    heads: int
    attention_width: int  # heads x head_dim
    kv_width: int  # key/value heads x head_dim
    vocab: int
    up_projections: int  # linear layers into the MLP's intermediate size: 2 for gated MLPs (Llama), 1 otherwise
    norms_per_layer: int
    lora_input_features: int  # summed over one layer's LoRA-wrapped linear layers
    lora_ranks: int  # summed r over one layer's LoRA-wrapped linear layers



def model_shape(config: Any, lora: dict, classifier: dict | None = None) -> ModelShape:
    """Count a model's parameters from its config, with `lora` (peft.LoraConfig keyword arguments) applied.

    `classifier` ({"num_labels": N, "head_only": bool}) sizes the model `lorakit classify` trains instead: the
    base with a new head of N outputs, trained in full beside the LoRA (or alone, head_only), as
    lorakit.models.classifier builds it."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if classifier is None:
            model = AutoModelForCausalLM.from_config(config)
        else:
            config = copy.deepcopy(config)
            config.num_labels = classifier["num_labels"]
            model = AutoModelForSequenceClassification.from_config(config)
    if classifier is None:
        heads = [model.get_output_embeddings()]
    else:
        from lorakit.models.classifier import HEAD_MODULES

        heads = [m for name, m in model.named_modules() if name.rpartition(".")[2] in HEAD_MODULES]
    head_parts = {id(m) for head in heads for m in head.modules()}
    total = sum(p.numel() for p in model.parameters())
    # The LM head, or a classifier's head, stays unquantized (bitsandbytes skips it; lorakit trains a new one).
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in head_parts]
    layers = _decoder_layers(model)
    layer = layers[0]
    layer_params = sum(p.numel() for p in layer.parameters())
    layer_linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]

    with warnings.catch_warnings():
        # peft 0.21 itself reads transformers' renamed `is_gradient_checkpointing`; nothing in this call can avoid it.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if classifier is None:
            settings = {"task_type": "CAUSAL_LM", **lora}
            peft_model = get_peft_model(model, LoraConfig(**settings), low_cpu_mem_usage=True)
        else:
            from lorakit.models.classifier import build_trainable_model

            names = [name for name, m in model.named_modules() if m in heads]
            peft_model = build_trainable_model(model, lora, names, classifier["head_only"])
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    wrapped = [m for m in layer.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]

    text = config.get_text_config()
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    ups = sum(1 for m in layer_linears if m.out_features == intermediate) or 1
    return ModelShape(
        total_params=total,
        quantizable_params=sum(m.weight.numel() for m in linears),
        quantizable_rows=sum(m.out_features for m in linears),
        largest_linear=max((m.weight.numel() for m in linears), default=0),
        trainable_params=trainable,
        layers=len(layers),
        layer_params=layer_params,
        layer_quantizable_params=sum(m.weight.numel() for m in layer_linears),
        hidden=hidden,
        intermediate=intermediate,
        heads=heads,
        attention_width=heads * head_dim,
        kv_width=kv_heads * head_dim,
        vocab=text.vocab_size if classifier is None else classifier["num_labels"],  # the head's outputs
        up_projections=ups,
        norms_per_layer=sum(1 for m in layer.modules() if "norm" in type(m).__name__.lower()),
        lora_input_features=sum(m.base_layer.in_features for m in wrapped if hasattr(m.base_layer, "in_features")),
        lora_ranks=sum(sum(m.r.values()) for m in wrapped),
    )


def _decoder_layers(model: Any) -> Any:
    """The model's stack of decoder layers: its longest list of modules."""
    import torch

    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no list of decoder layers to size")
    return max(stacks, key=len)

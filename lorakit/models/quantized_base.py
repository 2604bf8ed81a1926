"""What a QLoRA run's adapter is merged into: the base's original weights, or the dequantized 4-bit ones it
was trained against.

A QLoRA adapter was trained against the NF4-rounded base weights, not the original 16/32-bit ones. `merge --into
dequantized` merges it into exactly the weights it saw (transformers' `dequantize()` of the base loaded with the
run's own BitsAndBytesConfig), `--into original` into the unrounded ones; docs/merge.md has the measurement that
chose the default.
"""

from __future__ import annotations

from typing import Any

from lorakit.errors import LorakitError

INTO = ("original", "dequantized")
# Chosen by the measurement in docs/merge.md (the quickstart trained as QLoRA, held-out exact match and loss).
DEFAULT_QLORA_INTO = "dequantized"


def choose_into(into: str | None, quantization: dict | None) -> str:
    """What to merge into: the flag's choice, else the default for the run's kind."""
    quantized = bool(quantization and (quantization.get("load_in_4bit") or quantization.get("load_in_8bit")))
    if into == "dequantized" and not quantized:
        raise LorakitError("--into dequantized: the run was not quantized (no quantization section in its recipe), "
                           "so its base has no dequantized weights; merge it as it is (--into original, the default)")
    if into is not None:
        return into
    return DEFAULT_QLORA_INTO if quantized else "original"


def load_dequantized_base(section: dict, quantization: dict, placement) -> Any:
    """The base loaded as the run trained on it (its quantization section), then dequantized by transformers into
    placement.dtype: the weights the adapter was trained against, as a plain model."""
    from transformers import AutoModelForCausalLM

    from lorakit.models.loading import build_quantization_config, keep_unpacked_where_packing_fails

    config = build_quantization_config(quantization, placement)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            section["name_or_path"], revision=section.get("revision"), dtype=placement.torch_dtype,
            trust_remote_code=section.get("trust_remote_code", False), quantization_config=config,
            device_map={"": placement.device}, attn_implementation=placement.attn_implementation,
            use_safetensors=True)
    except (ImportError, OSError, RuntimeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LorakitError(f"--into dequantized: cannot load {section['name_or_path']} quantized as in training "
                           f"({reason}); merge into the original weights with --into original") from None
    keep_unpacked_where_packing_fails(model)
    model = model.dequantize()
    return model.to(placement.torch_dtype)

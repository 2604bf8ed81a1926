"""Device, dtype and attention choice; loading the tokenizer (with its chat template) and the base model."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEMPLATES_DIR = Path(__file__).parent / "templates"
# Attention with variable-length kernels: packed sequences cost what they would cost apart. With sdpa or eager,
# trl's padding-free packing becomes one long row whose attention grows with the square of the whole batch.
PACKABLE_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")
# Tokens that tokenizers ship for padding; preferred over reusing EOS so the pad token never shadows a trained EOS.
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<|padding|>")


@dataclass
class Placement:
    """Where and how the model runs; printed in the summary and written to the run record."""

    device: str  # cuda | xla (TPU) | xpu | mps | cpu
    dtype: str  # bfloat16 | float16 | float32
    attn_implementation: str
    device_name: str

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def choose_device(requested: str = "auto") -> str:
    """CUDA, else TPU (torch_xla), else XPU, else Apple MPS, else CPU; a requested device that is not there is an error."""
    import torch

    from lorakit.errors import LorakitError

    available = {
        "cuda": torch.cuda.is_available(),
        "xla": importlib.util.find_spec("torch_xla") is not None and _xla_device_present(),
        "xpu": hasattr(torch, "xpu") and torch.xpu.is_available(),
        "mps": hasattr(torch.backends, "mps") and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if requested != "auto":
        if not available.get(requested):
            raise LorakitError(f"device {requested} was asked for, but no {requested} device is available here; "
                               "use auto (picks what is there) or cpu")
        return requested
    return next(name for name, ok in available.items() if ok)


def _xla_device_present() -> bool:
    try:
        import torch_xla.runtime as xr

        return xr.device_type() == "TPU"
    except Exception:  # torch_xla installed without a TPU attached
        return False


def choose_dtype(requested: str, device: str) -> str:
    """bfloat16 on GPUs that support it, float16 on older GPUs, float32 on CPU.

    On CPU, float32 without gradient checkpointing trained a 4-layer 256-wide Llama about
    20x faster than trl's bf16 autocast plus checkpointing (0.8 s/step against 16.5).
    """
    if requested != "auto":
        return requested
    if device == "cuda":
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device in ("xpu", "xla"):
        return "bfloat16"
    return "float32"


def choose_attention(requested: str, device: str) -> str:
    if requested != "auto":
        return requested
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def choose_placement(model_section: dict, device_override: str | None = None) -> Placement:
    import torch

    device = choose_device(device_override or model_section.get("device", "auto"))
    dtype = choose_dtype(model_section.get("dtype", "auto"), device)
    attention = choose_attention(model_section.get("attn_implementation", "auto"), device)
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    elif device == "cpu":
        name = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    else:
        name = device.upper()
    return Placement(device=device, dtype=dtype, attn_implementation=attention, device_name=name)


# ---------------------------------------------------------------- tokenizer


def shipped_chat_template(name: str) -> str:
    return (TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def resolve_chat_template(requested: str | None, tokenizer) -> tuple[str, str]:
    """(template, where it came from): the recipe's, else the tokenizer's, else lorakit's ChatML."""
    if requested:
        if requested in ("chatml",):
            return _fit_chatml(shipped_chat_template(requested), tokenizer), f"lorakit's {requested}"
        if "{" in requested:
            return requested, "the recipe"
        return Path(requested).read_text(encoding="utf-8"), requested
    own = tokenizer.chat_template
    if isinstance(own, dict):
        own = own.get("default")
    if own:
        return own, "the tokenizer"
    return _fit_chatml(shipped_chat_template("chatml"), tokenizer), "lorakit's chatml (the tokenizer has none)"


def _fit_chatml(template: str, tokenizer) -> str:
    """ChatML needs <|im_end|> as one token to stop on; a vocabulary without it ends turns with EOS instead."""
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab or tokenizer.eos_token is None:
        return template
    return template.replace("<|im_end|>", tokenizer.eos_token)


def load_tokenizer(model_section: dict):
    """The base model's tokenizer with the chat template training will use, and a pad token set.

    Returns (tokenizer, template_source).
    """
    from transformers import AutoTokenizer

    reach_hub_or_cache(model_section)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_section["name_or_path"],
            revision=model_section.get("revision"),
            trust_remote_code=model_section.get("trust_remote_code", False),
        )
    except (OSError, ValueError) as error:
        raise _load_error("tokenizer", model_section, error) from None
    template, source = resolve_chat_template(model_section.get("chat_template"), tokenizer)
    tokenizer.chat_template = template
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        pad = next((token for token in PAD_CANDIDATES if token in vocab), None)
        # Reusing EOS as pad is safe here: trl masks padding by position, not by token id, so a trained EOS
        # keeps its label.
        tokenizer.pad_token = pad or tokenizer.eos_token
    return tokenizer, source


def _load_error(what: str, model_section: dict, error: Exception):
    """One clear message for a model or tokenizer that cannot be loaded (missing, offline, pickle-only weights)."""
    from lorakit.errors import LorakitError

    name = model_section["name_or_path"]
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    hint = ""
    if "safetensors" in str(error).lower():
        hint = " lorakit loads safetensors weights only (pickled .bin weights can run code when loaded)."
    elif os.environ.get("HF_HUB_OFFLINE") == "1" and not Path(name).exists():
        hint = " The Hub is off (HF_HUB_OFFLINE=1) and the model is not in the local cache."
    return LorakitError(f"model.name_or_path: cannot load the {what} of {name}: {first.rstrip('.')}.{hint}")


def end_of_turn_token(tokenizer) -> str | None:
    """The token the chat template puts right after an assistant reply: what generation must stop on."""
    marker = "lorakitreply"
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # a template that cannot render a plain exchange is reported by data preparation
        return None
    tail = text[text.rfind(marker) + len(marker):]
    if not tail:
        return tokenizer.eos_token
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    if not ids:
        return tokenizer.eos_token
    token = tokenizer.convert_ids_to_tokens(ids[0])
    special = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
    return token if token in special else tokenizer.eos_token


# ---------------------------------------------------------------- model


def build_quantization_config(quantization: dict | None, placement: Placement):
    """transformers.BitsAndBytesConfig from the recipe's section, compute dtype following the model's."""
    if not quantization:
        return None
    from transformers import BitsAndBytesConfig

    settings = dict(quantization)
    if settings.get("load_in_4bit"):
        settings.setdefault("bnb_4bit_compute_dtype", placement.dtype)
        # FSDP shards the 4-bit weights as tensors of this dtype; it must match the other parameters'.
        settings.setdefault("bnb_4bit_quant_storage", placement.dtype)
    return BitsAndBytesConfig(**settings)


def load_model(model_section: dict, quantization: dict | None, placement: Placement, *,
               gradient_checkpointing: bool = False, auto_class: str = "AutoModelForCausalLM",
               **from_pretrained: Any) -> Any:
    """The base model, quantized and prepared for k-bit training when the recipe asks.

    `auto_class` names the transformers class that loads it (AutoModelForSequenceClassification for classify);
    `from_pretrained` adds keyword arguments of its own (num_labels, ...). With output_loading_info=True the
    result is (model, loading info), as transformers returns it.
    """
    import transformers

    kwargs: dict[str, Any] = {
        "revision": model_section.get("revision"),
        "trust_remote_code": model_section.get("trust_remote_code", False),
        "dtype": placement.torch_dtype,
        "attn_implementation": placement.attn_implementation,
    }
    quantization_config = build_quantization_config(quantization, placement)
    if quantization_config is not None and placement.device in ("mps", "xla"):
        from lorakit.errors import LorakitError

        raise LorakitError(f"bitsandbytes quantization does not run on {placement.device.upper()}: remove the "
                           "quantization section to train plain LoRA here, or run on a CUDA GPU or the CPU "
                           "(--device cpu)")
    # Under FSDP (accelerate sets this), the launcher shards the model: no per-process device map, and no k-bit
    # preparation, whose fp32 upcast of the unquantized weights would mix dtypes inside FSDP's flat shards.
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        if not fsdp:
            kwargs["device_map"] = {"": _local_device(placement.device)}
    # safetensors only: pickled .bin weights can run code when loaded.
    kwargs["use_safetensors"] = True
    kwargs.update(from_pretrained)
    try:
        model = getattr(transformers, auto_class).from_pretrained(model_section["name_or_path"], **kwargs)
    except OSError as error:
        raise _load_error("model", model_section, error) from None
    model, info = model if from_pretrained.get("output_loading_info") else (model, None)
    if quantization_config is not None and placement.device == "cpu":
        keep_unpacked_where_packing_fails(model)
    if quantization_config is not None and not fsdp:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return model if info is None else (model, info)


# bitsandbytes (0.49, 0.50) repacks a 4-bit layer's weights for its AVX512-BF16 CPU kernel the first time the layer
# runs in eval mode without gradients, on CPUs that have that instruction set. The repacking takes only layers whose
# output width is a multiple of 32 (else: AssertionError "N must be divisible by block_n") and whose input width is
# a multiple of the quantization block, 64 (else: RuntimeError "shape '[256, 10]' is invalid..." from its absmax
# reshape): the quickstart model's 688-wide MLP fails both ways, so evaluation and generation of such a QLoRA model
# crash there. Training never takes that path.
PACKED_CPU_BLOCK = 32


def keep_unpacked_where_packing_fails(model) -> int:
    """Send the 4-bit layers the packed CPU kernel cannot take through bitsandbytes' unpacked path (the one
    training uses); the others keep the packed kernel, which is several times faster. Returns how many."""
    count = 0
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        blocksize = getattr(getattr(module.weight, "quant_state", None), "blocksize", None) or 64
        if module.out_features % PACKED_CPU_BLOCK or module.in_features % blocksize:
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def _local_device(device: str) -> Any:
    """This process's device: under torchrun/accelerate each process owns the GPU of its local rank."""
    if device in ("cuda", "xpu"):
        return int(os.environ.get("LOCAL_RANK", 0))
    return device


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as the weights they stand for, not as the bytes (or
    bfloat16/float32 storage elements, under bnb_4bit_quant_storage) they are packed into."""
    import math

    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if param.__class__.__name__ == "Params4bit":
            shape = getattr(getattr(param, "quant_state", None), "shape", None)
            # the original shape when quantized; else two 4-bit values per byte of storage
            count = math.prod(shape) if shape is not None else count * param.element_size() * 2
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def quiet_upstream_logs() -> None:
    """Silence upstream messages that tell the user nothing they can act on; real warnings still show."""
    import warnings

    # bitsandbytes warns on import that an optional Hub-downloaded CPU kernel is missing; the fallback is used.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # peft and trl read model.is_gradient_checkpointing, which transformers 5 renamed: their call, not lorakit's.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


# ---------------------------------------------------------------- an unreachable Hub

HUB_PROBE_SECONDS = 3.0
_hub_reachable: dict[str, str | None] = {}  # endpoint -> None when reachable, else why not (asked once a process)


def hub_unreachable_reason() -> str | None:
    """None when the Hub endpoint answers a TCP connection within a few seconds, else why not. huggingface_hub
    would retry each file five times with back-off (about 30 s a file, minutes for a model) before failing."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    if endpoint not in _hub_reachable:
        url = urlparse(endpoint)
        if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
            _hub_reachable[endpoint] = None  # through a proxy: a direct connection says nothing
        else:
            try:
                socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                         timeout=HUB_PROBE_SECONDS).close()
                _hub_reachable[endpoint] = None
            except OSError as error:
                _hub_reachable[endpoint] = f"{type(error).__name__}: {error}"
    return _hub_reachable[endpoint]


def reach_hub_or_cache(model_section: dict) -> None:
    """Before loading a Hub model with the Hub on: when the Hub cannot be reached, use the local cache (switching
    this process to offline mode, and saying so) or stop at once with what to do, instead of minutes of retries."""
    from huggingface_hub import constants, try_to_load_from_cache

    from lorakit.errors import LorakitError

    name = model_section["name_or_path"]
    if constants.HF_HUB_OFFLINE or Path(name).expanduser().exists():
        return
    reason = hub_unreachable_reason()
    if reason is None:
        return
    try:
        cached = try_to_load_from_cache(name, "config.json", revision=model_section.get("revision"))
    except Exception:  # a name that is no repo id: transformers' own error follows
        return
    if isinstance(cached, str):
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"
        import click

        click.echo(f"lorakit: cannot reach {constants.ENDPOINT} ({reason}); using the copy of {name} in the local "
                   "Hugging Face cache (set HF_HUB_OFFLINE=1 to skip this check)", err=True)
        return
    raise LorakitError(f"model.name_or_path: cannot reach {constants.ENDPOINT} ({reason}) to download {name}, and it "
                       "is not in the local Hugging Face cache. Check the network (or HF_ENDPOINT, or a proxy in "
                       "HTTPS_PROXY); once it is downloaded, HF_HUB_OFFLINE=1 runs from the cache")

"""Estimates of a run's peak memory (a GPU's, or on a CPU the whole process's) and of its number of optimizer steps,
before any weight is loaded.

The model's shape comes from its config alone (lorakit.training.model_shape: exact parameter counts, LoRA's
targets as peft matches them).

Peak memory is the sum of what lorakit's training holds at its worst moment, early in the backward pass of the
first optimizer step:
  weights           the base model in the compute dtype; with bitsandbytes, the quantized linear layers, and
                    every other parameter in float32 (peft's prepare_model_for_kbit_training upcasts them);
  trainable state   LoRA weights, their gradients and AdamW's two moments, all float32 (16 bytes a parameter);
  activations       what autograd keeps for the backward pass, counted tensor by tensor for a decoder layer
                    (`layer_bytes_per_token`): for every layer, or with gradient checkpointing each layer's input;
  backward workspace the larger of the LM head's working set (trl scores the head in tiles, never building the
                    full logits) and one layer's (recomputed activations and the gradients in flight);
  runtime           on CUDA, the context and cuBLAS workspaces (not tensors, but on the card); on a CPU, the
                    process itself: Python with PyTorch, transformers, trl and datasets loaded, the tokenizer and
                    the tokenized data, so that the CPU figure is the whole process's peak resident memory;
  allocator         on CUDA, the caching allocator's slack; on a CPU, the freed blocks glibc keeps in its heap for
                    reuse (lorakit.training.allocator): as much again as the activations the run would keep
                    without LoRA dropout (at most eight layers' worth in float32, where fewer passes leave fewer
                    short-lived tensors), plus the backward workspace, where their blocks are ones glibc serves
                    from its heap (under its mmap threshold; larger ones are unmapped when freed).
Everything not listed (inputs, the run's bookkeeping) is well below the estimate's error.

`estimate_recipe_memory` reads a recipe the way its command will run it (trl's defaults where the recipe is
silent, sft's own choices for the device, the launch section's processes and sharding); `lorakit validate` and
the shipped recipes' headers both use it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.training.allocator import MMAP_THRESHOLD
from lorakit.training.model_shape import ModelShape, model_shape

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# trl's chunked log-prob kernel on a GPU (trl/kernels/chunked_logprob.py): tiles of this many tokens x vocabulary
# entries.
HEAD_TILE_TOKENS = 4096
HEAD_TILE_VOCAB = 32768
# bitsandbytes 4-bit: two weights a byte, one absmax per 64 weights (float32, or 8-bit with a float32 per 256
# of those when double quantization is on).
FOUR_BIT_BYTES = 0.5 + 4 / 64
FOUR_BIT_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# AdamW on LoRA: float32 weight + float32 gradient + two float32 moments.
TRAINABLE_BYTES = 16
CUDA_CONTEXT_BYTES = int(0.75 * GIB)
ALLOCATOR_SLACK = 0.10
# A CPU run's process before its first step, less the weights: Python, torch, transformers, trl, peft, datasets and
# accelerate imported, the tokenizer and the tokenized rows (497-580 MiB at the start of training for the
# benchmark's tiny model and SmolLM2-135M, torch 2.13, transformers 5.24; docs/benchmarks.md).
CPU_RUNTIME_BYTES = int(0.5 * GIB)
# glibc serves blocks under its mmap threshold from its heap and keeps them once freed (lorakit.training.allocator
# fixes the threshold; glibc's dynamic one reaches the same after the first large free); larger blocks are mapped
# and unmapped each time. With the step's tensors served from that heap, its resident size outgrows what is live
# at the peak: the freed blocks come back in other sizes within the backward pass and from step to step. Measured
# at the peak (the first, longest step) against the activations the same run keeps without LoRA dropout: 1.5-1.65x
# on the benchmark's tiny model, 0.86-0.91x on SmolLM2-135M, with or without dropout (2,027 and 2,071 MiB, packed
# 4 x 512; glibc 2.36); counted as 1x (docs/benchmarks.md).
CPU_HEAP_RETAINED = 1.0
# Where lorakit's fewer passes apply (CPU float32, lorakit.models.cpu_passes), the norms and rotary embeddings
# leave far fewer short-lived tensors between the kept ones, and the heap holds at most about eight layers'
# activations beyond what is live: measured 5.6-7.7 layers' worth on SmolLM2-135M (30 layers; packed, unpacked,
# with LoRA dropout), every layer's on the 4-layer benchmark model, as before (docs/benchmarks.md).
FEWER_PASSES_RETAINED_LAYERS = 8
SIZE_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(gib|gb|mib|mb|g|m)\s*$", re.IGNORECASE)


@dataclass
class TrainingSetup:
    """How the model is trained, as far as memory is concerned."""

    micro_batch: int
    seq_len: int  # tokens per sequence in the largest micro-batch
    dtype: str = "bfloat16"  # weights and compute
    gradient_checkpointing: bool = True
    quantization: str | None = None  # None | "4bit" | "8bit"
    double_quant: bool = True
    lora_dropout: float = 0.0
    attention: str = "sdpa"  # eager keeps each layer's attention matrix
    processes: int = 1
    sharding: str = "none"  # across the processes: none (DDP) | states (ZeRO-2) | all (FSDP, ZeRO-3)
    device: str = "cuda"  # cuda | cpu


@dataclass
class MemoryEstimate:
    weights: int
    trainable_state: int
    activations: int  # kept for the backward pass
    workspace: int  # the backward pass's working set: the LM head's, or one layer's
    runtime: int  # the CUDA context; on a CPU, the process with its libraries and data
    allocator: int  # memory the allocator holds beyond the live tensors
    device: str = "cuda"

    @property
    def tensors(self) -> int:
        """What training's tensors hold at the peak."""
        return self.weights + self.trainable_state + self.activations + self.workspace

    @property
    def overhead(self) -> int:
        return self.runtime + self.allocator

    @property
    def total(self) -> int:
        return self.tensors + self.overhead

    def parts(self) -> list[tuple[str, int]]:
        on_cpu = self.device == "cpu"
        return [("weights", self.weights), ("LoRA weights, gradients, AdamW", self.trainable_state),
                ("activations", self.activations), ("backward workspace", self.workspace),
                ("Python, libraries, data" if on_cpu else "CUDA context", self.runtime),
                ("freed blocks malloc keeps" if on_cpu else "caching allocator slack", self.allocator)]


# ---------------------------------------------------------------- the estimate


def layer_bytes_per_token(shape: ModelShape, setup: TrainingSetup) -> int:
    """Bytes one decoder layer keeps for the backward pass, per token.

    Counted from what autograd saves in a Llama-style layer under LoRA (checked tensor by tensor against the
    autograd graph of a training step): each RMSNorm keeps its float32 input; attention keeps q, k, v and its
    output (SDPA and flash attention keep no attention matrix, eager keeps it); a gated MLP keeps gate, up and
    the activation; each LoRA-wrapped linear keeps its own copy of its input (made by the dropout, or by the
    cast to the compute dtype), the dropout mask, and the rank-r intermediate. Frozen linear layers keep
    nothing: their weights are all their input gradient needs.
    """
    e = DTYPE_BYTES[setup.dtype]
    norms = shape.norms_per_layer * 4 * shape.hidden
    attention = (2 * shape.attention_width + 2 * shape.kv_width) * e
    if setup.attention == "eager":
        attention += shape.heads * setup.seq_len * (4 + 2 * e)  # float32 softmax and its cast back, per query
    mlp = (2 * shape.up_projections - 1) * shape.intermediate * e  # gated: gate, up, act(gate); plain: up
    dropout = setup.lora_dropout > 0
    # CUDA's fused dropout keeps a one-byte mask; elsewhere PyTorch keeps the scaled noise in the input's dtype.
    mask = (1 if setup.device == "cuda" else e) if dropout else 0
    if dropout or e != 4:
        lora = shape.lora_input_features * (e + mask)
    else:  # float32 without dropout: LoRA keeps the frozen layers' own inputs: the norms' outputs and the MLP product
        lora = (2 * shape.hidden + shape.intermediate) * e
    return norms + attention + mlp + lora + shape.lora_ranks * e


def estimate_memory(shape: ModelShape, setup: TrainingSetup) -> MemoryEstimate:
    """Peak memory of one training process, in bytes."""
    e = DTYPE_BYTES[setup.dtype]
    tokens = setup.micro_batch * setup.seq_len
    weight_shards = setup.processes if setup.sharding == "all" else 1
    state_shards = setup.processes if setup.sharding in ("states", "all") else 1

    other_params = shape.total_params - shape.quantizable_params
    if setup.quantization == "4bit":
        per_weight = FOUR_BIT_DOUBLE_QUANT_BYTES if setup.double_quant else FOUR_BIT_BYTES
        weights = shape.quantizable_params * per_weight + other_params * 4
        layer_weights = shape.layer_quantizable_params * per_weight
    elif setup.quantization == "8bit":
        weights = shape.quantizable_params + shape.quantizable_rows * 4 + other_params * 4
        layer_weights = shape.layer_quantizable_params
    else:
        weights = shape.total_params * e
        layer_weights = shape.layer_params * e
    weights = weights / weight_shards
    if weight_shards > 1:
        weights += 2 * layer_weights  # the gathered layer in use and the next one being prefetched

    # Autograd keeps every layer's activations until the backward pass reaches it; with gradient checkpointing,
    # only each layer's input, and one layer is recomputed at a time during the backward pass.
    layer = layer_bytes_per_token(shape, setup)
    kept = shape.layers * (shape.hidden * e if setup.gradient_checkpointing else layer)
    recomputed = layer if setup.gradient_checkpointing else 0
    activations = tokens * kept

    # On top of those, the backward pass starts at the LM head and then walks the layers; the larger of the two
    # working sets sets the peak. The head: the final norm's float32 input, the head's input and its float32
    # gradient, and one tile of logits.
    head = tokens * shape.hidden * (4 + e + 4)
    if setup.device == "cuda":
        head += min(tokens, HEAD_TILE_TOKENS) * HEAD_TILE_VOCAB * e  # one buffer reused for every tile by trl's kernel
    else:
        # On a CPU lorakit scores the trained positions only (lorakit.models.trained_positions_head): their float32
        # log-probabilities kept for the backward pass, which adds the gradients of the pick and of the log-softmax.
        # Counted as if every position were trained, as the longest rows are assumed.
        head += tokens * shape.vocab * 3 * 4
    # A layer: the recomputed activations, and the gradients in flight through its MLP and residual stream.
    layer_backward = tokens * (recomputed + (2 * shape.intermediate + 2 * shape.hidden) * e)
    workspace = max(head, layer_backward)
    # The blocks most of a layer's tensors are made of (tokens x hidden, counted in float32, the widest dtype a
    # layer keeps), and the CPU head's (tokens x vocabulary, float32).
    layer_block = tokens * shape.hidden * 4
    head_block = tokens * shape.vocab * 4 if head >= layer_backward else layer_block
    if setup.quantization:
        workspace += 2 * shape.largest_linear * e  # a weight dequantized for the forward, another for the backward

    trainable = shape.trainable_params * TRAINABLE_BYTES / state_shards
    tensors = weights + trainable + activations + workspace
    if setup.device == "cuda":
        runtime, allocator = CUDA_CONTEXT_BYTES, ALLOCATOR_SLACK * tensors
    else:
        runtime = CPU_RUNTIME_BYTES
        allocator = 0
        if layer_block < MMAP_THRESHOLD:
            plain = TrainingSetup(**{**setup.__dict__, "lora_dropout": 0.0})
            retained_layers = shape.layers
            if setup.dtype == "float32":  # lorakit's fewer passes on a CPU
                retained_layers = min(shape.layers, FEWER_PASSES_RETAINED_LAYERS)
            allocator = CPU_HEAP_RETAINED * tokens * retained_layers * (
                shape.hidden * e if setup.gradient_checkpointing else layer_bytes_per_token(shape, plain))
        if head_block < MMAP_THRESHOLD:
            allocator += CPU_HEAP_RETAINED * workspace
    return MemoryEstimate(weights=int(weights), trainable_state=int(trainable), activations=int(activations),
                          workspace=int(workspace), runtime=int(runtime), allocator=int(allocator),
                          device=setup.device)


# ---------------------------------------------------------------- a recipe's setup


@dataclass
class Launch:
    """How many processes the run uses, and what they shard (from the recipe's launch section)."""

    processes: int = 1
    sharding: str = "none"  # none | states | all
    activation_checkpointing: bool = False  # done by FSDP itself


def read_launch(recipe) -> Launch:
    from lorakit.training.launch import read_accelerate_config

    settings = recipe.launch or {}
    config = read_accelerate_config(Path(settings["accelerate_config"])) if settings.get("accelerate_config") else {}
    processes = settings.get("num_processes") or config.get("num_processes") or 1
    kind = str(config.get("distributed_type", "")).upper()
    if kind == "FSDP":
        fsdp = config.get("fsdp_config") or {}
        return Launch(processes, "all", bool(fsdp.get("fsdp_activation_checkpointing")))
    if kind == "DEEPSPEED":
        stage = int((config.get("deepspeed_config") or {}).get("zero_stage", 0) or 0)
        return Launch(processes, "all" if stage == 3 else "states" if stage else "none")
    return Launch(processes)


def training_setup(recipe, device: str, launch: Launch, longest: int | None = None) -> tuple[TrainingSetup, bool]:
    """(setup, packing): the memory-relevant settings sft will use, with trl's defaults where the recipe is silent."""
    from lorakit.recipe.sections import upstream_fields

    training, model, quant = recipe.training, recipe.model, recipe.quantization or {}
    defaults = {name: default for name, (_, default) in upstream_fields("training").items()}

    def setting(name: str) -> Any:
        return training[name] if training.get(name) is not None else defaults.get(name)

    on_cpu = device == "cpu"
    attention = model.get("attn_implementation", "auto")
    from lorakit.models.loading import PACKABLE_ATTENTION, choose_attention

    chosen_attention = choose_attention(attention, "cpu" if on_cpu else "cuda")
    packing = training["packing"] if training.get("packing") is not None else chosen_attention in PACKABLE_ATTENTION
    micro_batch = setting("per_device_train_batch_size")
    per_document = packing and on_cpu and chosen_attention == "sdpa"  # lorakit.models.packed_attention
    if packing and chosen_attention not in PACKABLE_ATTENTION and not per_document:
        micro_batch = 1  # sft trains one packed row per forward pass without variable-length kernels (commands/sft.py)
    checkpointing = training.get("activation_checkpointing", training.get("gradient_checkpointing"))
    if checkpointing is None:
        checkpointing = not on_cpu  # sft's default: on for GPUs, off on the CPU
    dtype = model.get("dtype", "auto")
    if dtype == "auto":
        dtype = "float32" if on_cpu else "bfloat16"
    max_length = recipe.data["max_length"]
    return TrainingSetup(
        micro_batch=micro_batch,
        seq_len=max_length if packing or not longest else min(max_length, longest),
        dtype=dtype,
        gradient_checkpointing=bool(checkpointing) or launch.activation_checkpointing,
        quantization="4bit" if quant.get("load_in_4bit") else "8bit" if quant.get("load_in_8bit") else None,
        double_quant=bool(quant.get("bnb_4bit_use_double_quant")),
        lora_dropout=recipe.lora.get("lora_dropout") or 0.0,
        attention="eager" if attention == "eager" else "sdpa",
        processes=launch.processes,
        sharding=launch.sharding,
        device="cpu" if on_cpu else "cuda",
    ), packing


def estimate_recipe_memory(recipe, config, device: str = "cuda", longest: int | None = None):
    """(estimate, setup) for a lorakit Recipe on a model config, as its command trains it: what `lorakit validate`
    prints, what a run's summary states, and what the shipped recipes' headers state.

    sft trains the recipe's micro-batch, packed or not; dpo the chosen and the rejected sequence of each pair in one
    micro-batch (trl's DPOTrainer concatenates them); classify the base with its new head, on unpacked rows."""
    launch = read_launch(recipe)
    pairs = recipe.command == "dpo"
    if recipe.command in ("dpo", "classify"):  # neither packs rows
        recipe = dataclasses.replace(recipe, training={**recipe.training, "packing": False})
    setup, _ = training_setup(recipe, device, launch, longest)
    if pairs:
        setup = dataclasses.replace(setup, micro_batch=2 * setup.micro_batch)
    return estimate_memory(model_shape(config, recipe.lora, classifier_shape(recipe)), setup), setup


def classifier_shape(recipe) -> dict | None:
    """For a classify recipe, the head model_shape sizes: its number of outputs (the recipe's labels; two when the
    data will tell) and whether only the head trains."""
    if recipe.command != "classify":
        return None
    task = recipe.sections["task"]
    labels = 1 if task["type"] == "regression" else len(task.get("labels") or ()) or 2
    return {"num_labels": labels, "head_only": bool(task.get("head_only"))}


def estimate_steps(*, rows: int, tokens: int, micro_batch: int, gradient_accumulation: int, processes: int,
                   epochs: float, max_steps: int, packing: bool, max_length: int) -> int:
    """Optimizer steps, counted the way transformers' Trainer counts them."""
    if max_steps and max_steps > 0:
        return max_steps
    sequences = math.ceil(tokens / max_length) if packing else rows  # packing fills sequences of max_length
    batches = math.ceil(sequences / (micro_batch * processes))
    per_epoch = max(1, batches // gradient_accumulation)
    return int(math.ceil(per_epoch * epochs))


# ---------------------------------------------------------------- sizes as people write them


def parse_size(text: str) -> int:
    """'24GiB' -> bytes. GiB/MiB are powers of 1024, GB/MB of 1000 (as GPU vendors count)."""
    match = SIZE_PATTERN.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size; write it like 24GiB, 80GB or 16000MiB")
    number, unit = float(match.group(1)), match.group(2).lower()
    scale = {"gib": GIB, "g": GIB, "gb": 1000**3, "mib": 1024**2, "m": 1024**2, "mb": 1000**2}[unit]
    return int(number * scale)


def format_size(size: float) -> str:
    if size >= GIB:
        return f"{size / GIB:.1f} GiB"
    if size >= 1024**2:
        return f"{size / 1024**2:.0f} MiB"
    return f"{size / 1024:.0f} KiB"

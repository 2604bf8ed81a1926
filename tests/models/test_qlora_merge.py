"""QLoRA runs on a model whose layer widths are not multiples of 32 (the quickstart's MLP is 688 wide): eval,
generate and merge work on CPUs with AVX512-BF16, where bitsandbytes' packed CPU kernel refuses such layers, and
`merge --into` offers the original or the dequantized 4-bit weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import build_tokenizer, facts_rows, write_jsonl

from lorakit.cli import main

WIDTH = 176  # intermediate size: 176 = 5.5 x 32 outputs for gate/up, 176 = 2.75 x 64 inputs for down


@pytest.fixture(scope="module")
def odd_base(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("odd-width-llama")
    tokenizer = build_tokenizer(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=WIDTH,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                                 tie_word_embeddings=False)).save_pretrained(folder)
    return folder


def write_run(folder: Path, base: Path, quantized: bool) -> Path:
    """A finished run folder with a random (non-zero) adapter and the recipe it would have been trained with."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    data = write_jsonl(folder / "train.jsonl", facts_rows("messages", repeat=1))
    quantization = "quantization:\n  load_in_4bit: true\n" if quantized else ""
    (folder / "lorakit_recipe.yaml").write_text(
        f"model:\n  name_or_path: {base}\n{quantization}lora:\n  r: 4\n  lora_alpha: 8\n"
        f"data:\n  train:\n    - path: {data}\ntraining:\n  output_dir: {folder}\n", encoding="utf-8")
    (folder / "lorakit_run.json").write_text(json.dumps({"status": "completed"}))
    return folder


@pytest.fixture(scope="module")
def qlora_run(odd_base, tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("qlora") / "run", odd_base, quantized=True)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_the_upstream_packed_cpu_kernel_still_refuses_these_widths():
    """Why lorakit steers such layers to bitsandbytes' unpacked path (see docs/merge.md)."""
    import torch
    from bitsandbytes.functional import has_avx512bf16
    from bitsandbytes.nn import Linear4bit, Params4bit

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never takes its packed kernel here")
    for outputs, inputs in ((WIDTH, 64), (64, WIDTH)):
        layer = Linear4bit(inputs, outputs, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = Params4bit(torch.randn(outputs, inputs), requires_grad=False, quant_type="nf4")
        layer = layer.to("cpu").eval()
        with torch.no_grad(), pytest.raises((AssertionError, RuntimeError)):
            layer(torch.randn(2, inputs))


def test_eval_and_generate_of_a_qlora_run_work_with_widths_not_multiples_of_32(qlora_run, tmp_path):
    import math

    report = tmp_path / "report.json"
    result = cli("eval", qlora_run, "--data", qlora_run / "train.jsonl", "--max-new-tokens", 4, "--output", report)
    assert result.exit_code == 0, result.output
    metrics = json.loads(report.read_text())
    assert json.loads(report.read_text())["settings"]["quantization"]["load_in_4bit"] is True
    assert math.isfinite(metrics["metrics"]["model"]["loss"])
    result = cli("generate", qlora_run, "What do bees make?", "--max-new-tokens", 4)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.slow
def test_merge_into_dequantized_is_the_4bit_model_and_original_is_not(qlora_run, odd_base, tmp_path):
    import bitsandbytes  # noqa: F401  (the 4-bit model below)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    outputs = {}
    for into in ("original", "dequantized"):
        outputs[into] = tmp_path / into
        result = cli("merge", qlora_run, "--output", outputs[into], "--into", into)
        assert result.exit_code == 0, result.output
    records = {into: json.loads((out / "lorakit_merge.json").read_text()) for into, out in outputs.items()}
    assert {into: record["into"] for into, record in records.items()} == {"original": "original",
                                                                          "dequantized": "dequantized"}
    figures = {into: record["vs_training_model"] for into, record in records.items()}
    assert figures["original"]["measured"] and figures["dequantized"]["measured"]
    # Against the 4-bit model the adapter was trained with, the dequantized merge is far closer.
    assert figures["dequantized"]["mean_kl"] * 10 < figures["original"]["mean_kl"]

    # The dequantized merge computes transformers' own dequantization of the 4-bit base, plus the adapter.
    tokenizer = AutoTokenizer.from_pretrained(qlora_run)
    ids = list(tokenizer.apply_chat_template([{"role": "user", "content": "What do bees make?"}],
                                             add_generation_prompt=True, return_dict=True)["input_ids"])
    four_bit = AutoModelForCausalLM.from_pretrained(
        odd_base, dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="float32",
                                               bnb_4bit_quant_storage="float32"))
    expected = logits(PeftModel.from_pretrained(four_bit.dequantize(), qlora_run).eval(), ids)
    merged = logits(AutoModelForCausalLM.from_pretrained(outputs["dequantized"]).eval(), ids)
    assert (merged - expected).abs().max() < 1e-4
    original = logits(AutoModelForCausalLM.from_pretrained(outputs["original"]).eval(), ids)
    assert (original - expected).abs().max() > 1e-3  # the two merges really differ


@pytest.mark.slow
def test_a_qlora_run_merges_into_the_dequantized_weights_by_default(qlora_run, tmp_path, monkeypatch):
    from lorakit.models import loading

    load_model = loading.load_model

    def four_bit_fails(section, quantization, placement, **kwargs):
        if quantization:  # the information-only comparison with the 4-bit model
            raise AssertionError("N must be divisible by block_n")
        return load_model(section, quantization, placement, **kwargs)

    monkeypatch.setattr(loading, "load_model", four_bit_fails)
    result = cli("merge", qlora_run, "--output", tmp_path / "merged")
    assert result.exit_code == 0, result.output  # the comparison is for information: it never fails a merge
    assert "not compared with the 4-bit training-time model: N must be divisible by block_n" in result.output
    record = json.loads((tmp_path / "merged" / "lorakit_merge.json").read_text())
    assert record["into"] == "dequantized" and record["check"]["passed"]
    assert record["vs_training_model"] == {"measured": False, "reason": "N must be divisible by block_n"}


def test_dequantized_is_refused_for_a_run_that_was_not_quantized(odd_base, tmp_path):
    run = write_run(tmp_path / "lora", odd_base, quantized=False)
    result = cli("merge", run, "--output", tmp_path / "merged", "--into", "dequantized")
    assert result.exit_code == 2, result.output
    assert "--into dequantized: the run was not quantized" in result.output
    assert not (tmp_path / "merged").exists()

"""benchmarks/peers.py: every tool is given the same job, and what is measured is counted the same way for each."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import peer_job  # noqa: E402
import peers  # noqa: E402


def load_probe():
    spec = importlib.util.spec_from_file_location("bench_probe", BENCHMARKS / "peer_probe" / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # without LORAKIT_BENCH_PROBE it installs no import hook
    return module


def paths(tmp_path: Path) -> dict:
    return {"model": tmp_path / "model", "data_dir": tmp_path / "data", "train_file": tmp_path / "data" / "train.jsonl"}


@pytest.mark.parametrize("packing", [False, True])
def test_every_tool_gets_the_same_job(tmp_path, packing):
    """LoRA rank and alpha, learning rate, steps, micro-batch, length, packing: one job in four dialects."""
    read = {tool: yaml.safe_load(peer_job.write_config(tool, paths(tmp_path), tmp_path / tool, packing).read_text())
            for tool in peers.TOOLS}
    lk, trl, lf, ax = read["lorakit"], read["trl"], read["llamafactory"], read["axolotl"]
    assert lk["lora"]["r"] == trl["lora_r"] == lf["lora_rank"] == ax["lora_r"] == 16
    assert lk["lora"]["lora_alpha"] == trl["lora_alpha"] == lf["lora_alpha"] == ax["lora_alpha"] == 32
    assert lk["lora"]["target_modules"] == trl["lora_target_modules"] == "all-linear"
    assert lf["lora_target"] == "all" and ax["lora_target_linear"] is True
    rates = {float(lk["training"]["learning_rate"]), float(trl["learning_rate"]), float(lf["learning_rate"]),
             float(ax["learning_rate"])}
    assert rates == {2e-4}
    assert lk["training"]["max_steps"] == trl["max_steps"] == lf["max_steps"] == ax["max_steps"] == 30
    assert (lk["training"]["per_device_train_batch_size"] == trl["per_device_train_batch_size"]
            == lf["per_device_train_batch_size"] == ax["micro_batch_size"] == 4)
    assert lk["data"]["max_length"] == trl["max_length"] == lf["cutoff_len"] == ax["sequence_len"] == 512
    assert lk["training"]["packing"] is trl["packing"] is lf["packing"] is lf["neat_packing"] is ax["sample_packing"] \
        is packing
    # No tool trains the prompts, none checkpoints activations or autocasts to bf16.
    assert trl["assistant_only_loss"] and ax["datasets"][0]["roles_to_train"] == ["assistant"]
    assert trl["bf16"] is lf["bf16"] is ax["bf16"] is False
    assert trl["gradient_checkpointing"] is ax["gradient_checkpointing"] is False
    assert lk["model"]["name_or_path"] == trl["model_name_or_path"] == lf["model_name_or_path"] == ax["base_model"]


def test_two_lorakit_processes_share_the_same_rows_a_step(tmp_path):
    config = peer_job.write_config("lorakit", paths(tmp_path), tmp_path / "two", True, processes=2)
    assert yaml.safe_load(config.read_text())["training"]["per_device_train_batch_size"] == 2
    with pytest.raises(ValueError, match="4 rows a step cannot be divided among 3 processes"):
        peer_job.write_config("lorakit", paths(tmp_path), tmp_path / "three", True, processes=3)


def test_a_multi_process_run_is_counted_over_all_its_processes(tmp_path):
    import json

    probe = tmp_path / "run.probe.json"
    for rank, (seconds, tokens, peak) in enumerate([(10.0, 300, 2 << 30), (10.5, 260, 3 << 30)]):
        Path(f"{probe}.rank{rank}").write_text(json.dumps({
            "train_seconds": seconds, "real_tokens": tokens, "trained_tokens": tokens // 2, "padded_tokens": tokens,
            "micro_batches": 30, "losses": [2.0, 1.5], "settings": {}, "peak_at_train_end": peak,
            "peak_before_train": peak // 2, "rss_at_train_start": peak // 2}))
    merged = peers.read_probes(probe)
    assert merged["processes"] == 2 and merged["real_tokens"] == 560 and merged["trained_tokens"] == 280
    assert merged["train_seconds"] == 10.5  # the slower process ends the step
    assert merged["peak_at_train_end"] == 5 << 30 and merged["losses"] == [2.0, 1.5]
    assert peers.read_probes(tmp_path / "missing.probe.json") is None


def test_tokens_are_counted_alike_padded_packed_and_padding_free():
    import torch

    probe = load_probe()
    counts = dict.fromkeys(("real_tokens", "trained_tokens", "padded_tokens", "micro_batches"), 0)
    padded = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]),
              "labels": torch.tensor([[-100, -100, 3, 4, 5], [-100, 2, 3, -100, -100]])}
    probe.count(padded, counts)
    assert (counts["real_tokens"], counts["trained_tokens"], counts["padded_tokens"]) == (8, 5, 10)
    # LLaMA-Factory's neat packing numbers the rows packed together 1, 2, ...; 0 is padding.
    packed = {"input_ids": torch.ones(1, 6, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 2, 2, 2, 0]]),
              "labels": torch.tensor([[-100, 1, -100, 2, 2, -100]])}
    probe.count(packed, counts)
    assert counts["real_tokens"] == 8 + 5
    # trl's padding-free batches carry no mask: every id is a real token.
    free = {"input_ids": torch.ones(1, 7, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1]]),
            "labels": torch.full((1, 7), 1)}
    probe.count(free, counts)
    assert counts["real_tokens"] == 8 + 5 + 7 and counts["micro_batches"] == 3


def test_cells_keep_their_best_round_and_a_failed_tool_its_error():
    cells = {"trl-packing_off-alone": [
        {"ok": True, "tokens_per_s": 100.0, "wall_s": 20.0}, {"ok": True, "tokens_per_s": 125.0, "wall_s": 18.0},
        {"ok": False, "error": "timed out"}],
        "axolotl-packing_off-alone": [{"ok": False, "error": "ValueError: learning_rate Field required"}]}
    summary = peers.summarize(cells)
    trl = summary["trl-packing_off-alone"]
    assert trl["tokens_per_s"] == 125.0 and trl["best_wall_s"] == 18.0
    assert trl["spread"] == pytest.approx(0.2) and trl["failed_runs"] == 1
    assert summary["axolotl-packing_off-alone"] == {"ok": False, "error": "ValueError: learning_rate Field required",
                                                    "runs": 1}


def test_the_error_a_user_would_read_is_the_one_recorded():
    log = "Traceback (most recent call last):\n  File x\nValueError: learning_rate Field required\n[exit]\n"
    assert peers.first_error(log) == "ValueError: learning_rate Field required"
    assert peers.first_error("some last words\n") == "some last words"

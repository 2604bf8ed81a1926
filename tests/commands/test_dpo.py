"""`lorakit dpo` on tiny offline models: from a base model and from an SFT run, whose adapter is the starting point
and whose model is the reference; the preference margin rises; the run folder loads, merges and evaluates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import FACTS, facts_rows, fast_training, write_adapter_run, write_jsonl

from lorakit.cli import main
from lorakit.training.run_dir import RECORD_FILE


def fact_pairs(repeat: int = 4) -> list[dict]:
    """Each fact's answer chosen over the next fact's answer, as conversations sharing the question."""
    pairs = []
    for index, (question, answer) in enumerate(FACTS * repeat):
        wrong = FACTS[(index + 1) % len(FACTS)][1]
        user = {"role": "user", "content": question}
        pairs.append({"chosen": [user, {"role": "assistant", "content": answer}],
                      "rejected": [user, {"role": "assistant", "content": wrong}]})
    return pairs


def write_dpo_recipe(folder: Path, start: Path, out: Path, steps: int = 12, extra: str = "") -> Path:
    pairs = write_jsonl(folder / "pairs.jsonl", fact_pairs())
    recipe = folder / "dpo.yaml"
    training = fast_training(out, steps).replace("learning_rate: 5.0e-3", "learning_rate: 5.0e-3\n  beta: 0.5")
    recipe.write_text(f"# lorakit dpo dpo.yaml\nmodel:\n  name_or_path: {start}\ndata:\n  train:\n    - path: {pairs}\n"
                      f"  max_length: 64\n{extra}{training}", encoding="utf-8")
    return recipe


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def record(out: Path) -> dict:
    return json.loads((out / RECORD_FILE).read_text())


def logged(out: Path, key: str) -> list[float]:
    return [entry[key] for entry in record(out)["log_history"] if key in entry]


def build_trainer(recipe_path: Path, *overrides: str):
    """The trainer `lorakit dpo` would train, before its first step."""
    from lorakit.commands.dpo import build_dpo
    from lorakit.models.loading import choose_placement
    from lorakit.recipe.load import load_recipe
    from lorakit.training import run_dir
    from lorakit.training.lifecycle import RunContext

    recipe = load_recipe(recipe_path, overrides, command="dpo")
    context = RunContext(recipe, choose_placement(recipe.model), run_dir.Fingerprint("test"), [], None)
    return build_dpo(context).trainer


def plain_peft(base: Path, adapter: Path | None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    return (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()


def logps(model, pairs) -> torch.Tensor:
    from lorakit.evaluation.preference import response_logps

    sequences = [(p["prompt_ids"], p[side]) for p in pairs for side in ("chosen_ids", "rejected_ids")]
    return torch.tensor(response_logps(model, sequences, batch_size=8))


def reference_logps(trainer, pairs) -> torch.Tensor:
    """The log-probabilities trl's DPO loss takes for the reference, on these pairs."""
    batch = trainer.data_collator([{k: p[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in pairs])
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    return torch.stack([chosen, rejected], dim=1).flatten()


def adapter_weights(model, name: str) -> dict:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=name)


@pytest.fixture(scope="module")
def random_sft_run(tiny_llama, tmp_path_factory) -> Path:
    """A finished run folder with a random non-zero adapter: an SFT model clearly unlike the base."""
    return write_adapter_run(tmp_path_factory.mktemp("runs") / "sft", tiny_llama)


# ---------------------------------------------------------------- the start point and the reference (no training)


def test_step_zero_is_the_sft_adapter_and_the_reference_is_the_sft_model(tiny_llama, random_sft_run, tmp_path):
    from safetensors.torch import load_file

    trainer = build_trainer(write_dpo_recipe(tmp_path, random_sft_run, tmp_path / "out"))
    model = trainer.model
    saved = load_file(random_sft_run / "adapter_model.safetensors")
    for name in ("default", "ref"):  # the policy starts as the SFT adapter; the reference is a copy of it
        weights = adapter_weights(model, name)
        assert weights.keys() == saved.keys()
        assert all(weights[key].equal(saved[key]) for key in saved), name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)  # the reference copy is frozen
    pairs = list(trainer.train_dataset.select(range(6)))
    reference = reference_logps(trainer, pairs)
    assert torch.allclose(reference, logps(plain_peft(tiny_llama, random_sft_run), pairs), atol=1e-4)
    assert not torch.allclose(reference, logps(plain_peft(tiny_llama, None), pairs), atol=1e-1)  # not the base


def test_reference_base_scores_against_the_bare_base(tiny_llama, random_sft_run, tmp_path):
    trainer = build_trainer(write_dpo_recipe(tmp_path, random_sft_run, tmp_path / "out"),
                            "preference.reference=base")
    assert list(trainer.model.peft_config) == ["default"]
    pairs = list(trainer.train_dataset.select(range(6)))
    assert torch.allclose(reference_logps(trainer, pairs), logps(plain_peft(tiny_llama, None), pairs), atol=1e-4)
    policy = torch.cat([trainer.model(input_ids=torch.tensor([p["prompt_ids"] + p["chosen_ids"]])).logits[0]
                        for p in pairs[:1]])
    sft = plain_peft(tiny_llama, random_sft_run)(input_ids=torch.tensor([pairs[0]["prompt_ids"] +
                                                                         pairs[0]["chosen_ids"]])).logits[0]
    assert torch.allclose(policy, sft, atol=1e-4)  # the policy still starts from the SFT adapter


def test_a_bad_pair_exits_2_naming_file_and_row(tiny_llama, tmp_path):
    recipe = write_dpo_recipe(tmp_path, tiny_llama, tmp_path / "out")
    rows = fact_pairs(1)
    rows[4] = {"chosen": rows[4]["chosen"], "rejected": rows[4]["chosen"]}
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = CliRunner().invoke(main, ["dpo", str(recipe)])
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'pairs.jsonl'}: row 5: 'chosen' and 'rejected' are the same conversation" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_validate_shows_a_pair_with_its_scored_tokens(tiny_llama, random_sft_run, tmp_path):
    recipe = write_dpo_recipe(tmp_path, random_sft_run, tmp_path / "out")
    result = run_cli("validate", str(recipe), "--samples", "1")
    assert result.exit_code == 0, result.output
    assert "reference: the SFT model: the base + a frozen copy of the adapter of" in result.output
    assert "[[The sky is blue.<|im_end|>]]" in result.output and "[[Paris is the capital.<|im_end|>]]" in result.output
    assert "'<|im_end|>' is scored at the end of every response" in result.output
    assert "lorakit validate: the run can start" in result.output and f": lorakit dpo {recipe}" in result.output
    result = run_cli("validate", str(recipe), "--samples", "0", "--device", "cpu")
    # A DPO step's memory: each pair's chosen and rejected sequences in one micro-batch, part by part.
    assert "pairs, chosen and rejected)" in result.output and "freed blocks malloc keeps" in result.output
    # A template that never closes the assistant's turn is caught before any training.
    broken = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}\n{% endfor %}" \
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    result = CliRunner().invoke(main, ["validate", str(recipe), f"model.chat_template={json.dumps(broken)}"])
    assert result.exit_code == 1 and "do not end with a scored end-of-turn token" in result.output


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def sft_then_dpo(tiny_llama, tmp_path_factory):
    """`lorakit sft` then `lorakit dpo` on its run folder: (sft run, dpo run, dpo recipe, CLI output)."""
    from lorakit.commands.sft import run_sft

    folder = tmp_path_factory.mktemp("sft-then-dpo")
    data = write_jsonl(folder / "sft.jsonl", facts_rows("messages"))
    sft_recipe = folder / "sft.yaml"
    sft_recipe.write_text(f"model:\n  name_or_path: {tiny_llama}\ndata:\n  train:\n    - path: {data}\n"
                          f"  max_length: 64\nlora:\n  r: 4\n  lora_alpha: 8\n" + fast_training(folder / "sft", 12))
    sft = run_sft(str(sft_recipe), ("training.disable_tqdm=true",))
    recipe = write_dpo_recipe(folder, sft, folder / "dpo", extra="  eval:\n    - path: " +
                              str(folder / "pairs.jsonl") + "\n")
    result = run_cli("dpo", str(recipe), "training.disable_tqdm=true")
    assert result.exit_code == 0, result.output
    return sft, folder / "dpo", recipe, result.output


@pytest.mark.slow
def test_dpo_on_an_sft_run_raises_the_preference_margin(tiny_llama, sft_then_dpo):
    from peft import PeftModel

    sft, out, _, output = sft_then_dpo
    assert "reference      the SFT model: the base + a frozen copy of the adapter of" in output
    margins, accuracies = logged(out, "rewards/margins"), logged(out, "rewards/accuracies")
    assert margins[0] == 0.0 and logged(out, "rewards/chosen")[0] == 0.0  # step 1: the policy is the reference
    assert sum(margins[-3:]) / 3 > 0.1 and sum(accuracies[-3:]) / 3 > 0.8
    run = record(out)
    assert run["status"] == "completed" and run["reference"] == "sft"
    assert run["base_model"]["name_or_path"] == str(tiny_llama) and run["start"]["run"] == str(sft)
    assert [stage["command"] for stage in run["stages"]] == ["sft", "dpo"]
    assert run["metrics"]["eval_rewards/accuracies"] > 0.8 and run["metrics"]["eval_rewards/margins"] > 0.1
    assert {"eval_rewards/chosen", "eval_rewards/rejected", "eval_loss"} <= set(run["metrics"])
    assert not (out / "ref").exists() and not list(out.glob("checkpoint-*"))  # the adapter alone, no reference copy
    model = PeftModel.from_pretrained(plain_peft(tiny_llama, None), out)  # plain peft loads it on the base
    assert list(model.peft_config) == ["default"]
    card = (out / "README.md").read_text()
    assert "supervised fine-tuning (trl `SFTTrainer`), then preference optimization (trl `DPOTrainer`)" in card
    assert "- sft\n" in card and "- dpo\n" in card  # both stages among the card's tags


@pytest.mark.slow
def test_eval_merge_and_generate_work_on_a_dpo_run(tiny_llama, sft_then_dpo, tmp_path):
    from lorakit.models.merge import compare_logits

    sft, out, _, _ = sft_then_dpo
    result = run_cli("eval", str(out), "--compare-base", "--output", str(tmp_path / "report.json"))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "report.json").read_text())["metrics"]
    assert metrics["start"]["model"].startswith("the SFT model")
    # A handful of held-out pairs: accuracy moves in steps of a pair and may tie; the margin must rise.
    assert metrics["model"]["preference_accuracy"] >= metrics["start"]["preference_accuracy"]
    assert metrics["model"]["mean_margin"] > metrics["start"]["mean_margin"]
    assert metrics["model"]["reward_accuracy"] > 0.8

    merged = tmp_path / "merged"
    result = run_cli("merge", str(out), "--output", str(merged))
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM

    prompt = torch.tensor([[1, 5, 9, 30, 41, 7]])
    with torch.no_grad():
        expected = plain_peft(tiny_llama, out)(input_ids=prompt).logits[0]
        actual = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=prompt).logits[0]
    assert compare_logits([expected], [actual])["max_abs_diff"] < 1e-4

    result = CliRunner().invoke(main, ["generate", str(out), "What colour is the sky?", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    # SFT-style rows (messages) get the loss and exact match of any run, on the base the DPO run trained.
    # With --compare-base, beside the start point: the SFT model, scored exactly as `lorakit eval` scores the SFT run.
    rows = str(sft.parent / "sft.jsonl")
    result = run_cli("eval", str(out), "--data", rows, "--compare-base", "--output", str(tmp_path / "em.json"))
    assert result.exit_code == 0, result.output
    assert "start" in result.output and "the SFT model" in result.output
    metrics = json.loads((tmp_path / "em.json").read_text())["metrics"]
    assert metrics["model"]["exact_match"] is not None and "base" not in metrics
    result = run_cli("eval", str(sft), "--data", rows, "--output", str(tmp_path / "sft.json"))
    assert result.exit_code == 0, result.output
    sft_metrics = json.loads((tmp_path / "sft.json").read_text())["metrics"]["model"]
    assert metrics["start"]["loss"] == pytest.approx(sft_metrics["loss"], abs=1e-5)
    assert metrics["start"]["exact_match"] == sft_metrics["exact_match"]
    assert metrics["model"]["loss"] != pytest.approx(metrics["start"]["loss"], abs=1e-6)  # DPO moved the adapter


@pytest.mark.slow
def test_dpo_from_a_base_model_trains_a_new_adapter_against_the_base(tiny_llama, tmp_path):
    result = run_cli("dpo", str(write_dpo_recipe(tmp_path, tiny_llama, tmp_path / "out", steps=6)),
                     "training.disable_tqdm=true")
    assert result.exit_code == 0, result.output
    assert "reference      the base model (the new adapter disabled)" in result.output
    out = tmp_path / "out"
    assert record(out)["reference"] == "base" and [s["command"] for s in record(out)["stages"]] == ["dpo"]
    assert logged(out, "rewards/margins")[0] == 0.0  # a new adapter starts as the identity (LoRA B = 0)
    assert logged(out, "rewards/margins")[-1] > 0
    assert logged(out, "loss")[-1] < logged(out, "loss")[0]


@pytest.mark.slow
def test_qlora_dpo_runs_on_cpu_with_one_4bit_base(tiny_llama, random_sft_run, tmp_path):
    recipe = write_dpo_recipe(tmp_path, random_sft_run, tmp_path / "out", steps=4,
                              extra="quantization:\n  load_in_4bit: true\n")
    trainer = build_trainer(recipe)
    four_bit = [m for m in trainer.model.modules() if type(m).__name__ == "Linear4bit"]
    assert four_bit and trainer.ref_model is None  # policy and reference share the one 4-bit base
    assert {"default", "ref"} == set(trainer.model.peft_config)
    del trainer
    result = run_cli("dpo", str(recipe), "training.disable_tqdm=true")
    assert result.exit_code == 0, result.output
    assert "4-bit nf4 (QLoRA)" in result.output
    assert all(torch.isfinite(torch.tensor(logged(tmp_path / "out", "loss"))))
    assert logged(tmp_path / "out", "rewards/margins")[-1] != 0.0

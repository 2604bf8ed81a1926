"""lorakit classify on tiny offline models, a decoder (Llama) and an encoder (BERT): the head has the labels' size,
only LoRA and the head train, the base stays bitwise frozen, accuracy rises above the majority class, the saved
adapter is the best one, plain peft and the merged folder (pipeline included) compute the same logits, and eval
and predict read the run back."""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import build_tokenizer, write_jsonl
from lorakit.cli import main

# A learnable toy task: each text is words of its topic among shared filler words. 50/30/20, so the majority class
# scores 50%.
TOPICS = {"sky": ["sky", "blue", "Mars", "red", "planet"], "water": ["water", "fish", "ice", "frozen", "drink"],
          "animal": ["spider", "legs", "bees", "honey", "cows"]}
FILLER = ["the", "is", "what", "do", "of", "a"]
SHARES = {"sky": 0.5, "water": 0.3, "animal": 0.2}


def toy_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for label, share in SHARES.items():
        for _ in range(int(count * share)):
            words = rng.choices(TOPICS[label], k=3) + rng.choices(FILLER, k=3)
            rng.shuffle(words)
            rows.append({"text": " ".join(words), "label": label})
    rng.shuffle(rows)
    return rows


def write_toy_recipe(folder: Path, model: Path, out: Path, extra: str = "", steps: int = 30,
                     lora: str = "lora:\n  r: 8\n  lora_alpha: 16\n") -> Path:
    train = write_jsonl(folder / "train.jsonl", toy_rows(160, seed=1))
    evaluation = write_jsonl(folder / "eval.jsonl", toy_rows(40, seed=2))
    recipe = folder / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        # lorakit classify recipe.yaml
        model:
          name_or_path: {model}
        task:
          type: classification
        {lora.replace(chr(10), chr(10) + '        ')}data:
          train: {train}
          eval: {evaluation}
          max_length: 32
        training:
          output_dir: {out}
          max_steps: {steps}
          per_device_train_batch_size: 16
          learning_rate: 1.0e-2
          warmup_steps: 0
          logging_steps: 1
          eval_steps: 10
          seed: 0
          disable_tqdm: true
        """) + extra, encoding="utf-8")
    return recipe


def tiny_bert(folder: Path) -> Path:
    """A 2-layer BERT encoder (BertModel: no classifier in the checkpoint) with the test tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder, chat_template=None)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def llama_run(tiny_llama, tmp_path_factory) -> Path:
    from lorakit.commands.classify import run_classify

    folder = tmp_path_factory.mktemp("classify-llama")
    return run_classify(str(write_toy_recipe(folder, tiny_llama, folder / "run")))


def record(run: Path) -> dict:
    return json.loads((run / "lorakit_run.json").read_text())


def eval_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run.parent / "eval.jsonl").read_text().splitlines()]


def peft_logits(base: Path, run: Path, texts: list[str]):
    """Logits of base + head + adapter, loaded with plain transformers and peft as a user would."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    task = json.loads((run / "lorakit_task.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(base, **task["head"], dtype=torch.float32)
    model = PeftModel.from_pretrained(model, run).eval()
    tokenizer = AutoTokenizer.from_pretrained(run)
    with torch.no_grad():
        return torch.cat([model(**tokenizer(text, return_tensors="pt")).logits for text in texts])


# ---------------------------------------------------------------- training


@pytest.mark.slow
def test_a_lora_classifier_beats_the_majority_class_and_keeps_its_best_adapter(tiny_llama, llama_run):
    import torch

    history = record(llama_run)["log_history"]
    evals = [entry for entry in history if "eval_f1_macro" in entry]
    metrics = record(llama_run)["metrics"]
    assert metrics["eval_accuracy"] >= 0.8 > 0.5  # the majority class (sky) is half of the eval rows
    # The adapter saved is the best one evaluated (load_best_model_at_end), and it is the one scored at the end.
    assert metrics["eval_f1_macro"] == max(entry["eval_f1_macro"] for entry in evals[:-1])
    task = json.loads((llama_run / "lorakit_task.json").read_text())
    assert task["labels"] == ["animal", "sky", "water"] and task["head"]["num_labels"] == 3
    adapter = json.loads((llama_run / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    rows = eval_rows(llama_run)
    logits = peft_logits(tiny_llama, llama_run, [row["text"] for row in rows])
    assert logits.shape == (len(rows), 3)
    predicted = [task["labels"][i] for i in logits.argmax(-1).tolist()]
    accuracy = sum(p == row["label"] for p, row in zip(predicted, rows)) / len(rows)
    assert accuracy == pytest.approx(metrics["eval_accuracy"])  # plain peft agrees with what training measured
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_only_lora_and_the_head_train_and_the_base_stays_bitwise_frozen(tiny_llama, tmp_path):
    import torch

    from lorakit.commands.classify import build_classify
    from lorakit.models.loading import choose_placement
    from lorakit.recipe.load import load_recipe
    from lorakit.training.lifecycle import RunContext
    from lorakit.training.run_dir import Fingerprint

    recipe = load_recipe(write_toy_recipe(tmp_path, tiny_llama, tmp_path / "run", steps=3), command="classify")
    built = build_classify(RunContext(recipe, choose_placement(recipe.model), Fingerprint("t"), [], None))
    model = built.trainer.model
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or ".score.modules_to_save." in name for name in trainable)
    head = model.base_model.model.score.modules_to_save["default"].weight
    assert head.shape == (3, 64)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    before = head.detach().clone()
    built.trainer.train()
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    assert not torch.equal(head, before)



@pytest.mark.parametrize("head_only", [False, True])
def test_the_memory_estimate_sizes_the_classifier_that_trains(tiny_llama, tmp_path, head_only):
    from transformers import AutoConfig

    from lorakit.commands.classify import build_classify
    from lorakit.models.loading import choose_placement
    from lorakit.recipe.load import load_recipe
    from lorakit.training.lifecycle import RunContext
    from lorakit.training.memory import classifier_shape, estimate_memory, estimate_recipe_memory
    from lorakit.training.model_shape import model_shape
    from lorakit.training.run_dir import Fingerprint

    extra = f"  labels: {sorted(SHARES)}\n  head_only: {str(head_only).lower()}\n"
    path = write_toy_recipe(tmp_path, tiny_llama, tmp_path / "run", steps=1, **({"lora": ""} if head_only else {}))
    path.write_text(path.read_text().replace("  type: classification\n", "  type: classification\n" + extra))
    recipe = load_recipe(path, command="classify")
    built = build_classify(RunContext(recipe, choose_placement(recipe.model), Fingerprint("t"), [], None))
    trainable = sum(p.numel() for p in built.trainer.model.parameters() if p.requires_grad)

    config = AutoConfig.from_pretrained(tiny_llama)
    shape = model_shape(config, recipe.lora, classifier_shape(recipe))
    assert shape.trainable_params == trainable  # LoRA (unless head_only) and the head, as the run trains them
    assert shape.vocab == len(SHARES)  # the head's outputs, not the vocabulary
    estimate, setup = estimate_recipe_memory(recipe, config, "cpu")
    assert estimate.trainable_state == trainable * 16
    # The causal LM's vocabulary head is neither counted nor given a backward workspace.
    as_causal_lm = estimate_memory(model_shape(config, recipe.lora), setup)
    assert estimate.workspace < as_causal_lm.workspace

@pytest.mark.slow
def test_an_encoder_trains_with_lora_and_a_linear_probe_trains_the_head_alone(tmp_path):
    from safetensors.torch import load_file

    from lorakit.commands.classify import run_classify

    bert = tiny_bert(tmp_path / "bert")
    run = run_classify(str(write_toy_recipe(tmp_path, bert, tmp_path / "lora")))
    assert record(run)["metrics"]["eval_accuracy"] > 0.5
    saved = load_file(run / "adapter_model.safetensors")
    assert saved["base_model.model.classifier.weight"].shape == (3, 64)
    assert any("lora_A" in key for key in saved)

    probe = run_classify(str(write_toy_recipe(tmp_path, bert, tmp_path / "probe", steps=10, lora="")),
                         ("task.head_only=true",))
    weights = load_file(probe / "adapter_model.safetensors")
    assert set(weights) == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    trainable = record(probe)["parameters"]["trainable"]
    assert trainable == 3 * 64 + 3  # the head and nothing else
    from lorakit.commands.evaluate import run_eval

    report = run_eval(str(probe))  # its resolved recipe (lorakit's LoRA defaults written out) reads back
    assert report["metrics"]["model"]["accuracy"] == pytest.approx(record(probe)["metrics"]["eval_accuracy"])


# ---------------------------------------------------------------- the run read back


@pytest.mark.slow
def test_merge_gives_a_folder_plain_transformers_and_pipeline_load_with_equal_logits(tiny_llama, llama_run, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    result = CliRunner().invoke(main, ["merge", str(llama_run), "--output", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = tmp_path / "merged"
    assert not (merged / "adapter_config.json").exists()
    texts = [row["text"] for row in eval_rows(llama_run)[:8]]
    expected = peft_logits(tiny_llama, llama_run, texts)
    model = AutoModelForSequenceClassification.from_pretrained(merged, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    with torch.no_grad():
        actual = torch.cat([model(**tokenizer(text, return_tensors="pt")).logits for text in texts])
    assert (actual - expected).abs().max().item() <= 1e-4 * max(1.0, expected.abs().max().item())
    assert model.config.id2label == {0: "animal", 1: "sky", 2: "water"}
    classify = pipeline("text-classification", model=str(merged))
    answers = classify(texts)
    assert [a["label"] for a in answers] == [model.config.id2label[i] for i in actual.argmax(-1).tolist()]
    # eval and predict read the merged folder as they read the run
    result = CliRunner().invoke(main, ["eval", str(merged), "--data", str(llama_run.parent / "eval.jsonl"),
                                       "--compare-base"])
    assert result.exit_code == 0, result.output
    report = json.loads((merged / "lorakit_eval.json").read_text())
    assert report["metrics"]["model"]["accuracy"] == pytest.approx(record(llama_run)["metrics"]["eval_accuracy"])
    assert set(report["metrics"]) == {"model", "majority"}  # a merged folder has no untrained head to compare
    result = CliRunner().invoke(main, ["predict", str(merged), "--data", str(llama_run.parent / "eval.jsonl"),
                                       "--output", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 41  # the header and every row


@pytest.mark.slow
def test_eval_shows_accuracy_f1_and_the_confusion_matrix_beside_the_baselines(llama_run):
    result = CliRunner().invoke(main, ["eval", str(llama_run), "--compare-base"])
    assert result.exit_code == 0, result.output
    report = json.loads((llama_run / "lorakit_eval.json").read_text())
    metrics = report["metrics"]
    assert set(metrics) == {"model", "base", "majority"}
    assert metrics["model"]["accuracy"] == pytest.approx(record(llama_run)["metrics"]["eval_accuracy"])
    assert metrics["majority"]["accuracy"] == pytest.approx(0.5)  # sky, the training data's commonest class
    assert metrics["model"]["accuracy"] > metrics["majority"]["accuracy"]
    matrix = report["confusion_matrix"]["model"]
    assert len(matrix) == 3 and sum(map(sum, matrix)) == 40
    assert sum(matrix[i][i] for i in range(3)) / 40 == pytest.approx(metrics["model"]["accuracy"])
    assert set(report["per_class"]["model"]) == {"animal", "sky", "water"}
    assert "confusion matrix (model)" in result.output and "majority class" in result.output


@pytest.mark.slow
def test_predict_writes_every_row_with_its_probabilities(llama_run, tmp_path):
    out = tmp_path / "predictions.jsonl"
    result = CliRunner().invoke(main, ["predict", str(llama_run), "--data", str(llama_run.parent / "eval.jsonl"),
                                       "--output", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["row"] for row in rows] == list(range(1, 41))
    for row in rows:
        assert row["label"] in ("animal", "sky", "water")
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["score"] == max(row["probabilities"].values())
    again = CliRunner().invoke(main, ["predict", str(llama_run), "--data", str(llama_run.parent / "eval.jsonl"),
                                      "--output", str(out)])
    assert again.exit_code == 2 and "already exists; nothing was changed" in again.output


# ---------------------------------------------------------------- before any training


def test_a_classify_recipe_is_checked_against_its_task(tiny_llama, tmp_path):
    from lorakit.errors import RecipeError
    from lorakit.recipe.load import load_recipe

    recipe = write_toy_recipe(tmp_path, tiny_llama, tmp_path / "run", extra="early_stopping:\n  patience: 2\n")
    loaded = load_recipe(recipe, command="classify")
    assert loaded.sections["task"]["type"] == "classification" and loaded.lora["task_type"] == "SEQ_CLS"
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe, ("task.type=regression", "task.labels=[a]", "task.class_weights=balanced",
                             "training.metric_for_best_model=f1", "lora.task_type=CAUSAL_LM", "task.lables=[a]"),
                    command="classify")
    text = str(error.value)
    for expected in ("task.labels (command line): a regression head predicts one number",
                     "task.class_weights (command line): applies to classification and multi_label",
                     "training.metric_for_best_model (command line): a regression task is scored by mse, pearson, "
                     "spearman or loss, not 'f1'",
                     "lora.task_type (command line): classify trains a sequence-classification head",
                     "task.lables (command line): unknown key; did you mean task.labels?"):
        assert expected in text


def test_a_head_of_the_labels_size_on_a_decoder_and_an_encoder(tiny_llama, tmp_path):
    from lorakit.data.classification import LabelSpace
    from lorakit.models.classifier import build_trainable_model, load_classifier, load_classifier_tokenizer
    from lorakit.models.loading import choose_placement
    from lorakit.recipe.load import load_recipe

    space = LabelSpace("classification", ["a", "b", "c", "d"])
    for base, head in ((tiny_llama, "score"), (tiny_bert(tmp_path / "bert"), "classifier")):
        recipe = load_recipe(write_toy_recipe(tmp_path, base, tmp_path / "run"), command="classify")
        tokenizer = load_classifier_tokenizer(recipe.model)
        model, new = load_classifier(recipe, choose_placement({"device": "cpu"}), space, tokenizer)
        assert new == [head]
        assert model.config.id2label == {0: "a", 1: "b", 2: "c", 3: "d"}
        assert model.config.pad_token_id == tokenizer.pad_token_id
        peft_model = build_trainable_model(model, recipe.lora, new, head_only=False)
        assert getattr(peft_model.base_model.model, head).modules_to_save["default"].out_features == 4


def test_a_checkpoint_that_is_a_classifier_of_other_labels_gets_a_new_head(tiny_llama, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    from lorakit.data.classification import LabelSpace
    from lorakit.models.classifier import load_classifier, load_classifier_tokenizer
    from lorakit.models.loading import choose_placement
    from lorakit.recipe.load import load_recipe

    five = tmp_path / "five-labels"
    old = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=5)
    old.save_pretrained(five)
    load_classifier_tokenizer({"name_or_path": str(tiny_llama)}).save_pretrained(five)
    recipe = load_recipe(write_toy_recipe(tmp_path, five, tmp_path / "run"), command="classify")
    model, new = load_classifier(recipe, choose_placement({"device": "cpu"}), LabelSpace("classification", ["a", "b"]),
                                 load_classifier_tokenizer(recipe.model))
    assert new == ["score"] and model.score.weight.shape == (2, 64)
    layer = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(model.state_dict()[layer], old.state_dict()[layer])  # the rest comes from the checkpoint


def test_layers_outside_the_model_are_refused_by_number(tiny_llama, tmp_path):
    from lorakit.data.classification import LabelSpace
    from lorakit.errors import LorakitError
    from lorakit.models.classifier import build_trainable_model, load_classifier, load_classifier_tokenizer
    from lorakit.models.loading import choose_placement
    from lorakit.recipe.load import load_recipe

    recipe = load_recipe(write_toy_recipe(tmp_path, tiny_llama, tmp_path / "run"), ("lora.layers_to_transform=[1]",),
                         command="classify")
    tokenizer = load_classifier_tokenizer(recipe.model)
    model, new = load_classifier(recipe, choose_placement({"device": "cpu"}), LabelSpace("classification", ["a", "b"]),
                                 tokenizer)
    top = build_trainable_model(model, recipe.lora, new, head_only=False)
    assert {name.split(".layers.")[1].split(".")[0] for name, _ in top.named_parameters() if "lora_A" in name} == {"1"}
    with pytest.raises(LorakitError, match=r"layers_to_transform: the model has layers 0-1; 4 is not one of them"):
        build_trainable_model(model, {**recipe.lora, "layers_to_transform": [4]}, new, head_only=False)


def mixed_rows(count: int, seed: int) -> list[dict]:
    """Texts with words of any of the topics: the topics present (multi_label), how many water words (regression)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        present = [topic for topic in TOPICS if rng.random() < 0.4]
        words = [word for topic in present for word in rng.choices(TOPICS[topic], k=rng.randint(1, 3))]
        words += rng.choices(FILLER, k=6 - len(words) if len(words) < 6 else 1)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "topics": present,
                     "water": float(sum(word in TOPICS["water"] for word in words))})
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("kind, column, metric, extra", [
    ("multi_label", "topics", "eval_f1_macro", "  class_weights: balanced\n"),
    ("regression", "water", "eval_pearson", ""),
])
def test_multi_label_and_regression_heads_learn(tiny_llama, tmp_path, kind, column, metric, extra):
    from lorakit.commands.classify import run_classify

    recipe = write_toy_recipe(tmp_path, tiny_llama, tmp_path / "run", steps=40)
    write_jsonl(tmp_path / "train.jsonl", mixed_rows(240, seed=1))
    write_jsonl(tmp_path / "eval.jsonl", mixed_rows(60, seed=2))
    text = recipe.read_text().replace("  type: classification\n", f"  type: {kind}\n  label_column: {column}\n{extra}")
    recipe.write_text(text)
    run = run_classify(str(recipe))
    history = [entry for entry in record(run)["log_history"] if metric in entry]
    first, best = history[0][metric], record(run)["metrics"][metric]
    assert best > max(first, 0.5), (first, best)
    task = json.loads((run / "lorakit_task.json").read_text())
    assert task["head"]["problem_type"] == {"multi_label": "multi_label_classification",
                                            "regression": "regression"}[kind]
    assert task["head"]["num_labels"] == (3 if kind == "multi_label" else 1)


@pytest.mark.slow
def test_a_qlora_classifier_keeps_its_head_unquantized_and_merges_into_the_original_weights(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    from lorakit.commands.classify import run_classify
    from lorakit.commands.evaluate import run_eval

    recipe = write_toy_recipe(tmp_path, tiny_llama, tmp_path / "run", steps=20,
                              extra="quantization:\n  load_in_4bit: true\n")
    run = run_classify(str(recipe))
    assert record(run)["metrics"]["eval_accuracy"] > 0.5
    head = load_file(run / "adapter_model.safetensors")["base_model.model.score.weight"]
    assert head.shape == (3, 64) and head.is_floating_point()
    report = run_eval(str(run))  # loaded as trained: the 4-bit base with its full-precision head
    assert report["metrics"]["model"]["accuracy"] == pytest.approx(record(run)["metrics"]["eval_accuracy"])
    result = CliRunner().invoke(main, ["merge", str(run), "--output", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "merged" / "lorakit_task.json").is_file()


@pytest.mark.slow
def test_the_model_card_says_text_classification_with_the_eval_figures(llama_run, tmp_path):
    import yaml

    from lorakit.hub.card import ADAPTER, MERGED, build_card

    assert CliRunner().invoke(main, ["eval", str(llama_run)]).exit_code == 0
    card = build_card(llama_run, ADAPTER, "you/toy-topics")
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["pipeline_tag"] == "text-classification"
    results = metadata["model-index"][0]["results"]
    figures = {m["type"]: m["value"] for r in results for m in r["metrics"]}
    assert figures["accuracy"] == pytest.approx(record(llama_run)["metrics"]["eval_accuracy"])
    assert "AutoModelForSequenceClassification.from_pretrained" in card and '"lorakit_task.json"' in card
    assert CliRunner().invoke(main, ["merge", str(llama_run), "--output", str(tmp_path / "m")]).exit_code == 0
    merged = build_card(tmp_path / "m", MERGED, "you/toy-topics")
    assert 'pipeline("text-classification", model="you/toy-topics")' in merged

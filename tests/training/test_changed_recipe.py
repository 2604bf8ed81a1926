"""A run folder refused because the recipe changed says which keys changed, and from what to what."""

from __future__ import annotations

import pytest

from conftest import facts_rows, write_jsonl
from lorakit.errors import OutputDirError
from lorakit.recipe.load import load_recipe
from lorakit.training import run_dir


def fingerprint_of(recipe) -> run_dir.Fingerprint:
    return run_dir.Fingerprint(recipe.fingerprint(), {}, settings=recipe.weight_settings())


@pytest.mark.parametrize("status", [run_dir.INTERRUPTED, run_dir.COMPLETED])
def test_the_refusal_names_the_changed_keys(tiny_llama, tmp_path, status):
    data = write_jsonl(tmp_path / "train.jsonl", facts_rows("messages"))
    path = tmp_path / "recipe.yaml"
    out = tmp_path / "out"
    path.write_text(f"model: {tiny_llama}\ndata:\n  train: {data}\ntraining:\n  output_dir: {out}\n")
    earlier = load_recipe(path)
    out.mkdir()
    (out / run_dir.RECIPE_FILE).write_text(earlier.dump())
    run_dir.write_record(out, {"status": status, **fingerprint_of(earlier).to_record()})

    changed = load_recipe(path, ["lora.r=4", "training.learning_rate=1e-3", "training.logging_steps=1"])
    with pytest.raises(OutputDirError) as info:
        run_dir.prepare_output_dir(out, fingerprint_of(changed))
    message = str(info.value)
    assert "a different recipe (lora.r: 16 -> 4; training.learning_rate: 0.0002 -> 0.001)" in message
    assert "logging_steps" not in message  # logging decides nothing about the weights, so it is no change

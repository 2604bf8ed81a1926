"""The recipe reference page is generated from the field docs; it must not drift from the code."""

from pathlib import Path

from lorakit.recipe import reference


def test_recipe_reference_page_matches_the_code():
    page = Path(__file__).parents[2] / "docs" / "recipe-reference.md"
    assert page.read_text() == reference.render(), "run: python -m lorakit.recipe.reference > docs/recipe-reference.md"


def test_every_lorakit_key_is_documented():
    text = reference.render()
    for key in ("model.name_or_path", "data.truncation", "data.train_on", "early_stopping.patience", "`fraction`",
                "lora.target_modules", "training.learning_rate"):
        assert key in text

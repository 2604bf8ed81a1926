"""The recipe: sections and defaults (sections), reading YAML with overrides (load), checking (validation,
schema), and the generated key reference (reference)."""

from lorakit.errors import Problem, RecipeError
from lorakit.recipe.load import load_recipe
from lorakit.recipe.sections import SECRET_KEY_PATTERN, Recipe, looks_like_path, own_fields, redact, upstream_fields

__all__ = ["Problem", "Recipe", "RecipeError", "SECRET_KEY_PATTERN", "load_recipe", "looks_like_path", "own_fields",
           "redact", "upstream_fields"]

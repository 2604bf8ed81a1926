"""lorakit: parameter-efficient fine-tuning of LLMs from one YAML recipe.

From Python: lorakit.sft(recipe_or_dict, **overrides), lorakit.evaluate(...), lorakit.merge(...), ... (see
lorakit/api.py and docs/python-api.md). They are loaded on first use, so importing lorakit (and `lorakit --help`)
stays instant.
"""

__version__ = "0.1.0"

API = ("sft", "dpo", "classify", "train", "evaluate", "merge", "generate", "validate", "load_recipe",
       "TrainResult", "EvalResult", "MergeResult")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:
        from lorakit import api

        return getattr(api, name)
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")

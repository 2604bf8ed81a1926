"""The recipe reference (docs/recipe-reference.md), rendered from the field docs in lorakit/recipe/sections.py.

One source for the help text: a test checks the committed page matches what this renders.
"""

from __future__ import annotations

import dataclasses

from lorakit.recipe import sections as recipe


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
    else:
        return "required"
    return "`null`" if value is None else f"`{value}`".replace("`True`", "`true`").replace("`False`", "`false`")


def _table(cls: type, prefix: str) -> list[str]:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for field in dataclasses.fields(cls):
        lines.append(f"| `{prefix}{field.name}` | {_default(field)} | {field.metadata['doc']} |")
    return lines


def _upstream(title: str, target: str, defaults: dict) -> list[str]:
    lines = [f"## `{title}` -> `{target}`", "",
             f"Every field of `{target}` is accepted under its own name and checked against the class. "
             "lorakit changes only these defaults:", "", "| key | lorakit default |", "|---|---|"]
    lines += [f"| `{title}.{key}` | `{value}` |" for key, value in defaults.items()]
    return lines + [""]


def render() -> str:
    out = ["# Recipe reference", "",
           "Generated from `lorakit/recipe/sections.py` by `python -m lorakit.recipe.reference > docs/recipe-reference.md`.", "",
           "A recipe has lorakit's own sections (`model`, `data`, `early_stopping`) and sections passed to upstream "
           "classes (`quantization`, `lora`, `training`). A relative path in a recipe (model, data, chat template, "
           "accelerate config) is relative to the recipe file's folder, so the recipe means the same from any working "
           "directory; one given on the command line is relative to the working directory, and so is "
           "`training.output_dir`. The resolved recipe saved with a run holds them absolute.", "",
           "## `model`", ""]
    out += _table(recipe.ModelSection, "model.") + ["", "## `data`", ""]
    out += _table(recipe.DataSection, "data.") + ["", "### each source in `data.train` / `data.eval`", "",
                                                  "A source may also be written as just its path.", ""]
    out += _table(recipe.DataSource, "") + ["", "## `early_stopping`", "",
                                            "Stops when eval loss stops improving and keeps the best adapter "
                                            "(transformers' EarlyStoppingCallback; needs eval data).", ""]
    out += _table(recipe.EarlyStoppingSection, "early_stopping.") + ["", "## `launch`", "",
                                                                     "How many processes run the fine-tune; see "
                                                                     "[distributed.md](distributed.md).", ""]
    out += _table(recipe.LaunchSection, "launch.") + ["", "## `evaluation` (sft)", "",
                                                       "What `lorakit eval` scores replies with; see "
                                                       "[eval.md](eval.md#which-metric-for-which-task).", ""]
    out += _table(recipe.EvaluationSection, "evaluation.") + [""]
    out += _upstream("quantization", "transformers.BitsAndBytesConfig",
                     {**recipe.QUANTIZATION_4BIT_DEFAULTS, "bnb_4bit_compute_dtype": "the model dtype",
                      "bnb_4bit_quant_storage": "the model dtype (FSDP needs them equal)"})
    out += _upstream("lora", "peft.LoraConfig", recipe.LORA_DEFAULTS)
    out += _upstream("training", "trl.SFTConfig", {
        **recipe.TRAINING_DEFAULTS,
        "output_dir": "runs/<recipe file name>",
        "bf16 / fp16": "from the model dtype on GPU; off on CPU",
        "gradient_checkpointing": "on for GPU, off on CPU",
        "packing": "true with flash attention (padding-free); else false with train_sampling_strategy: group_by_length",
        "use_cpu": "true when the device is CPU",
    })
    out += ["These `training` keys are set from lorakit's own keys and are refused in `training`:", ""]
    out += [f"- `training.{key}`: set {where}" for key, where in recipe.TRAINING_KEYS_OWNED_ELSEWHERE.items()]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")

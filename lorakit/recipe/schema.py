"""Type checking of recipe values against Python annotations.

The recipe's upstream sections are checked against the annotations of the
upstream classes themselves (trl.SFTConfig, peft.LoraConfig,
transformers.BitsAndBytesConfig), so this module knows nothing about any of
their keys: it only understands the handful of annotation shapes they use.
"""

from __future__ import annotations

import difflib
import enum
import math
import types
import typing
from typing import Any

_NoneType = type(None)


NOT_FINITE = "finite number"


class Invalid(Exception):
    """A value that does not fit its annotation; the message says what would."""


def describe(annotation: Any) -> str:
    """A short human name for an annotation: 'int', 'float or null', 'one of a, b'."""
    origin = typing.get_origin(annotation)
    if annotation is Any or annotation is typing.Any:
        return "any value"
    if annotation is _NoneType or annotation is None:
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe(a) for a in typing.get_args(annotation)))
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in annotation)
    if origin in (list, tuple, set) or annotation in (list, tuple, set):
        args = typing.get_args(annotation)
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin is dict or annotation is dict:
        return "a mapping"
    if isinstance(annotation, type):
        return {"str": "a string", "bool": "true or false", "int": "an integer", "float": "a number"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation)


def coerce(value: Any, annotation: Any) -> Any:
    """Return `value` converted to fit `annotation`, or raise Invalid.

    Conversions are the ones YAML users trip over: an int where a float is
    expected, and '1e-4' (a string in YAML 1.1) where a number is expected.
    """
    if annotation is Any or annotation is typing.Any or annotation is None and value is None:
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        if value is None:
            if _NoneType in members:
                return None
            raise Invalid(f"must be {describe(annotation)}, not null")
        # 'SomeEnum | str' means "the enum, or its value as a string" (transformers converts and rejects others).
        enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
        if enums and isinstance(value, bool):
            value = _yaml_word(value, [m.value for m in enums[0]])
        if enums and str in members and isinstance(value, str):
            return coerce(value, enums[0])
        # Prefer an exact match before conversions, so 'str | int' keeps a string a string.
        ordered = sorted(members, key=lambda a: 0 if _exact(value, a) else 1)
        errors = []
        for member in ordered:
            if member is _NoneType:
                continue
            try:
                return coerce(value, member)
            except Invalid as error:
                errors.append(error)
        # The most telling reason wins: a suggested spelling, or a number that is there but not finite.
        telling = [e for e in errors if "did you mean" in str(e) or NOT_FINITE in str(e)]
        raise telling[0] if telling else Invalid(f"must be {describe(annotation)}, not {_show(value)}")
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if isinstance(value, bool) and bool not in map(type, choices):
            value = _yaml_word(value, choices)
        if value in choices:
            return value
        raise Invalid(f"must be one of {', '.join(map(str, choices))}, not {_show(value)}{_suggest(value, choices)}")
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        choices = [m.value for m in annotation]
        if isinstance(value, bool):
            value = _yaml_word(value, choices)
        if value in choices or isinstance(value, annotation):
            return value.value if isinstance(value, annotation) else value
        raise Invalid(f"must be one of {', '.join(map(str, choices))}, not {_show(value)}{_suggest(value, choices)}")
    if origin in (list, tuple, set) or annotation in (list, tuple, set):
        if not isinstance(value, (list, tuple)):
            raise Invalid(f"must be {describe(annotation)}, not {_show(value)}")
        args = typing.get_args(annotation)
        if not args or args[0] is Any:
            return list(value)
        items = []
        for index, item in enumerate(value):
            try:
                items.append(coerce(item, args[0]))
            except Invalid as error:
                raise Invalid(f"item {index} {error}") from None
        return items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise Invalid(f"must be a mapping, not {_show(value)}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise Invalid(f"must be true or false, not {_show(value)}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise Invalid(f"must be an integer, not {_show(value)}")
    if annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise Invalid(f"must be a number, not {_show(value)}")
        # YAML spells them .nan and .inf; no setting means anything with them (torch's optimizers crash on a NaN
        # learning rate deep inside a step), so they are refused wherever a number goes.
        if not math.isfinite(number):
            raise Invalid(f"must be a {NOT_FINITE}, not {_show(value)}")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        raise Invalid(f"must be a string, not {_show(value)}")
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        # Upstream fields typed as a class (a torch dtype, a config object) take their string form from YAML.
        if isinstance(value, (str, dict)):
            return value
        raise Invalid(f"must be {describe(annotation)}, not {_show(value)}")
    return value


def _exact(value: Any, annotation: Any) -> bool:
    if annotation is bool:
        return isinstance(value, bool)
    if annotation in (int, float):
        return isinstance(value, annotation) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return False


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return str(value)


def _suggest(value: Any, choices: Any) -> str:
    close = closest(str(value), [str(c) for c in choices])
    return f"; did you mean {close}?" if close else ""


# Names that peer tools and papers use for keys spelled differently upstream.
SYNONYMS = {
    "rank": "r", "lora_r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules_regex": "target_modules",
    "lr": "learning_rate", "epochs": "num_train_epochs", "num_epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size", "micro_batch_size": "per_device_train_batch_size",
    "gradient_accumulation": "gradient_accumulation_steps", "warmup_ratio": "warmup_steps",
    "scheduler": "lr_scheduler_type", "lr_scheduler": "lr_scheduler_type", "max_seq_length": "max_length",
    "sequence_len": "max_length", "seq_len": "max_length", "model": "name_or_path", "model_name": "name_or_path",
    "base_model": "name_or_path", "torch_dtype": "dtype", "attention": "attn_implementation",
    "quant_type": "bnb_4bit_quant_type", "double_quant": "bnb_4bit_use_double_quant",
}


def closest(word: str, candidates: typing.Iterable[str]) -> str | None:
    """The candidate a typo (or a peer tool's name for the key) most likely meant, if any is close enough."""
    candidates = list(candidates)
    if SYNONYMS.get(word) in candidates:
        return SYNONYMS[word]
    matches = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _yaml_word(value: bool, choices) -> Any:
    """The word YAML 1.1 read as a boolean (`eval_strategy: no` arrives as False), where the choices spell it."""
    words = ("no", "off", "false") if value is False else ("yes", "on", "true")
    return next((word for word in words if word in choices), value)

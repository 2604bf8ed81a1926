"""Tied values in a search space: `lora.lora_alpha: {expr: "2 * lora.r"}`.

An expression is arithmetic over numbers and dotted recipe keys, read with Python's own parser and evaluated
node by node: nothing in it can call or import anything but the few functions named here.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Any, Callable

FUNCTIONS: dict[str, Callable] = {"int": int, "float": float, "round": round, "min": min, "max": max, "abs": abs}
OPERATORS: dict[type, Callable] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                                   ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
                                   ast.Pow: operator.pow}
SIGNS: dict[type, Callable] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
WRITTEN_AS = "write it with numbers, dotted recipe keys (lora.r), + - * / // % **, and " + ", ".join(FUNCTIONS)


class ExpressionError(ValueError):
    """An expression that cannot be read or evaluated; the message says why."""


def parse(text: Any) -> ast.Expression:
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError(f"must be a string such as \"2 * lora.r\"; {WRITTEN_AS}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ExpressionError(f"{text!r} is not an expression; {WRITTEN_AS}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS) or node.keywords:
                raise ExpressionError(f"{text!r}: only {', '.join(FUNCTIONS)} may be called")
        elif isinstance(node, ast.Constant) and (isinstance(node.value, bool)
                                                 or not isinstance(node.value, (int, float))):
            raise ExpressionError(f"{text!r}: {node.value!r} is not a number; {WRITTEN_AS}")
        elif not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Attribute,
                                   ast.Call, ast.Load, *OPERATORS, *SIGNS)):
            raise ExpressionError(f"{text!r}: {type(node).__name__.lower()} is not allowed; {WRITTEN_AS}")
    return tree


def names(text: str) -> list[str]:
    """The dotted recipe keys an expression reads, in the order written."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        key = dotted(node)
        if key is not None:
            if key not in FUNCTIONS and key not in found:
                found.append(key)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(parse(text))
    return found


def dotted(node: ast.AST) -> str | None:
    """'lora.r' for the attribute chain Python reads `lora.r` as; None for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = dotted(node.value)
        return f"{head}.{node.attr}" if head is not None else None
    return None


def evaluate(text: str, values: dict[str, Any]) -> int | float:
    """The expression's value with each dotted key read from `values`."""

    def value_of(node: ast.AST) -> Any:
        key = dotted(node)
        if key is not None:
            if key not in values:
                raise ExpressionError(f"{text!r} reads {key}, which is neither searched nor set in the recipe")
            found = values[key]
            if isinstance(found, bool) or not isinstance(found, (int, float)):
                raise ExpressionError(f"{text!r} reads {key}, which is {found!r}, not a number")
            return found
        if isinstance(node, ast.Expression):
            return value_of(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.UnaryOp):
            return SIGNS[type(node.op)](value_of(node.operand))
        if isinstance(node, ast.BinOp):
            left, right = value_of(node.left), value_of(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ExpressionError(f"{text!r}: an exponent of {right} is beyond any setting")
            try:
                return OPERATORS[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ExpressionError(f"{text!r} divides by zero with {values_named(text, values)}") from None
        if isinstance(node, ast.Call):
            return FUNCTIONS[node.func.id](*(value_of(arg) for arg in node.args))  # type: ignore[attr-defined]
        raise ExpressionError(f"{text!r}: cannot evaluate {type(node).__name__}")

    result = value_of(parse(text))
    if isinstance(result, complex) or not math.isfinite(result):
        raise ExpressionError(f"{text!r} gives {result} with {values_named(text, values)}")
    return result


def values_named(text: str, values: dict[str, Any]) -> str:
    return ", ".join(f"{key}={values[key]}" for key in names(text) if key in values) or "these values"

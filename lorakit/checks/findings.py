"""The findings of a validation: problems (the run cannot start), warnings, and what was checked and is fine."""

from __future__ import annotations

from dataclasses import dataclass, field

import click


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.problems.append(text)
        click.secho(f"  problem  {indent(text, 11)}", fg="red")

    def warning(self, text: str) -> None:
        self.warnings.append(text)
        click.secho(f"  warning  {indent(text, 11)}", fg="yellow")

    @staticmethod
    def ok(text: str) -> None:
        click.echo(f"  ok       {indent(text, 11)}")


def indent(text: str, width: int) -> str:
    return text.replace("\n", "\n" + " " * width)

"""What a training run prints before the first step: the summary screen (the log lines and the last line are
lorakit.training.progress's)."""

from __future__ import annotations

from pathlib import Path

import click

from lorakit.recipe.sections import Recipe


def quantization_text(quantization: dict | None) -> str:
    quant = quantization or {}
    if quant.get("load_in_4bit"):
        return (f"4-bit {quant.get('bnb_4bit_quant_type')} (QLoRA), double quant "
                f"{quant.get('bnb_4bit_use_double_quant')}")
    if quant.get("load_in_8bit"):
        return "8-bit (LLM.int8)"
    return "none (LoRA on full-precision weights)"


def print_summary(recipe: Recipe, placement, command_rows: list[tuple[str, str]], trainable: int, total: int,
                  trainer, steps: int, resume_from: Path | None) -> None:
    """The run at a glance: model, device, adapter, the command's own rows (data, template, task), batch, steps."""
    args = trainer.args
    lora = recipe.lora
    rows = [
        ("model", recipe.model["name_or_path"]),
        ("device", f"{placement.device_name}, {placement.dtype}, attention {placement.attn_implementation}"),
        ("quantization", quantization_text(recipe.quantization)),
        ("lora", f"r={lora['r']} alpha={lora['lora_alpha']} dropout={lora['lora_dropout']} "
                 f"targets={lora['target_modules']}"),
        ("trainable", f"{trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"),
        *command_rows,
    ]
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    # A DPO step scores each pair twice (chosen and rejected): it counts pairs, as its data rows do.
    unit = "pairs (chosen + rejected)" if recipe.command == "dpo" else "sequences"
    rows += [
        ("batch", f"{batch} {unit} per step = {args.per_device_train_batch_size} per device x "
                  f"{args.gradient_accumulation_steps} accumulation x {args.world_size} process(es)"
                  + (", packed" if getattr(args, "packing", False) else "")),
        ("steps", f"{steps} optimizer steps, learning rate {args.learning_rate:g} ({scheduler})"),
        ("output", str(recipe.output_dir) + (f" (resuming from {resume_from.name})" if resume_from else "")),
    ]
    if recipe.model.get("trust_remote_code") and not recipe.model.get("revision"):
        rows.append(("warning", "trust_remote_code without model.revision: the code run can change under you; "
                                "pin a commit"))
    width = max(len(k) for k, _ in rows)
    click.secho(f"lorakit {recipe.command}", bold=True)
    for key, value in rows:
        click.echo(f"  {key:<{width}}  {value}")


def data_rows(reports: dict, max_length: int) -> list[tuple[str, str]]:
    """Summary rows for tokenized data: rows, tokens, trained tokens, lengths, what was cut, per source."""
    rows = []
    for split, report in reports.items():
        stats = report.length_stats()
        rows.append((f"{split} data", f"{report.rows:,} rows, {report.tokens:,} tokens "
                     f"({report.trained_tokens:,} trained); length median {stats.get('median')}, max {stats.get('max')}"))
        cut = []
        if report.truncated:
            cut.append(f"{report.truncated} truncated to {max_length} tokens")
        if report.dropped_too_long:
            cut.append(f"{report.dropped_too_long} dropped as longer than {max_length} tokens")
        if report.dropped_no_trained_tokens:
            cut.append(f"{report.dropped_no_trained_tokens} dropped: no trained tokens left within max_length")
        if cut:
            rows.append(("", "; ".join(cut)))
        for source in report.sources:
            rows.append(("", f"{source.name}: {source.format}, {source.used_rows:,} of {source.rows:,} rows"))
    return rows

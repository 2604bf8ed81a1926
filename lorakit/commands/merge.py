"""`lorakit merge`: fold a run's LoRA adapter into its base model and write a standalone model folder
(the merge and its check live in lorakit.models.merge)."""

from __future__ import annotations

import click

from lorakit.models.merge import merge_run


@click.command()
@click.argument("run_dir", type=click.Path())
@click.option("--output", type=click.Path(file_okay=False),
              help="Folder to write the merged model to (default: RUN_DIR-merged, beside the run). "
                   "Must not exist or be empty.")
@click.option("--base", help="Base model to merge into, a Hub id or folder (default: the run's "
                             "lorakit_recipe.yaml model.name_or_path).")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              show_default=True, help="dtype of the merged weights; auto keeps the base checkpoint's own dtype.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "mps", "xpu"]), default="cpu", show_default=True,
              help="Where to merge. cpu needs RAM for about one copy of the model in --dtype; --device cuda is "
                   "faster and needs that much GPU memory instead.")
@click.option("--into", type=click.Choice(["original", "dequantized"]), default=None,
              help="For a QLoRA run: merge into the dequantized 4-bit weights the adapter was trained against "
                   "(the default, which scored better: docs/merge.md), or into the base's original weights.")
def command(run_dir: str, output: str | None, base: str | None, dtype: str, device: str, into: str | None) -> None:
    """Merge the LoRA adapter of RUN_DIR into its base model and write a standalone model folder.

    The result loads with AutoModelForCausalLM.from_pretrained(OUTPUT), without peft. A QLoRA run is merged
    into 16/32-bit weights, never into 4-bit ones. The merged model is checked against base + adapter
    before the folder is put in place; the figures are kept in OUTPUT/lorakit_merge.json.
    """
    merge_run(run_dir, output=output, base=base, dtype=dtype, device=device, into=into)

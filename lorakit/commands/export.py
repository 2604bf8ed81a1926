"""`lorakit export`: a run or merged model as a GGUF (llama.cpp), an Ollama folder or a vLLM-ready folder, checked
against the fine-tuned model (the export itself lives in lorakit.export)."""

from __future__ import annotations

import click

from lorakit.export.flow import DEFAULT_QUANT, FORMATS, run_export


@click.command()
@click.argument("source", metavar="RUN_OR_MERGED")
@click.option("--to", "to", type=click.Choice(FORMATS), required=True,
              help="gguf: one GGUF file for llama.cpp; ollama: the GGUF with a Modelfile; vllm: a merged folder "
                   "`vllm serve` takes as is.")
@click.option("--quant", metavar="TYPE",
              help=f"GGUF type (default {DEFAULT_QUANT}): f16, bf16, q8_0 and f32 come from llama.cpp's converter; "
                   "others (q4_k_m, q5_k_m, q6_k, ...) need llama.cpp's llama-quantize.")
@click.option("--output", type=click.Path(file_okay=False),
              help="Folder to write (default: RUN_OR_MERGED-gguf, -ollama or -vllm beside it). Must not exist or be "
                   "empty.")
@click.option("--adapter-only", is_flag=True,
              help="Keep the base separate: a LoRA GGUF (--to gguf) or the adapter folder with the `vllm serve "
                   "--enable-lora` line (--to vllm).")
@click.option("--no-verify", "no_verify", is_flag=True,
              help="Skip loading the export back and comparing it with the fine-tuned model (the record says so).")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              show_default=True, help="dtype the model is loaded and merged in; auto keeps the base checkpoint's.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "mps", "xpu"]), default="cpu", show_default=True,
              help="Where the model is loaded, merged and measured.")
def command(source: str, to: str, quant: str | None, output: str | None, adapter_only: bool, no_verify: bool,
            dtype: str, device: str) -> None:
    """Export RUN_OR_MERGED (a lorakit run folder or a merged model folder) for llama.cpp, Ollama or vLLM.

    A run is merged in memory first (a QLoRA run into the full-precision base). Unless --no-verify, the export is
    loaded back and compared with the fine-tuned model on prompts from the run's own data: tokenizer, chat
    template and stop tokens in the metadata, logits and greedy replies; the figures go into
    OUTPUT/lorakit_export.json and a failed check writes nothing. GGUF export needs llama.cpp's converter: see
    docs/export.md.
    """
    run_export(source, to=to, quant=quant, output=output, verify=not no_verify, adapter_only=adapter_only,
               dtype=dtype, device=device)

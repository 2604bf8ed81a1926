"""Writing a GGUF with llama.cpp's converter: the model's tokenizer keys and names written explicitly, the
pre-tokenizer proved, other quantizations made by llama-quantize from a 16-bit GGUF."""

from __future__ import annotations

from pathlib import Path

import click

from lorakit.errors import LorakitError
from lorakit.export import converter
from lorakit.export.vocabulary import check_texts, gpt2_split_fits, tokenizer_settings

# llama.cpp's name for GPT-2's word splitting in tokenizer.ggml.pre (its runtime refuses "gpt2").
GPT2_PRE_TOKENIZER = "gpt-2"


def gguf_metadata(name: str, base_name: str | None) -> dict:
    """general.* keys, in the converter's own --metadata format: the export's name and the model it came from."""
    from lorakit.hub.card import is_hub_id

    metadata: dict = {"general.name": name}
    if base_name:
        base = {"name": base_name if is_hub_id(base_name) else Path(base_name).name}
        if is_hub_id(base_name):
            base.update(organization=base_name.split("/")[0] if "/" in base_name else None,
                        repo_url=f"https://huggingface.co/{base_name}")
        metadata["general.base_models"] = [{k: v for k, v in base.items() if v}]
    return metadata


def converter_settings(source, stops: list[int], name: str) -> dict:
    """What the driver adds to the converter: tokenizer keys, metadata, and the pre-tokenizer where proved."""
    reason = gpt2_split_fits(source.tokenizer, check_texts(source.tokenizer, source.conversations))
    return {"pre_tokenizer": None if reason else GPT2_PRE_TOKENIZER, "pre_tokenizer_refusal": reason,
            "tokenizer": tokenizer_settings(source.tokenizer, stops),
            "metadata": gguf_metadata(name, source.base_name)}


def write_gguf(source, settings: dict, folder: Path, name: str, quant: str, llama_cpp: Path) -> Path:
    """Convert source.folder into folder/NAME-QUANT.gguf; a type the converter cannot write goes via llama-quantize."""
    target = folder / f"{name}-{quant}.gguf"
    if quant in converter.CONVERTER_TYPES:
        click.echo(f"  converting with llama.cpp's {converter.HF_CONVERTER} to {quant}")
        convert(source, settings, target, quant, llama_cpp, folder)
        return target
    tool = converter.find_quantize_tool(llama_cpp)
    middle_type = "bf16" if source.placement.dtype == "bfloat16" else "f16"
    middle = folder / f".{name}-{middle_type}.gguf"
    click.echo(f"  converting with llama.cpp's {converter.HF_CONVERTER} to {middle_type}, then {tool.name} {quant}")
    convert(source, settings, middle, middle_type, llama_cpp, folder)
    try:
        converter.run_quantize(tool, middle, target, converter.known_types()[quant])
    finally:
        middle.unlink(missing_ok=True)
    return target


def convert(source, settings: dict, target: Path, outtype: str, llama_cpp: Path, work: Path) -> None:
    refusal = settings.get("pre_tokenizer_refusal")
    driver_settings = {key: value for key, value in settings.items() if key != "pre_tokenizer_refusal"}
    try:
        converter.run_converter(llama_cpp, converter.HF_CONVERTER,
                                [str(source.folder), "--outfile", str(target), "--outtype", outtype],
                                driver_settings, work)
    except LorakitError as error:
        if refusal and "pre-tokenizer" in str(error):
            raise LorakitError(f"the tokenizer cannot be converted to GGUF: llama.cpp does not recognise its "
                               f"pre-tokenizer, and GPT-2's splitting does not fit it ({refusal}); nothing was "
                               "written. A llama.cpp that knows this tokenizer (convert_hf_to_gguf_update.py) "
                               "can convert it") from None
        raise
    if not target.is_file():
        raise LorakitError(f"llama.cpp's converter finished without writing {target.name}; nothing was written")


def runtime_knows_pre_tokenizer(llama_cpp: Path, name: str | None) -> bool | None:
    """Whether the llama.cpp runtime of these sources accepts tokenizer.ggml.pre NAME (None: cannot tell)."""
    vocab = llama_cpp / "src" / "llama-vocab.cpp"
    if name is None or not vocab.is_file():
        return None
    return f'tokenizer_pre == "{name}"' in vocab.read_text(encoding="utf-8", errors="replace")

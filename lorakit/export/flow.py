"""`lorakit export`, start to end: check what is needed, measure the fine-tuned model, write, verify, put in place.

Everything is written under a temporary name beside the destination and renamed into place only at the end, once
the export has been checked (or, with --no-verify, once it is complete): a failure leaves nothing half-written.
The figures go into the export folder as lorakit_export.json.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import click

from lorakit.errors import ExportCheckError, LorakitError

RECORD_FILE = "lorakit_export.json"
FORMATS = ("gguf", "ollama", "vllm")
DEFAULT_QUANT = "f16"


def run_export(name: str, *, to: str, quant: str | None = None, output: str | os.PathLike | None = None,
               verify: bool = True, adapter_only: bool = False, dtype: str = "auto", device: str = "cpu") -> Path:
    from lorakit.models.loading import quiet_upstream_logs

    quiet_upstream_logs()
    source_path = Path(name).expanduser()
    if not source_path.exists():
        raise LorakitError(f"{name}: no such run or model folder")
    if to == "vllm" and quant:
        raise LorakitError("--quant is for --to gguf and --to ollama; vLLM serves the merged safetensors folder")
    if adapter_only and to == "ollama":
        raise LorakitError("--adapter-only is for --to gguf (a LoRA GGUF) and --to vllm; an Ollama folder holds "
                           "the whole model")
    folder = source_path.parent / source_path.stem if source_path.is_file() else source_path
    out = Path(output) if output else folder.parent / f"{folder.resolve().name}-{to}"
    from lorakit.training.folder_lock import hold_lock

    with hold_lock(out, "lorakit export"):  # a second export (or a merge) into the same folder is refused at once
        return export_into(out, name, to, quant, verify, adapter_only, dtype, device)


def export_into(out: Path, name: str, to: str, quant: str | None, verify: bool, adapter_only: bool, dtype: str,
                device: str) -> Path:
    """The export itself, with `out` locked: written beside it under a temporary name, renamed into place."""
    from lorakit.export import converter
    from lorakit.models.merge import check_output_folder

    check_output_folder(out)
    llama_cpp = None
    if to in ("gguf", "ollama"):
        converter.check_python_packages()
        quant = converter.check_quant(quant or DEFAULT_QUANT)
        llama_cpp = converter.find_llama_cpp()
        if quant not in converter.CONVERTER_TYPES:
            converter.find_quantize_tool(llama_cpp)

    click.echo(f"lorakit export: {name} -> {to}" + (f" ({quant})" if quant else "") + f" in {out}")
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    started = time.time()
    try:
        partial.mkdir(parents=True)
        if adapter_only:
            from lorakit.export.adapter import export_adapter

            record = export_adapter(name, to, partial, out, quant, llama_cpp, verify)
        else:
            record = export_model(name, to, partial, out, quant, llama_cpp, verify, dtype, device)
        record.update(seconds=round(time.time() - started, 1), created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      versions=versions())
        (partial / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        if record.get("verified") is False:
            raise ExportCheckError(f"the export does not answer like the fine-tuned model: "
                                   f"{'; '.join(record['problems'])}; nothing was written")
        if out.exists():
            out.rmdir()  # checked empty above; a folder cannot be renamed onto one that exists
        os.replace(partial, out)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    click.echo(f"lorakit: {to} export in {out} ({time.time() - started:.0f} s)"
               + ("" if verify else "; NOT verified (--no-verify)"))
    for line in record.get("commands", []):
        click.echo(f"  {line}")
    return out


def export_model(name: str, to: str, partial: Path, out: Path, quant: str | None, llama_cpp: Path | None,
                 verify: bool, dtype: str, device: str) -> dict:
    from lorakit.export import gguf as gguf_export
    from lorakit.export import verify as checks
    from lorakit.export.source import prepare_source
    from lorakit.export.vocabulary import stop_tokens

    staging = partial / (".source" if to != "vllm" else "model")
    stops_seen: list[int] = []

    def measure(model, tokenizer, conversations, folder):
        stops_seen[:] = stop_tokens(tokenizer, folder, model)
        return checks.measure(model, tokenizer, conversations, stops_seen) if verify else None

    source = prepare_source(name, staging, measure, dtype=dtype, device=device)
    stops = stops_seen
    record = source_record(source, to, stops)
    if to == "vllm":
        from lorakit.export import vllm

        for path in list(staging.iterdir()):
            os.replace(path, partial / path.name)
        staging.rmdir()
        check = vllm.check_merged_folder(partial, source.reference, source.placement) if verify else None
        record["commands"] = [vllm.serve_merged(out, out.name)]
        return finish(record, check, verify)

    file_stem = Path(source.name).resolve().name if Path(source.name).is_dir() else Path(source.name).stem
    settings = gguf_export.converter_settings(source, stops, file_stem)
    gguf_file = gguf_export.write_gguf(source, settings, partial, file_stem, quant, llama_cpp)
    shutil.rmtree(staging)
    record["gguf"] = gguf_facts(gguf_file, quant, settings, llama_cpp)
    check = None
    if verify:
        check = checks.verify_gguf(gguf_file, source.reference, quant, settings["tokenizer"], source.tokenizer,
                                   source.conversations)
        known = gguf_export.runtime_knows_pre_tokenizer(llama_cpp, record["gguf"]["pre_tokenizer"])
        check["llama_cpp_knows_pre_tokenizer"] = known
        if known is False:
            check["problems"].append(f"llama.cpp's runtime ({llama_cpp / 'src'}) does not know the pre-tokenizer "
                                     f"{record['gguf']['pre_tokenizer']!r} written in the GGUF")
            check["passed"] = False
        from lorakit.export.llama_cpp_check import run_llama_cpp

        check["llama_cpp"] = run_llama_cpp(gguf_file, source.reference, source.tokenizer, source.conversations)
        if check["llama_cpp"].get("problems"):
            check["problems"] += check["llama_cpp"]["problems"]
            check["passed"] = False
    if to == "ollama":
        from lorakit.export.ollama import write_modelfile

        record["ollama"] = write_modelfile(partial, gguf_file, source, settings["tokenizer"], stops, out)
        record["commands"] = [record["ollama"]["create_command"]]
    else:
        record["commands"] = [f"llama-cli -m {out.resolve() / gguf_file.name} -cnv   # chat, with the template "
                              "from the GGUF's metadata"]
    return finish(record, check, verify)


def finish(record: dict, check: dict | None, verify: bool) -> dict:
    if not verify:
        record.update(verified=None, check=None, note="not verified: exported with --no-verify")
        return record
    record.update(verified=bool(check["passed"]), check=check, problems=check.get("problems", []))
    return record


def source_record(source, to: str, stops: list[int]) -> dict:
    target = source.target
    return {
        "format": to,
        "source": {"path": str(Path(source.name).resolve()), "kind": source.kind, "base_model": source.base_name,
                   "trained_with_quantization": target.quantization, "reference_dtype": source.placement.dtype},
        "stop_tokens": [{"id": i, "text": source.tokenizer.convert_ids_to_tokens(i)} for i in stops],
        "check_conversations": len(source.conversations),
        "notes": source.notes,
    }


def gguf_facts(file: Path, quant: str, settings: dict, llama_cpp: Path) -> dict:
    from gguf import GGUFReader

    from lorakit.export.verify import read_fields

    fields = read_fields(GGUFReader(str(file)))
    tokenizer = {key: value for key, value in settings["tokenizer"].items() if key != "chat_template"}
    return {"file": file.name, "type": quant, "bytes": file.stat().st_size, "converter": str(llama_cpp),
            "architecture": fields.get("general.architecture"), "name": fields.get("general.name"),
            "pre_tokenizer": fields.get("tokenizer.ggml.pre"),
            "pre_tokenizer_proved_by_lorakit": settings.get("pre_tokenizer"),
            "tokenizer_keys": tokenizer, "chat_template_in_metadata": "tokenizer.chat_template" in fields}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from lorakit.training.run_dir import library_versions

    found = library_versions()
    for package in ("gguf", "llama-cpp-python"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found

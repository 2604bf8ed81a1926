"""The model card `lorakit push` uploads with an export folder (GGUF, with a Modelfile for Ollama).

The metadata says what the repo is (library_name gguf, tags gguf/llama.cpp/ollama, the base model when it is a
Hub model); the body says how to run it and what the export check measured, from lorakit_export.json.
"""

from __future__ import annotations

import json
from pathlib import Path

EXPORT_FILE = "lorakit_export.json"


def read_export_record(folder: Path) -> dict:
    path = folder / EXPORT_FILE
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def build_gguf_card(folder: Path, repo_id: str) -> str:
    from huggingface_hub import ModelCardData

    from lorakit.hub.card import is_hub_id, stamp, table

    record = read_export_record(folder)
    base = (record.get("source") or {}).get("base_model")
    files = sorted(path.name for path in folder.glob("*.gguf"))
    ollama = (folder / "Modelfile").is_file()
    tags = ["gguf", "llama.cpp", "lorakit", *(["ollama"] if ollama else [])]
    fields = {"library_name": "gguf", "tags": tags, "pipeline_tag": "text-generation"}
    if is_hub_id(base):
        fields["base_model"] = base
    name = repo_id.split("/")[-1]
    lines = [f"# {name}\n", "A fine-tuned model exported to GGUF with lorakit"
             + (f" (base model [`{base}`](https://huggingface.co/{base}))" if is_hub_id(base) else "") + ".\n",
             "## How to use\n", "```bash"]
    for file in files:
        if record.get("adapter_only"):
            lines.append(f"llama-cli -m BASE.gguf --lora {file} -cnv   # BASE.gguf: the base model as GGUF")
            continue
        lines.append(f"llama-cli -hf {repo_id}:{file.rsplit('-', 1)[-1].removesuffix('.gguf').upper()} -cnv"
                     if "-" in file else f"llama-cli -m {file} -cnv")
    if ollama:
        lines.append("ollama create " + name.lower() + " -f Modelfile   # in a download of this repo")
    lines += ["```", "", "The chat template, BOS/EOS and end-of-turn tokens are in the GGUF's metadata"
              + (", and the Modelfile's TEMPLATE renders what training rendered." if ollama else "."), ""]
    check = record.get("check") or {}
    lines.append("## Export check\n")
    if record.get("verified") is None:
        lines.append("Not verified: exported with `--no-verify`.\n")
    else:
        rows = [(key, f"{value:.4g}" if isinstance(value, float) else str(value)) for key, value in check.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)]
        lines.append("The GGUF read back and compared with the fine-tuned model on prompts from its own data "
                     f"(`{EXPORT_FILE}`):\n\n" + table(["figure", "value"], rows))
    text = f"---\n{ModelCardData(**fields).to_yaml()}\n---\n\n" + "\n".join(lines)
    return stamp(text)

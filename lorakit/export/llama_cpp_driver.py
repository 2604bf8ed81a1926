"""Runs one of llama.cpp's converter scripts with what lorakit knows and the converter cannot find out by itself.

Run as `python -m lorakit.export.llama_cpp_driver SETTINGS.json SCRIPT [converter arguments]`, in a subprocess of
`lorakit export`. It imports llama.cpp's `conversion` and `gguf` packages exactly as the script would, adjusts
three things, then runs the script unchanged:

* the pre-tokenizer: the converter recognises a BPE tokenizer by a hash of its output on one fixed text, and
  refuses every tokenizer outside its list (every custom or retrained tokenizer). lorakit tells it which
  llama.cpp pre-tokenizer to use only after proving it splits text exactly as the model's tokenizer does;
* the tokenizer keys: bos/eos/end-of-turn/padding ids, whether to add BOS/EOS, and the chat template, written
  explicitly instead of guessed from config files;
* the general metadata (name, base model), instead of what the converter reads from a folder name or a README.

Imports nothing of lorakit, so it runs in the converter's own world.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

TOKENIZER_KEYS = {  # settings key -> (GGUF key, GGUFWriter method)
    "bos_token_id": ("tokenizer.ggml.bos_token_id", "add_bos_token_id"),
    "eos_token_id": ("tokenizer.ggml.eos_token_id", "add_eos_token_id"),
    "eot_token_id": ("tokenizer.ggml.eot_token_id", "add_eot_token_id"),
    "padding_token_id": ("tokenizer.ggml.padding_token_id", "add_pad_token_id"),
    "add_bos_token": ("tokenizer.ggml.add_bos_token", "add_add_bos_token"),
    "add_eos_token": ("tokenizer.ggml.add_eos_token", "add_add_eos_token"),
    "chat_template": ("tokenizer.chat_template", "add_chat_template"),
}


def main(settings_file: str, script: str, arguments: list[str]) -> None:
    settings = json.loads(Path(settings_file).read_text(encoding="utf-8"))
    folder = Path(script).resolve().parent
    sys.path.insert(0, str(folder))
    if (folder / "gguf-py").is_dir():
        sys.path.insert(1, str(folder / "gguf-py"))  # the gguf that matches this converter, as the script does
    import gguf
    from conversion import base

    pre_tokenizer = settings.get("pre_tokenizer")
    recognise = base.TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer):
        try:
            return recognise(self, tokenizer)
        except NotImplementedError:
            if pre_tokenizer:
                return pre_tokenizer
            print("lorakit: llama.cpp does not recognise this tokenizer's pre-tokenizer, and it does not split text "
                  "like any pre-tokenizer lorakit can prove equal; the GGUF would tokenize differently from the "
                  "model, so none was written", file=sys.stderr)
            sys.exit(1)

    base.TextModel.get_vocab_base_pre = vocab_base_pre

    tokenizer_settings = settings.get("tokenizer") or {}
    prepare = base.TextModel.prepare_metadata

    def prepare_metadata(self, vocab_only: bool):
        prepare(self, vocab_only)
        for name, value in tokenizer_settings.items():
            key, method = TOKENIZER_KEYS[name]
            for table in self.gguf_writer.kv_data:
                table.pop(key, None)
            if value is not None:
                getattr(self.gguf_writer, method)(value)

    base.TextModel.prepare_metadata = prepare_metadata

    metadata = settings.get("metadata") or {}
    gguf.Metadata.load_metadata_override = staticmethod(lambda path=None: dict(metadata))

    sys.argv = [script, *arguments]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])

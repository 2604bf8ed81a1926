"""lorakit push takes an export folder: the GGUF, the Modelfile and the export record go up, under a card whose
metadata says GGUF; an export whose check failed does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lorakit.errors import LorakitError
from lorakit.hub.selection import plan_push


def export_folder(folder: Path, verified: bool | None) -> Path:
    import gguf
    import numpy as np

    folder.mkdir()
    writer = gguf.GGUFWriter(str(folder / "facts-q8_0.gguf"), "llama")
    writer.add_name("facts")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (folder / "Modelfile").write_text('FROM ./facts-q8_0.gguf\nPARAMETER stop "<|im_end|>"\n')
    record = {"format": "ollama", "verified": verified, "source": {"base_model": "HuggingFaceTB/SmolLM2-135M"},
              "check": {"max_abs_diff": 0.02, "mean_kl": 0.001, "top1_agreement": 0.99, "passed": bool(verified)}}
    (folder / "lorakit_export.json").write_text(json.dumps(record))
    (folder / "notes.txt").write_text("local notes")
    return folder


def test_an_export_folder_goes_up_with_a_gguf_card(tmp_path):
    plan = plan_push(export_folder(tmp_path / "export", True), "alice/facts-gguf")
    names = {name for name, _, _ in plan.files}
    assert names == {"facts-q8_0.gguf", "Modelfile", "lorakit_export.json"}
    assert ("notes.txt", "not part of a model repo") in plan.left_out
    card = plan.readme.decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "gguf" and {"gguf", "ollama"} <= set(metadata["tags"])
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert "llama-cli -hf alice/facts-gguf:Q8_0" in card and "ollama create" in card
    assert "mean_kl" in card


def test_an_export_whose_check_failed_is_not_pushed(tmp_path):
    with pytest.raises(LorakitError, match="export check failed"):
        plan_push(export_folder(tmp_path / "export", False), "alice/facts-gguf")


def test_an_unverified_export_says_so_on_its_card(tmp_path):
    plan = plan_push(export_folder(tmp_path / "export", None), "alice/facts-gguf")
    assert "Not verified" in plan.readme.decode()

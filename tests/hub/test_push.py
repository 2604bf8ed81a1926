"""`lorakit push` against a Hub stand-in on 127.0.0.1 (tests/hub_server.py): what arrives, byte for byte, and
what never does (pickles, checkpoints, logs, secrets)."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import facts_rows, fast_training, write_jsonl
from hub_server import Account, FakeHub

from lorakit.hub import card
from lorakit.cli import main


def fake_token(label: str) -> str:
    return "hf_" + label + "Q" * (34 - len(label))  # shaped like a real Hub token: hf_ and 34 letters


ENV_TOKEN = fake_token("PlantedInTheEnvironment")
CLI_TOKEN = fake_token("PlantedOnTheCommandLine")
RECIPE_TOKEN = fake_token("PlantedInTheRecipe")
SAVED_TOKEN = fake_token("SavedLogin")
READ_TOKEN = fake_token("ReadOnly")
BOB_TOKEN = fake_token("Bob")
PLANTED = (ENV_TOKEN, CLI_TOKEN, RECIPE_TOKEN)

# Files of a merged model folder that must go up, and ones that must not.
HUB_BASE = "HuggingFaceTB/SmolLM2-135M"
HUB_DATA = "tatsu-lab/alpaca"


# ---------------------------------------------------------------- fixtures


def write_run_recipe(root: Path, base: Path, output_dir: Path, extra: str = "") -> Path:
    data = write_jsonl(root / "train.jsonl", facts_rows("messages"))
    recipe = root / "recipe.yaml"
    recipe.write_text(f"model:\n  name_or_path: {base}\nlora:\n  r: 4\n"
                      f"data:\n  train:\n    - path: {data}\n  eval_fraction: 0.25\n  max_length: 64\n"
                      + fast_training(output_dir, steps=3) + extra, encoding="utf-8")
    return recipe


@pytest.fixture(scope="module")
def trained_run(tiny_llama, tmp_path_factory):
    """A real `lorakit sft` run folder (3 steps on a tiny model), and what sft printed, with HF_TOKEN set."""
    from lorakit.commands.sft import run_sft

    root = tmp_path_factory.mktemp("push-run")
    recipe = write_run_recipe(root, tiny_llama, root / "run")
    log = io.StringIO()
    with pytest.MonkeyPatch.context() as env, redirect_stdout(log), redirect_stderr(log):
        env.setenv("HF_TOKEN", ENV_TOKEN)
        run_sft(str(recipe))
    return root / "run", log.getvalue()


@pytest.fixture
def run_folder(trained_run, tmp_path) -> Path:
    """A copy of the trained run, free to change."""
    return Path(shutil.copytree(trained_run[0], tmp_path / "run"))


@pytest.fixture
def merged_folder(tiny_llama, tmp_path) -> Path:
    """A merged model folder as `lorakit merge` writes it (its record names the run it came from, whose recipe has a
    Hub base and a Hub dataset), with a `lorakit eval --compare-base` report and two stray pickles."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "lorakit_recipe.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": HUB_BASE, "revision": "a1b2c3d"},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": [{"path": HUB_DATA}, {"path": str(tmp_path / "local.jsonl")}], "max_length": 128},
        "training": {"learning_rate": 2e-4},
    }, sort_keys=False))
    (run / "lorakit_run.json").write_text(json.dumps({"status": "completed", "metrics": {"train_loss": 1.25}}))
    folder = tmp_path / "run-merged"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_llama / name, folder / name)
    (folder / "generation_config.json").write_text('{"eos_token_id": [0, 3]}\n')
    (folder / "lorakit_merge.json").write_text(json.dumps({
        "run_dir": str(run), "base_model": {"name_or_path": HUB_BASE, "revision": "a1b2c3d"},
        "check": {"max_abs_diff": 1.5e-6, "mean_kl": 2.0e-9, "top1_agreement": 1.0, "passed": True}}))
    (folder / "lorakit_eval.json").write_text(json.dumps({
        "report": "lorakit eval", "data": {"description": str(tmp_path / "test.jsonl"), "loss_rows": 100},
        "metrics": {"model": {"loss": 0.41, "exact_match": 0.86, "token_f1": 0.91, "trained_tokens": 900,
                              "replies": 100, "seconds": 3.5},
                    "base": {"loss": 2.9, "exact_match": 0.0, "token_f1": 0.12}}}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (folder / "optimizer.pt").write_bytes(b"\x80\x04pickle")
    return folder


@pytest.fixture
def adapter_folder(tiny_llama, tmp_path) -> Path:
    """The files of a finished `lorakit sft` run, written directly: for checks that need no trained weights."""
    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_llama / name, folder / name)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_llama),
                                                            "peft_type": "LORA", "r": 4}))
    save_file({"base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), dtype=np.float32)},
              str(folder / "adapter_model.safetensors"))
    (folder / "lorakit_recipe.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_llama), "revision": None}, "lora": {"r": 4},
        "data": {"train": [{"path": str(tmp_path / "train.jsonl")}]}, "training": {"max_steps": 3}}))
    (folder / "lorakit_run.json").write_text(json.dumps({
        "status": "completed", "metrics": {"train_loss": 2.5, "eval_loss": 2.7},
        "base_model": {"name_or_path": str(tiny_llama), "revision": None}}))
    return folder


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The Hub stand-in, with HF_ENDPOINT pointing at it and HF_TOKEN holding alice's write token."""
    from huggingface_hub import constants

    server = FakeHub({
        ENV_TOKEN: Account("alice", ["alice-org"]),
        SAVED_TOKEN: Account("alice", ["alice-org"]),
        READ_TOKEN: Account("alice", role="read"),
        BOB_TOKEN: Account("bob"),
    }).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)  # read once at import; keeps every request on 127.0.0.1
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the test suite runs offline; this server is local
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login"))
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    yield server
    server.stop()


def push(*args):
    return CliRunner().invoke(main, ["push", *map(str, args)])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def api_requests(hub: FakeHub) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in hub.requests]


def listed_uploads(output: str) -> list[str]:
    """The file names in the plan's upload rows."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  upload "))
    names = []
    for line in lines[start + 1:]:
        if not line.startswith(" " * 12):
            break
        names.append(line.split()[0])
    return names


def error_line(result) -> str:
    """The one line a user sees for an error; it must be the only thing after the plan, with no traceback."""
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), result.exception
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: "), result.output
    return last


# ---------------------------------------------------------------- what goes up


@pytest.mark.slow
def test_push_uploads_exactly_the_allow_list_byte_for_byte(run_folder, hub):
    decoys = {
        "training_args.bin": b"\x80\x04pickle", "optimizer.pt": b"\x80\x04pickle",
        "checkpoint-2/adapter_model.safetensors": b"old", "checkpoint-2/optimizer.pt": b"\x80\x04",
        "runs/events.out.tfevents.1": b"log", "train.log": b"log", "notes.txt": b"mine",
        ".env": f"HF_TOKEN={ENV_TOKEN}\n".encode(),
    }
    for name, data in decoys.items():
        (run_folder / name).parent.mkdir(parents=True, exist_ok=True)
        (run_folder / name).write_bytes(data)
    (run_folder / "additional_chat_templates").mkdir()
    (run_folder / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    before = snapshot(run_folder)
    hub.tree_page_size = 2  # the check after the upload lists the repo over several pages

    result = push(run_folder, "--repo", "alice/facts-lora")

    assert result.exit_code == 0, result.output
    expected = ["adapter_config.json", "adapter_model.safetensors", "additional_chat_templates/tool_use.jinja",
                "chat_template.jinja", "generation_config.json", "lorakit_recipe.yaml", "lorakit_run.json", "loss.png",
                "tokenizer.json",
                "tokenizer_config.json"]
    arrived = hub.files("alice/facts-lora")
    assert sorted(arrived) == sorted([".gitattributes", "README.md", *expected])
    for name in expected:
        assert arrived[name] == before[name], name
    assert snapshot(run_folder) == before  # the folder is never written to
    assert hub.repos["alice/facts-lora"].private  # private unless asked otherwise
    for name, why in [("training_args.bin", "pickle"), ("optimizer.pt", "pickle"), ("checkpoint-2/", "checkpoint"),
                      ("runs/", "logs"), ("train.log", "log"), (".env", "hidden"), ("notes.txt", "not part")]:
        assert any(name in line and why in line for line in result.output.splitlines()), (name, result.output)

    from huggingface_hub import ModelCard

    model_card = ModelCard(arrived["README.md"].decode())
    assert model_card.data.library_name == "peft"
    assert model_card.data.pipeline_tag == "text-generation"
    assert "lorakit" in model_card.data.tags
    assert model_card.data.base_model is None  # the base was a local folder: never a path in the metadata
    assert "/" not in yaml.safe_dump(model_card.data.to_dict())  # no local path anywhere in the metadata
    record = json.loads(before["lorakit_run.json"])
    assert record["data"]["train"]["sources"][0]["fingerprint"] in model_card.text
    assert f"| train_loss | {record['metrics']['train_loss']:.4g} |" in model_card.text
    assert "local base model" in model_card.text
    assert 'PeftModel.from_pretrained(base, "alice/facts-lora")' in model_card.text


@pytest.mark.slow
def test_the_cards_usage_code_runs(tiny_llama, run_folder, hub):
    assert push(run_folder, "--repo", "alice/facts-lora").exit_code == 0
    text = hub.files("alice/facts-lora")["README.md"].decode()
    code = text.split("```python\n")[1].split("```")[0]
    # The repo as it would be downloaded, and the local base this run was trained on.
    code = code.replace('"alice/facts-lora"', repr(str(run_folder)))
    code = code.replace('"path/to/base-model"', repr(str(tiny_llama)))
    namespace: dict = {}
    exec(compile(code.replace("max_new_tokens=128", "max_new_tokens=4"), "card", "exec"), namespace)
    assert namespace["output"].shape[1] > namespace["inputs"]["input_ids"].shape[1]


@pytest.mark.slow
def test_dry_run_prints_exactly_what_a_push_uploads_and_contacts_nothing(run_folder, hub):
    before = snapshot(run_folder)

    dry = push(run_folder, "--repo", "alice/facts-lora", "--dry-run")

    assert dry.exit_code == 0, dry.output
    assert hub.requests == [] and hub.repos == {}
    assert snapshot(run_folder) == before
    printed_card = dry.output.split("--- README.md (generated by lorakit) ---\n")[1]
    printed_card = printed_card.split("--- end of README.md ---")[0]

    real = push(run_folder, "--repo", "alice/facts-lora")

    assert real.exit_code == 0, real.output
    arrived = hub.files("alice/facts-lora")
    assert arrived["README.md"].decode().rstrip("\n") == printed_card.rstrip("\n")
    assert sorted(listed_uploads(dry.output)) == sorted(set(arrived) - {".gitattributes"})


@pytest.mark.slow
def test_planted_tokens_are_written_nowhere(tiny_llama, trained_run, run_folder, hub, tmp_path):
    # In the recipe: sft refuses a token there, and neither its message nor its output folder holds the value.
    recipe = write_run_recipe(tmp_path, tiny_llama, tmp_path / "refused", f"  hub_token: {RECIPE_TOKEN}\n")
    refused = CliRunner().invoke(main, ["sft", str(recipe)])
    # On the command line: a token pasted into the commit message stops the push before any request.
    pasted = push(run_folder, "--repo", "alice/facts-lora", "--commit-message", f"trained with {CLI_TOKEN}")
    assert pasted.exit_code == 2 and hub.requests == []
    # In the environment: HF_TOKEN authenticates the push, and goes nowhere else.
    result = push(run_folder, "--repo", "alice/facts-lora")

    assert result.exit_code == 0, result.output
    assert {r.token for r in hub.requests if r.token} == {ENV_TOKEN}
    written = [*snapshot(trained_run[0]).values(), *snapshot(run_folder).values(), *snapshot(tmp_path).values()]
    written = [data for data in written if data != recipe.read_bytes()]  # the test's own recipe, with the plant
    received = hub.uploaded_bytes() + [r.body for r in hub.requests]
    for token in PLANTED:
        for output in (trained_run[1], refused.output, pasted.output, result.output):
            assert token not in output
        assert not any(token.encode() in data for data in written), token
        assert not any(token.encode() in data for data in received), token


@pytest.mark.parametrize("file, text, told", [
    ("tokenizer_config.json", ENV_TOKEN, "the token from HF_TOKEN"),
    ("lorakit_recipe.yaml", "hub_token: not-redacted-secret-42", "training.hub_token"),
    ("chat_template.jinja", fake_token("SomeoneElses"), "shaped like a Hugging Face token"),
])
def test_a_secret_in_a_file_stops_the_push_before_any_request(adapter_folder, hub, file, text, told):
    path = adapter_folder / file
    if file == "lorakit_recipe.yaml":  # a recipe edited by hand after the run, the credential left in
        recipe = yaml.safe_load(path.read_text())
        recipe["training"]["hub_token"] = text.split(": ")[1]
        path.write_text(yaml.safe_dump(recipe))
    else:
        path.write_text(path.read_text() + f"\n{{# {text} #}}\n")

    result = push(adapter_folder, "--repo", "alice/facts-lora")

    assert result.exit_code == 2
    line = error_line(result)
    assert file in line and told in line and "nothing was uploaded" in line
    assert text.split(": ")[-1] not in result.output
    assert hub.requests == []


@pytest.mark.parametrize("token, told", [(ENV_TOKEN, "the token from HF_TOKEN"),
                                          (CLI_TOKEN, "something shaped like a Hugging Face token")])
def test_a_token_in_the_commit_message_stops_the_push(merged_folder, hub, token, told):
    result = push(merged_folder, "--repo", "alice/facts", "--commit-message", f"see {token}")

    assert result.exit_code == 2
    assert f"--commit-message contains {told}" in error_line(result)
    assert token not in result.output
    assert hub.requests == []


@pytest.mark.parametrize("change, told", [
    ({"status": "failed"}, "failed run"),
    ({"status": "running"}, "running run"),
    ({"status": "interrupted"}, "interrupted run"),
    ({"metrics": {"train_loss": float("nan")}}, "diverged"),
])
def test_only_a_completed_run_is_pushed(adapter_folder, hub, change, told):
    record = json.loads((adapter_folder / "lorakit_run.json").read_text())
    record.update(change)
    (adapter_folder / "lorakit_run.json").write_text(json.dumps(record))

    result = push(adapter_folder, "--repo", "alice/facts-lora")

    assert result.exit_code == 2
    assert told in error_line(result)
    assert hub.requests == []


def test_a_symlink_leaving_the_folder_is_refused(adapter_folder, hub, tmp_path):
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    (adapter_folder / "tokenizer.json").unlink()
    (adapter_folder / "tokenizer.json").symlink_to(outside)

    result = push(adapter_folder, "--repo", "alice/facts-lora")

    assert result.exit_code == 2
    line = error_line(result)
    assert "tokenizer.json" in line and "outside" in line
    assert hub.requests == []


def test_a_failed_upload_leaves_the_folder_untouched_and_a_retry_completes(adapter_folder, hub):
    before = snapshot(adapter_folder)
    hub.fail_next_commit = True

    failed = push(adapter_folder, "--repo", "alice/facts-lora")

    assert failed.exit_code == 1
    line = error_line(failed)
    assert "HTTP 500" in line and "run the same command again" in line
    assert snapshot(adapter_folder) == before
    assert sorted(hub.files("alice/facts-lora")) == [".gitattributes"]

    retried = push(adapter_folder, "--repo", "alice/facts-lora")

    assert retried.exit_code == 0, retried.output
    assert hub.files("alice/facts-lora")["adapter_model.safetensors"] == before["adapter_model.safetensors"]
    assert snapshot(adapter_folder) == before


# ---------------------------------------------------------------- merged models, branches, cards


def test_merged_folder_goes_to_a_branch_with_a_transformers_card(merged_folder, hub):
    result = push(merged_folder, "--repo", "alice-org/facts", "--revision", "dev", "--commit-message", "First merge")

    assert result.exit_code == 0, result.output
    assert sorted(hub.files("alice-org/facts", "main")) == [".gitattributes"]
    arrived = hub.files("alice-org/facts", "dev")
    assert sorted(arrived) == [".gitattributes", "README.md", "chat_template.jinja", "config.json",
                               "generation_config.json", "lorakit_eval.json", "lorakit_merge.json",
                               "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert arrived["model.safetensors"] == (merged_folder / "model.safetensors").read_bytes()
    repo = hub.repos["alice-org/facts"]
    assert repo.commits[repo.branches["dev"]].message == "First merge"

    from huggingface_hub import ModelCard

    model_card = ModelCard(arrived["README.md"].decode())
    assert model_card.data.library_name == "transformers"
    assert model_card.data.base_model == HUB_BASE
    assert model_card.data.datasets == [HUB_DATA]  # from the run's recipe; the local source is not named
    results = {r.metric_type: r.metric_value for r in model_card.data.eval_results}
    assert results == {"loss": 0.41, "exact_match": 0.86, "token_f1": 0.91}
    assert {r.dataset_name for r in model_card.data.eval_results} == {"test.jsonl"}  # a file name, not a path
    assert "| exact_match | 0.86 | 0 |" in model_card.text  # side by side with the base model
    assert "| max_abs_diff | 1.5e-06 |" in model_card.text
    assert "| train_loss | 1.25 |" in model_card.text  # borrowed from the run the merge came from
    assert f'from_pretrained("{HUB_BASE}"' not in model_card.text  # a merged model loads on its own
    assert f"`{HUB_BASE}` at revision `a1b2c3d`" in model_card.text


def test_a_merge_whose_check_failed_is_not_pushed(merged_folder, hub):
    record = json.loads((merged_folder / "lorakit_merge.json").read_text())
    record["check"]["passed"] = False
    (merged_folder / "lorakit_merge.json").write_text(json.dumps(record))

    result = push(merged_folder, "--repo", "alice/facts")

    assert result.exit_code == 2
    assert "merge check failed" in error_line(result)
    assert hub.requests == []


def test_card_license_comes_from_a_local_base_card(merged_folder, tmp_path):
    base = tmp_path / "my-base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Base\n")
    recipe_file = tmp_path / "run" / "lorakit_recipe.yaml"
    recipe = yaml.safe_load(recipe_file.read_text())
    recipe["model"] = {"name_or_path": str(base), "revision": None}
    recipe_file.write_text(yaml.safe_dump(recipe))

    from huggingface_hub import ModelCard

    model_card = ModelCard(card.build_card(merged_folder, card.MERGED, "alice/facts"))

    assert model_card.data.license == "apache-2.0"
    assert model_card.data.base_model is None
    assert str(base) not in model_card.content.split("---")[1]


def test_a_readme_of_your_own_goes_up_unchanged(merged_folder, hub):
    own = b"---\nlicense: mit\n---\n# My model\n\nWritten by hand.\n"
    (merged_folder / "README.md").write_bytes(own)

    result = push(merged_folder, "--repo", "alice/facts")

    assert result.exit_code == 0, result.output
    assert hub.files("alice/facts")["README.md"] == own
    assert "yours, from the folder" in result.output


# ---------------------------------------------------------------- visibility

SETTINGS = ("PUT", "/api/models/alice/facts/settings")
COMMIT = ("POST", "/api/models/alice/facts/commit/main")


@pytest.mark.parametrize("flags, private", [([], True), (["--private"], True), (["--public"], False)])
def test_a_new_repo_is_private_unless_asked(merged_folder, hub, flags, private):
    result = push(merged_folder, "--repo", "alice/facts", *flags)

    assert result.exit_code == 0, result.output
    assert hub.repos["alice/facts"].private is private


def test_private_makes_an_existing_public_repo_private_before_uploading(merged_folder, hub):
    hub.add_repo("alice/facts", private=False)

    result = push(merged_folder, "--repo", "alice/facts", "--private")

    assert result.exit_code == 0, result.output
    assert hub.repos["alice/facts"].private
    calls = api_requests(hub)
    assert calls.index(SETTINGS) < calls.index(COMMIT)
    assert "now private" in result.output


def test_an_existing_public_repo_without_a_flag_stops_the_push(merged_folder, hub):
    hub.add_repo("alice/facts", private=False)

    result = push(merged_folder, "--repo", "alice/facts")

    assert result.exit_code == 1
    line = error_line(result)
    assert "is public" in line and "--public" in line and "--private" in line
    assert not any(path.endswith("/commit/main") for _, path in api_requests(hub))
    assert not hub.repos["alice/facts"].private and sorted(hub.files("alice/facts")) == [".gitattributes"]


def test_public_turns_a_private_repo_public_only_after_the_upload(merged_folder, hub):
    hub.add_repo("alice/facts", private=True)

    result = push(merged_folder, "--repo", "alice/facts", "--public")

    assert result.exit_code == 0, result.output
    assert not hub.repos["alice/facts"].private
    calls = api_requests(hub)
    assert calls.index(COMMIT) < calls.index(SETTINGS)


# ---------------------------------------------------------------- errors users hit


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("case, repo, code, told", [
    ("bad token", "alice/facts", 1, "rejected the token from HF_TOKEN"),
    ("no token", "alice/facts", 1, "no Hugging Face token: set HF_TOKEN or run `hf auth login`"),
    ("read-only token", "alice/facts", 1, "read-only"),
    ("other namespace", "bob/facts", 1, "alice has no write access to bob"),
    ("invalid name", "alice/bad..name", 2, "not a valid Hub repo id"),
    ("no owner", "facts", 2, "it must be OWNER/NAME"),
    ("network down", "alice/facts", 1, "cannot reach http://127.0.0.1:"),
    ("offline mode", "alice/facts", 1, "HF_HUB_OFFLINE is set"),
])
def test_hub_errors_end_in_one_clear_line(merged_folder, hub, monkeypatch, case, repo, code, told):
    from huggingface_hub import constants

    if case == "bad token":
        monkeypatch.setenv("HF_TOKEN", fake_token("Unknown"))
    elif case == "no token":
        monkeypatch.delenv("HF_TOKEN")
    elif case == "read-only token":
        monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    elif case == "network down":
        monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    elif case == "offline mode":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = snapshot(merged_folder)

    result = push(merged_folder, "--repo", repo)

    assert result.exit_code == code
    assert told in error_line(result)
    assert not any(t in result.output for t in (ENV_TOKEN, READ_TOKEN, fake_token("Unknown")))
    assert snapshot(merged_folder) == before
    assert all(not r.path.endswith("/commit/main") for r in hub.requests)


def test_the_saved_login_is_used_without_hf_token(merged_folder, hub, monkeypatch, tmp_path):
    from huggingface_hub import constants

    saved = tmp_path / "saved-token"
    saved.write_text(SAVED_TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(saved))
    monkeypatch.delenv("HF_TOKEN")

    result = push(merged_folder, "--repo", "alice/facts")

    assert result.exit_code == 0, result.output
    assert {r.token for r in hub.requests if r.token} == {SAVED_TOKEN}


@pytest.mark.parametrize("make, told", [
    (lambda root: root / "missing", "no such folder"),
    (lambda root: (root / "notes").mkdir() or (root / "notes"), "neither a lorakit run"),
    (lambda root: (root / "a.txt").write_text("x") and (root / "a.txt"), "is a file"),
])
def test_a_wrong_folder_is_named_with_what_would_be_right(tmp_path, hub, make, told):
    result = push(make(tmp_path), "--repo", "alice/facts")

    assert result.exit_code == 2
    assert told in error_line(result)
    assert hub.requests == []


def test_an_adapter_without_a_run_record_is_refused(adapter_folder, hub):
    (adapter_folder / "lorakit_run.json").unlink()

    result = push(adapter_folder, "--repo", "alice/facts")

    assert result.exit_code == 2
    assert "not a lorakit run folder (no lorakit_run.json)" in error_line(result)
    assert hub.requests == []


def test_importing_the_command_loads_no_heavy_library():
    code = ("import sys, lorakit.commands.push; "
            "print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub', 'peft', 'trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

"""The examples in README.md and docs/ work as written: every example row of docs/data.md is read as its format;
the CSV walkthrough runs start to finish; every `lorakit` command the pages give for the quickstart runs on a
quickstart run; docs/python-api.md's Python runs; the recipes in the pages are valid.

Commands run in a scratch folder holding a link to the repository's recipes/, as they would from a checkout.
To keep the suite quick, the quickstart trains 10 steps without evaluating along the way
(`training.max_steps=10 training.eval_strategy="no"` added) and eval commands on it
generate at most 8 tokens per reply (`--max-new-tokens 8` added); nothing else is changed. Skipped, with the
reason: pushes without --dry-run (the Hub; tests/hub/test_push.py pushes to a local stand-in), --device cuda, and
paths that stand for the reader's own files (data/test.jsonl).
"""

from __future__ import annotations

import csv
import io
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lorakit.cli import main

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(encoding="utf-8"), re.S)


def sections(page: Path) -> dict[str, str]:
    """{heading: text under it, up to the next heading} for the page's ## and ### headings."""
    parts = re.split(r"^#{2,3} (.+)$", page.read_text(encoding="utf-8"), flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def why_skipped(line: str, workdir: Path | None = None) -> str | None:
    if line.startswith("lorakit push") and "--dry-run" not in line:
        return "a real push needs the Hub"
    if "--device cuda" in line:
        return "needs a GPU"
    if workdir is not None:
        args = shlex.split(line, comments=True)
        outputs = {value for option, value in zip(args, args[1:]) if option in ("--output", "--output-dir", "--repo")}
        for arg in args[2:]:
            if ("/" in arg or arg.endswith((".jsonl", ".csv", ".yaml"))) and " " not in arg and arg not in outputs \
                    and not arg.startswith("-") and not (workdir / arg).exists():
                return f"{arg} stands for a file of your own"
    return None


def lorakit(args: list[str]):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, f"lorakit {shlex.join(args)}\n{result.output}"
    return result


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder like a checkout's root: recipes/ is there; the commands write runs/ and the rest here."""
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_shell_block(block: str, workdir: Path) -> list[str]:
    """Run a bash block of the docs: heredocs that write files, mkdir, and lorakit commands (in this process).
    Returns the lines skipped. Any other line is a failure: the page would hold a step the test cannot check."""
    lines, skipped, index = block.splitlines(), [], 0
    while index < len(lines):
        line = lines[index].strip()
        index += 1
        if not line or line.startswith("#"):
            continue
        heredoc = re.fullmatch(r"cat > (\S+) <<'EOF'", line)
        if heredoc:
            end = lines.index("EOF", index)
            (workdir / heredoc.group(1)).write_text("\n".join(lines[index:end]) + "\n", encoding="utf-8")
            index = end + 1
        elif line.startswith("mkdir -p "):
            (workdir / line.split()[-1]).mkdir(parents=True, exist_ok=True)
        elif line.startswith("lorakit "):
            if why_skipped(line):
                skipped.append(line)
                continue
            lorakit(shlex.split(line, comments=True)[1:])
        else:
            raise AssertionError(f"tests/test_docs_examples.py cannot run this line of the docs: {line}")
    return skipped


# ---------------------------------------------------------------- docs/data.md


@pytest.mark.slow
def test_every_example_row_in_data_md_is_read_as_its_format(tiny_llama, tmp_path):
    from lorakit.data.pipeline import prepare_data
    from lorakit.models.loading import load_tokenizer
    from lorakit.recipe.load import load_recipe

    tokenizer, _ = load_tokenizer({"name_or_path": str(tiny_llama)})
    page = DOCS / "data.md"
    checked = []
    for heading, text in sections(page).items():
        if heading not in ("messages", "sharegpt", "alpaca", "prompt_completion", "text"):
            continue
        for language, suffix in (("jsonl", ".jsonl"), ("csv", ".csv")):
            for number, example in enumerate(re.findall(rf"```{language}\n(.*?)```", text, re.S)):
                data = tmp_path / f"{heading}-{number}{suffix}"
                data.write_text(example, encoding="utf-8")
                recipe = tmp_path / f"{data.stem}.yaml"
                recipe.write_text(f"model: {tiny_llama}\ndata:\n  train: {data}\n  max_length: 128\n")
                prepared = prepare_data(load_recipe(recipe).data, tokenizer)
                report = prepared.reports["train"]
                assert report.sources[0].format == heading, (data.name, example)
                rows = list(csv.DictReader(io.StringIO(example))) if suffix == ".csv" else example.splitlines()
                assert report.rows == len(rows), (data.name, report.rows)
                assert report.trained_tokens > 0
                checked.append(data.name)
    assert len(checked) >= 8, checked  # one JSONL row per format, and CSV for those CSV can hold

    # Your own column names: the page's CSV with the page's `columns:` mapping.
    mapping = sections(page)["Your own column names: `columns:`"]
    (tmp_path / "faq.csv").write_text(re.findall(r"```csv\n(.*?)```", mapping, re.S)[0])
    snippet = yaml.safe_load(re.findall(r"```yaml\n(.*?)```", mapping, re.S)[0])
    recipe = tmp_path / "faq.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tiny_llama), **snippet}))
    report = prepare_data(load_recipe(recipe).data, tokenizer).reports["train"]
    assert report.sources[0].format == "alpaca" and report.rows == 2 and report.trained_tokens > 0


def test_the_tool_call_row_in_data_md_trains_the_calls_and_not_the_result(tmp_path):
    sys.path.insert(0, str(REPO / "tests" / "data"))
    from chat_template_families import FAMILIES, build_model

    from lorakit.data.labels import IGNORE
    from lorakit.data.pipeline import prepare_data
    from lorakit.models.loading import load_tokenizer
    from lorakit.recipe.load import load_recipe

    model = build_model(tmp_path / "qwen", FAMILIES["qwen2.5"])
    row = re.findall(r"```jsonl\n(.*?)```", sections(DOCS / "data.md")["Tool calls"], re.S)[0]
    (tmp_path / "tools.jsonl").write_text(row)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {model}\ndata:\n  train: {tmp_path / 'tools.jsonl'}\n  max_length: 512\n")
    tokenizer, _ = load_tokenizer({"name_or_path": str(model)})
    prepared = prepare_data(load_recipe(recipe).data, tokenizer)
    assert prepared.reports["train"].sources[0].format == "messages"
    example = prepared.train[0]
    everything = tokenizer.decode(example["input_ids"])
    trained = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE])
    assert "get_weather" in trained and "It is 22 C and sunny in Paris." in trained
    # "22 C and sunny" is in the tool's result and in the final answer: only the answer's is trained.
    assert everything.count("22 C and sunny") == 2 and trained.count("22 C and sunny") == 1


# ---------------------------------------------------------------- recipes shown in the pages


def test_the_recipes_in_the_pages_are_valid():
    from lorakit.recipe.load import load_recipe

    checked = 0
    for page in (DOCS / "gpu-first-run.md", DOCS / "walkthrough-csv.md"):
        texts = blocks(page, "yaml") + [text for block in blocks(page, "bash")
                                        for text in re.findall(r"<<'EOF'\n(.*?)\nEOF", block, re.S)]
        for text in texts:
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError:  # a heredoc writing a data file, not a recipe
                continue
            if isinstance(data, dict) and "model" in data and "data" in data:
                path = Path(f"/tmp/lorakit-docs-{page.stem}-{checked}.yaml")
                path.write_text(text)
                load_recipe(path, check_paths=False)  # every key and type, as sft checks them
                checked += 1
    assert checked >= 2


# ---------------------------------------------------------------- commands


@pytest.mark.slow
def test_the_csv_walkthrough_runs_as_written(workdir):
    skipped = []
    for block in blocks(DOCS / "walkthrough-csv.md", "bash"):
        skipped += run_shell_block(block, workdir)
    assert skipped == ["lorakit push runs/faq --repo your-name/faq-lora"]
    assert (workdir / "runs" / "faq" / "loss.png").is_file()
    assert (workdir / "runs" / "faq" / "lorakit_eval.json").is_file()


def quickstart_commands() -> list[str]:
    found = []
    for page in PAGES:
        for block in blocks(page, "bash"):
            for line in block.splitlines():
                for command in re.findall(r"(?:^|&& )(lorakit [^&|]+)", line.strip().removeprefix("$ ")):
                    command = command.split("  #")[0].strip()
                    # classify's and dpo's quickstarts are run by their own tests (tests/commands/)
                    if "quickstart" in command and not re.search(r"classify|dpo", command) and command not in found:
                        found.append(command)
    return found


def order(command: str) -> int:
    """sft first, then what reads the run, then the merge and what reads the merged folder."""
    if command.startswith("lorakit sft"):
        return 0
    if "quickstart-merged" in command or "models/qs" in command:
        return 3
    return 2 if command.startswith("lorakit merge") else 1


@pytest.mark.slow
def test_every_quickstart_command_in_the_docs_runs(workdir):
    commands = sorted(quickstart_commands(), key=order)
    assert commands[0] == "lorakit sft recipes/quickstart.yaml"
    assert sum(c.startswith("lorakit eval") for c in commands) >= 3  # the pages' eval examples on the quickstart
    ran = []
    for command in commands:
        if why_skipped(command, workdir):
            continue
        args = shlex.split(command)[1:]
        if args[0] == "sft":
            args += ["training.max_steps=10", 'training.eval_strategy="no"']
        if args[0] == "eval":
            args += ["--max-new-tokens", "8"]
        lorakit(args)
        ran.append(command)
    assert "lorakit eval runs/quickstart --compare-base" in ran  # the recipe's own test set, data.eval
    assert any(c.startswith("lorakit merge") for c in ran) and any("--dry-run" in c for c in ran)


@pytest.mark.slow
def test_the_python_api_page_runs(workdir, capsys):
    namespace: dict = {}
    for number, code in enumerate(blocks(DOCS / "python-api.md", "python")):
        exec(compile(code, f"docs/python-api.md block {number + 1}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "exact match" in printed and "lora.rank: unknown key; did you mean lora.r?" in printed
    assert (workdir / "runs" / "qs-notebook-merged" / "model.safetensors").is_file()

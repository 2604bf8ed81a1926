"""The package's shape: no import cycle, modules small enough to read in one sitting, and docs/architecture.md
naming only packages that exist."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lorakit"
MAX_LINES = 420


def module_name(file: Path) -> str:
    parts = file.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lorakit_imports(file: Path, modules: set[str]) -> set[str]:
    """The lorakit modules `file` imports, at its top or inside functions (both can close a cycle)."""
    name = module_name(file)
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("lorakit") and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph = {}
    for name, file in files.items():
        # A package's __init__ re-exporting its children is how a package works, not a cycle.
        graph[name] = {d for d in lorakit_imports(file, set(files))
                       if not (files[d].name == "__init__.py" and name.startswith(d + "."))}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_errors_imports_nothing_of_lorakit():
    assert import_graph()["lorakit.errors"] == set()


def test_no_module_is_too_long_to_read_in_one_sitting():
    long = {module_name(f): n for f in PACKAGE.rglob("*.py") if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_training_command_shares_the_one_lifecycle():
    graph = import_graph()
    commands = [m for m in ("lorakit.commands.sft", "lorakit.commands.dpo", "lorakit.commands.classify") if m in graph]
    for command in commands:
        assert "lorakit.training.lifecycle" in graph[command], f"{command} does not run through the lifecycle"


def test_architecture_page_names_only_packages_that_exist():
    page = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(lorakit/[\w/]+?\.py|lorakit/[\w/]+/)`", page))
    assert len(named) >= 8, "the page should name the packages it describes"
    missing = sorted(n for n in named if not (REPO / n).exists())
    assert not missing, f"docs/architecture.md names what does not exist: {missing}"

"""The package's layout, checked from the source: no import cycles, no upward imports, one owner
of the run folder's file names, and every name the README shows importable."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "ldmkit"

# Layers, lowest first: a module may import its own layer and those below, never one above.
LAYERS = [
    ("base", ["ldmkit.config", "ldmkit.checkpoint", "ldmkit.utils", "ldmkit.runtime"]),
    ("core", ["ldmkit.diffusion", "ldmkit.models", "ldmkit.data"]),
    ("recipe", ["ldmkit.recipe", "ldmkit.runs", "ldmkit.pipeline"]),
    ("stages", ["ldmkit.training", "ldmkit.evaluation", "ldmkit.interop", "ldmkit.editing"]),
    ("front", ["ldmkit.options", "ldmkit.api", "ldmkit.cli", "ldmkit.__main__", "ldmkit.web"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """ldmkit modules that `name` imports anywhere in its source (also inside functions and
    TYPE_CHECKING blocks: a cycle there is still a cycle for a reader)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = name.split(".")
            if node.level:
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("ldmkit"):
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def layer_of(name: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{name} is in no layer of tests/test_layout.py: add it")


def test_every_module_has_a_layer():
    for m in modules():
        if m != "ldmkit":
            layer_of(m)


def test_no_module_imports_a_higher_layer():
    up = [
        f"{m} ({LAYERS[layer_of(m)][0]}) -> {t} ({LAYERS[layer_of(t)][0]})"
        for m, targets in graph().items()
        if m != "ldmkit"
        for t in targets
        if t != "ldmkit" and layer_of(t) > layer_of(m)
    ]
    assert not up, "upward imports:\n" + "\n".join(sorted(up))


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle between modules (package __init__ re-exports left out), or None."""
    pkgs = {m for m, p in modules().items() if p.name == "__init__.py"}
    edges = {m: {t for t in ts if t not in pkgs} for m, ts in g.items() if m not in pkgs}
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(m: str, stack: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state and (c := visit(t, stack + [t])):
                return c
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (c := visit(m, [m])):
            return c
    return None


def test_the_import_graph_has_no_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    g = graph()
    g["ldmkit.diffusion.process"] = g["ldmkit.diffusion.process"] | {"ldmkit.diffusion.losses"}
    assert find_cycle(g) is not None


def test_only_runs_names_the_run_folder_files():
    owners = sorted(
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if re.search(r"""["'](run|data)\.json["']""", p.read_text())
    )
    assert owners == ["runs.py"]


# ------------------------------------------------------------------------------ README


def readme_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def readme_imports() -> list[tuple[str, str]]:
    names = []
    for block in readme_blocks():
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom):
                names += [(node.module, a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                names += [(a.name, "") for a in node.names]
    return names


def test_the_readme_shows_imports():
    assert len(readme_imports()) >= 5


@pytest.mark.parametrize("module,name", readme_imports())
def test_every_name_the_readme_imports_exists(module, name):
    mod = importlib.import_module(module)
    if name:
        assert hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}"), (module, name)


def test_the_readme_examples_that_need_no_trained_run_run():
    ran = 0
    for block in readme_blocks():
        if "runs/" in block:  # needs the main job's run: its imports are checked above
            continue
        exec(compile(block, "README.md", "exec"), {})
        ran += 1
    assert ran >= 1

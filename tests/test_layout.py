"""The package's layout, checked from the source: docs/design.md's layout table (each module
imports only what its row's "may import" cell allows; no module imports a higher layer), no import
cycles, one owner of the run folder's file names, and every name the README shows importable.

The rule of the table (docs/design.md says the same above it):
- Every module of src/ldmkit belongs to one row: the row that names its file, else the row that
  names its package (`data/`). A package's `__init__.py` that no row covers belongs to the layer
  of its package's rows and may import its own package (re-exports).
- A module may import the other modules of its row and what its row's "may import" cell names;
  nothing else. Every import counts: at the top, inside functions (lazy) and under TYPE_CHECKING.
  `from pkg import mod` imports the module `pkg.mod`; `from pkg import name` imports `pkg`.
- The cell is a comma-separated list; text in parentheses is a note and is not read; `-` is
  nothing. An entry is a layer (`base`, `core`, `recipe`, `stages`, `front`: every module of it),
  `everything below` (every lower layer), `the above` (the rows above in the row's own package),
  or a module or package (a package: all its modules; `ldmkit`: the top __init__.py alone),
  dotted from ldmkit (`diffusion.process`, `data`) or bare, looked up in the row's own package
  first, then at the top (`process` in a diffusion/ row, `runs`); `evaluation.grids/plots` names
  evaluation.grids and evaluation.plots. A name that is no module fails the test, as does a
  module in no row.
- The layers are the table's layer column, lowest first, in the order they first appear.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "ldmkit"
DESIGN = ROOT / "docs" / "design.md"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """ldmkit modules that `name` imports anywhere in its source (also inside functions and
    TYPE_CHECKING blocks: a cycle there is still a cycle for a reader). `from pkg import mod`
    counts as an import of `pkg.mod` only, `from pkg import name` as one of `pkg`."""
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
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
            targets = subs + ([mod] if len(subs) < len(node.names) else [])
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("ldmkit"):
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


# ------------------------------------------------------------------- docs/design.md's table


@dataclasses.dataclass(frozen=True)
class Row:
    layer: str
    files: tuple[str, ...]  # modules the row names by file, e.g. ldmkit.diffusion.process
    packages: tuple[str, ...]  # packages it names as a whole (`data/`), e.g. ldmkit.data
    may_import: str  # the cell as written
    package: str  # the package its modules sit in ("ldmkit" at the top)


@dataclasses.dataclass
class Table:
    rows: list[Row]
    layers: list[str]  # lowest first
    row_of: dict[str, int]  # module -> index of its row; -1: a package __init__ without a row
    layer_of: dict[str, str]


def parse_rows(text: str) -> list[Row]:
    """The rows of the table headed | layer | module | owns | may import |."""
    lines = text.splitlines()
    head = re.compile(r"\|\s*layer\s*\|\s*module\s*\|\s*owns\s*\|\s*may import\s*\|\s*$")
    start = next(i for i, ln in enumerate(lines) if head.match(ln))
    rows = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        layer, cell, may_import = cells[0], cells[1], cells[-1]  # `owns` may hold a "|"
        files, packages, folder, package = [], [], "", ""
        for entry in re.findall(r"`([^`]+)`", cell):  # a bare file name is in the folder before
            if "/" in entry:
                folder, _, entry = entry.rpartition("/")
            parts = ["ldmkit", *folder.split("/")] if folder else ["ldmkit"]
            if not entry:  # `data/`: the package
                packages.append(".".join(parts))
            elif entry == "__init__.py":
                files.append(".".join(parts))
            else:
                files.append(".".join([*parts, entry.removesuffix(".py")]))
            package = package or ".".join(parts)
        rows.append(Row(layer, tuple(files), tuple(packages), may_import, package))
    return rows


def build_table(rows: list[Row], known: set[str]) -> Table:
    """Each module's row and layer (see the rule at the top)."""
    layers = list(dict.fromkeys(r.layer for r in rows))
    row_of: dict[str, int] = {}
    for i, r in enumerate(rows):
        for m in r.files:
            assert m in known, f"docs/design.md's table names {m}, which is no module"
            assert m not in row_of, f"docs/design.md's table names {m} twice"
            row_of[m] = i
    for i, r in enumerate(rows):
        for p in r.packages:
            inside = {m for m in known if m == p or m.startswith(p + ".")}
            assert inside, f"docs/design.md's table names {p}, which is no package"
            for m in inside:
                row_of.setdefault(m, i)
    layer_of = {m: rows[i].layer for m, i in row_of.items()}
    for m in sorted(known - set(row_of)):  # a package __init__ without a row: its package's layer
        below = {layer_of[k] for k in row_of if k.startswith(m + ".")}
        assert len(below) == 1, f"{m} is in no row of docs/design.md's layout table: add it"
        row_of[m], layer_of[m] = -1, below.pop()
    return Table(rows, layers, row_of, layer_of)


def resolve(name: str, package: str, known: set[str]) -> set[str]:
    """The modules a name in a "may import" cell stands for (a package: all of its modules;
    `ldmkit`: the top package's __init__ alone)."""
    if name == "ldmkit":
        return {"ldmkit"}
    for full in dict.fromkeys([f"{package}.{name}", f"ldmkit.{name}"]):
        inside = {m for m in known if m == full or m.startswith(full + ".")}
        if inside:
            return inside
    raise AssertionError(f"docs/design.md's table: {name!r} (a {package} row) is no module")


def allowed_imports(t: Table, i: int, known: set[str]) -> set[str]:
    """What the modules of row i may import: its other modules and what its cell names."""
    row = t.rows[i]
    out = {m for m, j in t.row_of.items() if j == i}
    cell = re.sub(r"\([^()]*\)", "", row.may_import).replace("`", "")
    for entry in (e.strip() for e in cell.split(",")):
        if entry == "-":
            continue
        elif entry in t.layers:
            out |= {m for m, layer in t.layer_of.items() if layer == entry}
        elif entry == "everything below":
            out |= {
                m for m, la in t.layer_of.items() if t.layers.index(la) < t.layers.index(row.layer)
            }
        elif entry == "the above":
            out |= {
                m for m, j in t.row_of.items() if 0 <= j < i and t.rows[j].package == row.package
            }
        else:
            first, *more = entry.split("/")
            prefix = first.rpartition(".")[0]
            for name in [first, *(f"{prefix}.{n}" if prefix else n for n in more)]:
                out |= resolve(name, row.package, known)
    return out


def table_violations(t: Table, g: dict[str, set[str]]) -> list[str]:
    """Each import its row does not allow, as 'module -> module'."""
    known = set(g)
    allowed = {i: allowed_imports(t, i, known) for i in range(len(t.rows))}
    out = []
    for m, targets in g.items():
        i = t.row_of[m]
        ok = allowed[i] if i >= 0 else {k for k in known if k.startswith(m + ".")}
        out += [f"{m} -> {x}" for x in sorted(targets - ok)]
    return sorted(out)


def upward_imports(t: Table, g: dict[str, set[str]]) -> list[str]:
    rank = {m: t.layers.index(la) for m, la in t.layer_of.items()}
    return sorted(
        f"{m} ({t.layer_of[m]}) -> {x} ({t.layer_of[x]})"
        for m, targets in g.items()
        for x in targets
        if rank[x] > rank[m]
    )


def design_table() -> Table:
    return build_table(parse_rows(DESIGN.read_text()), set(modules()))


def test_the_layout_table_parses():
    t = design_table()
    assert t.layers == ["base", "core", "recipe", "stages", "front"]
    assert len(t.rows) >= 30 and all(r.files or r.packages for r in t.rows)


def test_every_module_imports_only_what_its_row_allows():
    bad = table_violations(design_table(), graph())
    assert not bad, (
        "imports that docs/design.md's layout table does not allow (fix the table or the "
        "import):\n" + "\n".join(bad)
    )


def test_no_module_imports_a_higher_layer():
    up = upward_imports(design_table(), graph())
    assert not up, "upward imports:\n" + "\n".join(up)


FAKE_TABLE = """
| layer | module | owns | may import |
|---|---|---|---|
| base | `config.py` | settings | - |
| core | `diffusion/process.py`, `schedules.py` | the process | base (a note: `runs`, not read) |
| core | `models/` | the networks | diffusion.process |
| recipe | `runs.py` | the run folder | core |
"""
FAKE_MODULES = {"ldmkit.config", "ldmkit.diffusion", "ldmkit.diffusion.process",
                "ldmkit.diffusion.schedules", "ldmkit.models", "ldmkit.models.unet", "ldmkit.runs"}  # fmt: skip


def test_the_table_check_reports_what_a_row_does_not_allow():
    t = build_table(parse_rows(FAKE_TABLE), FAKE_MODULES)
    assert t.layer_of["ldmkit.diffusion"] == "core" and t.row_of["ldmkit.models.unet"] == 2
    g = {m: set() for m in FAKE_MODULES}
    g["ldmkit.diffusion.process"] = {"ldmkit.diffusion.schedules", "ldmkit.config"}  # peer, base
    g["ldmkit.models"] = {"ldmkit.models.unet"}
    g["ldmkit.models.unet"] = {"ldmkit.diffusion.process", "ldmkit.config"}  # config: not named
    g["ldmkit.runs"] = {"ldmkit.models", "ldmkit.models.unet", "ldmkit.diffusion.process"}
    g["ldmkit.diffusion"] = {"ldmkit.diffusion.process", "ldmkit.runs"}  # __init__: own package
    g["ldmkit.config"] = {"ldmkit.runs"}  # `-`, and a higher layer
    assert table_violations(t, g) == [
        "ldmkit.config -> ldmkit.runs",
        "ldmkit.diffusion -> ldmkit.runs",
        "ldmkit.models.unet -> ldmkit.config",
    ]
    assert upward_imports(t, g) == [
        "ldmkit.config (base) -> ldmkit.runs (recipe)",
        "ldmkit.diffusion (core) -> ldmkit.runs (recipe)",
    ]
    with pytest.raises(AssertionError, match="'nets'"):
        bad = parse_rows(FAKE_TABLE.replace("| diffusion.process |", "| nets |"))
        table_violations(build_table(bad, FAKE_MODULES), g)
    with pytest.raises(AssertionError, match="ldmkit.runs is in no row"):
        build_table(parse_rows(FAKE_TABLE)[:-1], FAKE_MODULES)


def test_the_table_check_reports_a_new_import_in_the_source():
    g = graph()
    g["ldmkit.config"] = g["ldmkit.config"] | {"ldmkit.pipeline"}
    g["ldmkit.diffusion.schedules"] = g["ldmkit.diffusion.schedules"] | {
        "ldmkit.diffusion.samplers"
    }
    assert table_violations(design_table(), g) == [
        "ldmkit.config -> ldmkit.pipeline",
        "ldmkit.diffusion.schedules -> ldmkit.diffusion.samplers",
    ]


# ------------------------------------------------------------------------------ cycles


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


def test_design_md_names_only_files_of_the_repository():
    text = DESIGN.read_text()
    outside = re.findall(r"(?:\.\./|~/|/work/|/home/|/tmp/)\S*", text)
    assert not outside, f"docs/design.md names files outside the repository: {outside}"
    named = re.findall(r"\b(?:tests|bench|docs|src)/[\w/.-]+\.(?:py|md|json|toml)\b", text)
    assert len(named) >= 5 and not [p for p in named if not (ROOT / p).exists()], named


# ------------------------------------------------------------------ the run folder's names


def run_folder_names() -> set[str]:
    """Every file and folder name `RunFolder` joins to its folder (`self.path / "run.json"`),
    read from runs.py: its path properties and the files its methods name."""
    tree = ast.parse((SRC / "runs.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RunFolder")
    return {
        n.right.value
        for n in ast.walk(cls)
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div)
        and ast.unparse(n.left) == "self.path"
        and isinstance(n.right, ast.Constant) and isinstance(n.right.value, str)
    }  # fmt: skip


def test_the_run_folder_names_are_read_in_full():
    from ldmkit.runs import RunFolder

    names = run_folder_names()
    folder = RunFolder("/run")
    paths = [getattr(folder, k) for k, v in vars(RunFolder).items() if isinstance(v, property)]
    assert {p.name for p in paths if isinstance(p, Path) and p.parent == folder.path} <= names
    assert {"run.json", "data.json", "training.json", "vae", "unet", "checkpoints", "eval",
            "latents.json", "stop"} <= names  # fmt: skip


def path_parts(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """Each string that a module uses as part of a path: an operand of `/` (also as a branch of
    a conditional expression there), an argument of Path(), os.path.join(), .joinpath() or
    .with_name(); and each piece of an f-string, whole."""
    for n in ast.walk(tree):
        parts: list[ast.expr] = []
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div):
            parts = [n.left, n.right]
        elif isinstance(n, ast.Call):
            f = n.func
            name = (
                f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            )
            if name in ("Path", "PurePath", "join", "joinpath", "with_name"):
                parts = list(n.args)
        elif isinstance(n, ast.JoinedStr):
            parts = list(n.values)
        for p in parts:
            for leaf in [p.body, p.orelse] if isinstance(p, ast.IfExp) else [p]:
                if isinstance(leaf, ast.Constant) and isinstance(leaf.value, str):
                    yield leaf.value, leaf.lineno


def names_used(path: Path, names: set[str]) -> set[str]:
    """The run folder's names that a module spells out: a file name (with a dot) as any string,
    a folder name (`vae`, `eval`: words with other meanings too) as part of a path."""
    tree = ast.parse(path.read_text())
    found = {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and n.value in names and "." in n.value
    }
    for text, _ in path_parts(tree):
        found |= {x for x in names if re.search(rf"(^|/){re.escape(x)}(/|$)", text)}
    return found


# (module, name): why it may spell out a name the run folder also uses; each names another folder
ELSEWHERE = {
    ("interop/diffusers.py", "vae"): "a diffusers folder's component (diffusers' name)",
    ("interop/diffusers.py", "unet"): "a diffusers folder's component (diffusers' name)",
    ("models/text.py", "tokenizer.json"): "MiniLM's tokenizer in its package folder",
    ("evaluation/feature_nets.py", "training.json"): "the domain classifier's folder in eval/",
    ("evaluation/report.py", "loss.png"): "the report's figures, in a temporary folder",
    ("evaluation/report.py", "samples.png"): "the report's figures, in a temporary folder",
    ("api/checks.py", "report.html"): "an example file name in a message",
    ("training/loop.py", "samples"): "a TensorBoard tag (`autoencoder/samples`), not a path",
}
# (module, name): run folder paths built outside runs.py still (issue 24); drop each when fixed
NOT_YET: dict[tuple[str, str], str] = {}


def run_folder_name_uses() -> set[tuple[str, str]]:
    names = run_folder_names()
    return {
        (str(p.relative_to(SRC)), name)
        for p in SRC.rglob("*.py")
        if p.name != "runs.py" or p.parent != SRC
        for name in names_used(p, names)
    }


def test_only_runs_names_the_run_folder_files():
    uses = run_folder_name_uses()
    outside = sorted(f"{m}: {name}" for m, name in uses - ELSEWHERE.keys() - NOT_YET.keys())
    assert not outside, (
        "run folder names spelled out beside runs.py (use RunFolder):\n" + "\n".join(outside)
    )
    fixed = sorted(f"{m}: {name}" for m, name in NOT_YET.keys() - uses)
    assert not fixed, "fixed, so drop from NOT_YET in tests/test_layout.py: " + ", ".join(fixed)


def test_the_run_folder_check_finds_a_spelled_out_name(tmp_path):
    names = run_folder_names()
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from pathlib import Path\n"
        "def f(run, stage, big):\n"
        "    a = run / ('eval' if big else 'x') / 'table.json'\n"
        "    b = Path(run, 'latents.json')\n"
        "    c = f'{run}/checkpoints/{stage}'\n"
        "    d = {'vae': 1, 'stage': 'unet'}  # words, not paths\n"
        "    return 'run.json'\n"
    )
    assert names_used(bad, names) == {"eval", "latents.json", "checkpoints", "run.json"}


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

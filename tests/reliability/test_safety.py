"""Safety: nothing untrusted is unpickled or executed, and no file lands outside its folder.

The source scan walks every module's AST (not regexes, so `model.eval()` is not `eval(`). The one
allowed unpickler, data/safe_pickle.py, has its own tests (tests/data/test_safe_pickle.py: a
malicious pickle is refused before anything runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from reliability_helpers import make_run, run_cli

import ldmkit
from ldmkit.utils import safe_filename

PACKAGE = Path(ldmkit.__file__).parent
PICKLE_ALLOWED = {"data/safe_pickle.py"}
PICKLE_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
}


def _dotted(node: ast.AST) -> str:
    """'np.load' for the func of `np.load(...)`; '' when it is not a plain dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw_is(call: ast.Call, name: str, test) -> bool:
    return any(k.arg == name and test(k.value) for k in call.keywords)


def _const(value):
    return lambda v: isinstance(v, ast.Constant) and v.value is value


def unsafe_calls(source: str, *, pickle_allowed: bool = False) -> list[str]:
    """Every unsafe deserialisation or code execution in `source`, as 'line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PICKLE_MODULES and not pickle_allowed:
                    found.append(f"{line}: import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in PICKLE_MODULES and not pickle_allowed:
                found.append(f"{line}: from {node.module} import")
        elif isinstance(node, (ast.Name, ast.Attribute)):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if name in ("Unpickler", "read_pickle") and not pickle_allowed:
                found.append(f"{line}: {name}")
        if not isinstance(node, ast.Call):
            continue
        func = _dotted(node.func)
        if isinstance(node.func, ast.Name) and func in ("eval", "exec", "compile", "__import__"):
            found.append(f"{line}: builtin {func}()")
        elif func.endswith("pickle.load") or func.endswith("pickle.loads"):
            if not pickle_allowed:
                found.append(f"{line}: {func}()")
        elif func == "torch.load" and not _kw_is(node, "weights_only", _const(True)):
            found.append(f"{line}: torch.load() without weights_only=True")
        elif func in ("np.load", "numpy.load") and not _kw_is(node, "allow_pickle", _const(False)):
            found.append(f"{line}: {func}() without allow_pickle=False")
        elif func in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all"):
            found.append(f"{line}: {func}()")
        elif func in ("yaml.load", "yaml.load_all"):
            safe = lambda v: _dotted(v).split(".")[-1] in ("SafeLoader", "CSafeLoader")  # noqa: E731
            if not (_kw_is(node, "Loader", safe) or (len(node.args) > 1 and safe(node.args[1]))):
                found.append(f"{line}: {func}() without SafeLoader")
    return found


def test_package_source_has_no_unsafe_loading_or_execution():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the scan really sees the package
    problems = []
    for path in files:
        rel = path.relative_to(PACKAGE).as_posix()
        for p in unsafe_calls(
            path.read_text(encoding="utf-8"), pickle_allowed=rel in PICKLE_ALLOWED
        ):
            problems.append(f"src/ldmkit/{rel}:{p}")
    assert problems == []


@pytest.mark.parametrize(
    "code",
    [
        "import pickle",
        "import _pickle as p",
        "from pickle import loads",
        "import dill",
        "x = pickle.load(f)",
        "class U(pickle.Unpickler): pass",
        "torch.load(p)",
        "torch.load(p, weights_only=False)",
        "eval(text)",
        "exec(code)",
        "yaml.load(s)",
        "yaml.load(s, Loader=yaml.Loader)",
        "yaml.full_load(s)",
        "np.load(p)",
        "numpy.load(p, allow_pickle=True)",
        "import pandas as pd; pd.read_pickle(p)",
    ],
)
def test_scanner_catches(code):
    assert unsafe_calls(code), code


@pytest.mark.parametrize(
    "code",
    [
        "model.eval()",
        "vae.eval().to(dev)",
        "torch.load(p, map_location='cpu', weights_only=True)",
        "np.load(p, allow_pickle=False)",
        "yaml.load(s, Loader=yaml.SafeLoader)",
        "yaml.safe_load(s)",
        "json.loads(s)",
        "'eval(' in text",
    ],
)
def test_scanner_passes_safe_code(code):
    assert unsafe_calls(code) == []


def test_pickle_allowed_only_in_safe_pickle():
    text = (PACKAGE / "data" / "safe_pickle.py").read_text()
    assert unsafe_calls(text, pickle_allowed=False)  # it does use pickle...
    assert unsafe_calls(text, pickle_allowed=True) == []  # ...and nothing else


# ------------------------------------------------------------------------------------ filenames
@pytest.mark.parametrize(
    "text",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "..",
        ".",
        "a\x00b",
        "C:\\Windows\\system32",
        "~/.bashrc",
        "-rf --no-preserve-root",
        "CON",
        "nul.txt",
        "",
        "\u202eevil\u202c.png",
        "a red circle " * 100,
    ],
)
def test_safe_filename_is_one_harmless_component(text, tmp_path):
    name = safe_filename(text)
    assert name and len(name) <= 80
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    assert ".." not in name and not name.startswith((".", "-"))
    assert name.split(".")[0].lower() not in ("con", "prn", "aux", "nul")
    path = tmp_path / (name + ".png")
    assert path.resolve().parent == tmp_path.resolve()
    path.write_bytes(b"x")  # a valid file name on this system


def test_safe_filename_keeps_readable_text_and_distinct_long_text():
    assert safe_filename("a red circle on blue") == "a_red_circle_on_blue"
    assert safe_filename("../../etc/passwd") == "etc_passwd"
    a, b = safe_filename("x" * 200 + "a"), safe_filename("x" * 200 + "b")
    assert a != b and len(a) == len(b) == 80
    assert safe_filename("x" * 500, max_len=40) == safe_filename("x" * 500, max_len=40)
    with pytest.raises(ValueError, match="max_len must be at least 16"):
        safe_filename("a", max_len=3)


def test_sample_outdir_writes_only_inside_the_chosen_folder(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    work = tmp_path / "work"
    (work / "other").mkdir(parents=True)
    outdir = work / "other" / ".." / "imgs"  # the user's folder, however spelled
    before = {p for p in tmp_path.rglob("*")}
    rc, out, err = run_cli(capsys, "sample", "--run", str(run), "--n", "3", "--steps", "1",
                           "--class", "c1", "--outdir", str(outdir))  # fmt: skip
    assert rc == 0, err
    new = {p for p in tmp_path.rglob("*")} - before
    assert {p.name for p in new} == {"imgs", "00000.png", "00001.png", "00002.png"}
    assert all(p.resolve().is_relative_to((work / "imgs").resolve()) for p in new)

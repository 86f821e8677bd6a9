"""The notebook tutorial (notebooks/tutorial.ipynb): kept without outputs, and run end to end
in a short form (tiny models and step counts injected after its parameters cell), so that it
cannot rot. Its full form (a 5-minute training) is measured by hand: docs/performance.md."""

import importlib.util
import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "tutorial.ipynb"

# the tiny run of tests/training/test_run.py, as `--set` settings
TINY_SETTINGS = [
    "image_size=16", "preview_steps=2",
    "vae.block_out_channels=[8,16]", "vae.layers_per_block=1", "vae.norm_groups=4",
    "unet.block_out_channels=[16,32]", "unet.attention_resolutions=[8]",
    "unet.norm_num_groups=8", "unet.head_dim=8",
    "vae_train.steps=4", "vae_train.batch_size=8", "vae_train.log_every=2",
    "vae_train.sample_every=0",
    "unet_train.steps=6", "unet_train.batch_size=8", "unet_train.log_every=2",
    "unet_train.sample_every=3",
]  # fmt: skip


def cells() -> list[dict]:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]


def test_the_notebook_is_kept_without_outputs():
    code = [c for c in cells() if c["cell_type"] == "code"]
    assert len(code) >= 8
    for c in code:
        assert c["outputs"] == [] and c["execution_count"] is None, "".join(c["source"])[:80]
    meta = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["metadata"]
    assert "widgets" not in meta  # no saved widget state (a progress bar's)


def test_the_notebook_installs_ldmkit_first_and_has_one_parameters_cell():
    code = [c for c in cells() if c["cell_type"] == "code"]
    first = "".join(code[0]["source"])
    assert 'find_spec("ldmkit") is None' in first and '"pip", "install"' in first
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
    names = {line.split("=")[0].strip() for line in "".join(params[0]["source"]).splitlines()
             if "=" in line}  # fmt: skip
    assert {"RUN", "DATA", "TIME_BUDGET", "SETTINGS", "SAMPLE_STEPS", "EVAL_N"} <= names


def test_the_notebook_uses_the_public_api_only():
    source = "\n".join("".join(c["source"]) for c in cells() if c["cell_type"] == "code")
    imports = {line.split()[1] for line in source.splitlines()
               if line.startswith(("from ldmkit", "import ldmkit"))}  # fmt: skip
    assert imports == {"ldmkit"}, imports  # `from ldmkit import api, RunFolder`, no internals


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("nbclient", "nbformat", "ipykernel")),
    reason="needs nbclient, nbformat and ipykernel (pip install 'ldmkit[notebook]')",
)
def test_the_notebook_runs_in_its_short_form(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    from ldmkit.evaluation.table import MIN_N

    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = (
        "import torch\ntorch.set_num_threads(1)\n"
        f"RUN = {str(tmp_path / 'run')!r}\nDATA = 'builtin:shapes?n=64'\nTIME_BUDGET = None\n"
        f"SETTINGS = {TINY_SETTINGS!r}\nSAMPLE_STEPS = 2\nFRAMES = 3\nEVAL_N = {MIN_N}\n"
    )
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(injected))
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})  # fmt: skip
    client.execute()  # raises CellExecutionError, with the cell's traceback, on any error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # the grid, the inpainting, the interpolation, the loss curves
    text = "".join(o.get("text", "") for o in outputs)
    assert "4 autoencoder steps, 6 UNet steps" in text and "PSNR" in text
    assert (tmp_path / "run" / "tutorial" / "inpainted.png").is_file()
    assert {p.name for p in (tmp_path / "run" / "tutorial").glob("interpolation.*")} == {
        "interpolation.png", "interpolation.gif"}  # fmt: skip

"""A tiny untrained run folder, built by hand in the layout `ldmkit train` writes (fast)."""

import json
import shutil

import pytest
import torch

from ldmkit.checkpoint import write_json
from ldmkit.config import to_dict
from ldmkit.data import load_dataset
from ldmkit.models.unet import UNet
from ldmkit.models.vae import Autoencoder
from ldmkit.training.run import resolve_config, run_config_from_dict

TINY = {
    "data": "builtin:shapes?n=96",
    "image_size": 16,
    "vae": {"block_out_channels": [8, 8], "norm_groups": 4, "layers_per_block": 1,
            "mid_attention": False},
    "unet": {"block_out_channels": [8, 16], "attention_resolutions": [], "mid_attention": False,
             "norm_num_groups": 4, "head_dim": 8, "num_res_blocks": 1},
    "diffusion": {"num_timesteps": 100},
}  # fmt: skip


def make_tiny_run(out):
    """Random-weight VAE (16 px -> 4x8x8) and class-conditional UNet, T = 100, 96 shapes."""
    cfg = run_config_from_dict(TINY)
    ds = load_dataset(cfg.data, image_size=cfg.image_size, channels=cfg.channels, seed=cfg.seed)
    cfg = resolve_config(cfg, ds.channels, len(ds.class_names))
    torch.manual_seed(0)
    Autoencoder(cfg.vae).save_pretrained(out / "vae")
    UNet(cfg.unet).save_pretrained(out / "unet")
    write_json(out / "run.json", to_dict(cfg))
    write_json(
        out / "data.json",
        {"spec": cfg.data, "name": ds.name, "num_images": len(ds), "channels": ds.channels,
         "image_size": cfg.image_size, "class_names": ds.class_names,
         "fingerprint": ds.fingerprint()},
    )  # fmt: skip
    rows = [{"stage": "autoencoder", "step": s, "loss": 1.0 / s} for s in range(1, 31)]
    rows += [{"stage": "diffusion", "step": s, "loss": 0.5 + 1.0 / s} for s in range(1, 31)]
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="session", autouse=True)
def _quick_domain_classifier():
    """Domain classifiers train for 10 steps at least here, not 300: the tests check wiring."""
    from ldmkit.evaluation import evaluate

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate, "DOMAIN_MIN_STEPS", 10)
        yield


@pytest.fixture(scope="session")
def tiny_run_template(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("tiny") / "run")


@pytest.fixture
def tiny_run(tiny_run_template, tmp_path):
    """A fresh copy per test, so tests that write eval/ or report.html do not see each other."""
    return shutil.copytree(tiny_run_template, tmp_path / "run")


@pytest.fixture(scope="session")
def evaluated_run(tiny_run_template, tmp_path_factory):
    """(run, printed text): a copy of the tiny run after `ldmkit eval --n 8` (2 samplers x 2
    step counts)."""
    import contextlib
    import io

    from ldmkit.cli import main

    run = shutil.copytree(tiny_run_template, tmp_path_factory.mktemp("evaluated") / "run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = main(["eval", "--run", str(run), "--n", "8", "--samplers", "ddim,dpm++2m",
                       "--steps", "2,3"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return run, out.getvalue()

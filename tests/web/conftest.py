"""A runs folder holding one tiny trained run (a few steps of each stage, made once per session),
and the web app over it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "starlette", reason="ldmkit serve needs the serve extra: pip install -e '.[serve]'"
)

from serve_helpers import tiny_settings  # noqa: E402


@pytest.fixture(scope="session")
def runs_template(tmp_path_factory) -> Path:
    from ldmkit import api

    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        api.train(root / "shapes", data="builtin:shapes?n=64", sets=tiny_settings(4, 2))
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture
def runs(runs_template, tmp_path) -> Path:
    """A fresh copy of the runs folder per test (tests write stop requests, lock files)."""
    return Path(shutil.copytree(runs_template, tmp_path / "runs"))


@pytest.fixture
def client(runs):
    from starlette.testclient import TestClient

    from ldmkit.web.app import create_app

    with TestClient(create_app(runs)) as c:
        yield c

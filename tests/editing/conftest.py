import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "reliability"))

from reliability_helpers import make_run  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """An untrained 3-class run of 16x16 RGB images (fast: no training)."""
    return make_run(tmp_path_factory.mktemp("edit") / "run")

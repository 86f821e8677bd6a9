import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "reliability"))
sys.path.insert(0, str(Path(__file__).parents[1] / "web"))  # serve_helpers: the page test
sys.path.insert(0, str(Path(__file__).parent))

from adapter_helpers import few_images, make_adaptable_run  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune")
    return {
        "class": make_adaptable_run(root / "class"),
        "uncond": make_adaptable_run(root / "uncond", num_classes=None),
        "few": few_images(root / "few"),
        "root": root,
    }

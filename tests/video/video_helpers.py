"""The tiny video run the tests of tests/video share (trained once per session)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
from test_run import TINY  # noqa: E402

FRAMES = 3


def tiny_video(**over) -> dict:
    d = json.loads(json.dumps(TINY))
    d["data"] = "builtin:moving-shapes?n=16"
    d["video"] = {"frames": FRAMES, "temporal_heads": 2, "fps": 5}
    d["unet_train"].update(batch_size=4, grad_accum=1, sample_every=3)
    for k, v in over.items():
        d[k].update(v) if isinstance(v, dict) else d.__setitem__(k, v)
    return d

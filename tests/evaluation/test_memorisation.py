"""memorisation.py: planted copies of training images are found in feature and pixel space."""

import json

import torch

from ldmkit.data import load_dataset
from ldmkit.data.transforms import to_float
from ldmkit.evaluation.memorisation import memorisation_check


def test_memorisation_check_finds_planted_copies(shapes, random_net, tmp_path):
    held_out = load_dataset("builtin:shapes?n=96", image_size=16, seed=1)
    fresh = load_dataset("builtin:shapes?n=8", image_size=16, seed=2).images
    planted = torch.tensor([3, 10, 17, 40, 41, 60, 77, 90])
    gen = to_float(torch.cat([shapes.images[planted], fresh]))  # 8 copies, 8 new
    res = memorisation_check(gen, shapes, held_out, random_net, out_dir=tmp_path, worst=4)
    for report in (res.pixel, res.feature):
        assert (report.ratio[:8] < 1e-6).all()  # exact copies: distance 0 to a training image
        assert torch.equal(report.train_index[:8], planted)
        assert set(report.worst.tolist()) <= set(range(8))
    assert res.pixel.near_copy_share == 0.5  # the fresh images are not flagged
    assert 0.5 <= res.near_copy_share <= 0.75
    d = res.to_dict()
    assert d["n"] == 16 and d["n_train"] == 96 and d["pixel"]["near_copy_share"] == 0.5
    for space in ("feature", "pixel"):
        assert res.grids[space].read_bytes()[:4] == b"\x89PNG"
    json.dumps(d)  # JSON-ready

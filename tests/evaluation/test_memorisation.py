"""memorisation.py: planted copies of training images are found in feature and pixel space."""

import json

import pytest
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


def test_memorisation_check_takes_known_train_features(shapes, random_net):
    """Features given for the training images are used as they are (not computed again), and
    must match the images in number; the whole set's size is recorded beside the sample's."""
    from ldmkit.evaluation.feature_nets import compute_features

    held_out = load_dataset("builtin:shapes?n=32", image_size=16, seed=1)
    gen = to_float(torch.cat([shapes.images[:4], held_out.images[:4]]))
    part = shapes.images[:32]
    feats = compute_features(random_net, part)
    plain = memorisation_check(gen, part, held_out, random_net)
    given = memorisation_check(gen, part, held_out, random_net, train_features=feats,
                               n_train_total=96)  # fmt: skip
    assert torch.equal(plain.feature.ratio, given.feature.ratio)
    assert given.to_dict()["n_train"] == 32 and given.to_dict()["n_train_total"] == 96
    # other features than the network's: the feature-space ratios change, the pixel ones do not
    moved = memorisation_check(gen, part, held_out, random_net, train_features=feats + 1.0)
    assert not torch.allclose(moved.feature.ratio, plain.feature.ratio)
    assert torch.equal(moved.pixel.ratio, plain.pixel.ratio)
    with pytest.raises(ValueError, match="31 train features for 32 train images"):
        memorisation_check(gen, part, held_out, random_net, train_features=feats[:31])

"""ImageDataset: items, batches, augmentation, split, fingerprint, and spec parsing."""

import pytest
import torch

from ldmkit.data import (
    DataError,
    ImageDataset,
    augment,
    load_dataset,
    parse_spec,
    to_float,
    to_uint8,
)


def _ds(n=10, c=3, s=8, **kw):
    images = torch.arange(n * c * s * s, dtype=torch.int64).remainder(256).to(torch.uint8)
    return ImageDataset(images.reshape(n, c, s, s), **kw)


def test_to_float_to_uint8_round_trip():
    x = torch.arange(256, dtype=torch.uint8)
    f = to_float(x)
    assert f.min() == -1 and f.max() == 1 and torch.equal(to_uint8(f), x)
    assert torch.equal(
        to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8)
    )


def test_item_and_batch():
    ds = _ds(
        labels=torch.arange(10),
        captions=[f"c{i}" for i in range(10)],
        class_names=list("abcdefghij"),
    )
    item = ds[3]
    assert item["label"] == 3 and item["caption"] == "c3" and item["image"].dtype == torch.float32
    assert (
        item["image"].shape == (3, 8, 8) and -1 <= item["image"].min() <= item["image"].max() <= 1
    )
    b = ds.batch([1, 4])
    assert (
        b["image"].shape == (2, 3, 8, 8)
        and b["label"].tolist() == [1, 4]
        and b["caption"] == ["c1", "c4"]
    )
    plain = _ds()
    assert (
        plain[0]["label"] == -1
        and plain[0]["caption"] == ""
        and plain.batch([0])["label"].tolist() == [-1]
    )
    assert ds.channels == 3 and ds.image_size == 8 and len(ds) == 10 and ds.num_classes == 10


def test_bad_construction():
    with pytest.raises(DataError, match="images must be uint8"):
        ImageDataset(torch.zeros(2, 3, 8, 8))
    with pytest.raises(DataError, match="got 1 captions for 10 images"):
        _ds(captions=["x"])
    with pytest.raises(DataError, match="labels must be long"):
        _ds(labels=torch.zeros(3, dtype=torch.long))


def test_split_disjoint_and_seeded():
    ds = _ds(n=20, labels=torch.arange(20))
    train, held = ds.split(0.25, seed=1)
    assert len(train) == 15 and len(held) == 5
    assert set(train.labels.tolist()).isdisjoint(held.labels.tolist())
    assert held.labels.tolist() == ds.split(0.25, seed=1)[1].labels.tolist()
    assert held.labels.tolist() != ds.split(0.25, seed=2)[1].labels.tolist()
    with pytest.raises(DataError, match="fraction must be in"):
        ds.split(1.0)


def test_fingerprint():
    a, b = _ds(spec="x"), _ds(spec="x")
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 16
    assert _ds(spec="y").fingerprint() != a.fingerprint()
    c = _ds(spec="x")
    c.images[0, 0, 0, 0] += 1
    assert c.fingerprint() != a.fingerprint()


def test_augment_crop_and_flip():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    before = x.clone()
    g = torch.Generator().manual_seed(0)
    flipped = augment(x, g, crop="center", flip=True)
    assert torch.equal(x, before)  # the caller's tensor is untouched
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    # a random crop is a window of the reflect-padded image: a shift by at most 32 // 16 = 2 px
    x32 = torch.arange(32 * 32, dtype=torch.float32).reshape(1, 1, 32, 32)
    padded = torch.nn.functional.pad(x32, (2, 2, 2, 2), mode="reflect")
    windows = [padded[..., dy : dy + 32, dx : dx + 32] for dy in range(5) for dx in range(5)]
    seen = set()
    for seed in range(30):
        out = augment(x32, torch.Generator().manual_seed(seed), crop="random", flip=False)
        matches = [i for i, w in enumerate(windows) if torch.equal(out, w)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 5  # the shifts vary
    u8 = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    assert augment(u8, torch.Generator().manual_seed(0)).dtype == torch.uint8
    again = augment(u8, torch.Generator().manual_seed(0))
    assert torch.equal(again, augment(u8, torch.Generator().manual_seed(0)))


def test_parse_spec_and_bad_arguments(tmp_path):
    assert parse_spec("builtin:shapes?n=5") == ("builtin:shapes", "shapes", {"n": "5"})
    assert parse_spec("cifar100:/d/x?split=test&labels=coarse") == (
        "cifar100", "/d/x", {"split": "test", "labels": "coarse"},
    )  # fmt: skip
    assert parse_spec("C:/data/img") == ("folder", "C:/data/img", {})
    with pytest.raises(
        DataError, match="unknown option\\(s\\) split in 'builtin:shapes\\?split=test'"
    ):
        load_dataset("builtin:shapes?split=test")
    with pytest.raises(DataError, match="needs a path after 'cifar10:'"):
        load_dataset("cifar10:")
    with pytest.raises(DataError, match="'cifar:x' is neither an existing folder nor a known kind"):
        load_dataset("cifar:x")
    with pytest.raises(DataError, match="channels must be 1, 3 or None"):
        load_dataset("builtin:shapes", channels=4)
    with pytest.raises(DataError, match="on_error must be"):
        load_dataset("builtin:shapes", on_error="ignore")
    with pytest.raises(DataError, match="unknown split 'val' for MNIST"):
        (tmp_path / "m").mkdir()
        load_dataset(f"mnist:{tmp_path / 'm'}?split=val")


def test_load_dataset_augment_settings():
    ds = load_dataset("builtin:shapes?n=4", image_size=8, crop="random", flip=True)
    assert ds.crop == "random" and ds.flip
    out = ds.augment(ds.images, torch.Generator().manual_seed(0))
    assert out.shape == ds.images.shape and out.dtype == torch.uint8
    held_train, held = ds.split(0.5)
    assert held.crop == "random" and len(held) == 2 and held.fingerprint() != ds.fingerprint()

"""Image folders: nested classes, captions, odd modes, and every kind of bad file."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from ldmkit.data import DataError, load_dataset


def _save(path, mode="RGB", size=(20, 20), color=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new(mode, size, color if color is not None else 0)
    im.save(path, **kw)
    return path


def test_nested_classes_and_order(tmp_path):
    _save(tmp_path / "dogs" / "a.png", color=(200, 0, 0))
    _save(tmp_path / "dogs" / "deeper" / "b.jpg", color=(0, 200, 0))
    _save(tmp_path / "cats" / "c.webp", color=(0, 0, 200))
    _save(tmp_path / ".hidden" / "x.png")  # hidden folders are ignored
    ds = load_dataset(str(tmp_path), image_size=8, labels_from_folders=True)
    assert ds.class_names == ["cats", "dogs"] and ds.labels.tolist() == [0, 1, 1]
    assert ds.images.shape == (3, 3, 8, 8) and ds.captions is None
    assert ds.images[0, 2].float().mean() > 150 and ds.images[1, 0].float().mean() > 150
    item = ds[1]
    assert item["label"] == 1 and item["caption"] == "" and item["image"].shape == (3, 8, 8)


def test_loose_image_with_labels_from_folders(tmp_path):
    _save(tmp_path / "a" / "x.png")
    _save(tmp_path / "loose.png")
    with pytest.raises(DataError, match="loose.png is not inside a class sub-folder"):
        load_dataset(str(tmp_path), image_size=8, labels_from_folders=True)


def test_captions_txt_and_jsonl(tmp_path):
    for name in ("a", "b", "c"):
        _save(tmp_path / "sub" / f"{name}.png")
    (tmp_path / "sub" / "a.txt").write_text("  a red\n circle ")
    lines = [
        {"file": "sub/a.png", "caption": "loses to the .txt"},
        {"file": "sub/b.png", "caption": "a blue square"},
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ds = load_dataset(str(tmp_path), image_size=8)
    assert ds.captions == ["a red circle", "a blue square", ""]
    assert ds[1]["caption"] == "a blue square" and ds.labels is None


def test_bad_captions_line(tmp_path, caplog):
    _save(tmp_path / "a.png")
    (tmp_path / "captions.jsonl").write_text('{"file": "a.png", "caption": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"captions.jsonl:2 is not a JSON object"):
        load_dataset(str(tmp_path), image_size=8, on_error="fatal")
    with caplog.at_level(logging.WARNING):
        assert load_dataset(str(tmp_path), image_size=8).captions == ["ok"]
    assert "captions.jsonl:2" in caplog.text


def test_odd_modes_convert(tmp_path):
    _save(tmp_path / "l.png", "L", color=100)
    _save(tmp_path / "la.png", "LA", color=(0, 0))  # fully transparent -> white
    _save(tmp_path / "rgba.png", "RGBA", color=(255, 0, 0, 255))
    pal = Image.new("RGB", (20, 20), (0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(tmp_path / "p.gif")
    Image.fromarray(np.full((20, 20), 65535, np.uint16)).save(tmp_path / "i16.png")
    _save(tmp_path / "cmyk.tif", "CMYK", color=(0, 255, 255, 0))  # red in CMYK
    with Image.open(tmp_path / "i16.png") as im:
        assert im.mode.startswith("I")  # really 16-bit on disk
    ds = load_dataset(str(tmp_path), image_size=8)  # mixed -> RGB
    assert ds.channels == 3
    means = {n: ds.images[i].float().mean(dim=(1, 2)).round().tolist() for i, n in enumerate(
        ["cmyk", "i16", "l", "la", "p", "rgba"])}  # fmt: skip
    assert means["cmyk"] == [255, 0, 0] and means["rgba"] == [255, 0, 0]
    assert means["i16"] == [255, 255, 255]  # scaled, not clipped at the low byte
    assert means["l"] == [100, 100, 100] and means["la"] == [255, 255, 255]
    assert means["p"] == [0, 0, 255]


def test_grayscale_folder_is_one_channel(tmp_path):
    _save(tmp_path / "a.png", "L", color=10)
    Image.fromarray(np.full((20, 20), 256 * 40, np.uint16)).save(tmp_path / "b.png")
    _save(tmp_path / "c.png", "1", color=1)
    ds = load_dataset(str(tmp_path), image_size=8)
    assert ds.channels == 1 and ds.images[:, 0, 0, 0].tolist() == [10, 40, 255]
    assert load_dataset(str(tmp_path), image_size=8, channels=3).channels == 3
    _save(tmp_path / "d.png", color=(1, 2, 3))
    assert load_dataset(str(tmp_path), image_size=8, channels=1).channels == 1


def _bad_files(root):
    _save(root / "good1.png")
    _save(root / "good2.jpg")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("this is not an image")
    buf = (root / "good1.png").read_bytes()
    _save(root / "trunc.png", size=(64, 64), color=(1, 2, 3))
    raw = (root / "trunc.png").read_bytes()
    (root / "trunc.png").write_bytes(raw[: len(raw) // 2])
    return buf


def test_bad_files_skipped_with_count(tmp_path, caplog):
    _bad_files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ldmkit.data"):
        ds = load_dataset(str(tmp_path), image_size=8)
    assert len(ds) == 2
    assert "skipped 3 of 5 files" in caplog.text
    for name, why in [("empty.png", "zero-byte"), ("notes.jpg", "not an image"), ("trunc.png", "")]:
        assert name in caplog.text and why in caplog.text


@pytest.mark.parametrize(
    "name, why",
    [
        ("empty.png", "zero-byte file"),
        ("notes.jpg", "not an image"),
        ("trunc.png", "truncated|broken"),
    ],
)
def test_bad_file_fatal_names_it(tmp_path, name, why):
    _save(tmp_path / "good.png")
    files = {"empty.png": b""}
    if name == "notes.jpg":
        files[name] = b"this is not an image"
    elif name == "trunc.png":
        _save(tmp_path / "big.png", size=(64, 64), color=(1, 2, 3))
        files[name] = (tmp_path / "big.png").read_bytes()[:100]
        (tmp_path / "big.png").unlink()
    (tmp_path / name).write_bytes(files[name])
    with pytest.raises(DataError, match=rf"cannot read image .*{name}: .*({why}).*on_error='skip'"):
        load_dataset(str(tmp_path), image_size=8, on_error="fatal")


def test_decompression_bomb_refused(tmp_path, monkeypatch, caplog):
    _save(tmp_path / "ok.png", size=(10, 10))
    _save(tmp_path / "bomb.png", size=(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(
        DataError,
        match=r"bomb.png: 40x40 = 1600 pixels is over Pillow's decompression-bomb limit of 1000",
    ):
        load_dataset(str(tmp_path), image_size=8, on_error="fatal")
    with caplog.at_level(logging.WARNING):
        assert len(load_dataset(str(tmp_path), image_size=8)) == 1
    assert "skipped 1 of 2 files: bomb.png" in caplog.text
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # over 2x: Pillow's own error
    with pytest.raises(DataError, match=r"bomb.png: .*decompression-bomb"):
        load_dataset(str(tmp_path), image_size=8, on_error="fatal")


def test_small_images_upscaled_with_warning(tmp_path, caplog):
    _save(tmp_path / "small.png", size=(4, 6), color=(9, 9, 9))
    _save(tmp_path / "big.png", size=(40, 30))
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(str(tmp_path), image_size=16)
    assert (
        ds.images.shape == (2, 3, 16, 16)
        and "upscaled 1 of 2 images smaller than 16x16" in caplog.text
    )
    assert ds.images[1].float().mean().round() == 9


def test_all_unreadable(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="none of the 1 image files .* could be read"):
        load_dataset(str(tmp_path), image_size=8)


def test_missing_empty_and_no_image_folders(tmp_path):
    with pytest.raises(
        DataError, match=r"data folder .*nope does not exist; give a folder of images \(png/jpg"
    ):
        load_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DataError, match=r"data folder .*empty is empty; put images \(png/jpg/jpeg/webp"
    ):
        load_dataset(str(tmp_path / "empty"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("hi")
    (tmp_path / "docs" / "data.csv").write_text("1,2")
    with pytest.raises(
        DataError,
        match=r"no images \(png/jpg.*\) in .*docs: found 2 other file\(s\) such as data.csv",
    ):
        load_dataset(str(tmp_path / "docs"))


def test_limit_and_crop(tmp_path):
    for i in range(6):
        _save(tmp_path / f"{i}.png", size=(30, 10), color=(i, i, i))
    ds = load_dataset(str(tmp_path), image_size=8, limit=3, seed=1)
    assert len(ds) == 3 and ds.images[:, 0, 0, 0].tolist() == sorted(ds.images[:, 0, 0, 0].tolist())
    assert ds.images.shape[-2:] == (8, 8)  # 30x10 -> short side 8 -> center 8x8

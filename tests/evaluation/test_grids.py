"""Grids: layout arithmetic, pixel placement, and PNGs that Pillow reads back."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.data.transforms import to_float
from ldmkit.evaluation.grids import make_grid, save_grid, to_uint8_hwc


def test_make_grid_shape_for_nrow_and_padding():
    images = torch.zeros(5, 3, 4, 6)
    grid = make_grid(images, nrow=3, padding=2)
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (6 + 2) + 2, 3) and grid.dtype == np.uint8
    assert make_grid(images, padding=0).shape == (2 * 4, 3 * 6, 3)  # default nrow = ceil(sqrt(5))
    assert make_grid(torch.zeros(2, 1, 5, 5), nrow=8, padding=1).shape == (7, 13, 1)


def test_make_grid_puts_a_known_pixel_where_expected():
    images = torch.full((5, 3, 4, 6), -1.0)
    images[4, 1, 1, 2] = 1.0  # image 4 -> row 1, column 1 with nrow=3
    grid = make_grid(images, nrow=3, padding=2, pad_value=7)
    y, x = 2 + 1 * (4 + 2) + 1, 2 + 1 * (6 + 2) + 2
    assert grid[y, x].tolist() == [0, 255, 0]
    assert (grid == 255).sum() == 1
    assert grid[0, 0, 0] == 7  # padding
    assert (grid[8:12, 18:24] == 7).all()  # the unused sixth cell keeps pad_value


def test_float_and_uint8_inputs_map_the_same():
    u8 = torch.randint(
        0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    as_float = to_float(u8)
    assert np.array_equal(to_uint8_hwc(as_float), to_uint8_hwc(u8))
    assert np.array_equal(make_grid(as_float), make_grid(u8.numpy()))


def test_save_grid_writes_a_readable_png(tmp_path):
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    path = tmp_path / "grid.png"
    grid = save_grid(images, path, nrow=3)
    assert np.array_equal(grid, make_grid(images, nrow=3))
    with Image.open(path) as img:
        assert img.mode == "RGB"
        assert np.array_equal(np.asarray(img), grid)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]  # no temp file left


def test_save_grid_with_captions_and_row_labels(tmp_path):
    images = torch.full((4, 1, 8, 8), 1.0)  # white cells: any dark pixel outside them is text
    path = tmp_path / "captioned.png"
    grid = save_grid(
        images,
        path,
        nrow=2,
        captions=["a red circle", "a blue square", "x", "a very long caption that must wrap"],
        row_labels=["circle", "square"],
    )
    with Image.open(path) as img:
        assert img.mode == "L" and img.size == (grid.shape[1], grid.shape[0])
        pixels = np.asarray(img)
    cell = 8 * 12  # 8 px upscaled to >= 96 px so captions fit
    assert pixels.shape[0] > 2 * cell and pixels.shape[1] > 2 * cell
    assert (pixels < 128).sum() > 50  # text was drawn
    assert (pixels[:, :20] < 128).any()  # row labels sit in the left margin


def test_save_grid_bad_inputs(tmp_path):
    images = torch.zeros(3, 3, 4, 4)
    with pytest.raises(ValueError, match="one per image"):
        save_grid(images, tmp_path / "a.png", captions=["only one"])
    with pytest.raises(ValueError, match="one per row"):
        save_grid(images, tmp_path / "a.png", nrow=3, row_labels=["r0", "r1"])
    with pytest.raises(ValueError, match="unknown image suffix"):
        save_grid(images, tmp_path / "a.grid")
    with pytest.raises(ValueError, match="C = 1 or 3"):
        make_grid(torch.zeros(2, 4, 4, 4))


def test_row_labels_are_drawn_at_their_size_on_cells_enlarged_for_them(tmp_path):
    """A labelled grid is meant to be shown 1:1: small cells are enlarged (nearest) to at least
    MIN_LABELLED_CELL px before the labels are drawn, and each label is the font's own bitmap at
    FONT_SIZE (never enlarged with the cells, which is what blurred them on the page)."""
    from PIL import ImageDraw

    from ldmkit.evaluation.grids import FONT_SIZE, MIN_LABELLED_CELL, _font

    images = torch.ones(10, 3, 16, 16)  # white cells: any dark pixel is text
    grid = save_grid(images, tmp_path / "g.png", nrow=2,
                     row_labels=["circle", "square", "triangle", "star", "cross"])  # fmt: skip
    cell = 16 * math.ceil(MIN_LABELLED_CELL / 16)  # 64
    assert grid.shape[0] == 5 * (cell + 2) + 2  # five rows of enlarged cells
    dark = grid[..., 0] < 128
    cols = np.flatnonzero(dark.any(0))
    margin = int(cols.max()) + 1  # the labels' margin: the cells are white
    for r, label in enumerate(["circle", "square", "triangle", "star", "cross"]):
        row = dark[2 + r * (cell + 2) : 2 + r * (cell + 2) + cell, :margin]
        ys, xs = np.nonzero(row)
        drawn = row[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        alone = Image.new("L", (200, 40), 255)
        ImageDraw.Draw(alone).text((2, 2), label, fill=0, font=_font())
        ref = np.asarray(alone) < 128
        rys, rxs = np.nonzero(ref)
        expect = ref[rys.min() : rys.max() + 1, rxs.min() : rxs.max() + 1]
        assert np.array_equal(drawn, expect), label  # the font's bitmap, 1:1
        assert drawn.shape[0] <= FONT_SIZE < cell  # a label's height: the font's, not the cell's

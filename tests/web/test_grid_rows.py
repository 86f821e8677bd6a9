"""One row per class: a count that does not fill whole rows is rounded to whole rows and the
caller is told (`models.conditioning.row_layout`, the one rule of the CLI's, the api's and the
page's grids); no class the user asked for is left out in silence (issue 32)."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from serve_helpers import wait_for

from ldmkit import api, cli
from ldmkit.evaluation.grids import MIN_LABELLED_CELL
from ldmkit.models.conditioning import row_layout

CLASSES = ["circle", "square", "triangle", "star", "cross"]  # the shapes run's five


@pytest.mark.parametrize(
    "n, rows, most, expect",
    [(8, 5, None, (10, 2, 5)), (10, 5, None, (10, 2, 5)), (1, 5, None, (5, 1, 5)),
     (11, 5, None, (15, 3, 5)), (64, 5, 64, (60, 12, 5)), (64, 10, 64, (60, 6, 10)),
     (8, 100, 64, (64, 1, 64)), (7, 3, 100, (9, 3, 3))],
)  # fmt: skip
def test_row_layout_keeps_every_row_whole_and_says_when_it_changes_the_count(n, rows, most, expect):
    layout = row_layout(n, rows, "class", most)
    assert (layout.n, layout.per_row, layout.rows) == expect
    assert layout.n == layout.per_row * layout.rows and (most is None or layout.n <= most)
    assert (layout.note is None) == (layout.n == n)
    if layout.note and layout.rows == rows:
        assert f"{n} images do not fill one row per class ({rows} classes): drawing {layout.n}" in layout.note
    if layout.rows < rows:  # only a call limit below the number of classes leaves some out
        assert f"for the first {most} of the {rows} classes" in layout.note


def test_api_sample_draws_every_class_and_says_so(runs):
    s = api.sample(runs / "shapes", n=8, steps=2)
    assert len(s.images) == 10 and s.per_row == 2 and s.row_labels == CLASSES
    assert s.notes == ["8 images do not fill one row per class (5 classes): drawing 10, 2 per "
                       "class (rounded up to whole rows, so that no class is left out)"]  # fmt: skip
    assert s.description.startswith("10 images")
    assert api.sample(runs / "shapes", n=10, steps=2).notes == []


def test_the_cli_grid_has_every_class_and_prints_the_note(runs, tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = cli.main(["sample", "--run", str(runs / "shapes"), "--n", "8", "--steps", "2",
                   "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0
    assert "note: 8 images do not fill one row per class (5 classes): drawing 10" in printed
    cell = MIN_LABELLED_CELL  # 16 px images, enlarged for the labels
    assert Image.open(out).height == 5 * (cell + 2) + 2  # five rows: cross is there


def test_the_page_gets_every_class_and_the_note(client):
    r = client.post("/api/sample", json={"run": "shapes", "n": 8, "steps": 2})
    assert r.status_code == 202, r.text
    job = wait_for(client, r.json()["job"]["id"])
    assert job["state"] == "done", job
    assert job["info"]["images"] == 10 and job["info"]["row_labels"] == CLASSES
    assert job["info"]["notes"][0].startswith("8 images do not fill one row per class")
    grid = Image.open(io.BytesIO(client.get("/api/job/result", params={"id": job["id"]}).content))
    assert grid.height == 5 * (MIN_LABELLED_CELL + 2) + 2
    # the page's limit (64 a job) rounds down to whole rows instead: 60, 12 per class
    r = client.post("/api/sample", json={"run": "shapes", "n": 64, "steps": 1})
    job = wait_for(client, r.json()["job"]["id"])
    assert job["info"]["images"] == 60 and "drawing 60, 12 per class" in job["info"]["notes"][0]



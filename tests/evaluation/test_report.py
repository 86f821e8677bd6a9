"""report.py and `ldmkit report`: one self-contained HTML page, checked by parsing it and (slow)
by rendering it in headless Chromium."""

import os
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from ldmkit.cli import main
from ldmkit.evaluation.report import SECTIONS, build_report

CHROMIUM = "/usr/bin/chromium"


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.images, self.external, self.stack = [], [], [], []
        self.text: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "img":
            self.images.append((self.sections[-1] if self.sections else None, a.get("src", "")))
        if tag in ("link", "script", "iframe") or (tag != "img" and "src" in a):
            self.external.append((tag, a))
        for k in ("href", "src"):
            if a.get(k, "").startswith(("http:", "https:", "//", "file:")):
                self.external.append((tag, a))

    def handle_data(self, data):
        if self.sections:
            self.text[self.sections[-1]] = self.text.get(self.sections[-1], "") + data


def _parse(path):
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_cli_report_writes_one_self_contained_page(tiny_run, capsys):
    assert main(["report", "--run", str(tiny_run), "--steps", "3"]) == 0
    path = tiny_run / "report.html"
    assert capsys.readouterr().out.strip() == str(path)
    page = _parse(path)
    assert page.sections == list(SECTIONS)
    assert not page.external
    assert page.images and all(src.startswith("data:image/png;base64,") for _, src in page.images)
    with_images = {s for s, _ in page.images}
    assert {"data", "training", "autoencoder", "samples", "trajectory"} <= with_images
    assert '"num_timesteps": 100' in page.text["config"]
    assert "circle" in page.text["data"] and page.text["data"].count("96") >= 1
    assert "ldmkit eval --run" in page.text["evaluation"]  # how to add the table


def test_report_shows_the_eval_table_and_summary(evaluated_run, tmp_path):
    run, _ = evaluated_run
    path = build_report(run, out_path=tmp_path / "r.html", steps=2)
    page = _parse(path)
    ev = page.text["evaluation"]
    assert "real-vs-real" in ev and "ddim" in ev and "dpm++2m" in ev
    assert "shapes-cnn" in ev and "near-copy share" in ev and "biased" in ev
    assert sum(s == "evaluation" for s, _ in page.images) == 3  # plot + 2 memorisation grids
    assert all(src.startswith("data:image/png;base64,") for _, src in page.images)


def test_cli_report_missing_run(tmp_path, capsys):
    assert main(["report", "--run", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="apt-get install -y chromium")
def test_report_renders_in_headless_chromium(evaluated_run, tmp_path):
    from PIL import Image, ImageStat

    run, _ = evaluated_run
    html_path = build_report(run, out_path=tmp_path / "report.html", steps=2)
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1200,2000", html_path.resolve().as_uri()]  # fmt: skip
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    if os.environ.get("LDMKIT_KEEP_SCREENSHOT"):  # to look at it: set this to a folder
        shutil.copy(shot, os.environ["LDMKIT_KEEP_SCREENSHOT"])
    with Image.open(shot) as im:
        assert im.size == (1200, 2000)
        gray = im.convert("L")
        stat = ImageStat.Stat(gray)
        assert stat.stddev[0] > 10  # not a blank page
        dark = sum(gray.histogram()[:128]) / (1200 * 2000)
        assert 0.005 < dark < 0.9  # text and images drawn on a light background
        # images rendered: many distinct colours in the page (a text-only page has few)
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 500


def test_eval_and_report_of_a_text_run(tmp_path, monkeypatch):
    """A text-conditional run is evaluated with the reference images' own captions as prompts,
    and its report draws one row per prompt."""
    from eval_helpers import make_tiny_run

    import ldmkit.pipeline as pipeline
    from ldmkit.data import load_dataset

    run = make_tiny_run(tmp_path / "run", text=True)
    seen, original = [], pipeline.LatentDiffusion.sample

    def spy(self, n, **kw):
        seen.append(kw.get("prompt"))
        return original(self, n, **kw)

    monkeypatch.setattr(pipeline.LatentDiffusion, "sample", spy)
    assert main(["eval", "--run", str(run), "--n", "8", "--samplers", "ddim", "--steps", "2"]) == 0
    assert main(["report", "--run", str(run), "--steps", "2"]) == 0
    captions = load_dataset("builtin:shapes?n=96", image_size=16).captions
    table_calls = [p for p in seen if p and len(p) == 8 and all(p)]  # not the time probe's ""
    assert table_calls and set(table_calls[0]) <= set(captions)
    assert "one row per prompt" in (run / "report.html").read_text()

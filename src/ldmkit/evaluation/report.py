"""`build_report(run_dir)`: one self-contained HTML page about a trained run.

The page (run_dir/report.html) holds the run config, a data summary, the loss curves, VAE
reconstructions beside their originals, the latent channels, a sample grid (one labelled row
per class for a class-conditional model), a denoising trajectory, and the sampler table and
summary of `ldmkit eval` when eval/summary.json exists (otherwise a line saying how to make
them), and the Classification Accuracy Score of `ldmkit eval --cas` when eval/cas.json does.
Every image is an inline base64 PNG and the
CSS is inline: the file needs nothing else, and opens offline in any browser.

Sections carry ids, in order: config, data, training, autoencoder, samples, trajectory,
evaluation.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ldmkit.checkpoint import atomic_write
from ldmkit.pipeline import LatentDiffusion
from ldmkit.runs import RunFolder

from .grids import save_grid
from .plots import (
    plot_denoising_trajectory,
    plot_latent_channels,
    plot_loss_curves,
    plot_reconstructions,
    plot_samples,
)
from .table import FLOOR_NAME

logger = logging.getLogger(__name__)

SECTIONS = ("config", "data", "training", "autoencoder", "samples", "trajectory", "evaluation")

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto;
       max-width: 1100px; padding: 1em 2em; color: #222; background: #fff; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
section { margin-bottom: 1.5em; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; font-size: 12px; max-height: 420px; }
table { border-collapse: collapse; font-size: 13px; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #eee; } td:first-child, th:first-child { text-align: left; }
table.kv td { text-align: left; }
tr.floor td { font-style: italic; background: #f4f8ff; }
img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; margin: .3em 0; }
figure { margin: .6em 0; } figcaption { font-size: 13px; color: #555; }
.warn { color: #8a4b00; background: #fff6e5; padding: .4em .6em; border-left: 3px solid #e0a030; }
.muted { color: #666; }
"""


def _img(path: Path | None, caption: str) -> str:
    if path is None or not Path(path).is_file():
        return f'<p class="muted">({html.escape(caption)}: not available)</p>'
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _kv_table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_cell(v))}</td></tr>" for k, v in rows
    )
    return f'<table class="kv">{body}</table>'


def _cell(v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    try:
        return f"{float(v):.4g}" if "." in str(v) or "e" in str(v) else str(v)
    except ValueError:
        return str(v)


def _csv_table(path: Path, labels: dict[str, str]) -> str:
    """The sampler table, its metric columns headed by their labels (e.g. FID-shapes-cnn)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return '<p class="muted">(empty table)</p>'
    cols = [c for c in rows[0] if c not in ("feature_network", "feature_fingerprint")]

    def label(c: str) -> str:
        base = c.removesuffix("_std")
        return labels.get(base, base) + ("_std" if c.endswith("_std") else "")

    head = "".join(f"<th>{html.escape(label(c))}</th>" for c in cols)
    body = ""
    for r in rows:
        cls = ' class="floor"' if r.get("sampler") == FLOOR_NAME else ""
        body += f"<tr{cls}>" + "".join(f"<td>{html.escape(_cell(r[c]))}</td>" for c in cols)
        body += "</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def _evaluation_section(run_dir: Path, eval_dir: Path) -> str:
    summary_path = eval_dir / "summary.json"
    if not summary_path.is_file():
        return (
            "<p>No evaluation yet. Run <code>ldmkit eval --run "
            f"{html.escape(str(run_dir))}</code> to add the sampler-quality table (FID, KID, "
            "precision, recall per sampler and step count), the real-vs-real floor, the VAE "
            "reconstruction error and the memorisation check, then run <code>ldmkit report"
            "</code> again.</p>"
        )
    s = json.loads(summary_path.read_text(encoding="utf-8"))
    net = s.get("feature_network", {})
    labels = net.get("labels", {})
    fid = labels.get("FID", "FID")
    floor, best = s.get("floor") or {}, s.get("best") or {}
    recon, mem = s.get("vae_reconstruction") or {}, s.get("memorisation") or {}
    rows = [
        ("images per row (n)", s.get("n")),
        ("feature network", f"{net.get('name')} (fingerprint {net.get('fingerprint')})"),
        (
            "reference data",
            f"{s.get('reference', {}).get('name')} ({s.get('reference', {}).get('fingerprint')})",
        ),  # fmt: skip
        (f"real-vs-real floor {fid}", floor.get("FID")),
        (
            f"best {fid}",
            f"{_cell(best.get('FID'))} ({best.get('sampler')}, {best.get('steps')} steps)"
            if best
            else None,
        ),  # fmt: skip
        (
            "VAE reconstruction MSE / PSNR",
            f"{_cell(recon.get('mse'))} / {_cell(recon.get('psnr'))} dB on {recon.get('on')}"
            if recon
            else None,
        ),  # fmt: skip
        ("near-copy share (memorisation)", mem.get("near_copy_share")),
    ]
    if net.get("held_out_accuracy") is not None:
        rows.append(("feature network held-out accuracy", net["held_out_accuracy"]))
    where = f"from {summary_path}, {s.get('created')}"
    parts = [f'<p class="muted">{html.escape(where)}</p>', _kv_table(rows)]
    if s.get("warning"):
        parts.append(f'<p class="warn">{html.escape(s["warning"])}</p>')
    if mem.get("note"):
        parts.append(f'<p class="muted">{html.escape(mem["note"])}</p>')
    if (eval_dir / "sampler_table.csv").is_file():
        parts.append("<h3>Sampler table</h3>" + _csv_table(eval_dir / "sampler_table.csv", labels))
    for sk in s.get("skipped", []):
        parts.append(
            f'<p class="muted">skipped {html.escape(sk["sampler"])} at {sk["steps"]} steps: '
            f"{html.escape(sk['reason'])}</p>"
        )
    parts.append(_img(eval_dir / "sampler_table.png", f"{fid} against sampler steps"))
    for space in ("feature", "pixel"):
        p = eval_dir / f"memorisation-{space}.png"
        if p.is_file():
            caption = (
                f"memorisation, {space} space: the worst generated images, each beside its "
                "nearest training image (r = d_train / d_held_out)"
            )
            parts.append(_img(p, caption))
    return "\n".join(parts)


def _cas_section(eval_dir: Path) -> str:
    """The Classification Accuracy Score of `ldmkit eval --cas` (eval/cas.json), when measured."""
    path = eval_dir / "cas.json"
    if not path.is_file():
        return ""
    c = json.loads(path.read_text(encoding="utf-8"))
    spread = lambda d: f"{d['mean']:.3f} \u00b1 {d['std']:.3f}"  # noqa: E731
    rows = [
        ("CAS (trained on generated images only)", f"{spread(c['cas'])} "
         f"({c['n_generated']} images)"),
        ("the same classifier on real images", f"{spread(c['real'])} ({c['n_real']} images)"),
        ("chance", f"{c['chance']:.3f}"),
        ("seeds; held-out test images", f"{len(c['seeds'])}; {c['n_test']} "
         f"({c.get('held_out', {}).get('spec')})"),
    ]  # fmt: skip
    return "<h3>Classification Accuracy Score</h3>" + _kv_table(rows)


def build_report(
    run_dir: str | os.PathLike,
    *,
    out_path: str | os.PathLike | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    per_class: int = 8,
    device: str | None = None,
) -> Path:
    """Write the report of a run (default run_dir/report.html) and return its path. `sampler`
    and `steps` None: the run's own (`RunFolder.default_sampling`: DEFAULT_SAMPLER at
    DEFAULT_STEPS, a distilled student's DDIM at its count)."""
    run = RunFolder(run_dir).require_run()
    own_sampler, own_steps = run.default_sampling()
    sampler = sampler if sampler is not None else own_sampler
    steps = steps if steps is not None else own_steps
    out_path = Path(out_path) if out_path is not None else run.report_path
    ldm = LatentDiffusion.from_run(run.path, device=device)
    ds = run.load_data()
    with tempfile.TemporaryDirectory(prefix="ldmkit-report-") as tmp:
        t = Path(tmp)
        sec = {
            "data": _data_section(run, ds, t, per_class),
            "training": _img(
                plot_loss_curves(run.log_path, t / "loss.png"), "training loss (log.jsonl)"
            ),
            "autoencoder": _autoencoder_section(ldm, ds.images, t),
            **_sample_sections(
                ldm,
                t,
                sampler=sampler,
                steps=steps,
                seed=seed,
                per_class=per_class,
                prompts=list(dict.fromkeys(c for c in ds.captions if c))[:5]
                if ds.captions
                else None,
            ),
            "config": f"<pre>{html.escape(json.dumps(run.config_dict(), indent=2))}</pre>",
            "evaluation": _evaluation_section(run.path, run.eval_dir) + _cas_section(run.eval_dir),
        }
    page = _page(run.path, sec)
    atomic_write(out_path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    logger.info("wrote %s (%.1f kB)", out_path, len(page) / 1024)
    return out_path


def _data_section(run: RunFolder, ds: Any, t: Path, per_class: int) -> str:
    """Facts about the training data and a grid of its images (one row per class)."""
    if ds.labels is not None and ds.class_names:
        idx = torch.cat([torch.nonzero(ds.labels == c).flatten()[:per_class]
                         for c in range(len(ds.class_names))])  # fmt: skip
        counts = torch.bincount(ds.labels, minlength=len(ds.class_names)).tolist()
        rows_ok = all(k >= per_class for k in counts)
        save_grid(ds.images[idx], t / "data.png", nrow=per_class, scale=2,
                  row_labels=list(ds.class_names) if rows_ok else None)  # fmt: skip
        classes = ", ".join(f"{n} ({k})" for n, k in zip(ds.class_names, counts))
    else:
        save_grid(ds.images[:64], t / "data.png", scale=2)
        classes = "none (unlabelled)"
    info = run.data_info()
    facts = [
        ("spec", info.spec or run.config().data),
        ("name", ds.name),
        ("images", len(ds)),
        ("size", f"{ds.channels} x {ds.image_size} x {ds.image_size}"),
        ("classes (count)", classes),
        ("fingerprint", info.fingerprint),
    ]
    rows_note = ", one row per class" if ds.labels is not None else ""
    return _kv_table(facts) + _img(t / "data.png", "training images" + rows_note)


def _autoencoder_section(ldm: Any, images: Any, t: Path) -> str:
    """The VAE's summary, reconstructions beside their originals, and latent channels."""
    vae = ldm.vae
    return (
        _kv_table([("summary", vae.summary() if hasattr(vae, "summary") else "-"),
                   ("latent scaling factor", vae.config.scaling_factor)])  # fmt: skip
        + _img(plot_reconstructions(ldm, images, t / "recon.png", n=8),
               "VAE reconstructions: originals (top) and reconstructions (bottom)")
        + _img(plot_latent_channels(ldm, images, t / "latents.png", n=4),
               "latent channels of four training images")
    )  # fmt: skip


def _sample_sections(
    ldm: Any, t: Path, *, sampler: str, steps: int, seed: int, per_class: int,
    prompts: list[str] | None = None,
) -> dict[str, str]:  # fmt: skip
    """The "samples" grid (one row per class or prompt when conditional) and the denoising
    "trajectory"."""
    what = ("one row per prompt" if ldm.is_text_conditional else
            "one row per class" if ldm.conditioner.enabled else "unconditional")  # fmt: skip
    return {
        "samples": _img(
            plot_samples(ldm, t / "samples.png", per_class=per_class, sampler=sampler,
                         steps=steps, seed=seed, prompts=prompts),
            f"samples ({what}; {sampler}, {steps} steps, seed {seed})",
        ),
        "trajectory": _img(
            plot_denoising_trajectory(ldm, t / "trajectory.png", sampler=sampler, steps=steps,
                                      seed=seed),
            "denoising trajectory: decoded x_t and predicted x0 over the sampler's steps",
        ),
    }  # fmt: skip


def _page(run_dir: Path, sec: dict[str, str]) -> str:
    """The whole HTML page: title, inline CSS and the sections in SECTIONS order."""
    titles = {"config": "Run config", "data": "Data", "training": "Training",
              "autoencoder": "Autoencoder", "samples": "Samples",
              "trajectory": "Denoising trajectory", "evaluation": "Evaluation"}  # fmt: skip
    body = "\n".join(
        f'<section id="{k}"><h2>{titles[k]}</h2>\n{sec[k]}\n</section>' for k in SECTIONS
    )
    name = html.escape(run_dir.resolve().name)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>ldmkit report: {name}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>ldmkit report: {name}</h1>\n"
        f'<p class="muted">{html.escape(str(run_dir.resolve()))} &middot; written '
        f"{html.escape(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}</p>\n{body}\n</body></html>\n"
    )


__all__ = ["SECTIONS", "build_report"]

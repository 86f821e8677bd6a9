"""`evaluate` (FID, accuracy, memorisation: `Evaluation`), `cas` (the Classification Accuracy
Score), `report` and `table_text`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ConfigError
from ..diffusion.samplers import check_sampler
from ..options import (
    MAX_BATCH,
    MAX_IMAGES,
    SynthOptions,
    check_student_guidance,
)
from ..runs import RunFolder

if TYPE_CHECKING:
    from ..evaluation.table import SamplerTable

from .checks import (
    check_apart,
    check_count,
    check_device,
    check_guidance,
    check_output_file,
    check_path,
    check_seed,
    check_steps,
    check_writable,
    run_inputs,
)
from .synthetic import synth

log = logging.getLogger(__name__)


_SYNTH = SynthOptions()  # the defaults of `synth`'s keywords, which `cas` shares


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` measured: `table` (a SamplerTable: one row per sampler and step count,
    FID / KID / precision / recall / accuracy against the real-vs-real floor) and `summary` (the
    contents of summary.json). The parts a reader asks for first are properties."""

    table: SamplerTable
    summary: dict[str, Any]

    @property
    def folder(self) -> Path:
        """Where the table, its plot and summary.json were written."""
        return Path(self.summary["files"]["summary"]).parent

    @property
    def reconstruction(self) -> dict[str, Any]:
        """The autoencoder on held-out images: n, on, mse, psnr."""
        return self.summary["vae_reconstruction"]

    @property
    def memorisation(self) -> dict[str, Any]:
        """The near-copy check (near_copy_share None and a note when it was not measured)."""
        return self.summary["memorisation"]


def evaluate(
    run: str | os.PathLike,
    *,
    samplers: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    n: int | None = None,
    full: bool = False,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    batch_size: int = 64,
    guidance_scale: float | None = None,
    device: str | None = None,
    **options: Any,
) -> Evaluation:
    """The sampler-quality table of a run (ldmkit.evaluation.evaluate.evaluate_run), with the
    autoencoder's reconstruction and the memorisation check, as an `Evaluation`.

    Unset samplers / steps / n give a table that takes minutes on a CPU (the default sampler
    at 20 steps, n = 500); `full` gives the whole table (six samplers x 10..1000 steps, n = 2000,
    hours on a CPU). The estimated time is logged before the sampling starts.
    """
    from ..evaluation.evaluate import evaluate_run
    from ..evaluation.table import (
        DEFAULT_N,
        DEFAULT_SAMPLERS,
        DEFAULT_STEPS,
        FULL_N,
        FULL_SAMPLERS,
        FULL_STEPS,
        MIN_N,
    )

    if not full and samplers is None and steps is None:  # a distilled student: its own
        try:
            own_sampler, own_steps = RunFolder(run).default_sampling()
            samplers, steps = [own_sampler], [own_steps]
        except (OSError, ValueError):  # the checks below say what is wrong with `run`
            pass
    samplers = list(
        samplers if samplers is not None else FULL_SAMPLERS if full else DEFAULT_SAMPLERS
    )
    steps = list(steps if steps is not None else FULL_STEPS if full else DEFAULT_STEPS)
    n = n if n is not None else FULL_N if full else DEFAULT_N
    if not samplers:
        raise ConfigError("--samplers: give at least one sampler, e.g. dpm++2m,ddim")
    check_sampler(*samplers)
    if not steps:
        raise ConfigError("--steps: give at least one step count, e.g. 10,20,50")
    for s in steps:
        check_steps("--steps", s)
    check_count("--n", n, MIN_N, MAX_IMAGES)
    check_seed("--seed", seed)
    check_count("--batch-size", batch_size, 1, MAX_BATCH)
    check_guidance("--guidance", guidance_scale)
    check_device(device)
    for flag, path in (("--run", run), ("--out", out), ("--ref", options.get("ref")),
                       ("--held-out", options.get("held_out"))):  # fmt: skip
        check_path(flag, path)
    folder = RunFolder(run).require_run()
    check_student_guidance(folder, run, guidance_scale)  # issue 27: a fixed-scale student's
    out_dir = Path(out) if out is not None else folder.eval_dir
    for flag, data in (("--ref", options.get("ref")), ("--held-out", options.get("held_out")),
                       ("run's data", folder.config().data)):  # fmt: skip
        check_apart("--out", out_dir, flag, data)
    check_writable(out_dir)
    table, summary = evaluate_run(
        run, samplers=samplers, steps=steps, n=n, out_dir=out_dir, seed=seed,
        batch_size=batch_size, guidance_scale=guidance_scale, device=device, **options,
    )  # fmt: skip
    return Evaluation(table, summary)


CAS_PER_CLASS = 100  # generated images per class `eval --cas` trains its classifier on


MAX_CAS_SEEDS = 20


def cas(
    run: str | os.PathLike,
    *,
    per_class: int = CAS_PER_CLASS,
    seeds: int | None = None,
    held_out: str | None = None,
    out: str | os.PathLike | None = None,
    sampler: str = _SYNTH.sampler,
    steps: int = _SYNTH.steps,
    seed: int = _SYNTH.seed,
    guidance_scale: float | None = None,
    batch_size: int = _SYNTH.batch_size,
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The Classification Accuracy Score of a class-conditional run (`evaluation.cas`):
    `per_class` images of each class drawn with `synth` (into OUT/cas-synth-<key>/, so a second
    call reuses them and an interrupted one resumes), the fixed classifier trained on them and
    tested on held-out real images (`held_out`, default: the data's own held-out part, as `eval`
    finds it), beside the same classifier trained on as many real training images per class;
    `seeds` runs (default 3), mean and std. Written to OUT/cas.json (OUT: RUN/eval)."""
    import hashlib
    import json

    import torch

    from ..checkpoint import write_json
    from ..evaluation import cas as caslib
    from ..evaluation.evaluate import held_out_data
    from ..synth import read_synth

    seeds = caslib.DEFAULT_SEEDS if seeds is None else seeds
    check_count("--cas-per-class", per_class, 1, MAX_IMAGES)
    check_count("--cas-seeds", seeds, 1, MAX_CAS_SEEDS)
    for flag, path in (("--run", run), ("--out", out), ("--held-out", held_out)):
        check_path(flag, path)
    folder = RunFolder(run).require_trained()
    kind = folder.conditioning()
    if kind != "class":
        what = "follows text prompts" if kind == "text" else "has no class labels (unconditional)"
        raise ConfigError(
            f"--cas: the model in {run} {what}; the Classification Accuracy Score trains a "
            "classifier on a class-conditional run's classes"
        )
    out_dir = Path(out) if out is not None else folder.eval_dir
    check_apart("--out", out_dir, "--held-out", held_out)
    train_ds = folder.load_data()
    held, note = held_out_data(folder, train_ds, held_out)
    if held is None:
        raise ConfigError(
            f"--cas needs labelled real images the model never saw, to test the classifiers on: "
            f"{train_ds.name} has no held-out part; pass --held-out DATA (a folder with one "
            "sub-folder per class, or e.g. mnist:DIR?split=test)"
        )
    if held.labels is None:
        raise ConfigError(
            f"--held-out {held_out}: its images have no class labels; put them in one sub-folder "
            "per class"
        )
    names = folder.data_info().class_names or train_ds.class_names
    key = json.dumps([folder.weights_hash(), per_class, sampler, steps, seed, guidance_scale,
                      batch_size])  # fmt: skip
    synth_dir = out_dir / f"cas-synth-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    synth(run, synth_dir, per_class=per_class, sampler=sampler, steps=steps, seed=seed,
                 guidance_scale=guidance_scale, batch_size=batch_size, device=device, progress=progress)  # fmt: skip
    images, labels, _, _ = read_synth(synth_dir)
    test_labels = caslib.map_labels(held.labels, held.class_names, names)
    pick = torch.randperm(len(held), generator=torch.Generator().manual_seed(0))[: caslib.MAX_TEST]
    result = caslib.scores(
        images, labels, train_ds.images, caslib.map_labels(train_ds.labels,
        train_ds.class_names, names), held.images[pick], test_labels[pick], len(names),
        seeds=tuple(range(seeds)),
    )  # fmt: skip
    result.update({
        "run": str(folder.path), "weights": folder.weights_hash(), "synth_folder": str(synth_dir),
        "generated": {"per_class": per_class, "sampler": sampler, "steps": steps, "seed": seed,
                      "guidance": read_synth_guidance(synth_dir)},
        "held_out": {"spec": held.spec, "name": held.name, "num_images": len(held)},
        "train_data": {"spec": train_ds.spec, "num_images": len(train_ds)},
    })  # fmt: skip
    write_json(out_dir / "cas.json", result)
    result["path"] = str(out_dir / "cas.json")
    return result


def read_synth_guidance(folder: Path) -> float | None:
    from ..synth import read_manifest

    manifest = read_manifest(folder) or {}
    return manifest.get("guidance")


def report(
    run: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: str | None = None,
) -> Path:
    """One self-contained HTML page about a run (ldmkit.evaluation.report.build_report);
    `sampler`, `steps` None: the run's own (issue 27: a distilled student's DDIM, its count)."""
    from ..evaluation.report import build_report

    if sampler is not None:
        check_sampler(sampler)
    if steps is not None:
        check_steps("--steps", steps)
    check_seed("--seed", seed)
    check_device(device)
    check_path("--run", run)
    if out is not None:
        check_output_file("--out", out, inputs=run_inputs(run))
    folder = RunFolder(run).require_run()
    if steps is not None:
        check_steps("--steps", steps, folder.config().diffusion.num_timesteps)
    return build_report(run, out_path=out, sampler=sampler, steps=steps, seed=seed, device=device)


def table_text(table: Any) -> str:
    """The sampler table that `evaluate` returns, as aligned text (as `ldmkit eval` prints it:
    the metric labels, n, the real-vs-real floor and any warning)."""
    from ..evaluation.table import format_table

    return format_table(table)

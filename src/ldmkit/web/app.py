"""`ldmkit serve`: a local web page and its JSON/PNG API over the runs of one folder.

The page (static/: one HTML, one JS, one CSS file, no CDN, no web font) calls the API below,
which calls `ldmkit.api` and `LatentDiffusion` like the command line does: nothing here samples,
checks an argument or names a run file by itself.

    GET  /api/runs                      runs under --runs: name, trained, training
    GET  /api/run?run=NAME              its data, classes or text, guidance, which grids exist,
                                        the fields of the sample and edit forms (web/forms.py)
    GET  /api/run/log?run=NAME          loss rows per stage (log.jsonl)
    GET  /api/run/image?run=NAME&which=samples|loss|reconstructions|preview|clips  (clips: a
                                        video run's final clips, an animated GIF)
    POST /api/run/stop   {"run"}        asks its training to stop with a checkpoint
    POST /api/sample     {"run", and options.SampleOptions' fields by their page names: "n",
                          "sampler", "steps", "seed", "guidance", "classes", "prompts",
                          "negative_prompt", ...}                   -> a queued job
    GET  /api/job?id=ID                 state, step / total, place in the queue, error
    GET  /api/job/preview?id=ID         PNG: the x0 estimate at the current step
    GET  /api/job/result?id=ID          PNG with its parameters in the PNG text, as the CLI's
    GET  /api/job/image?id=ID&i=K       the K-th image of its grid, the same way
    POST /api/job/cancel {"id"}
    POST /api/edit       multipart: run, method (inpaint, img2img, interpolate, denoise, fill),
                         params (JSON), image, mask, image_b (uploads)  -> a queued job: api.edit
    GET  /api/job/input?id=ID&which=image|mask|image_b   an upload as the server received it
    GET  /api/train                     the New run form's fields (options.TrainOptions), the
                                        data root, the server's training (web/trainer.py)
    POST /api/train/plan {"run", and TrainOptions' fields: "data", "time_budget", "seed",
                          "image_size", "conditioning"}     -> the plan `ldmkit train` logs
    POST /api/train      {the same}     starts the training into RUNS/run (one at a time)

Errors are JSON `{"error": "<one line>"}` with a 4xx status (the library's ValueErrors: 400).
Requests are bounded: a body limit, a pixel limit on images, run names that stay inside --runs,
one job at a time per run (web/jobs.py). Every response carries
`Content-Security-Policy: default-src 'self'`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import math
import os
import socket
import tempfile
import threading
import time
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__, api
from ..config import ConfigError
from ..data.images import png_info, write_png
from ..data.transforms import pil_image
from ..diffusion.samplers import SAMPLERS
from ..options import VERBS, TrainOptions, adjusted, direction_names
from ..pipeline import LatentDiffusion
from ..runs import RunFolder
from ..training.state import RunLock
from . import edits, forms, trainer
from .jobs import Job, Jobs, QueueFull, Result

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 8 * 2**20  # a request body (uploaded images and masks)
MAX_WEB_IMAGES = 64  # images per job
MAX_DEPTH = 3  # folder levels under --runs searched for runs
MAX_LOG_ROWS = 2000  # loss rows per stage sent to the page (evenly thinned)
PREVIEW_EVERY_S = 0.25  # at most this often a job's x0 estimate is decoded for the page
PREVIEW_SHARE = 10  # ... and at most every 10x the time one decoding takes
PREVIEW_IMAGES = 16  # images of the batch decoded for a preview
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
RUN_IMAGES = ("samples", "loss", "reconstructions", "preview", "clips")


class WebError(Exception):
    """An expected failure of a request: its HTTP status and one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------ the app
def create_app(runs: str | os.PathLike, *, device: str | None = None,
               hosts: tuple[str, ...] | None = None, data_root: str | os.PathLike | None = None,
               train_config: str | None = None) -> Guard:  # fmt: skip
    """The web app over the runs under `runs`. `hosts`: the Host names it answers (None: any;
    a server on 127.0.0.1 passes LOOPBACK, so a page of another site cannot reach it through
    DNS rebinding). `data_root`: the folder whose data folders the page may train on (None:
    built-in data only); `train_config`: the config file its trainings start from (as
    `ldmkit train --config`)."""
    site = Site(runs, device=device, data_root=data_root, train_config=train_config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        site.jobs.close()
        site.trainer.close()

    routes = [
        Route("/", site.index),
        Route("/api/runs", site.list_runs),
        Route("/api/run", site.run_info),
        Route("/api/run/log", site.run_log),
        Route("/api/run/image", site.run_image),
        Route("/api/run/stop", site.stop_training, methods=["POST"]),
        Route("/api/sample", site.sample, methods=["POST"]),
        Route("/api/job", site.job),
        Route("/api/job/preview", site.job_preview),
        Route("/api/job/result", site.job_result),
        Route("/api/job/image", site.job_image),
        Route("/api/job/cancel", site.cancel_job, methods=["POST"]),
        Route("/api/job/input", site.job_input),
        Route("/api/edit", site.edit, methods=["POST"]),
        Route("/api/train", site.train_form),
        Route("/api/train/plan", site.train_plan, methods=["POST"]),
        Route("/api/train", site.start_training, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan,
        exception_handlers={WebError: _expected, ValueError: _expected, HTTPException: _http_error,
                            FileNotFoundError: _not_found, OSError: _os_error,
                            Exception: _bug},
    )  # fmt: skip
    return Guard(app, hosts=hosts)


async def _expected(request: Request, e: Exception) -> Response:
    """A WebError, or one of the library's ValueErrors (400 unless it names a status)."""
    return _error(getattr(e, "status", 400), str(e))


async def _http_error(request: Request, e: Exception) -> Response:
    return _error(getattr(e, "status_code", 400), getattr(e, "detail", "bad request"))


async def _not_found(request: Request, e: Exception) -> Response:
    if getattr(e, "filename", None) is not None:  # the file system's, not the library's
        return await _os_error(request, e)
    return _error(404, str(e))


async def _os_error(request: Request, e: Exception) -> Response:
    """The file system refused a file a request needs: 4xx with the reason in words (a missing
    file 404, no permission 403, a name too long 400), never Python's "[Errno N] ..."."""
    import errno

    code = getattr(e, "errno", None)
    status = {errno.EACCES: 403, errno.EPERM: 403, errno.ENAMETOOLONG: 400,
              errno.ENOENT: 404, errno.ENOTDIR: 404}.get(code, 500)  # fmt: skip
    what = getattr(e, "filename", None) or "a file"
    why = (getattr(e, "strerror", None) or str(e) or type(e).__name__).lower()
    if status == 500:
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
    return _error(status, f"the server cannot use {what}: {why}")


async def _bug(request: Request, e: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=e)
    return _error(500, f"internal error (a bug in ldmkit, see the server's log): {e}")


def _error(status: int, message: str) -> JSONResponse:
    line = message.splitlines()[0] if message else "bad request"
    return JSONResponse({"error": line}, status_code=status)


class Guard:
    """ASGI middleware: security headers on every response; refuses a request body over
    MAX_BODY_BYTES (or of no declared size), a Host header not in `hosts`, and a POST that
    another site's page sent (its Origin is not this server)."""

    def __init__(self, app: ASGIApp, *, hosts: tuple[str, ...] | None) -> None:
        self.app, self.hosts = app, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    headers[k] = v
            await send(message)

        refusal = self.refusal(scope)
        if refusal is not None:
            await _error(*refusal)(scope, receive, send_secured)
            return
        await self.app(scope, receive, send_secured)

    def refusal(self, scope: Scope) -> tuple[int, str] | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        name = host.rsplit(":", 1)[0].strip("[]") if not host.endswith("]") else host.strip("[]")
        if self.hosts is not None and name not in self.hosts:
            return 400, f"Host {host!r} is not this server; open the page at 127.0.0.1"
        if scope["method"] in ("GET", "HEAD"):
            return None
        origin = headers.get("origin")
        if origin is not None and origin.split("://", 1)[-1] != host:
            return 403, f"a request from the page of {origin} was refused; use this server's page"
        size = headers.get("content-length")
        if size is None or not size.isdigit():
            return 411, "the request has no Content-Length; send the body with its size"
        if int(size) > MAX_BODY_BYTES:
            return 413, (
                f"the request is {int(size) / 2**20:.1f} MiB, over the limit of "
                f"{MAX_BODY_BYTES / 2**20:.0f} MiB; send a smaller image"
            )
        return None


# ------------------------------------------------------------------------------ the site
class Site:
    """The runs folder, the loaded models (one per run, loaded once) and the jobs."""

    def __init__(self, runs: str | os.PathLike, *, device: str | None = None,
                 data_root: str | os.PathLike | None = None,
                 train_config: str | None = None) -> None:  # fmt: skip
        api.check_path("--runs", runs)
        api.check_path("--data-root", data_root)
        api.check_path("--train-config", train_config)
        if data_root is not None and not Path(data_root).expanduser().is_dir():
            raise ConfigError(
                f"--data-root {data_root} is not a folder; give the folder that holds the data "
                "folders the page may train on"
            )
        if train_config is not None and not Path(train_config).is_file():
            raise ConfigError(
                f"--train-config {train_config} is not a file; give a TOML or JSON file of "
                "RunConfig fields (as ldmkit train --config reads)"
            )
        self.data_root = Path(data_root).expanduser().resolve() if data_root is not None else None
        root = Path(runs).expanduser()
        if not root.is_dir():
            raise ConfigError(
                f"--runs {runs} is not a folder; give the folder that holds your run folders, "
                "e.g. --runs runs"
            )
        if RunFolder.holds_run(root):
            raise ConfigError(
                f"--runs {runs} is a run folder; give the folder that holds it: --runs {root.resolve().parent}"
            )
        self.root = root.resolve()
        self.device = api.check_device(device)
        self.jobs = Jobs()
        self.train_config = str(Path(train_config).resolve()) if train_config else None
        self.trainer = trainer.Trainer(device=device, config_file=self.train_config)
        self._models: dict[str, tuple[tuple[int, int], LatentDiffusion]] = {}
        self._models_lock = threading.Lock()

    # -------------------------------------------------------------- runs
    def folder(self, name: Any) -> RunFolder:
        """The run called `name` (a relative path under --runs), or a 4xx WebError. Every
        request names its run through here: the name is checked (characters, length, depth)
        before it touches the file system, and the file system's errors become 4xx too."""
        path, shown = self.place(name)
        try:
            found = RunFolder.holds_run(path)
        except OSError as e:  # a folder the server may not read, a link loop, ...
            raise WebError(
                403, f"run {shown} cannot be read ({(e.strerror or str(e)).lower()}); pick "
                "another of /api/runs",
            ) from None  # fmt: skip
        if not found:
            raise WebError(
                404, f"no run {shown} in --runs (no run.json there); pick one of /api/runs"
            )
        return RunFolder(path)

    def place(self, name: Any) -> tuple[Path, str]:
        """The folder under --runs a run name leads to, and the name as messages show it, or a
        4xx WebError (characters, length, depth; not out of --runs, links included)."""
        if not isinstance(name, str) or not name:
            raise WebError(400, "give a run: ?run=NAME, one of /api/runs")
        shown = api.shorten(name)
        if any(unicodedata.category(c) == "Cc" for c in name):  # NUL, newline, ...
            raise WebError(400, f"run {shown} holds a control character; pick a run of /api/runs")
        parts = name.replace("\\", "/").split("/")
        if (
            name.startswith(("/", "\\"))
            or ":" in parts[0]
            or any(p in ("", ".", "..") for p in parts)
        ):
            raise WebError(
                400, f"run {shown} is not a folder name under --runs; pick one of /api/runs"
            )
        if any(len(os.fsencode(p)) > api.NAME_MAX for p in parts):
            raise WebError(
                400, f"run {shown} has a folder name longer than the file system's limit of "
                f"{api.NAME_MAX} bytes; pick one of /api/runs",
            )  # fmt: skip
        if len(parts) > MAX_DEPTH:
            raise WebError(
                400, f"run {shown} is {len(parts)} folders deep; runs are looked for at most "
                f"{MAX_DEPTH} deep under --runs: pick one of /api/runs",
            )  # fmt: skip
        try:
            path = (self.root / name).resolve()
        except (OSError, RuntimeError) as e:  # a link loop, ...
            raise WebError(
                403, f"run {shown} cannot be read ({str(e).lower()}); pick another of /api/runs"
            ) from None
        if not path.is_relative_to(self.root):  # a symbolic link out of --runs
            raise WebError(403, f"run {shown} leads outside --runs; only runs inside it are served")
        return path, shown

    def run_names(self) -> list[str]:
        found: list[str] = []

        def walk(folder: Path, depth: int) -> None:
            try:
                children = sorted(folder.iterdir())
            except OSError:  # a folder the server may not read: not listed
                return
            for child in children:
                try:
                    if not child.is_dir() or child.name.startswith("."):
                        continue
                    if not child.resolve().is_relative_to(self.root):
                        continue
                    run = RunFolder.holds_run(child)
                except (OSError, RuntimeError):  # unreadable, a link loop: not listed
                    continue
                if run:
                    found.append(child.relative_to(self.root).as_posix())
                elif depth < MAX_DEPTH:
                    walk(child, depth + 1)

        walk(self.root, 1)
        return found

    def model(self, folder: RunFolder) -> LatentDiffusion:
        """The run's LatentDiffusion, loaded once (again when a training saves new weights)."""
        folder.require_trained()
        stamp = (folder.unet_dir.stat().st_mtime_ns, folder.vae_dir.stat().st_mtime_ns)
        key = str(folder.path)
        with self._models_lock:
            cached = self._models.get(key)
            if cached is None or cached[0] != stamp:
                ldm = LatentDiffusion.from_run(folder.path, device=self.device)
                self._models[key] = cached = (stamp, ldm)
        return cached[1]

    # -------------------------------------------------------------- pages and run endpoints
    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def list_runs(self, request: Request) -> Response:
        runs = []
        for name in self.run_names():
            folder = RunFolder(self.root / name)
            runs.append({"name": name, "trained": folder.is_trained(),
                         "training": RunLock.is_held(folder.path)})  # fmt: skip
        return JSONResponse({"root": str(self.root), "runs": runs})

    async def run_info(self, request: Request) -> Response:
        name = request.query_params.get("run")
        folder = self.folder(name)
        cfg, data = folder.config(), folder.data_info()
        conditioning = folder.conditioning()
        classes = data.class_names if conditioning == "class" else None
        preview = folder.newest_preview()
        run = {"conditioning": conditioning, "class_names": classes,
               "guidance": cfg.sampling_guidance}  # fmt: skip
        if cfg.video is not None and cfg.video.motion_classes:  # issue 30: the direction field
            run["directions"] = direction_names()
        own_sampler, own_steps = folder.default_sampling()  # a distilled student's: DDIM, its steps
        if folder.distill_record() is not None:  # the edits' forms take a student's own too
            run["student_sampling"] = (own_sampler, own_steps)
        sampling = forms.fields(
            sample_options(),
            run,
            {"guidance_scale": cfg.sampling_guidance, "sampler": own_sampler, "steps": own_steps},
        )
        return JSONResponse({
            "name": name,
            "adapters": adapters_of(folder) if folder.is_trained() else [],  # issue 28
            "trained": folder.is_trained(),
            "training": RunLock.is_held(folder.path),
            "stop_requested": folder.stop_requested(),
            "conditioning": conditioning,
            "class_names": classes,
            "guidance": cfg.sampling_guidance,
            "num_timesteps": cfg.diffusion.num_timesteps,
            "image_size": cfg.image_size,
            "data": {"name": data.name, "spec": data.spec or cfg.data,
                     "num_images": data.num_images, "channels": data.channels},
            "images": {
                "samples": folder.final_grid_path.is_file(),
                "loss": folder.loss_plot_path.is_file(),
                "reconstructions": folder.reconstructions_path.is_file(),
                "preview": preview.stem if preview else None,
            },
            "samplers": list(SAMPLERS), "default_sampler": own_sampler,
            "max_images": MAX_WEB_IMAGES, "sampling": sampling,
            "editing": [] if cfg.video else edits.methods(run),  # a video run: sample only
            "warnings": folder.warnings(),  # a failed or cut-short stage (training.json)
            # issue 30: a video run's clips (its sample results are animated GIFs)
            "video": {"frames": cfg.video.frames, "fps": cfg.video.fps} if cfg.video else None,
            "clips": folder.final_clips_path.is_file(),
        })  # fmt: skip

    async def run_log(self, request: Request) -> Response:
        folder = self.folder(request.query_params.get("run"))
        stages: dict[str, list[list[float]]] = {}
        for row in folder.read_log():
            with contextlib.suppress(KeyError, ValueError, TypeError):  # a row of another kind
                if isinstance(row.get("loss"), (int, float)) and math.isfinite(row["loss"]):
                    stages.setdefault(str(row["stage"]), []).append(
                        [int(row["step"]), float(row["loss"])]
                    )
        for stage, rows in stages.items():
            if len(rows) > MAX_LOG_ROWS:
                keep = MAX_LOG_ROWS / len(rows)
                stages[stage] = [
                    r for i, r in enumerate(rows) if int(i * keep) != int((i + 1) * keep)
                ]
        return JSONResponse({"stages": stages})

    async def run_image(self, request: Request) -> Response:
        folder = self.folder(request.query_params.get("run"))
        which = request.query_params.get("which")
        paths = {"samples": folder.final_grid_path, "loss": folder.loss_plot_path,
                 "reconstructions": folder.reconstructions_path,
                 "preview": folder.newest_preview(), "clips": folder.final_clips_path}  # fmt: skip
        if which not in paths:
            raise WebError(400, f"which={which!r}: use one of {', '.join(RUN_IMAGES)}")
        path = paths[which]
        if path is None or not path.is_file():
            raise WebError(404, f"the run has no {which} image yet")
        return Response(path.read_bytes(), media_type=_media_type(path.read_bytes()[:6]))

    async def stop_training(self, request: Request) -> Response:
        body = await _json_body(request, {"run"})
        folder = self.folder(body.get("run"))
        if not RunLock.is_held(folder.path):
            raise WebError(
                409, f"no training is running in {body['run']}; there is nothing to stop"
            )
        folder.request_stop()
        return JSONResponse({"stop_requested": True})

    # -------------------------------------------------------------- new runs (web/trainer.py)
    async def train_form(self, request: Request) -> Response:
        current = self.trainer.current
        return JSONResponse({
            "fields": forms.fields(VERBS["train"], {"conditioning": "none"}),
            "data_root": str(self.data_root) if self.data_root else None,
            "config": self.train_config,
            "training": current.to_json() if current else None,
        })  # fmt: skip

    async def _train_request(self, request: Request) -> tuple[str, Path, TrainOptions]:
        """A New run request: its run name (a new folder under --runs) and its options, checked
        as `ldmkit train` checks its flags, with the data confined to --data-root."""
        declared = VERBS["train"]
        body = await _json_body(request, {"run"} | forms.names(declared))
        path, _ = self.place(body.get("run"))
        given = forms.given(declared, {k: v for k, v in body.items() if k != "run"})
        options = declared(**given).check()  # as api.train checks it (again, in the training)
        data = api.check_data_root(options.data, self.data_root)
        return body["run"], path, dataclasses.replace(options, data=data)

    async def train_plan(self, request: Request) -> Response:
        run, path, options = await self._train_request(request)
        lines = await run_in_threadpool(self.trainer.plan, path, options)
        return JSONResponse({"run": run, "lines": lines})

    async def start_training(self, request: Request) -> Response:
        run, path, options = await self._train_request(request)
        training = await run_in_threadpool(self.trainer.start, run, path, options)
        return JSONResponse({"training": training.to_json()}, status_code=202)

    # -------------------------------------------------------------- jobs
    async def sample(self, request: Request) -> Response:
        declared = sample_options()
        body = await _json_body(request, {"run", *ADAPTER_FIELDS} | forms.names(declared))
        folder = self.folder(body.get("run"))
        given = forms.given(declared, {k: v for k, v in body.items()
                                       if k != "run" and k not in ADAPTER_FIELDS})  # fmt: skip
        if given.get("adapters") or given.get("adapter_scales"):  # folders: only by their name
            raise WebError(400, "the page samples with a run's own adapters only: name one of "
                           "its adapter list as \"adapter\" (and \"adapter_scale\")")  # fmt: skip
        given.update(_adapter_choice(folder, body))
        # checked now, against the run's files (nothing loaded), so that the page hears of a bad
        # number at once; the same check and messages as the CLI's (api.sample checks it again)
        options = declared(**given).check(folder, shown=body["run"])
        # the job's parameters (written into its PNGs): the page's fields, and any other given
        params = {f.web_name: getattr(options, f.name) for f in options.fields()
                  if f.spec.web or f.name in given}  # fmt: skip
        return self._submit(body["run"], "sample", params, lambda job: self._sample(folder, job))

    def _sample(self, folder: RunFolder, job: Job) -> Result:
        if folder.is_video():
            return self._sample_clips(folder, job)
        ldm = self.model(folder)
        p = job.params
        options = sample_options().given(p)  # checked again by api.sample
        progress = _progress(ldm, job, options.steps)  # previews: the same autoencoder
        with_adapters = {"ldm": None} if options.adapters else {"ldm": ldm}  # loaded with the run
        samples = api.sample(folder.path, options=options, callback=progress, **with_adapters)
        meta = {"ldmkit": __version__, "method": "sample", "run": str(folder.path),
                "weights": folder.weights_hash(), "options": p}  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            grid = Image.open(api.save_grid(samples, Path(tmp) / "grid.png"))
            png = png_with_params(grid, meta)
        images = []
        for image in samples.images.split(1):
            buf = io.BytesIO()
            write_png(image, buf, meta)
            images.append(buf.getvalue())
        info = {"description": samples.description, "images": len(images),
                "notes": samples.notes, "row_labels": samples.row_labels}  # fmt: skip
        return Result(png, info, images)

    def _sample_clips(self, folder: RunFolder, job: Job) -> Result:
        """A video run's sample job: its clips as one animated GIF (the result, each frame a
        grid of the clips), the strip PNG of their frames and one GIF per clip (its images),
        each with the parameters; the job's progress is the sampler's steps."""
        options = sample_options().given(job.params)  # checked again by api.sample_clips
        clips = api.sample_clips(folder.path, options=options, device=self.device,
                                 progress=lambda done, total: job.report(done, total))  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            gif, strip = api.save_clips(clips, Path(tmp) / "sample.gif")
            each = api.save_clip_files(clips, Path(tmp) / "each")[:-1]
            result, images = gif.read_bytes(), [strip.read_bytes(), *(p.read_bytes() for p in each)]
        info = {"description": clips.description, "images": len(images), "notes": clips.notes,
                "row_labels": None, "clips": len(each)}  # fmt: skip
        return Result(result, info, images)

    async def edit(self, request: Request) -> Response:
        form = await request.form(max_files=3, max_fields=8, max_part_size=MAX_BODY_BYTES)
        run, method = form.get("run"), form.get("method")
        folder = self.folder(run)
        try:
            params = json.loads(str(form.get("params") or "{}"))
        except ValueError:
            raise WebError(400, "params must be a JSON object of the method's fields") from None
        if not isinstance(params, dict):
            raise WebError(400, "params must be a JSON object of the method's fields")
        uploads = {}
        for name in ("image", "mask", "image_b"):
            part = form.get(name)
            if part is not None and not isinstance(part, str):
                uploads[name] = await part.read()
        store = self.root / edits.UPLOADS
        checked = await run_in_threadpool(
            lambda: edits.prepare(self.model(folder), folder, method, params, uploads, store)
        )
        return self._submit(
            str(run), checked.method, checked.options, lambda job: self._edit(folder, job, checked),
            inputs=checked.uploads,
        )  # fmt: skip

    def _edit(self, folder: RunFolder, job: Job, request: edits.Request) -> Result:
        ldm = self.model(folder)
        steps = request.checked.steps
        result, png, images = edits.run(ldm, folder.path, request, _progress(ldm, job, steps))
        frames = len(images) if request.method == "interpolate" else 1
        info = {"notes": result.notes, "frames": frames, "network_calls": result.network_calls}
        return Result(png, info, images)

    def _submit(self, run: str, kind: str, params: dict[str, Any], work: Any,
                inputs: dict[str, bytes] | None = None) -> Response:  # fmt: skip
        try:
            job = self.jobs.submit(run, kind, params, work, inputs)
        except QueueFull as e:
            raise WebError(429, str(e)) from None
        return JSONResponse({"job": job.to_json(self.jobs.position(job))}, status_code=202)

    def _job(self, request: Request, job_id: Any = None) -> Job:
        job_id = job_id if job_id is not None else request.query_params.get("id")
        job = self.jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise WebError(404, f"no job {job_id!r} (finished jobs are kept for a while only)")
        return job

    async def job(self, request: Request) -> Response:
        job = self._job(request)
        return JSONResponse(job.to_json(self.jobs.position(job)))

    async def job_preview(self, request: Request) -> Response:
        job = self._job(request)
        if job.preview is None:
            raise WebError(404, "no preview yet: the job has not taken its first step")
        return Response(job.preview, media_type="image/png")

    async def job_result(self, request: Request) -> Response:
        job = self._job(request)
        if job.result is None:
            raise WebError(409, f"job {job.id} is {job.state}; its result comes when it is done")
        headers = {}
        media = _media_type(job.result.png[:6])  # a video run's result is an animated GIF
        if request.query_params.get("download"):
            headers["Content-Disposition"] = (
                f'attachment; filename="ldmkit-{job.kind}-{job.id}.{media.split("/")[1]}"'
            )
        return Response(job.result.png, media_type=media, headers=headers)

    async def job_image(self, request: Request) -> Response:
        """One image of a finished job's grid (?i=0 the first), a PNG with its parameters."""
        job = self._job(request)
        images = job.result.images if job.result else []
        i = request.query_params.get("i", "0")
        if not (i.isascii() and i.isdecimal()) or int(i) >= len(images):
            raise WebError(
                404, f"job {job.id} has no image {i!r} ({len(images)} images, {job.state})"
            )
        return Response(images[int(i)], media_type=_media_type(images[int(i)][:6]))

    async def job_input(self, request: Request) -> Response:
        job = self._job(request)
        which = request.query_params.get("which", "image")
        if which not in job.inputs:
            raise WebError(404, f"job {job.id} received no {which!r} (it has {sorted(job.inputs)})")
        return Response(job.inputs[which], media_type="image/png")

    async def cancel_job(self, request: Request) -> Response:
        body = await _json_body(request, {"id"})
        job = self._job(request, body.get("id"))
        self.jobs.cancel(job)
        return JSONResponse(job.to_json(self.jobs.position(job)))


# ------------------------------------------------------------------------------ helpers
@functools.cache
def _page_sample(declared: type) -> type:
    return adjusted(declared, n={"default": 8, "hi": MAX_WEB_IMAGES})


def sample_options() -> type:
    """The sample verb's declaration as the page takes it: at most MAX_WEB_IMAGES images a job,
    8 by default."""
    return _page_sample(VERBS["sample"])


def _media_type(head: bytes) -> str:
    """image/gif for a GIF's bytes (a video run's clips), else image/png."""
    return "image/gif" if head.startswith(b"GIF8") else "image/png"


# ------------------------------------------------------------------ adapters (issue 28)
ADAPTERS_DIR = "adapters"  # a run's adapters: RUN/adapters/NAME (`ldmkit finetune --out ...`)
ADAPTER_FIELDS = ("adapter", "adapter_scale")  # a sample request's choice of one of them


def adapters_of(folder: RunFolder) -> list[dict[str, Any]]:
    """The adapters in the run's adapters/ folder, by name: what each teaches (a class name or
    a style), its default scale, and whether it fits the run's weights (else why not)."""
    from ..runs import AdapterFolder

    root = folder.path / ADAPTERS_DIR
    found = []
    try:
        names = sorted(p.name for p in root.iterdir() if AdapterFolder(p).holds_adapter())
    except OSError:
        return []
    for name in names[:MAX_ADAPTERS]:
        adapter = AdapterFolder(root / name)
        entry: dict[str, Any] = {"name": name, "scale": 1.0}
        try:
            info = adapter.check_fits(folder, shown=folder.path.name)
            entry.update(kind=info.kind, class_name=info.class_name, fits=True, why=None,
                         rank=info.lora.rank, steps=info.steps,
                         kb=round(adapter.weights_path.stat().st_size / 1024, 1))  # fmt: skip
            entry["word"] = info.word  # a text run's new word (issue 28), else None
        except (ConfigError, ValueError, OSError) as e:  # CheckpointError is a ValueError
            entry.update(kind=None, class_name=None, word=None, fits=False, why=str(e))
        found.append(entry)
    return found


MAX_ADAPTERS = 100  # listed per run


def _adapter_choice(folder: RunFolder, body: dict[str, Any]) -> dict[str, Any]:
    """A sample request's "adapter" (a name of the run's adapter list) and "adapter_scale", as
    SampleOptions' adapters / adapter_scales; nothing else names a folder."""
    name, scale = body.get("adapter"), body.get("adapter_scale")
    if name in (None, ""):
        if scale is not None:
            raise WebError(400, "adapter_scale without an adapter; pick one of the run's adapters")
        return {}
    listed = {a["name"]: a for a in adapters_of(folder)}
    if not isinstance(name, str) or name not in listed:
        known = ", ".join(listed) or "none"
        raise WebError(
            400, f"unknown adapter {str(name)[:80]!r} for this run; its adapters: {known}"
        )
    if not listed[name]["fits"]:
        raise WebError(400, listed[name]["why"])
    out: dict[str, Any] = {"adapters": (str(folder.path / ADAPTERS_DIR / name),)}
    if scale is not None:
        out["adapter_scales"] = (scale,)  # checked (a number in range) by SampleOptions
    return out


async def _json_body(request: Request, fields: set[str]) -> dict[str, Any]:
    """The request's JSON object, with no key outside `fields`."""
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise WebError(400, "the request body is not JSON; send a JSON object") from None
    if not isinstance(body, dict):
        raise WebError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise WebError(400, f"unknown field {unknown[0]!r}; known: {', '.join(sorted(fields))}")
    return body


def _progress(ldm: Any, job: Job, total: int) -> Any:
    """A sampler callback that reports a job's step (at most `total`) and, now and then, a
    preview of its x0 estimate (previews take at most ~10 % of the time)."""
    next_preview = 0.0

    def progress(i: int, x: Any, sigma: Any, x0: Any) -> None:
        nonlocal next_preview
        step, preview, now = min(job.step + 1, total), None, time.perf_counter()
        if step == total or now >= next_preview:
            preview = _preview_png(ldm, x0[:PREVIEW_IMAGES])
            cost = time.perf_counter() - now
            next_preview = now + max(PREVIEW_EVERY_S, PREVIEW_SHARE * cost)
        job.report(step, total, preview)

    return progress


def _preview_png(ldm: LatentDiffusion, x0: Any) -> bytes | None:
    """The step's x0 estimate (scaled latents), decoded, as one grid PNG (None if it cannot be
    decoded: an early estimate may be far off; the job goes on)."""
    from ..evaluation.grids import make_grid

    try:
        grid = make_grid(ldm.decode(x0).cpu(), nrow=None)
    except ValueError:
        return None
    buf = io.BytesIO()
    pil_image(grid).save(buf, format="PNG")
    return buf.getvalue()


def png_with_params(image: Image.Image, params: dict[str, Any]) -> bytes:
    """`image` as PNG bytes with `params` (JSON) in its text chunk PNG_KEY."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(params))
    return buf.getvalue()


# ------------------------------------------------------------------------------ serving
def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, or a one-line ConfigError (port taken, no such host)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except OSError as e:
        raise ConfigError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port, or a "
            "--host of this machine"
        ) from None
    return sock


def serve(app: Guard, sock: socket.socket) -> None:
    """Serve `app` on a listening socket until Ctrl-C (uvicorn, one process)."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])

"""`ldmkit distill`: a trained run's UNet distilled into a student that samples in a few steps.

Progressive distillation (Salimans & Ho 2022, Algorithm 2; the math in
`ldmkit.diffusion.distillation`): the student starts as a copy of the teacher's (EMA) UNet and
learns to take one deterministic DDIM step where the teacher takes two; then it becomes the
teacher and the count halves again, N -> N/2 -> ... -> the target (default 64 -> 4).

- Each halving is a stage of the shared loop (`loop.train_stage`, stage "distill_<N>to<N/2>"):
  data order, per-sample randomness, the LR plan, checkpoints, resume, the time budget's plan,
  log rows, progress and stopping are the trainer's. Its data are the teacher's cached latents
  (posterior moments, encoded again when the cache is gone) and its conditions: class labels or
  caption token ids, the latter through the teacher's frozen text encoder.
- Guidance: a conditional teacher is distilled guided, at the run's own guidance scale w (one
  guided teacher call per step, the student unguided: one call). The student's run.json samples
  with guidance 1 (none); distill.json records w. With `guidance_input` the student takes w as
  an input instead (Meng et al. 2023; `UNetConfig.guidance_input`), trained on scales drawn
  per sample from [1, max_guidance]; its run.json keeps the run's scale as its default.
  Only the first halving's teacher (the run's own UNet) is guided by classifier-free guidance:
  from the second halving on, the teacher is the previous student, whose guidance is built in,
  and it is called on the condition alone (or with w as its input). Guiding it again would
  compound the scale (about w^k at the k-th halving: over-guided few-step students, with
  high class accuracy and little diversity; measured in docs/performance.md, issue 27).
- The student is a run folder (`RunFolder.start_student`: the teacher's config, data record,
  autoencoder, text encoder) with its own UNet and distill.json (method, the teacher, the
  SHA-256 of its weights, step counts, guidance, each halving's measurements). Its UNet is saved
  after each halving, so a stopped distillation leaves a usable student at the count reached;
  `resume` continues the halving in progress from its checkpoint, refusing a teacher whose
  weights changed since.
- Each halving is measured on fixed noise before and after it: the student's samples at N/2
  DDIM steps against the teacher's at N (RMS in the latent space, through `samplers.sample`,
  an independent path from the training target's code).
- The student's default sampler (distill.json's `sampler`): `sampler="auto"` measures DDIM
  against multistep consistency sampling (`lcm`) once the last halving is done
  (evaluation/sampler_choice.py) and keeps DDIM unless lcm is clearly better; "ddim" or "lcm"
  sets it without measuring.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..diffusion import distillation as pd
from ..diffusion.process import add_noise, predict_x0
from ..diffusion.samplers import sample as run_sample
from ..models.conditioning import ClassConditioner, TextConditioner
from ..models.distributions import DiagonalGaussian
from ..models.unet import UNet
from ..recipe import RunConfig, TrainConfig
from ..runs import RunFolder
from ..runtime import resolve_device
from .loop import ProgressFn, RunLog, StopRequest, train_stage
from .stages import encode_moments
from .state import RunLock, list_checkpoints
from .step import MicroBatch, Stage

log = logging.getLogger(__name__)

METHOD = "progressive"
SAMPLER = "ddim"  # what a student samples with: the deterministic DDIM it was distilled for
EMA_DECAY = 0.995
MEASURE_N = 16  # fixed noises per halving measurement
STOPPED = ("signal", "stop request", "bad loss")


@dataclass
class DistillResult:
    out: Path
    steps: int  # the student's step count reached
    complete: bool  # reached the target
    stopped_because: str
    halvings: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def check_teacher(teacher: RunFolder, shown: Any, steps: int, teacher_steps: int) -> RunConfig:
    """The teacher's config, or a one-line error: no trained run, a student already, an eps-
    or x0-prediction run, an inpainting model, step counts that do not halve down."""
    teacher.require_trained()
    record = teacher.distill_record()
    if record is not None:
        raise ConfigError(
            f"{shown} is a distilled student (of {record.get('teacher')}); a student of a student "
            "is not supported: distil the teacher itself to fewer --steps"
        )
    cfg = teacher.config()
    kind = cfg.unet.prediction_type
    if kind == "eps":
        raise ConfigError(
            f"{shown} predicts eps: progressive distillation needs v-prediction (an eps model's "
            "x-prediction is unstable at high noise, Salimans & Ho 2022 Sec. 4); train the "
            "teacher with the default unet.prediction_type=v"
        )
    if kind != "v":
        raise ConfigError(
            f"{shown} predicts {kind}: distillation supports v-prediction runs (the default) only"
        )
    if cfg.task == "inpaint":
        raise ConfigError(f"{shown} is an inpainting model: distilling one is not supported yet")
    T = cfg.diffusion.num_timesteps
    if not is_power_of_two(teacher_steps) or teacher_steps > T:
        raise ConfigError(
            f"--teacher-steps {teacher_steps} must be a power of two up to the run's {T} "
            "diffusion steps (e.g. 64)"
        )
    if not is_power_of_two(steps) or steps >= teacher_steps:
        raise ConfigError(
            f"--steps {steps} must be a power of two below --teacher-steps {teacher_steps} "
            "(1, 2, 4, ...): each halving halves the step count"
        )
    return cfg


def student_config(cfg: RunConfig, steps: int, input_record: dict | None = None) -> RunConfig:
    """The student's run.json: the teacher's, previews with DDIM at its step count, no guidance
    measurement; sampling unguided (the guidance is distilled in), or with a guidance input
    (`input_record`: distill.json) at the run's scale by default."""
    unet, guidance = cfg.unet, 1.0
    if input_record is not None:
        unet = dataclasses.replace(cfg.unet, guidance_input=True)
        guidance = float(input_record["guidance_scale"])
    return dataclasses.replace(
        cfg, unet=unet, guidance_scale=guidance, choose_guidance=False, preview_sampler=SAMPLER,
        preview_steps=steps, time_budget=None,
    )  # fmt: skip


@dataclass
class _Data:
    moments: Tensor  # (N, 2 zc, h, w) posterior moments
    cond_data: Tensor | None  # class labels (N,) or caption token ids (N, L)
    scaling_factor: float


def _data(teacher: RunFolder, device: torch.device) -> _Data:
    """The teacher's training latents (its cache, else encoded now) and conditions."""
    cfg = teacher.config()
    ds = teacher.load_data()
    vae = teacher.load_vae(device)
    moments = teacher.cached_moments(teacher.vae_identity(len(ds.images)))
    if moments is None:
        log.info("no latent cache in %s: encoding %d images", teacher.path, len(ds.images))
        moments = encode_moments(vae, ds.images, device)
    cond_data = None
    if teacher.has_text():
        if not ds.captions:
            raise ConfigError(f"the data of {teacher.path} ({cfg.data}) has no captions any more")
        cond_data, _ = teacher.load_tokenizer().encode(ds.captions)
    elif cfg.unet.num_classes:
        if ds.labels is None or int(ds.labels.max()) >= cfg.unet.num_classes:
            raise ConfigError(
                f"the data of {teacher.path} ({cfg.data}) no longer has the {cfg.unet.num_classes} "
                "classes the run was trained on; distil it with the data it was trained on"
            )
        cond_data = ds.labels
    return _Data(moments, cond_data, float(vae.config.scaling_factor))


class _Conditions:
    """The network keywords of a batch's conditions: (cond, uncond) for the guided teacher, cond
    alone for the student. Text goes through the teacher's frozen encoder. `guidance`: the
    fixed scale (1: no uncond), or None for scales drawn per sample (uncond always)."""

    def __init__(self, teacher: RunFolder, cfg: RunConfig, guidance: float | None,
                 device: torch.device) -> None:  # fmt: skip
        self.guidance, self.device = guidance, device
        self.text: TextConditioner | None = None
        self.classes: ClassConditioner | None = None
        if teacher.has_text():
            encoder = teacher.load_text_encoder(device).eval().requires_grad_(False)
            self.text = TextConditioner(teacher.load_tokenizer(), encoder)
        elif cfg.unet.num_classes:
            self.classes = ClassConditioner(cfg.unet.num_classes)

    @torch.no_grad()
    def __call__(self, rows: Tensor | None) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        if rows is None:
            return {}, None
        if self.text is not None:
            cond = self.text.encode(rows, self.device)
            if self.guidance == 1.0:
                return cond, None
            null = self.text.null_ids.expand(len(rows), -1)
            return cond, self.text.encode(null, self.device)
        assert self.classes is not None
        scale = 2.0 if self.guidance is None else self.guidance  # any scale but 1: the pair
        return self.classes.sampling_kwargs(rows, len(rows), scale, self.device)


def guided_v(unet: nn.Module, z: Tensor, t: Tensor, cond: dict[str, Tensor],
             uncond: dict[str, Tensor] | None, w: Tensor) -> Tensor:  # fmt: skip
    """v of a network at scales w (B,): a UNet with a guidance input takes w; another is guided
    by classifier-free guidance on v (affine in x at fixed z, t: the same as on x)."""
    if unet.config.guidance_input:
        return unet(z, t, **cond, guidance=w)
    if uncond is None:
        return unet(z, t, **cond)
    both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
    v_c, v_u = unet(torch.cat([z, z]), torch.cat([t, t]), **both).chunk(2)
    return v_u + w.reshape(-1, *([1] * (z.ndim - 1))).to(v_c) * (v_c - v_u)


def guided_x(unet: nn.Module, schedule: Any) -> Any:
    """The teacher as `pd.XPredictor` with its conditions and scales bound by
    `bind(cond, uncond, w)`: its guided v (`guided_v`), then x = a z - s v."""

    def bind(cond: dict[str, Tensor], uncond: dict[str, Tensor] | None,
             w: Tensor) -> pd.XPredictor:  # fmt: skip
        @torch.no_grad()
        def x_hat(z: Tensor, t: Tensor) -> Tensor:
            v = guided_v(unet, z, t.to(z.device), cond, uncond, w)
            return predict_x0(schedule, z, t.cpu(), v.float(), "v")

        return x_hat

    return bind


def halving_stage(
    name: str, student: nn.Module, teacher: nn.Module, data: _Data, conditions: _Conditions,
    schedule: Any, n_teacher: int, tc: TrainConfig, device: torch.device, weighting: str,
    scales: tuple[float, float], teacher_guided: bool = True,
) -> Stage:  # fmt: skip
    """One halving as a `Stage`: the student (trained) learns one DDIM step of the teacher's two
    on the teacher's grid of n_teacher steps, at guidance scales drawn from `scales` (lo, hi;
    lo = hi: a fixed scale). `teacher_guided`: the teacher is guided by classifier-free
    guidance (the run's own UNet); False: it is a student with the guidance built in (or taken
    as an input), called on the condition alone."""
    grid = pd.trailing_grid(schedule.num_timesteps, n_teacher)
    half = n_teacher // 2
    bind = guided_x(teacher, schedule)
    lo, hi = scales
    trained = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=tc.lr, weight_decay=tc.weight_decay)

    def loss(mb: MicroBatch) -> tuple[Tensor, dict[str, float]]:
        # each sample's draws from its own generator: posterior noise, the student step, eps
        post = DiagonalGaussian.from_moments(data.moments[mb.indices])
        z0 = post.sample(noise=mb.randn(*post.shape[1:])) * data.scaling_factor
        j = torch.cat([torch.randint(0, half, (1,), generator=g) for g in mb.generators])
        eps = mb.randn(*z0.shape[1:])
        t = grid[2 * j]
        z = add_noise(schedule, z0, eps, t).to(device)
        rows = data.cond_data[mb.indices] if data.cond_data is not None else None
        cond, uncond = conditions(rows)
        w = torch.full((len(j),), lo)
        if hi > lo:  # a scale per sample, from its generator (after its other draws)
            w = lo + (hi - lo) * torch.cat([torch.rand(1, generator=g) for g in mb.generators])
        w = w.to(device)
        teacher_uncond = uncond if teacher_guided else None
        _, x_tilde = pd.distillation_target(bind(cond, teacher_uncond, w), schedule, z, grid, j)
        extra = {"guidance": w} if student.config.guidance_input else {}
        v = student(z, t.to(device), **cond, **extra)
        return pd.distillation_loss(v, z, t, x_tilde, schedule, weighting), {}

    return Stage(name, student, opt, loss)


@torch.no_grad()
def sample_gap(
    student: nn.Module, teacher: nn.Module, data: _Data, conditions: _Conditions, schedule: Any,
    n_teacher: int, device: torch.device, seed: int = 0, n: int = MEASURE_N, scale: float = 1.0,
    teacher_guided: bool = True,
) -> float:  # fmt: skip
    """RMS (latent space) between the student's DDIM samples at n_teacher / 2 steps and the
    teacher's at n_teacher, from the same n noises and the conditions of the first n images,
    at the guidance scale `scale` (`teacher_guided`: as in `halving_stage`)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, *data.moments.shape[1:])
    x_T = torch.randn(shape[0], shape[1] // 2, *shape[2:], generator=g).to(device)
    rows = None
    if data.cond_data is not None:
        rows = data.cond_data[torch.arange(n) % len(data.cond_data)]
    cond, uncond = conditions(rows)
    w = torch.full((n,), float(scale), device=device)

    def net(unet: nn.Module, guided: bool) -> Any:
        def fn(z: Tensor, t: Tensor) -> Tensor:
            b = len(z)
            return guided_v(unet, z, t.expand(b), {k: v[:b] for k, v in cond.items()},
                            uncond if guided else None, w[:b])  # fmt: skip

        return fn

    common = dict(sampler="ddim", prediction_type="v", spacing="trailing")
    was = student.training
    student.eval()
    ref = run_sample(net(teacher.eval(), teacher_guided), schedule, x_T, steps=n_teacher, **common)
    out = run_sample(net(student, False), schedule, x_T, steps=n_teacher // 2, **common)
    student.train(was)
    return float((out - ref).square().mean().sqrt())


def _frozen(unet: nn.Module) -> nn.Module:
    return copy.deepcopy(unet).eval().requires_grad_(False)


def with_guidance_input(unet: UNet) -> UNet:
    """The UNet with a guidance input (`UNetConfig.guidance_input`) whose embedding's last layer
    is zero: it computes exactly what `unet` does, at every scale, until it trains."""
    wide = UNet(dataclasses.replace(unet.config, guidance_input=True)).to(
        next(unet.parameters()).device
    )
    missing, unexpected = wide.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("guidance_embed.") for k in missing), missing
    return wide


def distill_run(
    teacher_dir: str | Path,
    out: str | Path,
    *,
    steps: int = 4,
    teacher_steps: int = 64,
    iterations: int = 400,
    time_budget_s: float | None = None,
    batch_size: int = 32,
    lr: float = 1e-4,
    weighting: str = "truncated-snr",
    seed: int = 0,
    resume: bool = False,
    device: str | None = None,
    progress: ProgressFn | None = None,
    stop: StopRequest | None = None,
    on_halving: Callable[[int, nn.Module], None] | None = None,
    guidance_input: bool = False,
    max_guidance: float | None = None,
    ema_decay: float = EMA_DECAY,
    sampler: str = SAMPLER,
) -> DistillResult:
    """Distil the run in `teacher_dir` into a student run folder `out` (see the module's doc).

    `iterations`: optimizer steps per halving (a time budget may end one sooner: the budget is
    split evenly over the halvings left). `on_halving(steps, unet)`: after each halving, with
    the student of that many steps (a benchmark keeps each). `guidance_input`: the student takes
    the guidance scale as an input (Meng et al. 2023), trained on scales drawn uniformly from
    [1, max_guidance] (default: twice the run's); else it learns the run's scale alone.
    `ema_decay`: the student's EMA (the weights each halving keeps). `sampler`: the student's
    default sampler, or "auto" to measure it at the end (module docstring). The caller checks
    the arguments' ranges (api)."""
    teacher = RunFolder(teacher_dir)
    cfg = check_teacher(teacher, teacher_dir, steps, teacher_steps)
    if guidance_input and not _conditional(teacher, cfg):
        raise ConfigError(
            f"{teacher_dir} is unconditional: it has no guidance to take as an input; drop "
            "--guidance-mode input"
        )
    if weighting not in pd.WEIGHTINGS:
        raise ConfigError(
            f"unknown weighting {weighting!r}; choose one of {', '.join(pd.WEIGHTINGS)}"
        )
    dev = resolve_device(device)
    student = RunFolder(out)
    t0 = time.perf_counter()
    data = _data(teacher, dev)  # before the student folder is made: the data may be refused
    with RunLock(student.path):
        record = _start(teacher, student, cfg, steps, teacher_steps, weighting, resume,
                        teacher_dir, guidance_input, max_guidance)  # fmt: skip
        schedule = cfg.diffusion.make_schedule()
        w = float(record["guidance_scale"])
        scales = tuple(record["guidance_range"]) if record.get("guidance_input") else (w, w)
        conditions = _Conditions(teacher, cfg, None if record.get("guidance_input") else w, dev)
        if student.has_model("unet"):
            current = student.load_unet(dev)
        else:
            current = teacher.load_unet(dev)
            if record.get("guidance_input"):  # the teacher's UNet, with a zero guidance input
                current = with_guidance_input(current)
        n = record["steps"] or teacher_steps
        run_log = RunLog(student, tensorboard=False)
        why, first = "finished", n == teacher_steps
        while n > steps:
            name = f"distill_{n}to{n // 2}"  # a checkpoint stage name: [a-z0-9_]
            left = int(math.log2(n // steps))
            budget = None
            if time_budget_s is not None:
                budget = max((time_budget_s - (time.perf_counter() - t0)) / left, 1.0)
            tc = TrainConfig(
                steps=iterations, batch_size=min(batch_size, len(data.moments)), lr=lr,
                warmup_steps=min(20, iterations // 10), lr_schedule="cosine",
                ema_decay=ema_decay, checkpoint_every=max(1, min(500, iterations)),
                keep_last=1, sample_every=0, log_every=max(1, min(25, iterations // 4)),
            )  # fmt: skip
            model = copy.deepcopy(current).train().requires_grad_(True)
            if first and record.get("guidance_input"):  # the teacher: the run's own UNet
                frozen = _frozen(teacher.load_unet(dev))
            else:
                frozen = _frozen(current)
            # the run's own UNet is guided; a student (later halvings) has it built in already
            guided, first = first, False
            stage = halving_stage(name, model, frozen, data, conditions, schedule, n, tc, dev,
                                  record["weighting"], scales, teacher_guided=guided)  # fmt: skip
            before = sample_gap(model, frozen, data, conditions, schedule, n, dev, seed, scale=w,
                                teacher_guided=guided)  # fmt: skip
            res = train_stage(
                stage, tc, folder=student, num_items=len(data.moments), seed=seed + n,
                resume=resume and bool(list_checkpoints(student.checkpoints_dir, name)),
                time_budget_s=budget, run_log=run_log, progress=progress, stop=stop,
            )  # fmt: skip
            if res.stopped_because in STOPPED:
                why = res.stopped_because
                break
            current = (res.ema.model if res.ema is not None else model).eval()
            after = sample_gap(current, frozen, data, conditions, schedule, n, dev, seed, scale=w,
                               teacher_guided=guided)  # fmt: skip
            row = {"from": n, "to": n // 2, "iterations": res.steps_done,
                   "seconds": round(res.seconds, 1), "loss": res.last_loss,
                   "gap_before": before, "gap_after": after, "ended": res.stopped_because}  # fmt: skip
            log.info(
                "%s: %d steps in %.0f s; the student's samples at %d DDIM steps are %.4f RMS "
                "from the teacher's at %d (%.4f before)", name, res.steps_done, res.seconds,
                n // 2, after, n, before,
            )  # fmt: skip
            student.save_unet(current)
            n //= 2
            if on_halving is not None:
                on_halving(n, current)
            record["halvings"].append(row)
            record.update(steps=n, complete=n == steps)
            student.write_distill_record(record)
            resume = False  # the next halving starts afresh
        if why == "finished":
            record["sampler"] = _student_sampler(student, sampler, record, seed)
            student.write_distill_record(record)
    return DistillResult(student.path, record["steps"] or teacher_steps, bool(record["complete"]),
                         why, record["halvings"], time.perf_counter() - t0)  # fmt: skip


def _student_sampler(student: RunFolder, sampler: str, record: dict[str, Any], seed: int) -> str:
    """The student's default sampler: `sampler`, or for "auto" the measured pick (DDIM where
    nothing can be measured); the measurement goes to record["sampler_choice"] and
    eval/sampler.json."""
    if sampler != "auto":
        return sampler
    from ..evaluation import sampler_choice as sc
    from ..pipeline import LatentDiffusion

    ldm = LatentDiffusion.from_run(student.path)
    choice = sc.measure_student_sampler(ldm, student, int(record["steps"]), seed=seed)
    if choice is None:
        record["sampler_choice"] = None
        return SAMPLER
    log.info("the student's sampler, chosen by measurement (--sampler ddim or lcm sets one):\n%s",
             choice.table())  # fmt: skip
    sc.save_choice(student, choice)
    record["sampler_choice"] = {r.sampler: {"fid": r.fid, "accuracy": r.accuracy}
                                for r in choice.rows} | {"n": choice.n}  # fmt: skip
    return choice.sampler


def _start(
    teacher: RunFolder, student: RunFolder, cfg: RunConfig, steps: int, teacher_steps: int,
    weighting: str, resume: bool, shown: Any, guidance_input: bool = False,
    max_guidance: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The student's record: a new student folder, or the one being resumed (checked against
    the teacher's weights and the step counts asked for)."""
    weights = teacher.weights_hash()
    if student.exists():
        if not resume:
            raise ConfigError(
                f"{student.path} already holds a run; pass --resume to continue a distillation "
                "there, or choose another --out folder"
            )
        record = student.distill_record()
        if record is None:
            raise ConfigError(f"--resume: {student.path} is no distilled student (no distill.json)")
        if record.get("teacher_hash") != weights:
            raise ConfigError(
                f"--resume: the teacher {shown}'s weights changed since this distillation started "
                f"(hash {weights}, recorded {record.get('teacher_hash')}); distil it again into a "
                "new --out folder"
            )
        if (record.get("target_steps"), record.get("teacher_steps")) != (steps, teacher_steps):
            raise ConfigError(
                f"--resume: this distillation goes from {record.get('teacher_steps')} to "
                f"{record.get('target_steps')} steps; resume it with --teacher-steps "
                f"{record.get('teacher_steps')} --steps {record.get('target_steps')}"
            )
        return record
    if student.path.exists() and any(p.name != ".lock" for p in student.path.iterdir()):
        raise ConfigError(f"{student.path} is not empty; choose a new --out folder for the student")
    record = {
        "method": METHOD, "teacher": str(teacher.path), "teacher_hash": weights,
        "teacher_steps": teacher_steps, "target_steps": steps, "sampler": SAMPLER, "steps": None,
        "complete": False, "guidance_scale": cfg.sampling_guidance if _conditional(teacher, cfg) else 1.0,
        "weighting": weighting, "halvings": [], "guidance_input": guidance_input,
    }  # fmt: skip
    if guidance_input:
        record["guidance_range"] = [1.0, float(max_guidance or 2 * record["guidance_scale"])]
    student.start_student(teacher, student_config(cfg, steps, record if guidance_input else None))
    student.write_distill_record(record)
    return record


def _conditional(teacher: RunFolder, cfg: RunConfig) -> bool:
    return teacher.has_text() or bool(cfg.unet.num_classes)

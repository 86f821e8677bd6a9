"""Two-stage latent diffusion training, from a data spec to a run folder.

Stage 1 trains the autoencoder (reconstruction + KL), then measures the latent scaling factor
on the data and stores it in the VAE config. The latents' posterior moments are then cached in
memory (and on disk), so stage 2 never runs the encoder again: each step draws z from the cached
posterior, noises it and trains the UNet on the noise-prediction objective (Rombach et al. 2022).

Run folder:
    run.json             the resolved RunConfig
    data.json            data set name, fingerprint, channels, class names
    vae/, unet/          final weights (config.json + model.safetensors); unet/ holds EMA weights
    checkpoints/         resumable training states of both stages (last K kept)
    latents.safetensors  cached posterior moments of the training images
    samples/             preview grids;  samples.png, loss.png: final grid and loss curve
    log.jsonl, tb/       scalars (JSON lines, TensorBoard when installed)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..checkpoint import CheckpointError, load_tensors, read_json, save_tensors, write_json
from ..config import ConfigError, deep_update, from_dict, to_dict
from ..diffusion.losses import loss_weights
from ..diffusion.process import add_noise, target_for
from ..diffusion.samplers import DEFAULT_SAMPLER
from ..diffusion.schedules import NoiseSchedule, ScheduleName, schedule_from_fields
from ..models.losses import autoencoder_loss, discriminator_loss, make_discriminator
from ..models.unet import UNet, UNetConfig
from ..models.vae import Autoencoder, AutoencoderConfig, measure_scaling_factor
from .loop import Stage, TrainConfig, clip_and_check, train_stage
from .state import RunLock, list_checkpoints

log = logging.getLogger(__name__)


@dataclass
class DiffusionConfig:
    """The diffusion process the UNet is trained on."""

    # linear (DDPM), scaled_linear (LDM), cosine (Nichol & Dhariwal 2021), sigmoid. cosine is
    # the default: on 16x16 latents the linear schedule spends most steps at noise levels where
    # nothing is left to learn, and cosine reached a lower FID in the same CPU time (issue notes)
    schedule: ScheduleName = "cosine"
    num_timesteps: int = 1000
    zero_terminal_snr: bool = False  # Lin et al. 2024; use with prediction_type "v"
    beta_start: float | None = (
        None  # None: the schedule's own default (linear 1e-4, scaled_linear 0.00085)
    )
    beta_end: float | None = (
        None  # None: the schedule's own default (linear 0.02, scaled_linear 0.012)
    )
    loss_weighting: Literal["none", "min_snr", "eps_equivalent"] = "min_snr"  # Hang et al. 2023
    min_snr_gamma: float = 5.0
    class_dropout: float = 0.1  # share of labels replaced by the null label (for guidance)

    def make_schedule(self) -> NoiseSchedule:
        return schedule_from_fields(self)

    def __post_init__(self) -> None:
        if self.num_timesteps < 2:
            raise ConfigError(f"num_timesteps must be >= 2, got {self.num_timesteps}")
        if not 0 <= self.class_dropout < 1:
            raise ConfigError(f"class_dropout must be in [0, 1), got {self.class_dropout}")


def default_vae() -> AutoencoderConfig:
    """The default autoencoder: f2 (32 px -> 16x16x4 latents), small enough to train on a CPU.

    Chosen by measurement on the built-in shapes (see the issue notes): f4 (8x8x8 latents)
    reconstructed small shapes as blobs after 2.5 CPU-minutes, and a UNet trained on them drew
    blobs; f2 reconstructs them crisply in the same time, and keeps shape as a spatial pattern
    in the latent, which the UNet's convolutions pick up. At equal CPU time a thin network that
    takes more steps reconstructs better than a wide one that takes fewer.
    """
    return AutoencoderConfig(
        block_out_channels=(16, 32), layers_per_block=1, norm_groups=8, latent_channels=4
    )


def default_unet() -> UNetConfig:
    """The default latent UNet for 16x16 latents: 3 levels (16, 8, 4), one res block each.

    One res block per level runs 1.5x the images/s of two on a CPU (the small latent UNet is
    bound by per-op overhead). The time and class embedding scale and shift each res block's
    normalised features (AdaGN, Dhariwal & Nichol 2021) instead of adding to them: in 10
    CPU-minutes that doubled the share of samples a classifier assigns to the requested class
    (0.21 -> 0.41 without guidance) at no cost in speed. v-prediction (Salimans &
    Ho 2022): 500 steps of eps-prediction gave noise-like samples (its x0 estimate at high noise
    amplifies eps errors by 1/sqrt(alpha_bar)), v-prediction clean backgrounds and objects.
    """
    return UNetConfig(
        sample_size=16,
        block_out_channels=(32, 64, 128),
        num_res_blocks=1,
        attention_resolutions=(4,),
        norm_num_groups=16,
        head_dim=32,
        time_injection="scale_shift",
        prediction_type="v",
    )


@dataclass
class RunConfig:
    """Everything a training run needs; saved as run.json."""

    data: str = (
        "builtin:shapes"  # folder, builtin:shapes|mnist|digits, mnist:PATH, cifar10:PATH, ...
    )
    image_size: int = 32
    channels: int | None = None  # None: inferred from the data (1 for grayscale, else 3)
    conditioning: Literal["auto", "none", "class"] = (
        "auto"  # auto: class labels when the data has them
    )
    seed: int = 0
    time_budget: str | None = None  # e.g. "10m": split between the stages by budget_split
    budget_split: float = 0.15  # share of the time budget for the autoencoder
    device: str = "auto"  # auto: cuda, then mps, then cpu
    vae: AutoencoderConfig = field(default_factory=lambda: default_vae())
    unet: UNetConfig = field(default_factory=lambda: default_unet())
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    vae_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=3000,
            batch_size=32,
            lr=2e-3,
            warmup_steps=50,
            ema_decay=0.995,
            lr_schedule="cosine",
        )  # fmt: skip
    )
    unet_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=20000, batch_size=32, lr=1e-3, lr_schedule="cosine"
        )
    )
    preview_sampler: str = DEFAULT_SAMPLER
    preview_steps: int = 20
    # classifier-free guidance when a class-conditional model is sampled (previews, and the
    # default of `ldmkit sample` / `ldmkit eval`); 1 = none. Chosen by measurement (issue notes).
    guidance_scale: float = 5.0

    def __post_init__(self) -> None:
        if self.guidance_scale < 0:
            raise ConfigError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.image_size < 4:
            raise ConfigError(f"image_size must be >= 4, got {self.image_size}")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"channels must be 1 or 3 (or unset to infer), got {self.channels}")
        if not 0 < self.budget_split < 1:
            raise ConfigError(f"budget_split must be in (0, 1), got {self.budget_split}")
        if self.time_budget is not None:
            parse_duration(self.time_budget)


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from a (file or command line) dict, deriving the linked fields first.

    The UNet's sample_size and channels follow from the image size and the autoencoder, so they
    are filled in before validation: a user who sets attention_resolutions does so for the latent
    size their autoencoder gives.
    """
    user = json.loads(json.dumps(data))  # a deep copy
    data = to_dict(RunConfig())
    # fields derived below are dropped from the defaults, kept where the user set them
    data["vae"].pop("image_size")
    for k in ("sample_size", "in_channels", "out_channels"):
        data["unet"].pop(k)
    deep_update(data, user)
    vae, unet = data["vae"], data["unet"]
    if not isinstance(vae, dict) or not isinstance(unet, dict):
        return from_dict(RunConfig, data)  # reports the wrong type
    image_size = data["image_size"]
    levels = (
        len(vae["block_out_channels"]) if isinstance(vae.get("block_out_channels"), list) else 1
    )
    latent_channels = vae.get("latent_channels")
    vae.setdefault("image_size", image_size)
    if isinstance(image_size, int) and image_size % 2 ** (levels - 1) == 0:
        unet.setdefault("sample_size", image_size // 2 ** (levels - 1))
    unet.setdefault("in_channels", latent_channels)
    unet.setdefault("out_channels", latent_channels)
    return from_dict(RunConfig, data)


def parse_duration(text: str) -> float:
    """'90s', '10m', '1.5h', '1h30m' or a plain number of seconds -> seconds."""
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", s)
    if not parts or "".join(n + u for n, u in parts) != s.replace(" ", ""):
        raise ConfigError(f"cannot read the duration {text!r}; write e.g. 90s, 10m or 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


# ---------------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        from ..pipeline import default_device

        return default_device()
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' was asked for but no CUDA GPU is available; use --device cpu"
        )
    return dev


def _to_float(images_u8: Tensor) -> Tensor:
    return images_u8.float().div_(127.5).sub_(1.0)


def _flip(x: Tensor, gen: torch.Generator) -> Tensor:
    mask = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)


def _check_bf16(cfg: RunConfig, device: torch.device) -> RunConfig:
    """Turn bf16 off, with a warning, on a CPU that would run it far slower than fp32."""
    from ..runtime import cpu_has_fast_bf16

    wants = [name for name in ("vae_train", "unet_train") if getattr(cfg, name).bf16]
    if not wants or device.type != "cpu" or cpu_has_fast_bf16():
        return cfg
    log.warning(
        "%s.bf16: this CPU has no native bf16 (avx512_bf16 or AMX), where bf16 runs about 15x "
        "slower than fp32; training in fp32 instead", "/".join(wants),
    )  # fmt: skip
    return dataclasses.replace(
        cfg, **{name: dataclasses.replace(getattr(cfg, name), bf16=False) for name in wants}
    )


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


# ---------------------------------------------------------------------------------- stages
def autoencoder_stage(
    vae: Autoencoder, images: Tensor, cfg: TrainConfig, device: torch.device, flip: bool
) -> Stage:
    """Stage 1: train the autoencoder on uint8 images (N, C, H, W).

    With `vae.config.disc_weight > 0` a PatchGAN discriminator trains beside it from
    `disc_start` on (hinge loss, adaptive weight; Esser et al. 2021).
    """
    # GAN-style betas only when a discriminator trains beside it (Esser et al. 2021)
    betas = (0.5, 0.9) if vae.config.disc_weight > 0 else (0.9, 0.999)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas)
    optimizers = {"adamw": opt}
    disc = make_discriminator(vae.config)
    extra: dict[str, torch.nn.Module] = {}
    if disc is not None:
        disc = disc.to(device)
        extra["discriminator"] = disc
        optimizers["disc"] = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=betas)
    gen = torch.Generator().manual_seed(1)
    params = [p for p in vae.parameters()]

    def step(micro: list[Tensor], i: int) -> dict[str, float]:
        opt.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        total = 0.0
        batches = []
        for idx in micro:
            x = _to_float(images[idx])
            if flip:
                x = _flip(x, gen)
            x = x.to(device)
            with _autocast(device, cfg.bf16):
                post = vae.encode(x)
                noise = torch.randn(post.mean.shape, generator=gen).to(device)
                z = post.mean + (0.5 * post.logvar).exp() * noise  # reparameterization
                recon = vae.decode(z)
            loss, parts = autoencoder_loss(
                x, recon.float(), post, vae.config, step=i, discriminator=disc,
                last_layer=vae.last_layer if disc is not None else None,
            )  # fmt: skip
            (loss / len(micro)).backward()
            total += float(loss.detach()) / len(micro)
            for k, v in parts.items():
                logs[k] = logs.get(k, 0.0) + v / len(micro)
            if disc is not None:
                batches.append((x, recon.detach().float()))
        norm, ok = clip_and_check(params, cfg.grad_clip)
        if not ok or not math.isfinite(total):
            opt.zero_grad(set_to_none=True)
            return {"loss": total, "skipped": True}
        opt.step()
        if disc is not None:
            optimizers["disc"].zero_grad(set_to_none=True)  # the GAN term reached it too
            for x, recon in batches:
                d_loss, d_logs = discriminator_loss(disc, x, recon, vae.config, step=i)
                (d_loss / len(batches)).backward()
                for k, v in d_logs.items():
                    logs[k] = logs.get(k, 0.0) + v / len(batches)
            optimizers["disc"].step()
        return {"loss": total, "grad_norm": norm, **logs}

    return Stage(
        "autoencoder", vae, optimizers, step, extra_modules=extra, generators={"noise": gen}
    )


def diffusion_stage(
    unet: UNet,
    moments: Tensor,
    labels: Tensor | None,
    scaling_factor: float,
    diff: DiffusionConfig,
    cfg: TrainConfig,
    device: torch.device,
) -> Stage:
    """Stage 2: train the UNet on latents drawn from cached posterior moments (N, 2*zc, h, w)."""
    schedule = diff.make_schedule()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(2)
    params = [p for p in unet.parameters()]
    pred_type = unet.config.prediction_type
    num_classes = unet.config.num_classes
    zc = moments.shape[1] // 2

    def step(micro: list[Tensor], i: int) -> dict[str, float]:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for idx in micro:
            mean, logvar = moments[idx, :zc], moments[idx, zc:]
            z0 = (
                mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen)
            ) * scaling_factor
            t = torch.randint(0, schedule.num_timesteps, (len(idx),), generator=gen)
            eps = torch.randn(z0.shape, generator=gen)
            y = None
            if num_classes:
                assert labels is not None
                y = labels[idx].clone()
                y[torch.rand(len(idx), generator=gen) < diff.class_dropout] = num_classes
                y = y.to(device)
            z0, t, eps = z0.to(device), t.to(device), eps.to(device)
            x_t = add_noise(schedule, z0, eps, t)
            with _autocast(device, cfg.bf16):
                pred = unet(x_t, t, class_labels=y)
            target = target_for(pred_type, z0, eps, schedule, t)
            per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
            if diff.loss_weighting != "none":
                w = loss_weights(
                    schedule, t, pred_type, weighting=diff.loss_weighting, gamma=diff.min_snr_gamma
                )
                per_sample = per_sample * w.to(per_sample)
            loss = per_sample.mean()
            (loss / len(micro)).backward()
            total += float(loss.detach()) / len(micro)
        norm, ok = clip_and_check(params, cfg.grad_clip)
        if not ok or not math.isfinite(total):
            opt.zero_grad(set_to_none=True)
            return {"loss": total, "skipped": True}
        opt.step()
        return {"loss": total, "grad_norm": norm}

    return Stage("diffusion", unet, {"adamw": opt}, step, generators={"noise": gen})


@torch.no_grad()
def encode_moments(
    vae: Autoencoder, images: Tensor, device: torch.device, batch: int = 256
) -> Tensor:
    """Posterior (mean, logvar) of every image, concatenated on channels, float32 on the CPU."""
    vae.eval()
    out = []
    for s in range(0, images.shape[0], batch):
        post = vae.encode(_to_float(images[s : s + batch]).to(device))
        out.append(torch.cat([post.mean, post.logvar], 1).float().cpu())
    return torch.cat(out)


def estimate_step_time(
    model: torch.nn.Module, make_batch, device: torch.device, repeats: int = 2
) -> float:
    """Seconds per training micro-batch, measured on a throw-away copy of the model."""
    import copy

    probe = copy.deepcopy(model).train()
    opt = torch.optim.SGD(probe.parameters(), lr=0.0)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        loss = make_batch(probe)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del probe, opt
    return min(times[1:])


def _model_memory_mb(model: torch.nn.Module) -> float:
    n = sum(p.numel() for p in model.parameters())
    return n * 4 * 4 / 2**20  # weights, grads, two AdamW moments (fp32)


# ---------------------------------------------------------------------------------- the run
@dataclass
class RunResult:
    run_dir: Path
    vae_steps: int
    unet_steps: int
    seconds: float
    stopped_because: str


def resolve_config(cfg: RunConfig, channels: int, num_classes: int | None) -> RunConfig:
    """Fill in what the data decides: image channels, latent size, class count."""
    vae = dataclasses.replace(cfg.vae, image_channels=channels, image_size=cfg.image_size)
    f = vae.downsample_factor
    if cfg.image_size % f:
        raise ConfigError(
            f"image_size {cfg.image_size} is not a multiple of the autoencoder's downsampling factor {f}"
        )
    unet = dataclasses.replace(
        cfg.unet,
        in_channels=vae.latent_channels,
        out_channels=vae.latent_channels,
        sample_size=cfg.image_size // f,
        num_classes=num_classes,
    )
    return dataclasses.replace(cfg, channels=channels, vae=vae, unet=unet)


def train_run(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    stage: Literal["all", "vae", "unet"] = "all",
    progress: bool = True,
) -> RunResult:
    """Train both stages into `out_dir` (see the module docstring for its layout)."""
    from ..data import load_dataset

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    if resume and not list_checkpoints(out) and not (out / "vae" / "model.safetensors").is_file():
        if not (out / "run.json").is_file():
            raise CheckpointError(
                f"--resume: {out} holds no checkpoint to resume from; drop --resume to start anew"
            )
        # killed before its first checkpoint: less than one interval is lost, so start over
        log.warning("%s has no checkpoint yet: starting its training from step 0", out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    with RunLock(out):
        if not resume and (out / "run.json").is_file():  # checked under the lock: see RunLock
            raise ConfigError(
                f"{out} already holds a run; pass --resume to continue it, or choose another --out folder"
            )
        if resume and (out / "run.json").is_file():  # the saved config decides what data to load
            saved = from_dict(RunConfig, read_json(out / "run.json"))
            # the data and models are the saved ones; training settings (steps, ...) may change
            cfg = dataclasses.replace(saved, **{k: getattr(cfg, k) for k in _CHANGEABLE_ON_RESUME})
        device = resolve_device(cfg.device)
        cfg = _check_bf16(cfg, device)
        torch.manual_seed(cfg.seed)
        ds = load_dataset(cfg.data, image_size=cfg.image_size, channels=cfg.channels, seed=cfg.seed)
        images = ds.images  # (N, C, H, W) uint8
        labels = ds.labels if cfg.conditioning in ("auto", "class") else None
        if cfg.conditioning == "class" and labels is None:
            raise ConfigError(f"conditioning 'class' needs labels, but {cfg.data} has none")
        num_classes = len(ds.class_names) if labels is not None and ds.class_names else None
        if not (resume and (out / "run.json").is_file()):
            cfg = resolve_config(cfg, ds.channels, num_classes)
        elif cfg.unet.num_classes != num_classes:  # the data changed since the run started
            raise ConfigError(
                f"--resume: the data {cfg.data} has {num_classes or 'no'} classes but the run was "
                f"trained with {cfg.unet.num_classes or 'no'}; resume with the same data, or train "
                "into a new --out folder"
            )
        write_json(out / "run.json", to_dict(cfg))
        write_json(
            out / "data.json",
            {"spec": cfg.data, "name": ds.name, "num_images": len(images), "channels": ds.channels,
             "image_size": cfg.image_size, "class_names": ds.class_names if num_classes else None,
             "fingerprint": ds.fingerprint()},
        )  # fmt: skip
        _sanity_check(images, cfg)
        if len(images) < 1000:
            log.warning(
                "only %d training images: the model will likely memorise them; "
                "use `ldmkit eval` to check for near-copies",
                len(images),
            )

        budget = parse_duration(cfg.time_budget) if cfg.time_budget else None
        writer = _tensorboard(out)
        stopped = "finished"

        # ---------------- stage 1: autoencoder
        vae_dir = out / "vae"
        torch.manual_seed(cfg.seed)  # each model's init depends on the seed alone (exact resume)
        vae = Autoencoder(cfg.vae).to(device)
        vae_steps = 0
        vae_done = (vae_dir / "model.safetensors").is_file() and (vae_dir / "config.json").is_file()
        if stage in ("all", "vae") and not vae_done:
            st = autoencoder_stage(vae, images, cfg.vae_train, device, flip=False)
            _vae_round_trip_check(vae, images, device)
            st.preview = lambda step, model: _save_reconstructions(
                model, images, out / "samples" / f"vae-step-{step:08d}.png", device
            )
            per_step = estimate_step_time(
                vae,
                lambda m: (m(_to_float(images[: cfg.vae_train.micro_batch]).to(device))[0]).square().mean(),
                device,
            )  # fmt: skip
            _announce("autoencoder", vae, per_step, cfg.vae_train, len(images))
            vae_budget = budget * cfg.budget_split if budget else None
            res = train_stage(
                st, cfg.vae_train, run_dir=out, num_items=len(images), seed=cfg.seed, resume=resume,
                time_budget_s=vae_budget, writer=writer, progress=progress,
            )  # fmt: skip
            vae_steps = res.steps_done
            if res.stopped_because in ("signal", "bad loss"):
                return RunResult(
                    out, vae_steps, 0, time.perf_counter() - t_start, res.stopped_because
                )
            final_vae = res.ema.model if res.ema is not None else vae
            final_vae.eval()
            scale = measure_scaling_factor(final_vae, _batches(images, device))
            final_vae.config = dataclasses.replace(final_vae.config, scaling_factor=scale)
            final_vae.save_pretrained(vae_dir)
            log.info(
                "autoencoder done after %d steps; latent scaling factor %.4f", vae_steps, scale
            )
            _save_reconstructions(final_vae, images, out / "reconstructions.png", device)
        if stage == "vae":
            return RunResult(out, vae_steps, 0, time.perf_counter() - t_start, stopped)
        vae = Autoencoder.from_pretrained(vae_dir, device=device).eval()

        # ---------------- latent cache
        moments = _cached_moments(vae, images, out, device)

        # ---------------- stage 2: diffusion
        # The UNet's init must not depend on whether stage 1 ran in this process (a resumed run)
        torch.manual_seed(cfg.seed + 1)
        unet = UNet(cfg.unet).to(device)
        st = diffusion_stage(
            unet, moments, labels, vae.config.scaling_factor, cfg.diffusion, cfg.unet_train, device
        )
        class_names = ds.class_names if num_classes else None
        st.preview = _diffusion_preview(vae, cfg, out, device, class_names=class_names)
        per_step = estimate_step_time(
            unet,
            lambda m: m(
                torch.randn(cfg.unet_train.micro_batch, *moments.shape[1:2], *moments.shape[2:])[:, : cfg.unet.in_channels].to(device),
                torch.randint(0, 1000, (cfg.unet_train.micro_batch,)).to(device),
                class_labels=(torch.zeros(cfg.unet_train.micro_batch, dtype=torch.long, device=device) if num_classes else None),
            ).square().mean(),
            device,
        )  # fmt: skip
        _announce("diffusion", unet, per_step, cfg.unet_train, len(images))
        unet_budget = None
        if budget:
            unet_budget = max(budget - (time.perf_counter() - t_start) - 20.0, 10.0)
        res = train_stage(
            st, cfg.unet_train, run_dir=out, num_items=len(images), seed=cfg.seed + 1,
            resume=resume and bool(list_checkpoints(out, "diffusion")), time_budget_s=unet_budget,
            writer=writer, progress=progress,
        )  # fmt: skip
        final_unet = res.ema.model if res.ema is not None else unet
        final_unet.save_pretrained(out / "unet")
        stopped = res.stopped_because
        if writer is not None:
            writer.close()
        if stopped not in ("signal", "bad loss"):
            preview = _diffusion_preview(vae, cfg, out, device, per_row=8, class_names=class_names)
            grid = preview(res.steps_done, final_unet.eval())
            if grid is not None:
                import shutil

                shutil.copyfile(grid, out / "samples.png")
        _plot_loss(out)
        return RunResult(out, vae_steps, res.steps_done, time.perf_counter() - t_start, stopped)


# training settings that a resumed run may change; everything else comes from its run.json
_CHANGEABLE_ON_RESUME = (
    "time_budget", "budget_split", "device", "vae_train", "unet_train", "preview_sampler", "preview_steps",
    "guidance_scale",
)  # fmt: skip


def _batches(images: Tensor, device: torch.device, batch: int = 256, limit: int = 4096):
    for s in range(0, min(len(images), limit), batch):
        yield _to_float(images[s : s + batch]).to(device)


@torch.no_grad()
def _vae_round_trip_check(vae: Autoencoder, images: Tensor, device: torch.device) -> None:
    """One encode/decode before training, so a broken config fails in seconds, not hours."""
    was_training = vae.training
    vae.eval()
    x = _to_float(images[:2]).to(device)
    post = vae.encode(x)
    recon = vae.decode(post.mode())
    vae.train(was_training)
    if recon.shape != x.shape or not torch.isfinite(recon).all():
        raise ValueError(
            f"the autoencoder maps {tuple(x.shape)} to {tuple(recon.shape)} (finite: "
            f"{bool(torch.isfinite(recon).all())}); check the vae config"
        )


def _sanity_check(images: Tensor, cfg: RunConfig) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"the data loader returned {images.dtype} {tuple(images.shape)}; expected uint8 (N, C, H, W)"
        )
    lo, hi = int(images.min()), int(images.max())
    if hi - lo < 8:
        raise ValueError(
            f"every training image is (nearly) one flat value ({lo}..{hi}); check the data"
        )
    if images.shape[-1] != cfg.image_size:
        raise ValueError(f"images are {images.shape[-1]} px but image_size is {cfg.image_size}")


def _announce(
    name: str, model: torch.nn.Module, per_micro: float, cfg: TrainConfig, n: int
) -> None:
    steps_per_epoch = max(1, n // cfg.batch_size)
    per_step = per_micro * cfg.grad_accum
    log.info(
        "%s: %s; ~%.2f s/step (%.0f img/s), ~%.0f s/epoch of %d images; model state ~%.0f MB",
        name, model.summary() if hasattr(model, "summary") else type(model).__name__, per_step,
        cfg.batch_size / per_step, per_step * steps_per_epoch, n, _model_memory_mb(model),
    )  # fmt: skip


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        log.info(
            "TensorBoard is not installed (pip install tensorboard): scalars go to log.jsonl only"
        )
        return None
    return SummaryWriter(log_dir=str(out / "tb"))


def _cached_moments(vae: Autoencoder, images: Tensor, out: Path, device: torch.device) -> Tensor:
    """Encode the data once; reuse the cache when it was made by these VAE weights from this data."""
    from ..checkpoint import WEIGHTS_NAME

    path = out / "latents.safetensors"
    vae_id = str((out / "vae" / WEIGHTS_NAME).stat().st_mtime_ns) + f":{len(images)}"
    if path.is_file():
        try:
            cached = load_tensors(path)
            meta = read_json(out / "latents.json") if (out / "latents.json").is_file() else {}
            if meta.get("vae_id") == vae_id:
                return cached["moments"]
        except CheckpointError:
            log.warning("latent cache %s is unreadable; encoding the data again", path)
    t0 = time.perf_counter()
    moments = encode_moments(vae, images, device)
    save_tensors(path, {"moments": moments})
    write_json(out / "latents.json", {"vae_id": vae_id, "shape": list(moments.shape)})
    log.info(
        "encoded %d images into latents %s in %.1f s",
        len(images),
        tuple(moments.shape[1:]),
        time.perf_counter() - t0,
    )
    return moments


def _save_reconstructions(
    vae: Autoencoder, images: Tensor, path: Path, device: torch.device
) -> Path:
    from ..evaluation.grids import save_grid

    was_training = vae.training
    vae.eval()
    with torch.no_grad():
        x = _to_float(images[:32]).to(device)
        recon = vae.decode(vae.encode(x).mode()).clamp(-1, 1).cpu()
    vae.train(was_training)
    pairs = torch.stack([x.cpu(), recon], 1).flatten(0, 1)  # original, reconstruction, ...
    save_grid(pairs, path, nrow=16)
    return path


def _diffusion_preview(
    vae: Autoencoder,
    cfg: RunConfig,
    out: Path,
    device: torch.device,
    per_row: int = 4,
    class_names: list[str] | None = None,
):
    """A function that samples a grid with the given model: one row per class when it has
    classes (row labels = class names), else a square of per_row x per_row images."""
    from ..evaluation.grids import save_grid
    from ..pipeline import LatentDiffusion

    schedule = cfg.diffusion.make_schedule()
    nc = cfg.unet.num_classes
    n = nc * per_row if nc else per_row * per_row
    labels = torch.arange(nc).repeat_interleave(per_row) if nc else None
    row_labels = list(class_names) if nc and class_names and len(class_names) == nc else None

    def preview(step: int, model: torch.nn.Module) -> Path | None:
        was_training = model.training
        model.eval()
        ldm = LatentDiffusion(vae, model, schedule, device=device)
        images = ldm.sample(
            n, sampler=cfg.preview_sampler, steps=cfg.preview_steps, seed=0, class_labels=labels,
            guidance_scale=cfg.guidance_scale,
        )  # fmt: skip
        model.train(was_training)
        path = out / "samples" / f"step-{step:08d}.png"
        save_grid(
            images,
            path,
            nrow=per_row,
            row_labels=row_labels,
            scale=2 if cfg.image_size <= 64 else 1,
        )
        return path

    return preview


def _plot_loss(out: Path) -> None:
    path = out / "log.jsonl"
    if not path.is_file():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed run
            continue
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, name in zip(axes, ("autoencoder", "diffusion")):
        pts = [(r["step"], r["loss"]) for r in rows if r.get("stage") == name]
        if pts:
            ax.plot(*zip(*pts))
        ax.set_title(f"{name} loss")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)

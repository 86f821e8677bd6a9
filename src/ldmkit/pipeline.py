"""LatentDiffusion: a trained autoencoder + denoising UNet + noise schedule, ready to sample.

    ldm = LatentDiffusion.from_run("runs/shapes")
    images = ldm.sample(16, sampler="dpm++2m-sde", steps=20, seed=0)   # (16, C, H, W) in [-1, 1]
    ldm.to_pil(images)[0].save("first.png")

A run folder (ldmkit.runs) holds the config, both models and the data's class names.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .data.transforms import pil_image, to_uint8
from .diffusion.denoiser import Denoiser
from .diffusion.samplers import (
    DEFAULT_SAMPLER,
    DEFAULT_SPACING,
    DEFAULT_STEPS,
    NonFiniteSampleError,
    check_sampler,
    check_start,
    get_sigmas,
    make_denoiser,
    run_sampler,
)
from .diffusion.schedules import NoiseSchedule
from .models.conditioning import ClassConditioner, TextConditioner
from .models.text import AnyTextEncoder, Tokenizer
from .models.unet import UNet
from .models.vae import Autoencoder
from .runs import AdapterFolder, RunFolder
from .runtime import compile_for_sampling, fast_autocast, fast_dtype, resolve_device

log = logging.getLogger(__name__)

# The fast path's bf16 autocast pays off only when a network call has enough arithmetic to hide
# its casts: on a 2-core avx512_bf16 EPYC (bench/vs_diffusers.py, 1 thread, CPU time;
# docs/performance.md) the default UNet (0.19 GFLOP/image) sampled 1 image 0.74x as fast in bf16
# as in float32 and 4 images 0.96-1.06x; the latent8 reference UNet (0.77 GFLOP/image) 1 image
# 1.43-1.68x, and every model at batch 16 and more 1.3-1.8x.
FAST_MIN_GFLOP = 0.5  # UNet GFLOP per call (batch x per image) from which autocast is used


def _weight_gflop(unet: UNet, shape: tuple[int, ...], device: torch.device) -> float:
    """GFLOP of the UNet's convolutions and linear layers on one image (2 per multiply-add;
    attention's own matmuls, about 1 % here, left out), from one forward pass with hooks."""
    flop = 0

    def count(module: torch.nn.Module, _: Any, out: Tensor) -> None:
        nonlocal flop
        # each output value of a conv / linear layer is one weight row's multiply-adds
        channels = out.shape[1] if isinstance(module, torch.nn.Conv2d) else out.shape[-1]
        flop += 2 * module.weight.numel() * (out.numel() // channels)

    layers = [m for m in unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    hooks = [m.register_forward_hook(count) for m in layers]
    try:
        with torch.no_grad():  # .forward, not a call: hooks on the UNet (an NFE counter) miss it
            extra = {"guidance": torch.ones(1, device=device)} if unet.config.guidance_input else {}
            unet.forward(
                torch.zeros(1, *shape, device=device),
                torch.zeros(1, dtype=torch.long, device=device),
                **extra,
            )
    finally:
        for h in hooks:
            h.remove()
    return flop / 1e9


@dataclass(frozen=True)
class Conditions:
    """What n images are conditioned on: class labels (long (n,)) or prompts (n strings) or
    None, negative prompts or None, and the guidance scale (1 = none)."""

    cond: Any
    negative: list[str] | None
    guidance_scale: float
    n: int

    def part(self, start: int, b: int) -> Conditions:
        """The conditions of images start .. start + b."""
        cut = lambda v: None if v is None else v[start : start + b]  # noqa: E731
        return Conditions(cut(self.cond), cut(self.negative), self.guidance_scale, b)


def with_adapters(
    folder: RunFolder, unet: UNet, class_names: Sequence[str] | None,
    adapters: Sequence[tuple[str | os.PathLike, float]],
    text: tuple[AnyTextEncoder, Tokenizer] | None = None,
) -> tuple[UNet, list[str] | None]:  # fmt: skip
    """The run's UNet with the adapters (folder, scale) added in order, and the class names
    with their new classes behind the run's (indices as names where the run has none). A text
    run's adapters teach their new words to `text` (its encoder and tokenizer, in place)."""
    names = list(class_names) if class_names else None
    base = unet.config.num_classes or 0
    if names is None or len(names) != base:
        names = [str(i) for i in range(base)] if base else None
    for i, (path, scale) in enumerate(adapters):
        adapter = AdapterFolder(path)
        adapter.check_fits(folder)
        info = adapter.load_into(unet, f"adapter{i}", scale, text=text)
        if info.class_name is not None and names is not None:
            names.append(info.class_name)
        log.info("adapter %s (scale %g)%s", adapter.path, scale,
                 f": class {info.class_name!r}" if info.class_name else
                 f": word {info.word!r}" if info.word else "")  # fmt: skip
    return unet, names


class LatentDiffusion:
    """Autoencoder + UNet + schedule. Images are (B, C, H, W) float tensors in [-1, 1]."""

    def __init__(
        self,
        vae: Autoencoder,
        unet: UNet,
        schedule: NoiseSchedule,
        *,
        class_names: Sequence[str] | None = None,
        text_encoder: AnyTextEncoder | None = None,
        tokenizer: Tokenizer | None = None,
        device: str | torch.device | None = None,
        guidance_scale: float = 1.0,
        fast: bool = True,
        compile: bool = False,
        default_sampler: str = DEFAULT_SAMPLER,
        default_steps: int = DEFAULT_STEPS,
    ) -> None:
        """`fast`: sample and decode under bf16 autocast where the device runs bf16 natively
        (`runtime.fast_dtype`: CPUs with avx512_bf16 or AMX, CUDA); the sampler's state stays
        float32. `compile`: run the UNet through `torch.compile` with frozen weights (a
        one-off compile of 20-140 s measured on a loaded 2-core CPU, once per batch shape).
        `default_sampler`, `default_steps`: what `sample` uses unless told otherwise (a run's
        own: `RunFolder.default_sampling`, DDIM at a distilled student's step count)."""
        check_sampler(default_sampler)
        self.default_sampler, self.default_steps = default_sampler, int(default_steps)
        self.fast = fast
        self._gflop: float | None = None  # UNet forward per image, counted on first use
        self.guidance_scale = float(guidance_scale)  # used when sample() is given a condition
        self.device = resolve_device(device)
        self.vae = vae.to(self.device).eval()
        self.unet = unet.to(self.device).eval()
        self.schedule = schedule
        self._compiled = compile_for_sampling(self.unet) if compile else None
        latent = self.vae.config.latent_channels
        c_in, c_out = self.unet.config.in_channels, self.unet.config.out_channels
        if c_out != latent or c_in not in (latent, 2 * latent + 1):
            raise ValueError(
                f"the UNet maps {c_in} to {c_out} channels but the autoencoder makes "
                f"{latent}-channel latents; they are not from the same run"
            )
        self.text_encoder = None
        self.conditioner: ClassConditioner | TextConditioner
        if text_encoder is None:
            self.conditioner = ClassConditioner(
                self.unet.config.num_classes, class_names=class_names
            )
            return
        if tokenizer is None:
            raise ValueError("a text encoder needs its tokenizer; pass tokenizer=")
        if self.unet.config.context_dim != text_encoder.config.width:
            raise ValueError(
                f"the UNet's context_dim {self.unet.config.context_dim} differs from the text "
                f"encoder's width {text_encoder.config.width}; they are not from the same run"
            )
        self.text_encoder = text_encoder.to(self.device).eval()
        self.conditioner = TextConditioner(tokenizer, self.text_encoder)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_run(
        cls, run_dir: str | os.PathLike, device: str | torch.device | None = None, *,
        fast: bool = True, compile: bool = False,
        adapters: Sequence[tuple[str | os.PathLike, float]] = (),
    ) -> LatentDiffusion:  # fmt: skip
        """Load a trained run folder (as written by `ldmkit train`); `fast`, `compile`: see
        `__init__`. `adapters`: (folder, scale) of adapters written by `ldmkit finetune`, each
        checked against the run's weights and added to the UNet; a new class of one becomes the
        next class label, named as it was taught."""
        folder = RunFolder(run_dir).require_trained()
        for problem in folder.warnings():  # a failed or cut-short stage: say so at every use
            log.warning("%s: %s", folder.path, problem)
        cfg = folder.config()
        dev = resolve_device(device)
        text = {}
        if folder.has_text():
            text = {
                "text_encoder": folder.load_text_encoder(dev),
                "tokenizer": folder.load_tokenizer(),
            }
        sampler, steps = folder.default_sampling()
        unet, class_names = folder.load_unet(dev), folder.data_info().class_names
        if adapters:
            words = (text["text_encoder"], text["tokenizer"]) if text else None
            unet, class_names = with_adapters(folder, unet, class_names, adapters, text=words)
        return cls(
            folder.load_vae(dev), unet, cfg.diffusion.make_schedule(),
            class_names=class_names, device=dev,
            guidance_scale=cfg.sampling_guidance, fast=fast, compile=compile,
            default_sampler=sampler, default_steps=steps, **text,
        )  # fmt: skip

    @property
    def is_text_conditional(self) -> bool:
        return isinstance(self.conditioner, TextConditioner)

    @property
    def class_names(self) -> list[str] | None:
        return self.conditioner.class_names

    # ------------------------------------------------------------------ latents
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.out_channels, c.sample_size, c.sample_size)

    @property
    def is_inpainting_model(self) -> bool:
        """Whether the UNet also takes a mask and the masked latent (a run trained with
        task=inpaint): 2 * latent + 1 input channels."""
        return self.unet.config.in_channels != self.unet.config.out_channels

    def network(
        self, mask: Tensor | None = None, known: Tensor | None = None, *, float_out: bool = False
    ) -> Callable[..., Tensor]:
        """The network function the denoiser calls, model(x_t, t, **cond): the UNet (compiled
        when asked for), or for an inpainting model the UNet given the latent mask (B, 1, h, w;
        1 = regenerate) and the known latent outside it as extra inputs. Without a mask it
        regenerates everything (what it learned from its fully masked training images).
        Guidance's doubled batch gets the extra inputs repeated. `float_out`: the prediction is
        cast back to float32, for a caller under the fast path's autocast (so the sampler's own
        arithmetic stays float32)."""
        unet = self._compiled if self._compiled is not None else self.unet
        inpainting = self.is_inpainting_model
        if not (float_out or inpainting):
            return unet

        def network(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
            if inpainting:
                b, c, h, w = x.shape
                if mask is None:
                    extra = torch.cat([x.new_ones(b, 1, h, w), x.new_zeros(b, c, h, w)], 1)
                else:
                    extra = torch.cat([mask, known * (1 - mask)], 1).to(x)
                    extra = extra.repeat(b // extra.shape[0], 1, 1, 1)
                x = torch.cat([x, extra], 1)
            out = unet(x, t, **cond)
            return out.float() if float_out else out

        return network

    @property
    def downsampling(self) -> int:
        """Pixels per latent cell along each side (the autoencoder's factor f)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model makes and edits."""
        size = self.unet.config.sample_size * self.downsampling
        return (self.vae.config.image_channels, size, size)

    @torch.no_grad()
    def encode(
        self, images: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Images in [-1, 1] -> scaled latents (what the UNet sees)."""
        post = self.vae.encode(images.to(self.device, torch.float32))
        z = post.sample(generator=generator) if sample else post.mode()
        return z * self.vae.config.scaling_factor

    @property
    def fast_dtype(self) -> torch.dtype | None:
        """The dtype the fast path computes in here (None: float32 throughout)."""
        return fast_dtype(self.device) if self.fast else None

    def uses_fast_path(self, batch: int, fast: bool | None = None) -> bool:
        """Whether a batch of `batch` images samples under bf16 autocast: where the device has
        fast bf16 and the call is big enough to gain from it (FAST_MIN_GFLOP). A function of
        the model, the batch and the device only, so a seed gives the same images each time."""
        if not (self.fast if fast is None else fast) or fast_dtype(self.device) is None:
            return False
        if self._gflop is None:
            c = self.unet.config  # the UNet's input: an inpainting model's has more channels
            self._gflop = _weight_gflop(
                self.unet, (c.in_channels, c.sample_size, c.sample_size), self.device
            )
        return batch * self._gflop >= FAST_MIN_GFLOP

    @torch.no_grad()
    def decode(self, latents: Tensor, *, fast: bool | None = None) -> Tensor:
        """Scaled latents -> images clamped to [-1, 1] (float32); under bf16 autocast when
        `fast` (None: `uses_fast_path` for this batch) and the device runs bf16 natively."""
        z = latents.to(self.device, torch.float32) / self.vae.config.scaling_factor
        fast = self.uses_fast_path(len(z)) if fast is None else fast
        with fast_autocast(self.device, fast):
            x = self.vae.decode(z).float()
        if not bool(torch.isfinite(x).all()):  # never hand on garbage as images
            raise NonFiniteSampleError(
                "the autoencoder decoded the latents into non-finite values (NaN or inf); check "
                "its weights, or the latents given to it"
            )
        return x.clamp(-1, 1)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        seed: int | None = 0,
        class_labels: Sequence[int] | Tensor | None = None,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        batch_size: int = 64,
        return_latents: bool = False,
        callback: Callable[..., Any] | None = None,
        fast: bool | None = None,
        **sampler_options: Any,
    ) -> Tensor:
        """Draw n images (B, C, H, W) in [-1, 1] on the CPU.

        The same seed gives the same images whatever the batch size: each image's starting
        noise and per-step noise come from one generator seeded by (seed, image index).
        A class-conditional model takes `class_labels`, a text-conditional one `prompt` (one for
        all images, or n) and `negative_prompt` (the unconditional branch of guidance instead
        of ""); without them the model samples unconditionally. `guidance_scale`
        (classifier-free guidance; 1 = none) applies with a condition only; None takes the
        run's default (`guidance_scale`). `fast` (None: `self.fast`) runs the UNet and the
        decoder under bf16 autocast where that is fast (`uses_fast_path`); False keeps float32.
        `sampler`, `steps`: None takes the model's defaults (`default_sampler`, `default_steps`).
        """
        sampler = self.default_sampler if sampler is None else sampler
        steps = self.default_steps if steps is None else steps
        check_sampler(sampler)
        fast = self.fast if fast is None else fast
        assert n >= 1, n  # the fronts check it (ldmkit.options)
        conditions = self.conditions(n, class_labels, prompt, negative_prompt, guidance_scale)
        seed = int(torch.randint(0, 2**31, (1,)).item()) if seed is None else seed
        sigmas = self.sigmas(sampler, steps, sampler_options.pop("spacing", None))
        out = []
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + start)
            # one autocast region for all steps: it casts each weight to bf16 once, not per call
            # (under no_grad: in inference_mode autocast's weight cache is off)
            fast_here = self.uses_fast_path(b, fast)
            denoise = self.denoiser(
                conditions.part(start, b), guidance_rescale=guidance_rescale, fast=fast_here
            )
            x_T = torch.randn((b, *self.latent_shape), generator=gen).to(self.device)
            with fast_autocast(self.device, fast_here):
                z = run_sampler(
                    denoise, x_T, sigmas, sampler=sampler, generator=gen, callback=callback,
                    **sampler_options,
                )  # fmt: skip
            out.append((z if return_latents else self.decode(z, fast=fast_here)).float().cpu())
        return torch.cat(out)

    def sigmas(self, sampler: str, steps: int, spacing: str | None = None) -> Tensor:
        """The noise levels `sample` walks down for this sampler and step count (float64,
        steps + 1, ending in 0), checked against the model's prediction type."""
        check_sampler(sampler)
        sigmas = get_sigmas(self.schedule, steps, spacing or DEFAULT_SPACING[sampler])
        check_start(sigmas, self.unet.config.prediction_type)
        return sigmas

    def conditions(
        self,
        n: int,
        class_labels: Sequence[int] | Tensor | None = None,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        guidance_scale: float | None = None,
    ) -> Conditions:
        """The checked conditions of n images (labels or prompts, negative prompts) and the
        guidance scale (None: the run's default with a condition, else 1)."""
        cond_all, negative = self._check_conditions(n, class_labels, prompt, negative_prompt)
        if guidance_scale is None:
            guidance_scale = self.guidance_scale if cond_all is not None else 1.0
        return Conditions(cond_all, negative, float(guidance_scale), n)

    def denoiser(
        self,
        conditions: Conditions,
        *,
        guidance_rescale: float = 0.0,
        network: Callable[..., Tensor] | None = None,
        fast: bool = False,
    ) -> Denoiser:
        """The denoiser (x, sigma) -> x0 of images with these conditions (for b = len(conditions)
        images): the UNet (or `network`, a wrapper of it) with the condition bound, under
        classifier-free guidance when the scale is not 1. `fast`: the network's prediction is
        cast back to float32 (for a caller that runs it under the fast path's autocast)."""
        b, guidance = conditions.n, conditions.guidance_scale
        if self.unet.config.guidance_input:  # a student that takes w: one call, no CFG pair
            if conditions.negative is not None:
                raise ValueError(
                    "this model takes the guidance scale as an input and has no unconditional "
                    "branch to steer: a negative prompt does not apply; drop it"
                )
            cond, _ = self.conditioner.sampling_kwargs(conditions.cond, b, 1.0, self.device)
            cond["guidance"] = torch.full((b,), guidance, device=self.device)
            return make_denoiser(
                network or self.network(float_out=fast), self.schedule,
                self.unet.config.prediction_type, cond=cond,
            )  # fmt: skip
        if conditions.negative is not None:
            cond, uncond = self.conditioner.sampling_kwargs(
                conditions.cond, b, guidance, self.device, negative=conditions.negative
            )
        else:
            cond, uncond = self.conditioner.sampling_kwargs(
                conditions.cond, b, guidance, self.device
            )
        return make_denoiser(
            network or self.network(float_out=fast), self.schedule, self.unet.config.prediction_type, cond=cond,
            uncond=uncond, guidance_scale=guidance, guidance_rescale=guidance_rescale,
        )  # fmt: skip

    def _check_conditions(
        self, n: int, class_labels: Any, prompt: Any, negative_prompt: Any
    ) -> tuple[Any, Any]:
        """The per-image condition (labels or prompts) and negative prompts, checked."""
        if self.is_text_conditional:
            if class_labels is not None:
                raise ValueError("this model follows text prompts, not class labels; pass prompt=")
            return self.conditioner.check(prompt, n), self.conditioner.check(negative_prompt, n)
        if prompt is not None or negative_prompt is not None:
            how = " (pass class_labels=)" if self.conditioner.enabled else ""
            raise ValueError(
                f"this model has no text conditioning, so it cannot follow a prompt{how}"
            )
        return self.conditioner.check(class_labels, n), None

    def sample_grid(
        self, n: int, **sample_kwargs: Any
    ) -> tuple[Tensor, int | None, list[str] | None]:
        """n images for a grid: one row per class (labelled with its name) for a class-conditional
        model, else unconditional. Returns (images, images per row or None, row labels or None).
        Every class has a row (`conditioning.row_layout`; a multiple of the classes fills them)."""
        labels, per_row, row_labels = self.conditioner.grid_labels(n)
        if labels is not None:
            sample_kwargs["class_labels"] = labels
        return self.sample(n, **sample_kwargs), per_row, row_labels

    def prompt_grid(
        self, prompts: Sequence[str], per_row: int, **sample_kwargs: Any
    ) -> tuple[Tensor, int, list[str]]:
        """One row of `per_row` images per prompt (row labels = the prompts)."""
        texts = [p for p in prompts for _ in range(per_row)]
        return self.sample(len(texts), prompt=texts, **sample_kwargs), per_row, list(prompts)

    def estimate_seconds(
        self, n: int, *, sampler: str = DEFAULT_SAMPLER, steps: int | Sequence[int] = DEFAULT_STEPS,
        batch_size: int = 64, guidance_scale: float | None = None, **sampler_options: Any,
    ) -> float:  # fmt: skip
        """Wall time `sample(n, ...)` will take here (summed over several step counts, as the rows
        of a table), from a short timed probe: one batch through 3 steps of the same sampler,
        with class labels and guidance as a class-conditional grid draws them. The time between
        the probe's steps is the cost of a step, the rest the fixed cost of a batch."""
        counts = [steps] if isinstance(steps, int) else list(steps)
        k, probe = min(batch_size, n), min(3, *counts)
        condition: dict[str, Any] = {}
        if self.is_text_conditional:
            condition["prompt"] = [""] * k
        elif self.conditioner.num_classes:
            condition["class_labels"] = torch.arange(k) % self.conditioner.num_classes
        marks: list[float] = []
        t0 = time.perf_counter()
        self.sample(
            k, sampler=sampler, steps=probe, seed=0, batch_size=k, **condition,
            guidance_scale=guidance_scale, callback=lambda *_: marks.append(time.perf_counter()),
            **sampler_options,
        )  # fmt: skip
        total = time.perf_counter() - t0
        per_step = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else total / probe
        fixed = max(total - per_step * probe, 0.0)
        return sum(fixed + per_step * c for c in counts) * n / k

    @staticmethod
    def to_pil(images: Tensor) -> list[Any]:
        """(B, C, H, W) in [-1, 1] -> list of PIL images."""
        arr = to_uint8(images.clamp(-1, 1)).permute(0, 2, 3, 1).cpu().numpy()
        return [pil_image(a) for a in arr]

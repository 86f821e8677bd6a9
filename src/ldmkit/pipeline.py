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
from typing import Any

import torch
from torch import Tensor

from .data.transforms import to_uint8
from .diffusion.samplers import DEFAULT_SAMPLER, NonFiniteSampleError, check_sampler, sample
from .diffusion.schedules import NoiseSchedule
from .models.conditioning import ClassConditioner, TextConditioner
from .models.text import TextEncoder, Tokenizer
from .models.unet import UNet
from .models.vae import Autoencoder
from .runs import RunFolder
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
            unet.forward(
                torch.zeros(1, *shape, device=device),
                torch.zeros(1, dtype=torch.long, device=device),
            )
    finally:
        for h in hooks:
            h.remove()
    return flop / 1e9


class LatentDiffusion:
    """Autoencoder + UNet + schedule. Images are (B, C, H, W) float tensors in [-1, 1]."""

    def __init__(
        self,
        vae: Autoencoder,
        unet: UNet,
        schedule: NoiseSchedule,
        *,
        class_names: Sequence[str] | None = None,
        text_encoder: TextEncoder | None = None,
        tokenizer: Tokenizer | None = None,
        device: str | torch.device | None = None,
        guidance_scale: float = 1.0,
        fast: bool = True,
        compile: bool = False,
    ) -> None:
        """`fast`: sample and decode under bf16 autocast where the device runs bf16 natively
        (`runtime.fast_dtype`: CPUs with avx512_bf16 or AMX, CUDA); the sampler's state stays
        float32. `compile`: run the UNet through `torch.compile` with frozen weights (a
        one-off compile of 20-140 s measured on a loaded 2-core CPU, once per batch shape)."""
        self.fast = fast
        self._gflop: float | None = None  # UNet forward per image, counted on first use
        self.default_guidance = float(guidance_scale)  # used when sample() is given a condition
        self.device = resolve_device(device)
        self.vae = vae.to(self.device).eval()
        self.unet = unet.to(self.device).eval()
        self.schedule = schedule
        self._compiled = compile_for_sampling(self.unet) if compile else None
        if self.unet.config.in_channels != self.vae.config.latent_channels:
            raise ValueError(
                f"the UNet takes {self.unet.config.in_channels} channels but the autoencoder makes "
                f"{self.vae.config.latent_channels}-channel latents; they are not from the same run"
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
    ) -> LatentDiffusion:  # fmt: skip
        """Load a trained run folder (as written by `ldmkit train`); `fast`, `compile`: see
        `__init__`."""
        folder = RunFolder(run_dir).require_trained()
        cfg = folder.config()
        dev = resolve_device(device)
        text = {}
        if folder.has_text():
            text = {
                "text_encoder": folder.load_text_encoder(dev),
                "tokenizer": folder.load_tokenizer(),
            }
        return cls(
            folder.load_vae(dev), folder.load_unet(dev), cfg.diffusion.make_schedule(),
            class_names=folder.data_info().class_names, device=dev,
            guidance_scale=cfg.guidance_scale, fast=fast, compile=compile, **text,
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
        return (c.in_channels, c.sample_size, c.sample_size)

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
            self._gflop = _weight_gflop(self.unet, self.latent_shape, self.device)
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
        sampler: str = DEFAULT_SAMPLER,
        steps: int = 20,
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
        run's default (`default_guidance`). `fast` (None: `self.fast`) runs the UNet and the
        decoder under bf16 autocast where that is fast (`uses_fast_path`); False keeps float32.
        """
        check_sampler(sampler)
        fast = self.fast if fast is None else fast
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        cond_all, negative = self._check_conditions(n, class_labels, prompt, negative_prompt)
        if guidance_scale is None:
            guidance_scale = self.default_guidance if cond_all is not None else 1.0
        seed = int(torch.randint(0, 2**31, (1,)).item()) if seed is None else seed
        out = []
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + start)
            part = cond_all[start : start + b] if cond_all is not None else None
            if negative is not None:
                cond, uncond = self.conditioner.sampling_kwargs(
                    part, b, guidance_scale, self.device, negative=negative[start : start + b]
                )
            else:
                cond, uncond = self.conditioner.sampling_kwargs(
                    part, b, guidance_scale, self.device
                )
            # one autocast region for all steps: it casts each weight to bf16 once, not per call
            fast_here = self.uses_fast_path(b, fast)
            with fast_autocast(self.device, fast_here):
                z = sample(
                    self._network(fast_here), self.schedule, (b, *self.latent_shape),
                    sampler=sampler, steps=steps, prediction_type=self.unet.config.prediction_type,
                    generator=gen, callback=callback, cond=cond, uncond=uncond,
                    guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                    device=self.device, **sampler_options,
                )  # fmt: skip
            out.append((z if return_latents else self.decode(z, fast=fast_here)).float().cpu())
        return torch.cat(out)

    def _network(self, fast: bool) -> Callable[..., Tensor]:
        """The UNet as the sampler calls it (compiled or not). Under the fast path's autocast
        its prediction is cast back to float32, so the sampler's arithmetic (elementwise ops,
        which autocast leaves alone) stays float32."""
        net = self._compiled if self._compiled is not None else self.unet
        if not fast:
            return net

        def network(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
            return net(x, t, **cond).float()

        return network

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
        model, else unconditional. Returns (images, images per row or None, row labels or None)."""
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
        self, n: int, *, sampler: str = DEFAULT_SAMPLER, steps: int | Sequence[int] = 20,
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
        from PIL import Image

        arr = to_uint8(images.clamp(-1, 1)).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]

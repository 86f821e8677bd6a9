"""ldmkit against diffusers on identical models: forward, training, VAE and sampling speed.

    python bench/vs_diffusers.py                        # every row (tens of minutes)
    python bench/vs_diffusers.py --rows forward,small   # some rows
    python bench/vs_diffusers.py --models latent8 --rows sample
    python bench/vs_diffusers.py --quick                # seconds, tiny models (the CI smoke run)

Builds each reference model of shared/PERF_ANCHORS.md in both libraries with the same weights
(ldmkit's interop name tables), prints how far their outputs differ, then times them
interleaved (A B A B ...; warm-up, medians) and prints images/s, the ratio ldmkit/diffusers,
ldmkit's achieved GFLOP/s (bench/model_flops.py's counting) and its share of the fp32 and bf16
peaks of a large 1x1 convolution measured in the same run. "fast" is ldmkit's fast path (bf16
autocast where the CPU runs bf16 natively; `ldmkit.runtime.fast_dtype`) against diffusers in
fp32; "compiled" (--compile) adds torch.compile with frozen weights (sampling rows only).

Rows: parity (output differences), forward (batch 1/16/64), train (fwd + bwd + AdamW, batch
32/64), vae (encode/decode, batch 64), sample (64 images, dpm++2m 20 steps and ddim 50 steps +
decode, against DPMSolverMultistepScheduler / DDIMScheduler loops), small (sampling 1 and 4
images, latent8), overhead (the sampler without the network at batch 64), profile (where
ldmkit's forward spends its time, by kind of op and by convolution shape, fp32 and fast, at
--profile-batch: the cause of a share of peak). Models: latent8,
latent16 (block channels (128, 256, 256)), default (ldmkit's recipe UNet + VAE), pixel (DDPM's
CIFAR-10 layout at half width: 3x32x32, (64, 128, 128, 128)).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from benchlib import (
    clock_name,
    interleaved,
    load_line,
    machine_line,
    peak_gflops,
    perturb,
    print_table,
    use_cpu_clock,
)
from model_flops import UNET_BASE, UNET_REFERENCES, forward_gflop
from torch import nn

from ldmkit.diffusion.samplers import sample as ldmkit_sample
from ldmkit.diffusion.schedules import make_schedule
from ldmkit.interop.unet_names import diffusers_unet_config, state_dict_to_diffusers
from ldmkit.interop.vae_names import diffusers_vae_config
from ldmkit.interop.vae_names import state_dict_to_diffusers as vae_state_dict_to_diffusers
from ldmkit.models import Autoencoder, AutoencoderConfig, UNet, UNetConfig
from ldmkit.pipeline import LatentDiffusion
from ldmkit.runtime import compile_for_sampling, fast_autocast, fast_dtype, tune_allocator

ROWS = ("parity", "forward", "train", "vae", "sample", "small", "overhead", "profile")
PIXEL = dict(UNET_REFERENCES[2][1], block_out_channels=(64, 128, 128, 128))
# name: (UNetConfig kwargs, AutoencoderConfig kwargs or None for a pixel model)
MODELS: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    "latent8": ({**UNET_BASE, "sample_size": 8, "attention_resolutions": (4, 2)},
                {"block_out_channels": (64, 128, 128), "layers_per_block": 2, "norm_groups": 32}),
    "latent16": ({**UNET_BASE, "sample_size": 16, "attention_resolutions": (8, 4)},
                 {"block_out_channels": (64, 128), "layers_per_block": 2, "norm_groups": 32}),
    "default": ({}, {}),
    "pixel": ({**UNET_BASE, **PIXEL}, None),
}  # fmt: skip
QUICK_MODEL = ({**UNET_BASE, "sample_size": 8, "attention_resolutions": (4,),
                "block_out_channels": (32, 64), "norm_num_groups": 16},
               {"block_out_channels": (16, 32, 32), "layers_per_block": 1, "norm_groups": 8})  # fmt: skip
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


@dataclass
class Models:
    """One reference config in both libraries, with the same weights."""

    name: str
    unet: UNet
    d_unet: nn.Module
    vae: Autoencoder | None
    d_vae: nn.Module | None
    gflop: float  # ldmkit UNet forward, per image
    vae_gflop: tuple[float, float]  # encode, decode per image

    @property
    def shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)


def build(name: str, unet_kw: dict[str, Any], vae_kw: dict[str, Any] | None) -> Models:
    torch.manual_seed(0)
    unet = perturb(UNet(UNetConfig(**unet_kw))).eval()
    kind, kw = diffusers_unet_config(unet.config)
    import diffusers

    d_unet = getattr(diffusers, kind)(**kw).eval()
    d_unet.load_state_dict(state_dict_to_diffusers(unet.state_dict()))
    c = unet.config
    gflop = forward_gflop(unet, torch.randn(1, c.in_channels, c.sample_size, c.sample_size),
                          torch.tensor([500]))  # fmt: skip
    if vae_kw is None:
        return Models(name, unet, d_unet, None, None, gflop, (0.0, 0.0))
    vae = perturb(Autoencoder(AutoencoderConfig(**vae_kw))).eval()
    d_vae = diffusers.AutoencoderKL(**diffusers_vae_config(vae.config)).eval()
    d_vae.load_state_dict(vae_state_dict_to_diffusers(vae.state_dict()))
    img = torch.randn(1, vae.config.image_channels, vae.config.image_size, vae.config.image_size)
    enc = forward_gflop(nn.Sequential(vae.encoder, vae.quant_conv), img)
    dec = forward_gflop(
        nn.Sequential(vae.post_quant_conv, vae.decoder), torch.randn(1, *vae.latent_shape())
    )
    return Models(name, unet, d_unet, vae, d_vae, gflop, (enc, dec))


def inputs(m: Models, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(b)
    return torch.randn(b, *m.shape, generator=g), torch.randint(0, 1000, (b,), generator=g)


class Bench:
    """Collects the table's rows; each row times its functions interleaved."""

    def __init__(self, args: argparse.Namespace, peaks: dict[str, float]) -> None:
        self.a, self.peaks = args, peaks
        self.rows: list[tuple[object, ...]] = []
        self.overhead: list[tuple[object, ...]] = []
        self.fast = fast_dtype(torch.device("cpu")) is not None

    def row(self, what: str, model: str, batch: int, gflop_per_img: float,
            fns: dict[str, Callable[[], object]], repeats: int, note: str = "") -> None:  # fmt: skip
        """fns: "ldmkit", "diffusers", optionally "fast" and "compiled" (ldmkit variants)."""
        sec = interleaved(fns, repeats, warmup=1)
        ips = {k: batch / v for k, v in sec.items()}
        gfs = ips["ldmkit"] * gflop_per_img
        fast = ips.get("fast")
        self.rows.append((
            what, model, batch, ips["ldmkit"], ips["diffusers"], ips["ldmkit"] / ips["diffusers"],
            fast, fast / ips["diffusers"] if fast else None,
            ips.get("compiled"), ips["compiled"] / ips["diffusers"] if "compiled" in ips else None,
            gfs, 100 * gfs / self.peaks["fp32"],
            100 * fast * gflop_per_img / self.peaks["bf16"] if fast else None, note,
        ))  # fmt: skip
        print(f"  {what} {model} b{batch}: ldmkit {ips['ldmkit']:.3g} img/s, diffusers "
              f"{ips['diffusers']:.3g}, fast {fast or 0:.3g} ({load_line()})", flush=True)  # fmt: skip

    def print(self) -> None:
        print_table(
            ["row", "model", "batch", "ldmkit img/s", "diffusers img/s", "ratio", "fast img/s",
             "fast ratio", "compiled img/s", "comp. ratio", "ldmkit GFLOP/s", "% fp32 pk",
             "fast % bf16 pk", "note"],
            self.rows,
        )  # fmt: skip


def forward_rows(bench: Bench, m: Models, batches: list[int]) -> None:
    for b in batches:
        x, t = inputs(m, b)

        def run(net: nn.Module, theirs: bool, fast: bool = False) -> Callable[[], object]:
            def go() -> object:
                with torch.inference_mode(), fast_autocast(torch.device("cpu"), fast):
                    return net(x, t).sample if theirs else net(x, t)

            return go

        fns = {"ldmkit": run(m.unet, False), "diffusers": run(m.d_unet, True)}
        if bench.fast:
            fns["fast"] = run(m.unet, False, fast=True)
        bench.row("forward", m.name, b, m.gflop, fns, bench.a.repeats)


def train_rows(bench: Bench, m: Models, batches: list[int]) -> None:
    for b in batches:
        x, t = inputs(m, b)
        target = torch.randn_like(x)

        def step(net: nn.Module, theirs: bool, bf16: bool = False) -> Callable[[], object]:
            net = net.train()
            opt = torch.optim.AdamW(net.parameters(), lr=1e-6)

            def go() -> object:
                with fast_autocast(torch.device("cpu"), bf16):
                    out = net(x, t).sample if theirs else net(x, t)
                loss = (out.float() - target).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            return go

        fns = {"ldmkit": step(m.unet, False), "diffusers": step(m.d_unet, True)}
        if bench.fast:
            fns["fast"] = step(m.unet, False, bf16=True)
        bench.row("train", m.name, b, 3 * m.gflop, fns, max(2, bench.a.repeats // 2),
                  note="bf16 autocast = train option bf16")  # fmt: skip
        m.unet.eval(), m.d_unet.eval()


def vae_rows(bench: Bench, m: Models, b: int) -> None:
    if m.vae is None:
        return
    c = m.vae.config
    img = torch.randn(b, c.image_channels, c.image_size, c.image_size)
    z = torch.randn(b, *m.vae.latent_shape())

    def enc(net: nn.Module, theirs: bool, fast: bool = False) -> Callable[[], object]:
        def go() -> object:
            with torch.inference_mode(), fast_autocast(torch.device("cpu"), fast):
                return net.encode(img).latent_dist.mean if theirs else net.encode(img).mean

        return go

    def dec(net: nn.Module, theirs: bool, fast: bool = False) -> Callable[[], object]:
        def go() -> object:
            with torch.inference_mode(), fast_autocast(torch.device("cpu"), fast):
                return net.decode(z).sample if theirs else net.decode(z)

        return go

    for what, make, gflop in (("encode", enc, m.vae_gflop[0]), ("decode", dec, m.vae_gflop[1])):
        fns = {"ldmkit": make(m.vae, False), "diffusers": make(m.d_vae, True)}
        if bench.fast:
            fns["fast"] = make(m.vae, False, fast=True)
        bench.row(f"vae {what}", m.name, b, gflop, fns, bench.a.repeats)


def _scheduler(sampler: str, m: Models) -> Any:
    """The diffusers scheduler that computes what ldmkit's `sampler` computes."""
    import diffusers

    kw = dict(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="trailing",
              prediction_type=DIFFUSERS_PREDICTION[m.unet.config.prediction_type])  # fmt: skip
    if sampler == "ddim":
        return diffusers.DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=True)
    return diffusers.DPMSolverMultistepScheduler(
        **kw, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"
    )


def diffusers_sampling(m: Models, scheduler: Any, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """The loop of a diffusers pipeline: scheduler.step on the UNet's output, then decode."""
    with torch.inference_mode():
        scheduler.set_timesteps(steps)
        x = x_T * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            out = m.d_unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(out, t, x).prev_sample
        if m.d_vae is None:
            return x.clamp(-1, 1)
        return m.d_vae.decode(x / m.vae.config.scaling_factor).sample.clamp(-1, 1)


def _pipeline(m: Models, compiled: bool = False) -> LatentDiffusion | None:
    if m.vae is None:
        return None
    return LatentDiffusion(m.vae, m.unet, make_schedule("linear"), device="cpu", compile=compiled)


def ldmkit_sampling(m: Models, ldm: LatentDiffusion | None, sampler: str, n: int, steps: int,
                    fast: bool, net: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """ldmkit's sampling of n images: LatentDiffusion.sample (latent models) or the sampler on
    the pixel UNet, with the same starting noise (seed 0) as `LatentDiffusion.sample`."""
    if ldm is not None:
        return ldm.sample(n, sampler=sampler, steps=steps, seed=0, batch_size=n, fast=fast)
    g = torch.Generator().manual_seed(0)
    # no_grad as in LatentDiffusion.sample: autocast's weight cache is off in inference_mode
    with torch.no_grad(), fast_autocast(torch.device("cpu"), fast):
        x = ldmkit_sample(net or m.unet, make_schedule("linear"), (n, *m.shape), sampler=sampler,
                          steps=steps, prediction_type=m.unet.config.prediction_type, generator=g)  # fmt: skip
    return x.float().clamp(-1, 1)


def sample_rows(bench: Bench, m: Models, n: int, plan: list[tuple[str, int]],
                what: str = "sample") -> None:  # fmt: skip
    ldm = _pipeline(m)
    compiled = None
    if bench.a.compile:
        t0 = time.perf_counter()
        compiled = _pipeline(m, compiled=True) or compile_for_sampling(m.unet)
        ldmkit_sampling(m, compiled if isinstance(compiled, LatentDiffusion) else None,
                        "ddim", n, 2, False, None if isinstance(compiled, LatentDiffusion) else compiled)  # fmt: skip
        print(f"  compile ({m.name}, batch {n}): {time.perf_counter() - t0:.0f} s")
    dec = m.vae_gflop[1] if m.vae is not None else 0.0
    for sampler, steps in plan:
        x_T = torch.randn(n, *m.shape, generator=torch.Generator().manual_seed(0))
        sched = _scheduler(sampler, m)
        ours = ldmkit_sampling(m, ldm, sampler, n, steps, fast=False)
        theirs = diffusers_sampling(m, sched, x_T, steps)
        diff = (ours - theirs).abs().max().item()
        fns: dict[str, Callable[[], object]] = {
            "ldmkit": lambda: ldmkit_sampling(m, ldm, sampler, n, steps, fast=False),
            "diffusers": lambda: diffusers_sampling(m, sched, x_T, steps),
        }
        if bench.fast:
            fns["fast"] = lambda: ldmkit_sampling(m, ldm, sampler, n, steps, fast=True)
        if compiled is not None:
            # what `ldmkit sample --compile` runs: compiled, with the fast path's own choice
            if isinstance(compiled, LatentDiffusion):
                fns["compiled"] = lambda: ldmkit_sampling(m, compiled, sampler, n, steps, fast=True)
            else:
                fns["compiled"] = lambda: ldmkit_sampling(
                    m, None, sampler, n, steps, False, compiled
                )
        bench.row(f"{what} {sampler}-{steps}", m.name, n, steps * m.gflop + dec, fns,
                  bench.a.sample_repeats, note=f"max |diff| {diff:.1e}")  # fmt: skip


def overhead_rows(bench: Bench, m: Models, b: int, steps: int) -> None:
    """Everything but the network call: the sampler (ldmkit: denoiser wrapper, finite check,
    update) and the scheduler loop (diffusers), timed with a trivial network against the real
    one at batch b."""
    x_T = torch.randn(b, *m.shape, generator=torch.Generator().manual_seed(0))
    schedule = make_schedule("linear")

    def trivial_ours(x: torch.Tensor, t: torch.Tensor, **_: Any) -> torch.Tensor:
        return x * 0.5

    class Trivial(nn.Module):
        def forward(self, x: torch.Tensor, t: Any) -> Any:
            return type("Out", (), {"sample": x * 0.5})()

    def ours(net: Callable[..., torch.Tensor], sampler: str) -> Callable[[], object]:
        def go() -> object:
            with torch.inference_mode():
                return ldmkit_sample(net, schedule, x_T.clone(), sampler=sampler, steps=steps,
                                     prediction_type=m.unet.config.prediction_type)  # fmt: skip

        return go

    def theirs(net: nn.Module, sampler: str) -> Callable[[], object]:
        sched = _scheduler(sampler, m)
        bare = Models(m.name, m.unet, net, None, None, m.gflop, (0, 0))
        return lambda: diffusers_sampling(bare, sched, x_T, steps)

    for sampler in ("dpm++2m", "dpm++2m-sde", "ddim"):
        d_sampler = "ddim" if sampler == "ddim" else "dpm++2m"
        sec = interleaved({
            "ours trivial": ours(trivial_ours, sampler), "ours": ours(m.unet, sampler),
            "theirs trivial": theirs(Trivial(), d_sampler), "theirs": theirs(m.d_unet, d_sampler),
        }, bench.a.sample_repeats)  # fmt: skip
        for lib, key in (("ldmkit", "ours"), ("diffusers", "theirs")):
            over, step = sec[f"{key} trivial"] / steps, sec[key] / steps
            print(f"  overhead {lib} {sampler if lib == 'ldmkit' else d_sampler}, {m.name} b{b}: "
                  f"{1e3 * over:.2f} ms of a {1e3 * step:.1f} ms step = {100 * over / step:.2f} %")  # fmt: skip
            bench.overhead.append((lib, sampler if lib == "ldmkit" else d_sampler, m.name, b,
                                   1e3 * over, 1e3 * step, 100 * over / step))  # fmt: skip


# the kinds of op a UNet forward spends its time in (torch.profiler names, self time)
OP_KINDS = {
    "convolution": ("conv", "mkldnn_convolution", "_slow_conv2d", "thnn_conv"),
    "group norm": ("group_norm", "native_group_norm"),
    "silu": ("silu",),
    "attention": ("scaled_dot_product", "_flash_attention", "bmm", "softmax", "baddbmm"),
    "linear": ("addmm", "mm", "linear"),
    "casts / copies": ("copy_", "to", "_to_copy", "contiguous", "clone"),
    "element-wise": ("add", "mul", "cat", "div", "sub", "upsample", "pad"),
}


def op_kind(name: str) -> str:
    bare = name.removeprefix("aten::")
    for kind, keys in OP_KINDS.items():
        if any(bare == k or bare.startswith(k + "_") or bare.startswith("_" + k) for k in keys):
            return kind
    return "other"


def profile_rows(m: Models, b: int, fast: bool, peaks: dict[str, float],
                 repeats: int = 3) -> None:  # fmt: skip
    """Print where one ldmkit forward at batch b spends its time, in one autocast region as
    sampling runs it: (1) by kind of op, as shares of torch.profiler's self time; (2) each
    convolution shape of the model timed alone on the bench's clock (CPU time with --cpu-time,
    so a loaded host does not skew it), with its GFLOP/s, share of the dtype's peak, and share
    of a whole forward timed on the same clock: what is left is the other ops' time."""
    from torch.profiler import ProfilerActivity, profile

    x, t = inputs(m, b)
    cpu = torch.device("cpu")
    calls: dict[tuple[Any, ...], int] = {}  # (x shape, weight shape, stride, padding) -> calls

    def record(module: nn.Module, args: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        key = (tuple(args[0].shape), tuple(module.weight.shape), module.stride, module.padding)
        calls[key] = calls.get(key, 0) + 1

    hooks = [mod.register_forward_hook(record) for mod in m.unet.modules()
             if isinstance(mod, nn.Conv2d)]  # fmt: skip
    # no_grad, not inference_mode: under inference_mode autocast casts every weight again at
    # every call (measured: 231 casts per latent8 forward, 28 % of its time at 1 image)
    with torch.no_grad(), fast_autocast(cpu, fast):
        m.unet(x, t)  # warm-up (oneDNN builds its kernels; autocast caches the bf16 weights)
        for h in hooks:
            h.remove()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                m.unet(x, t)
        forward_s = interleaved({"f": lambda: m.unet(x, t)}, repeats)["f"]
    kinds: dict[str, float] = {}
    for e in prof.key_averages():
        kinds[op_kind(e.key)] = kinds.get(op_kind(e.key), 0.0) + e.self_cpu_time_total
    total = sum(kinds.values())
    dtype = fast_dtype(cpu) if fast else torch.float32
    peak = peaks["bf16" if fast else "fp32"]
    gfs = m.gflop * b / forward_s
    what = f"fast ({dtype} autocast)" if fast else "fp32"
    print(
        f"\nprofile: {m.name} forward, batch {b}, {what}: {1e3 * forward_s:.1f} ms per forward "
        f"({clock_name()}), {gfs:.0f} GFLOP/s = {100 * gfs / peak:.0f} % of the "
        f"{'bf16' if fast else 'fp32'} peak"
    )
    print_table(["kind of op", "% of time"],
                [(k, 100 * v / total) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])])  # fmt: skip
    rows, conv_s, conv_flop = [], 0.0, 0.0
    with torch.inference_mode():
        for (xs, ws, stride, pad), n in calls.items():
            xi, wi = torch.randn(xs, dtype=dtype), torch.randn(ws, dtype=dtype)
            bias = torch.randn(ws[0], dtype=dtype)
            sec = interleaved({"c": lambda: F.conv2d(xi, wi, bias, stride, pad)}, 5)["c"]
            out = F.conv2d(xi, wi, bias, stride, pad)
            flop = 2 * out.numel() * ws[1] * ws[2] * ws[3]
            conv_s, conv_flop = conv_s + n * sec, conv_flop + n * flop
            g = flop / sec / 1e9
            name = f"{'x'.join(map(str, xs[1:]))} * {'x'.join(map(str, ws[:3]))}"
            name += f" /{stride[0]}" if stride[0] != 1 else ""
            rows.append((name, n, 100 * n * sec / forward_s, g, 100 * g / peak))
    rows.sort(key=lambda r: -r[2])
    print(
        f"convolutions alone: {100 * conv_s / forward_s:.0f} % of a forward's time at "
        f"{conv_flop / conv_s / 1e9:.0f} GFLOP/s ({100 * conv_flop / conv_s / 1e9 / peak:.0f} % of "
        f"peak); the other ops take the remaining {max(0.0, 100 * (1 - conv_s / forward_s)):.0f} %"
        f" and do {max(0.0, 100 * (1 - conv_flop / (m.gflop * 1e9 * b))):.0f} % of the FLOPs"
    )
    print_table(
        ["input CxHxW * weight OxIxK", "per fwd", "% of fwd", "GFLOP/s", "% of peak"], rows[:12]
    )


@dataclass
class Plan:
    """Batch sizes and sampling runs of a benchmark run."""

    forward: tuple[int, ...] = (1, 16, 64)
    train: tuple[int, ...] = (32, 64)
    vae: int = 64
    sample_n: int = 64
    sampling: tuple[tuple[str, int], ...] = (("dpm++2m", 20), ("ddim", 50))
    small: tuple[int, ...] = (1, 4)
    overhead: int = 64


QUICK = Plan((1, 4), (4,), 4, 4, (("dpm++2m", 2), ("ddim", 3)), (1,), 4)


def parity_rows(m: Models) -> list[tuple[object, ...]]:
    """How far the two libraries' outputs differ on the same input (batch 2)."""
    x, t = inputs(m, 2)
    with torch.inference_mode():
        d = (m.unet(x, t) - m.d_unet(x, t).sample).abs().max().item()
        out = [(m.name, "unet", f"{m.unet.num_parameters() / 1e6:.2f} M", m.gflop, d)]
        if m.vae is not None:
            z = torch.randn(2, *m.vae.latent_shape())
            d = (m.vae.decode(z) - m.d_vae.decode(z).sample).abs().max().item()
            params = f"{m.vae.num_parameters() / 1e6:.2f} M"
            out.append((m.name, "vae decode", params, m.vae_gflop[1], d))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"subset of {','.join(ROWS)}")
    p.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per row (after a warm-up)")
    p.add_argument("--sample-repeats", type=int, default=2, help="timed rounds of sampling rows")
    p.add_argument("--small", default="1,4", help="numbers of images of the small rows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="add torch.compile to sampling rows")
    p.add_argument("--cpu-time", action="store_true",
                   help="time by process CPU time (robust to a loaded host; use with --threads 1)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny models, tiny batches: seconds")
    p.add_argument("--profile-batch", type=int, default=16, help="batch of the profile rows")
    p.add_argument("--sample-n", type=int, default=64, help="images of the sample rows")
    p.add_argument("--sampling", default="dpm++2m:20,ddim:50",
                   help="sampler:steps runs of the sample rows (the first also for small rows)")  # fmt: skip
    a = p.parse_args(argv)
    rows, names = a.rows.split(","), a.models.split(",")
    for what, asked, known in (("rows", rows, ROWS), ("models", names, MODELS)):
        if unknown := set(asked) - set(known):
            p.error(f"unknown {what} {sorted(unknown)}; choose from {', '.join(known)}")
    torch.set_num_threads(a.threads)
    tune_allocator()
    if a.cpu_time:
        use_cpu_clock()
    if a.quick:
        a.repeats = a.sample_repeats = 1
        plan, models = QUICK, {"quick": QUICK_MODEL}
    else:
        runs = tuple((k, int(v)) for k, v in (r.split(":") for r in a.sampling.split(",")))
        plan = Plan(small=tuple(int(n) for n in a.small.split(",")), sampling=runs,
                    sample_n=a.sample_n)  # fmt: skip
        models = {k: MODELS[k] for k in names}
    print(machine_line())
    size = 512 if a.quick else 2048
    peaks = {"fp32": peak_gflops(torch.float32, size), "bf16": peak_gflops(torch.bfloat16, size)}
    print(f"peak (best of a {size}^3 1x1 conv and a 3x3 conv): fp32 {peaks['fp32']:.0f}, "
          f"bf16 {peaks['bf16']:.0f} GFLOP/s")  # fmt: skip
    bench, parity = Bench(a, peaks), []
    for name, (unet_kw, vae_kw) in models.items():
        m = build(name, unet_kw, vae_kw)
        if "parity" in rows:
            parity += parity_rows(m)
        if "forward" in rows:
            forward_rows(bench, m, plan.forward)
        if "train" in rows:
            train_rows(bench, m, plan.train)
        if "vae" in rows:
            vae_rows(bench, m, plan.vae)
        if "sample" in rows:
            sample_rows(bench, m, plan.sample_n, plan.sampling)
        if "small" in rows and name in ("latent8", "default", "quick"):
            for n in plan.small:
                sample_rows(bench, m, n, plan.sampling[:1], what="small")
        if "overhead" in rows and m.vae is not None:
            overhead_rows(bench, m, plan.overhead, plan.sampling[0][1])
        if "profile" in rows:
            for fast in (False, True) if bench.fast else (False,):
                profile_rows(m, 2 if a.quick else a.profile_batch, fast, peaks)
    end = {"fp32": peak_gflops(torch.float32, size), "bf16": peak_gflops(torch.bfloat16, size)}
    print()
    print(machine_line())
    print(f"peak at the end: fp32 {end['fp32']:.0f}, bf16 {end['bf16']:.0f} GFLOP/s (start: "
          f"{peaks['fp32']:.0f}, {peaks['bf16']:.0f}); fast path here: "
          f"{fast_dtype(torch.device('cpu')) or 'off (float32)'}")  # fmt: skip
    if parity:
        print_table(["model", "part", "params", "GFLOP/img", "max |ldmkit - diffusers|"], parity)
    if bench.rows:
        bench.print()
    if bench.overhead:
        print_table(["library", "sampler", "model", "batch", "overhead ms/step", "step ms",
                     "overhead %"], bench.overhead)  # fmt: skip
    print(
        "command: python bench/vs_diffusers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    )


if __name__ == "__main__":
    main()

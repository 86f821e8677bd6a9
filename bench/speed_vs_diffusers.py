"""ldmkit against diffusers on identical architectures: forward, training and sampling speed.

    python bench/speed_vs_diffusers.py [--threads 2] [--batch 64] [--repeats 3] [--bf16]

Builds the reference configs of shared/PERF_ANCHORS.md (latent8 UNet: block channels
(128, 256, 256), attention at 4x4, 2x2 and mid, head_dim 32; f4 AutoencoderKL (64, 128, 128))
in both libraries with the same weights (copied through ldmkit's name tables), checks the
outputs agree, and prints images/s and the ldmkit/diffusers ratio measured in the same run.
Set MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 for stable numbers (the script
prints whether they are set). Differences under 10-15 % are noise on a shared host.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def best_times(fa, fb, repeats: int) -> tuple[float, float]:
    """Best-of-n wall times of two functions, alternated so host noise hits both alike."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return min(ta), min(tb)


@torch.no_grad()
def perturb(model: torch.nn.Module) -> None:
    """Give zero-initialised layers weights, so the output comparison means something."""
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.02)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both libraries")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import diffusers

    from ldmkit.interop.unet_names import diffusers_unet_config, state_dict_to_diffusers
    from ldmkit.interop.vae_names import diffusers_vae_config
    from ldmkit.interop.vae_names import state_dict_to_diffusers as vae_to_diffusers
    from ldmkit.models import Autoencoder, AutoencoderConfig, UNet, UNetConfig

    env = {k: os.environ.get(k) for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, threads {a.threads}, "
          f"batch {a.batch}, bf16 {a.bf16}, allocator env {env}")  # fmt: skip
    print(f"command: python bench/speed_vs_diffusers.py --threads {a.threads} --batch {a.batch}"
          + (" --bf16" if a.bf16 else ""))  # fmt: skip
    ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16)
    rows = []

    # ---- latent8 UNet
    torch.manual_seed(0)
    ours = UNet(UNetConfig(sample_size=8, in_channels=4, block_out_channels=(128, 256, 256),
                           num_res_blocks=2, norm_num_groups=32, time_injection="add",
                           attention_resolutions=(4, 2), head_dim=32)).eval()  # fmt: skip
    perturb(ours)
    kind, kw = diffusers_unet_config(ours.config)
    theirs = getattr(diffusers, kind)(**kw).eval()
    theirs.load_state_dict(state_dict_to_diffusers(ours.state_dict()))
    x = torch.randn(a.batch, 4, 8, 8)
    t = torch.randint(0, 1000, (a.batch,))
    with torch.no_grad():
        diff = (ours(x, t) - theirs(x, t).sample).abs().max().item()
    print(f"latent8 UNet outputs agree to {diff:.1e}")

    def fwd(m, is_theirs):
        def run():
            with torch.no_grad(), ac:
                m(x, t).sample if is_theirs else m(x, t)

        return run

    def train(m, is_theirs):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def run():
            with ac:
                out = m(x, t).sample if is_theirs else m(x, t)
            out.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    for what, make in (("latent8 UNet forward", fwd), ("latent8 UNet train step", train)):
        training = what.endswith("step")
        o, d = best_times(
            make(ours.train(training), False), make(theirs.train(training), True), a.repeats
        )
        rows.append((what, a.batch / o, a.batch / d))

    # ---- f4 VAE decode
    vae = Autoencoder(
        AutoencoderConfig(block_out_channels=(64, 128, 128), layers_per_block=2, norm_groups=32)
    ).eval()
    perturb(vae)
    dvae = diffusers.AutoencoderKL(**diffusers_vae_config(vae.config)).eval()
    dvae.load_state_dict(vae_to_diffusers(vae.state_dict()))
    z = torch.randn(a.batch, 4, 8, 8)
    with torch.no_grad():
        print(
            f"f4 VAE decode outputs agree to {(vae.decode(z) - dvae.decode(z).sample).abs().max().item():.1e}"
        )

    def dec(m, is_theirs):
        def run():
            with torch.no_grad(), ac:
                m.decode(z).sample if is_theirs else m.decode(z)

        return run

    o, d = best_times(dec(vae, False), dec(dvae, True), a.repeats)
    rows.append(("f4 VAE decode", a.batch / o, a.batch / d))

    print(f"{'what':28s} {'ldmkit img/s':>13s} {'diffusers img/s':>16s} {'ratio':>6s}")
    for what, o, d in rows:
        print(f"{what:28s} {o:13.1f} {d:16.1f} {o / d:6.2f}")


if __name__ == "__main__":
    main()

"""Tiny runs and image folders for the fine-tuning tests (a module of its own name: every test
folder has a conftest.py, so `from conftest import ...` would find whichever came first)."""

from pathlib import Path

import torch


def noisy_unet(config, seed: int):
    """A fresh UNet with seeded noise on every weight (its zero-initialised output conv would
    otherwise block every gradient)."""
    from ldmkit.models.unet import UNet

    unet = UNet(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return unet


def fixed_noise_loss(unet, run, z0, cond) -> float:
    """The run's diffusion loss of `unet` on latents z0 under `cond`, at t and noise drawn from
    seed 0: the same draws for every model compared."""
    from ldmkit.diffusion.losses import training_loss
    from ldmkit.runs import RunFolder

    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 100, (len(z0),), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    cfg = RunFolder(run).config().diffusion
    with torch.no_grad():
        return float(training_loss(
            unet, cfg.make_schedule(), z0, prediction_type=unet.config.prediction_type,
            weighting=cfg.loss_weighting, gamma=cfg.min_snr_gamma, t=t, eps=eps, cond=cond,
        ))  # fmt: skip


def make_adaptable_run(
    folder: Path, *, num_classes: int | None = 3, channels=(8, 16), seed: int = 0
) -> Path:
    """A small run folder whose UNet has attention (at 4x4) and non-zero weights everywhere
    (noise on a fresh UNet: its zero-initialised output conv would otherwise block every
    gradient), 16 px RGB shapes, T = 100; classes c0, c1, c2 (or unconditional)."""
    from ldmkit.models.vae import Autoencoder
    from ldmkit.recipe import resolve_config, run_config_from_dict
    from ldmkit.runs import DataInfo, RunFolder

    cfg = run_config_from_dict(
        {"data": "builtin:shapes?n=64", "image_size": 16,
         "vae": {"block_out_channels": [8, 8], "norm_groups": 4, "layers_per_block": 1,
                 "mid_attention": False},
         "unet": {"block_out_channels": list(channels), "attention_resolutions": [4],
                  "norm_num_groups": 4, "head_dim": 8, "num_res_blocks": 1, "mid_attention": True},
         "diffusion": {"num_timesteps": 100}}
    )  # fmt: skip
    cfg = resolve_config(cfg, 3, num_classes)
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    run = RunFolder(folder)
    run.write_data_info(DataInfo(channels=3, class_names=[f"c{i}" for i in range(num_classes)]
                                 if num_classes else None))  # fmt: skip
    run.save_vae(Autoencoder(cfg.vae))
    run.save_unet(noisy_unet(cfg.unet, seed))
    run.write_config(cfg)
    return folder


def few_images(folder: Path, n: int = 5) -> Path:
    """n images of the built-in shapes as PNG files (a folder to fine-tune on)."""
    from PIL import Image

    from ldmkit.data import load_dataset

    ds = load_dataset(f"builtin:shapes?n={max(n, 3)}", image_size=16, seed=7)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return folder


SHAPE_CAPTIONS = ["a red square", "a blue circle", "a large red circle", "a small blue square",
                  "a green star on a blue background"]  # fmt: skip


def make_text_adaptable_run(folder: Path, *, seed: int = 0) -> Path:
    """A small text-conditional run folder (the trained-from-scratch encoder, words tokenizer
    of SHAPE_CAPTIONS) whose UNet has cross-attention at 4x4 and non-zero weights everywhere,
    16 px RGB, T = 100 (as `make_adaptable_run`)."""
    from ldmkit.models.text import TextEncoder, TextEncoderConfig, Tokenizer
    from ldmkit.models.vae import Autoencoder
    from ldmkit.recipe import resolve_config, run_config_from_dict
    from ldmkit.runs import DataInfo, RunFolder

    cfg = run_config_from_dict(
        {"data": "builtin:shapes?n=64", "image_size": 16, "conditioning": "text",
         "text": {"width": 16, "layers": 1, "heads": 2, "max_length": 12},
         "vae": {"block_out_channels": [8, 8], "norm_groups": 4, "layers_per_block": 1,
                 "mid_attention": False},
         "unet": {"block_out_channels": [8, 16], "attention_resolutions": [4],
                  "norm_num_groups": 4, "head_dim": 8, "num_res_blocks": 1,
                  "mid_attention": False},
         "diffusion": {"num_timesteps": 100}}
    )  # fmt: skip
    cfg = resolve_config(cfg, 3, None, text=True)
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    run = RunFolder(folder)
    run.write_data_info(DataInfo(channels=3))
    tok = Tokenizer.from_captions(SHAPE_CAPTIONS, max_length=12)
    run.save_tokenizer(tok)
    run.save_vae(Autoencoder(cfg.vae))
    run.save_unet(noisy_unet(cfg.unet, seed))
    t = cfg.text
    enc = TextEncoder(TextEncoderConfig(tok.vocab_size, t.max_length, t.width, t.layers, t.heads))
    with torch.no_grad():
        enc.token_embed.weight.mul_(20)  # rows of a trained encoder's size (RMS ~0.4)
    run.save_text_encoder(enc)
    run.write_config(cfg)
    return folder


def captioned_few(folder: Path, word: str, n: int = 5) -> Path:
    """n images of the built-in shapes, each with a caption holding `word` (a .txt beside it)."""
    few_images(folder, n)
    for i in range(n):
        (folder / f"{i}.txt").write_text(f"a {['red', 'blue'][i % 2]} {word}")
    return folder

"""A tiny run folder with random weights for the evaluation tests (a module of its own: the
test folders each have a conftest.py, so `from conftest import ...` would find whichever
was imported first)."""

import json

import torch

from ldmkit.data import load_dataset
from ldmkit.models.unet import UNet
from ldmkit.models.vae import Autoencoder
from ldmkit.recipe import resolve_config, run_config_from_dict
from ldmkit.runs import DataInfo, RunFolder

TINY = {
    "data": "builtin:shapes?n=96",
    "image_size": 16,
    "vae": {"block_out_channels": [8, 8], "norm_groups": 4, "layers_per_block": 1,
            "mid_attention": False},
    "unet": {"block_out_channels": [8, 16], "attention_resolutions": [], "mid_attention": False,
             "norm_num_groups": 4, "head_dim": 8, "num_res_blocks": 1},
    "diffusion": {"num_timesteps": 100},
}  # fmt: skip


def make_tiny_run(out, text: bool = False):
    """Random-weight VAE (16 px -> 4x8x8) and class-conditional UNet, T = 100, 96 shapes; with
    `text`, a text-conditional UNet, text encoder and tokenizer of the shapes' captions."""
    from ldmkit.models.text import TextEncoder, TextEncoderConfig, Tokenizer

    settings = (
        {**TINY, "conditioning": "text", "text": {"width": 16, "layers": 1, "heads": 2}}
        if text
        else TINY
    )
    cfg = run_config_from_dict(settings)
    ds = load_dataset(cfg.data, image_size=cfg.image_size, channels=cfg.channels, seed=cfg.seed)
    cfg = resolve_config(cfg, ds.channels, None if text else len(ds.class_names), text=text)
    torch.manual_seed(0)
    run = RunFolder(out)
    run.save_vae(Autoencoder(cfg.vae))
    run.save_unet(UNet(cfg.unet))
    if text:
        tok = Tokenizer.from_captions(ds.captions, max_length=cfg.text.max_length)
        run.save_tokenizer(tok)
        t = cfg.text
        run.save_text_encoder(
            TextEncoder(TextEncoderConfig(tok.vocab_size, t.max_length, t.width, t.layers, t.heads))
        )
    run.write_data_info(
        DataInfo(spec=cfg.data, name=ds.name, num_images=len(ds), channels=ds.channels,
                 image_size=cfg.image_size, class_names=ds.class_names,
                 fingerprint=ds.fingerprint())
    )  # fmt: skip
    rows = [{"stage": "autoencoder", "step": s, "loss": 1.0 / s} for s in range(1, 31)]
    rows += [{"stage": "diffusion", "step": s, "loss": 0.5 + 1.0 / s} for s in range(1, 31)]
    run.log_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run.write_config(cfg)  # last: run.json marks a complete run folder (see ldmkit.runs)
    return out

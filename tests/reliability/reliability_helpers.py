"""Shared helpers of the reliability tests: a tiny training config, synthetic run folders, and
a way to call the CLI in-process or as a subprocess."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch

from ldmkit import cli
from ldmkit.runs import DataInfo, RunFolder

# The smallest two-stage run that exercises every part: 64 shapes at 16 px, an f2 autoencoder and a
# two-level UNet without attention; each stage takes well under a second per step on one thread.
TINY = [
    "--data", "builtin:shapes?n=64", "--image-size", "16",
    "--set", "vae.block_out_channels=[8,8]", "--set", "vae.norm_groups=4",
    "--set", "vae.layers_per_block=1", "--set", "vae.mid_attention=false",
    "--set", "unet.block_out_channels=[8,16]", "--set", "unet.attention_resolutions=[]",
    "--set", "unet.norm_num_groups=4", "--set", "unet.head_dim=8",
    "--set", "unet.num_res_blocks=1", "--set", "unet.mid_attention=false",
    "--set", "vae_train.batch_size=8", "--set", "unet_train.batch_size=8",
    "--set", "vae_train.sample_every=0", "--set", "unet_train.sample_every=0",
    "--set", "vae_train.log_every=1", "--set", "unet_train.log_every=1",
    "--set", "preview_steps=2", "--quiet",
]  # fmt: skip


def tiny(steps: int = 4, every: int = 2) -> list[str]:
    """TINY with `steps` steps per stage and a checkpoint every `every` steps."""
    return TINY + [
        "--set", f"vae_train.steps={steps}", "--set", f"unet_train.steps={steps}",
        "--set", f"vae_train.checkpoint_every={every}", "--set", f"unet_train.checkpoint_every={every}",
    ]  # fmt: skip


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`ldmkit ARGV` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(err: str) -> str:
    """The one `ldmkit: error:` line of stderr (log lines may precede it); fails on a traceback."""
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("ldmkit: error:")]
    assert len(lines) == 1, err
    assert err.rstrip().endswith(lines[0]), err  # the error is the last thing said
    return lines[0]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Env for `python -m ldmkit.cli` children: one thread, so float sums match in-process runs."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def spawn_train(out: Path, args: list[str], **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ldmkit.cli", "train", "--out", str(out), *args]
    return subprocess.Popen(
        cmd, env=subprocess_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (but the lock file), to prove nothing was overwritten."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def make_run(folder: Path, *, num_classes: int | None = 3, unet_channels=(8, 16)) -> Path:
    """A small untrained but complete run folder, as `ldmkit train` writes it (fast: no training)."""
    from ldmkit.models.unet import UNet
    from ldmkit.models.vae import Autoencoder
    from ldmkit.recipe import resolve_config, run_config_from_dict

    cfg = run_config_from_dict(
        {"data": "builtin:shapes?n=64", "image_size": 16, "vae": {"block_out_channels": [8, 8], "norm_groups": 4,
         "layers_per_block": 1, "mid_attention": False},
         "unet": {"block_out_channels": list(unet_channels), "attention_resolutions": [], "norm_num_groups": 4,
                  "head_dim": 8, "num_res_blocks": 1, "mid_attention": False}}
    )  # fmt: skip
    cfg = resolve_config(cfg, 3, num_classes)
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    run = RunFolder(folder)
    run.write_config(cfg)
    names = [f"c{i}" for i in range(num_classes)] if num_classes else None
    run.write_data_info(DataInfo(channels=3, class_names=names))
    run.save_vae(Autoencoder(cfg.vae))
    run.save_unet(UNet(cfg.unet))
    return folder


def make_text_run(folder: Path) -> Path:
    """A small untrained text-conditional run folder (tokenizer of two captions, encoder, UNet)."""
    from ldmkit.models.text import TextEncoder, TextEncoderConfig, Tokenizer
    from ldmkit.models.unet import UNet
    from ldmkit.models.vae import Autoencoder
    from ldmkit.recipe import resolve_config, run_config_from_dict

    cfg = run_config_from_dict(
        {"data": "builtin:shapes?n=64", "image_size": 16, "conditioning": "text",
         "text": {"width": 16, "layers": 1, "heads": 2, "max_length": 12},
         "vae": {"block_out_channels": [8, 8], "norm_groups": 4, "layers_per_block": 1, "mid_attention": False},
         "unet": {"block_out_channels": [8, 16], "attention_resolutions": [4], "norm_num_groups": 4,
                  "head_dim": 8, "num_res_blocks": 1, "mid_attention": False}}
    )  # fmt: skip
    cfg = resolve_config(cfg, 3, None, text=True)
    torch.manual_seed(0)
    run = RunFolder(folder)
    run.write_config(cfg)
    run.write_data_info(DataInfo(channels=3))
    tok = Tokenizer.from_captions(["a red square", "a blue circle"], max_length=12)
    run.save_tokenizer(tok)
    run.save_vae(Autoencoder(cfg.vae))
    run.save_unet(UNet(cfg.unet))
    t = cfg.text
    run.save_text_encoder(
        TextEncoder(TextEncoderConfig(tok.vocab_size, t.max_length, t.width, t.layers, t.heads))
    )
    return folder

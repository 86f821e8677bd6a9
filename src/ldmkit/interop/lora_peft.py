"""An ldmkit adapter (`ldmkit finetune`) in the LoRA layout of diffusers and peft (issue 28).

    export_peft_lora("runs/shapes", "adapters/cross", "cross-peft/")
    # cross-peft/pytorch_lora_weights.safetensors   the UNet's LoRA, diffusers/peft keys
    # cross-peft/adapter_config.json                peft's LoraConfig of it
    # cross-peft/class_embedding.safetensors        a class adapter's new row(s), if any

Keys are those diffusers' `save_lora_weights` writes and `load_lora_weights` /
`ModelMixin.load_lora_adapter(..., prefix="unet")` / peft's `set_peft_model_state_dict` read:
`unet.<diffusers module path>.lora_A.weight` (ldmkit's lora_down) and `.lora_B.weight`
(lora_up), the module paths renamed by `unet_names` (ldmkit's UNet maps onto diffusers' tensor
for tensor). ldmkit's alpha / rank is baked into lora_B, so that peft's default
`lora_alpha = r` (scaling 1) gives the adapter's exact output: no network alphas are needed.
A conv adapter (LoCon) is peft's Conv2d LoRA (A: the base's kernel, B: 1x1), the same maths.

Which diffusers class the run maps to: a text run (cross-attention) maps to
UNet2DConditionModel, where diffusers' own `load_lora_adapter` / a pipeline's
`load_lora_weights` read the file; a class-conditional or unconditional run maps to
UNet2DModel, which diffusers gives no LoRA loader (no `PeftAdapterMixin`): load it with peft
(`inject_adapter_in_model(LoraConfig(**adapter_config), unet)` then
`set_peft_model_state_dict(unet, weights without the "unet." prefix)`). A run that maps to no
diffusers UNet (`unet_names.diffusers_unet_config` refuses it, e.g. a distilled student's
guidance input) is refused in one line.

A class adapter's new class is a row of the class embedding, which no LoRA file holds: it is
written beside, as `class_embedding.safetensors` {"new_rows": (k, D)}, and goes between the
old classes' rows and the null label's (the last) row of diffusers' `class_embedding.weight`
(`new_class_embedding`); the new class's label is then the old null label's index.

This module imports nothing from diffusers or peft.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from ldmkit.checkpoint import CheckpointError, save_tensors
from ldmkit.config import ConfigError
from ldmkit.interop import unet_names
from ldmkit.interop.diffusers import InteropError
from ldmkit.runs import AdapterFolder, RunFolder

PEFT_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' save/load_lora_weights name
PEFT_CONFIG_NAME = "adapter_config.json"  # peft's
CLASS_ROWS_NAME = "class_embedding.safetensors"
PREFIX = "unet"  # diffusers' key prefix of the UNet's LoRA in a pipeline's LoRA file
DOWN, UP = ".lora_down.weight", ".lora_up.weight"


def diffusers_module_name(path: str) -> str:
    """The diffusers module path of the ldmkit UNet layer `path` (e.g. "mid.attention.attn.to_q"
    -> "mid_block.attentions.0.to_q")."""
    return unet_names.to_diffusers_name(path + ".weight")[: -len(".weight")]


def peft_state_dict(tensors: dict[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """ldmkit adapter weights {"<path>.lora_down.weight", "<path>.lora_up.weight"} -> diffusers /
    peft keys {"unet.<diffusers path>.lora_A.weight", ".lora_B.weight"}, `scaling` (alpha /
    rank) baked into lora_B. Other tensors (class rows) are left out."""
    out: dict[str, Tensor] = {}
    for key, down in tensors.items():
        if not key.endswith(DOWN):
            continue
        path = key[: -len(DOWN)]
        name = f"{PREFIX}.{diffusers_module_name(path)}"
        out[f"{name}.lora_A.weight"] = down.detach().float().contiguous()
        out[f"{name}.lora_B.weight"] = (tensors[path + UP].detach().float() * scaling).contiguous()
    return out


def peft_config(weights: dict[str, Tensor], rank: int) -> dict:
    """peft LoraConfig fields of `weights` (as `peft_state_dict` writes): lora_alpha = r
    (the scaling is in lora_B), the target modules by their full diffusers paths."""
    modules = sorted(
        k[len(PREFIX) + 1 : -len(".lora_A.weight")] for k in weights if k.endswith(".lora_A.weight")
    )
    return {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "target_modules": modules,
    }


def new_class_embedding(weight: Tensor, new_rows: Tensor) -> Tensor:
    """diffusers' class_embedding.weight (old classes' rows, then the null label's) with
    `new_rows` put in before the null row: the new classes take labels K, K+1, ... (K = the
    old number of classes) and the null label moves to the end, as in ldmkit."""
    return torch.cat([weight[:-1], new_rows.to(weight), weight[-1:]])


def export_peft_lora(run: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Write `adapter` (made by `ldmkit finetune` for `run`) as a diffusers/peft LoRA folder
    `out` (see the module docstring). Returns `out`."""
    folder = RunFolder(run)
    try:
        folder.require_trained()
        info = AdapterFolder(adapter).check_fits(folder, shown=str(run))
        unet_cls, _ = unet_names.diffusers_unet_config(folder.config().unet)
    except (ConfigError, CheckpointError) as e:
        raise InteropError(f"{e}") from None
    if info.kind == "word":
        raise InteropError(
            f"{adapter} teaches a text run the word {info.word!r}, a row of ldmkit's own text "
            "encoder that a diffusers/peft UNet LoRA cannot carry; sample it with --adapter"
        )
    if info.gate == "class":
        raise InteropError(
            f"{adapter} acts on its class only (fine-tuned with --gate class); a diffusers/peft "
            "LoRA acts on every class: fine-tune again with --gate none to export"
        )
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InteropError(f"--out {out} is not empty; give a new folder for the exported LoRA")
    tensors = AdapterFolder(adapter).tensors()
    weights = peft_state_dict(tensors, info.lora.alpha / info.lora.rank)
    if not weights:
        raise InteropError(f"{adapter} holds no LoRA weights to export")
    meta = {
        "format": "pt",
        "ldmkit_diffusers_class": unet_cls,
        "ldmkit_base_weights_hash": info.base_weights_hash,
    }
    save_tensors(out / PEFT_WEIGHTS_NAME, weights, metadata=meta)
    (out / PEFT_CONFIG_NAME).write_text(json.dumps(peft_config(weights, info.lora.rank), indent=2))
    rows = tensors.get(AdapterFolder.CLASS_ROWS)
    if rows is not None:
        save_tensors(
            out / CLASS_ROWS_NAME, {"new_rows": rows.float().contiguous()},
            metadata={"format": "pt", "class_name": str(info.class_name),
                      "class_index": str(info.class_index)},
        )  # fmt: skip
    return out

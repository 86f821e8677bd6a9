"""Low-rank adapters (LoRA) on a trained UNet, and new class rows of its class embedding.

LoRA (Hu et al. 2021): a frozen layer W x gains a trainable low-rank path, so the adapted
layer computes  W x + s * (alpha / rank) * B (A x),  A: rank x in (the down-projection, random),
B: out x rank (the up-projection, zero at the start), s the adapter's scale at sampling (1 by
default; 0 switches it off). B = 0 makes the adapted model compute exactly what the base model
does until it trains (bit for bit: the path adds +0.0). On a convolution (LoCon, as in LyCORIS /
peft) A is a convolution of the layer's kernel, stride and padding into `rank` channels and B a
1x1 convolution back.

A new class (what `ldmkit finetune` teaches a class-conditional run) is a new row of the UNet's
class embedding, learned; the rows of the old classes and the null label stay as they are, the
null label moves to the end (`ClassRows`), so label `num_classes` keeps meaning "no class".

Several adapters may sit on one UNet at once, each under its name with its own scale. The
functions here only change modules; where an adapter's files live and whom it fits (a run's
weights hash) is `ldmkit.runs.AdapterFolder`'s business, and training them is
`ldmkit.training.finetune`'s. Nothing here knows of training.

    config = LoraConfig(rank=4)
    inject_lora(unet, config, "mine")       # adds zero-start adapters to the attention projections
    state = lora_state_dict(unet, "mine")   # {"<layer>.lora_down.weight": ..., ...}
    set_lora_scale(unet, "mine", 0.8)
    merge_lora(unet)                         # bakes every adapter into the weights
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.config import ConfigError, check_float, check_int

# The layers an adapter may target, by their attribute name in ldmkit's UNet (models/layers.py):
# the attention projections (self-attention blocks and the cross-attention transformer's), and
# for LoCon the residual blocks' 3x3 convolutions and the transformer's in/out projections.
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out")
CONV_TARGETS = ("conv1", "conv2")
KNOWN_TARGETS = ATTENTION_TARGETS + CONV_TARGETS + ("proj_in", "proj_out", "time_proj")
MAX_RANK = 1024


@dataclass
class LoraConfig:
    """Rank, alpha (the path is scaled by alpha / rank) and the targeted layers of an adapter.

    `targets` names layers by their attribute name: the default is the attention projections;
    add "conv1", "conv2" for LoCon (the residual blocks' convolutions)."""

    rank: int = 4
    alpha: float = 4.0
    targets: tuple[str, ...] = field(default_factory=lambda: ATTENTION_TARGETS)

    def __post_init__(self) -> None:
        check_int("rank", self.rank, 1, MAX_RANK)
        check_float("alpha", self.alpha, 0, None, lo_open=True)
        self.targets = tuple(self.targets)
        if not self.targets:
            raise ConfigError("an adapter needs at least one target layer, e.g. to_q")
        unknown = [t for t in self.targets if t not in KNOWN_TARGETS]
        if unknown:
            raise ConfigError(
                f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(KNOWN_TARGETS)}"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoraPath(nn.Module):
    """One adapter's low-rank path of one layer: scaling * B(A(x))."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, scaling: float) -> None:
        super().__init__()
        self.scaling = scaling
        if isinstance(base, nn.Linear):
            self.down: nn.Module = nn.Linear(base.in_features, rank, bias=False)
            self.up: nn.Module = nn.Linear(rank, base.out_features, bias=False)
        else:
            self.down = nn.Conv2d(
                base.in_channels, rank, base.kernel_size, stride=base.stride,
                padding=base.padding, dilation=base.dilation, bias=False,
            )  # fmt: skip
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        # A as peft and the paper (nn.Linear's own init), B zero: the path starts at exactly 0
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        w = base.weight
        self.to(device=w.device, dtype=w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x)) * self.scaling

    def delta(self) -> Tensor:
        """The change this path makes to the base weight (scale 1), in the base weight's shape."""
        up, down = self.up.weight, self.down.weight
        if up.ndim == 2:  # linear: (out, r) @ (r, in)
            return (up @ down) * self.scaling
        # conv: (out, r, 1, 1) x (r, in, kh, kw) -> (out, in, kh, kw)
        return torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * self.scaling


class LoraLayer(nn.Module):
    """A frozen nn.Linear or nn.Conv2d plus named low-rank paths, each with its scale.

    forward(x) = base(x) + sum over adapters of scale * path(x); an adapter of scale 0 is
    skipped, so the output is then the base layer's, bit for bit."""

    def __init__(self, base: nn.Linear | nn.Conv2d) -> None:
        super().__init__()
        self.base = base
        self.paths = nn.ModuleDict()
        self.scales: dict[str, float] = {}
        self.gates: dict[str, Tensor] = {}  # per sample (B,) bool: a class-gated adapter's

    def add(self, name: str, config: LoraConfig) -> None:
        self.paths[name] = LoraPath(self.base, config.rank, config.scaling)
        self.scales[name] = 1.0

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        for name, path in self.paths.items():
            scale = self.scales[name]
            if scale == 0:
                continue
            gate = self.gates.get(name)
            if gate is None:
                out = out + path(x) * scale
            elif bool(gate.any()):  # only the gated samples' rows change (the others add 0)
                if gate.shape[0] != x.shape[0]:
                    raise ValueError(f"adapter {name!r}: {gate.shape[0]} class labels for a "
                                     f"batch of {x.shape[0]}")  # fmt: skip
                mask = gate.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
                out = out + path(x) * (scale * mask)
        return out


class ClassRows(nn.Module):
    """A class embedding with new rows: [the old classes' rows, the new rows (per adapter, in
    the order they were added), the null label's row]. The old rows are the base embedding's
    own, so the old classes and the null label embed exactly as before."""

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__()
        self.base = base
        self.rows = nn.ParameterDict()

    @property
    def num_base_classes(self) -> int:
        return self.base.num_embeddings - 1

    @property
    def weight(self) -> Tensor:
        w = self.base.weight
        return torch.cat([w[:-1], *self.rows.values(), w[-1:]])

    def forward(self, labels: Tensor) -> Tensor:
        return F.embedding(labels, self.weight)


# ------------------------------------------------------------------------------ adding adapters
def _targets(unet: nn.Module, config: LoraConfig) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, layer) of every layer the config targets."""
    found = []
    for _, parent in unet.named_modules():
        if isinstance(parent, LoraLayer):
            continue
        for attr, child in parent.named_children():
            if attr in config.targets and isinstance(child, (nn.Linear, nn.Conv2d, LoraLayer)):
                found.append((parent, attr, child))
    return found


def inject_lora(unet: nn.Module, config: LoraConfig, name: str = "default") -> int:
    """Add adapter `name` to every layer of `unet` that `config.targets` names (in place).
    It starts at zero: the UNet computes what it did, bit for bit. Returns the number of layers
    adapted; none is an error (a UNet without attention, e.g., has no to_q)."""
    layers = _targets(unet, config)
    if not layers:
        raise ConfigError(
            f"the UNet has no layer named {', '.join(config.targets)} to adapt (a UNet without "
            "attention has no to_q ...); add conv1,conv2 to the targets"
        )
    for parent, attr, child in layers:
        if isinstance(child, LoraLayer):
            if name in child.paths:
                raise ConfigError(f"the UNet has an adapter named {name!r} already")
        else:
            child = LoraLayer(child)
            setattr(parent, attr, child)
        child.add(name, config)
    return len(layers)


def _scales(unet: nn.Module) -> dict[str, float]:
    """{adapter name: its largest scale over the layers}."""
    out: dict[str, float] = {}
    for layer in lora_layers(unet).values():
        for name, scale in layer.scales.items():
            out[name] = max(out.get(name, 0.0), abs(scale))
    return out


GATES = "_lora_class_gates"  # on the UNet: {adapter name: the class labels it acts on}


def gate_by_class(unet: nn.Module, name: str, labels: Sequence[int]) -> None:
    """Make adapter `name` act only on the samples whose class label is in `labels` (its new
    classes): every other class and the null label run through the UNet without it, bit for
    bit, in the same batch. A forward pre-hook reads each call's `class_labels`. Such an
    adapter cannot be merged into plain weights (`merge_lora` refuses it)."""
    gates = unet.__dict__.get(GATES)
    if gates is None:
        gates = unet.__dict__[GATES] = {}
        unet.register_forward_pre_hook(_set_gates, with_kwargs=True)
    _layers_of(unet, name)  # the adapter exists
    gates[name] = tuple(int(k) for k in labels)


def class_gates(unet: nn.Module) -> dict[str, tuple[int, ...]]:
    """{adapter name: class labels} of the class-gated adapters of `unet`."""
    return dict(unet.__dict__.get(GATES) or {})


def _set_gates(unet: nn.Module, args: tuple, kwargs: dict) -> None:
    labels = kwargs.get("class_labels")
    gates = unet.__dict__[GATES]
    for layer in lora_layers(unet).values():
        for name, acts_on in gates.items():
            if name not in layer.paths:
                continue
            if labels is None:  # no class: the gated adapter is off
                layer.gates[name] = torch.zeros(args[0].shape[0], dtype=torch.bool)
            else:
                layer.gates[name] = torch.isin(labels, torch.tensor(acts_on, device=labels.device))


WORD_GATES = "_lora_word_gates"  # on the UNet: {adapter name: the token ids it acts on}
PROMPT_IDS = "prompt_ids"  # the keyword a text conditioner adds for the word gates


def watch_prompts(unet: nn.Module) -> None:
    """Let `unet` take the keyword `prompt_ids` (B, L): the prompts' token ids, which the text
    conditioner adds once a new word is taught (`text.add_word`). A forward pre-hook takes it
    out of the call and sets the word-gated adapters' per-sample masks (`gate_by_words`)."""
    if WORD_GATES not in unet.__dict__:
        unet.__dict__[WORD_GATES] = {}
        unet.register_forward_pre_hook(_set_word_gates, with_kwargs=True)


def gate_by_words(unet: nn.Module, name: str, token_ids: Sequence[int]) -> None:
    """Make adapter `name` act only on the samples whose prompt holds one of `token_ids` (its
    new words): every other prompt, the empty one of guidance included, runs through the UNet
    without it, bit for bit, in the same batch. A call without `prompt_ids` runs without it.
    The text run's analogue of `gate_by_class`; `merge_lora` refuses it likewise."""
    watch_prompts(unet)
    _layers_of(unet, name)  # the adapter exists
    unet.__dict__[WORD_GATES][name] = tuple(int(k) for k in token_ids)


def word_gates(unet: nn.Module) -> dict[str, tuple[int, ...]]:
    """{adapter name: token ids} of the word-gated adapters of `unet`."""
    return dict(unet.__dict__.get(WORD_GATES) or {})


def _set_word_gates(unet: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kwargs = dict(kwargs)
    ids = kwargs.pop(PROMPT_IDS, None)
    gates = unet.__dict__[WORD_GATES]
    if gates:
        for layer in lora_layers(unet).values():
            for name, acts_on in gates.items():
                if name not in layer.paths:
                    continue
                if ids is None:  # no prompt: the gated adapter is off
                    layer.gates[name] = torch.zeros(args[0].shape[0], dtype=torch.bool)
                else:
                    words = torch.tensor(acts_on, device=ids.device)
                    layer.gates[name] = torch.isin(ids, words).any(-1)
    return args, kwargs


def lora_layers(unet: nn.Module) -> dict[str, LoraLayer]:
    """Every adapted layer of `unet` by its module path."""
    return {path: m for path, m in unet.named_modules() if isinstance(m, LoraLayer)}


def adapter_names(unet: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for layer in lora_layers(unet).values():
        names.update(dict.fromkeys(layer.paths))
    return list(names)


def _layers_of(unet: nn.Module, name: str) -> dict[str, LoraLayer]:
    layers = {p: m for p, m in lora_layers(unet).items() if name in m.paths}
    if not layers:
        raise ConfigError(f"the UNet has no adapter named {name!r}")
    return layers


def lora_parameters(unet: nn.Module, name: str) -> list[nn.Parameter]:
    """The trainable weights of adapter `name` (A and B of every layer)."""
    return [p for m in _layers_of(unet, name).values() for p in m.paths[name].parameters()]


def lora_state_dict(unet: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """Adapter `name`'s weights: {"<layer path>.lora_down.weight", "<layer path>.lora_up.weight"}
    (the layer paths of the plain UNet, e.g. "mid.attention.attn.to_q")."""
    out = {}
    for path, layer in _layers_of(unet, name).items():
        p = layer.paths[name]
        out[f"{path}.lora_down.weight"] = p.down.weight.detach().clone()
        out[f"{path}.lora_up.weight"] = p.up.weight.detach().clone()
    return out


def load_lora_state_dict(unet: nn.Module, state: dict[str, Tensor], name: str = "default") -> None:
    """Set adapter `name`'s weights (already injected with the same config) from `state`; a
    missing, extra or misshapen key is a one-line error (an adapter of another UNet)."""
    layers = _layers_of(unet, name)
    expected = {f"{p}.lora_{s}.weight" for p in layers for s in ("down", "up")}
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)
        raise ConfigError(
            f"the adapter's weights do not fit this UNet ({len(odd)} layers differ, e.g. "
            f"{odd[0]}); it was made for another architecture"
        )
    with torch.no_grad():
        for path, layer in layers.items():
            p = layer.paths[name]
            for part, module in (("down", p.down), ("up", p.up)):
                value = state[f"{path}.lora_{part}.weight"]
                if value.shape != module.weight.shape:
                    raise ConfigError(
                        f"the adapter's {path}.lora_{part}.weight is {tuple(value.shape)}, the "
                        f"UNet's {tuple(module.weight.shape)}; it was made for another architecture"
                    )
                module.weight.copy_(value)


def set_lora_scale(unet: nn.Module, name: str, scale: float) -> None:
    """The weight of adapter `name`'s path at sampling: 1 as trained, 0 off (the base model
    exactly), in between or beyond to weaken or strengthen it."""
    check_float("adapter scale", scale)
    for layer in _layers_of(unet, name).values():
        layer.scales[name] = float(scale)


# ------------------------------------------------------------------------------ new classes
def add_class_rows(unet: nn.Module, name: str, rows: Tensor | int) -> int:
    """Give the class-conditional `unet` new classes: `rows` (k, time_embed_dim) as adapter
    `name`'s rows of the class embedding, or an int k for k rows started at the mean of the
    old classes' rows (a neutral start, like textual inversion from a generic word). The null
    label moves behind them and `unet.config.num_classes` grows by k. Returns the first new
    class's label."""
    embed = getattr(unet, "class_embed", None)
    if embed is None:
        raise ConfigError("the UNet has no class embedding (an unconditional or text model)")
    if not isinstance(embed, ClassRows):
        embed = ClassRows(embed)
        unet.class_embed = embed
    if name in embed.rows:
        raise ConfigError(f"the UNet has class rows named {name!r} already")
    first = embed.weight.shape[0] - 1
    base = embed.base.weight
    if isinstance(rows, int):
        start = base[:-1].detach().mean(0, keepdim=True).expand(rows, -1).clone()
    else:
        start = rows.detach().to(base).clone()
        if start.ndim != 2 or start.shape[1] != base.shape[1]:
            raise ConfigError(
                f"class rows must be (k, {base.shape[1]}), got {tuple(start.shape)}; the adapter "
                "was made for another architecture"
            )
    embed.rows[name] = nn.Parameter(start)
    unet.config = dataclasses.replace(unet.config, num_classes=embed.weight.shape[0] - 1)
    return first


def class_rows(unet: nn.Module, name: str) -> nn.Parameter | None:
    """Adapter `name`'s rows of the class embedding (None: it added none)."""
    embed = getattr(unet, "class_embed", None)
    if isinstance(embed, ClassRows) and name in embed.rows:
        return embed.rows[name]
    return None


# ------------------------------------------------------------------------------ merging
@torch.no_grad()
def merge_lora(unet: nn.Module) -> nn.Module:
    """Bake every adapter (at its scale) into the base weights, in place, and put the plain
    layers back: the UNet is then an ordinary `UNet` whose state dict saves like any other
    (new classes become rows of a plain nn.Embedding). Its outputs equal the adapted ones up
    to float rounding. Returns `unet`. A class-gated adapter (`gate_by_class`) is refused:
    plain weights act on every class alike."""
    gated = [n for n, scale in _scales(unet).items()
             if (n in class_gates(unet) or n in word_gates(unet)) and scale != 0]  # fmt: skip
    if gated:
        raise ConfigError(
            f"adapter {gated[0]!r} acts on its own class only (trained with --gate class); "
            "merged weights would act on every class: sample with --adapter instead, or "
            "fine-tune with --gate none to merge"
        )
    for path, layer in list(lora_layers(unet).items()):
        w = layer.base.weight
        for name, p in layer.paths.items():
            scale = layer.scales[name]
            if scale != 0:
                w += (p.delta() * scale).to(w.dtype)
        parent = unet.get_submodule(path.rpartition(".")[0]) if "." in path else unet
        setattr(parent, path.rpartition(".")[2], layer.base)
    embed = getattr(unet, "class_embed", None)
    if isinstance(embed, ClassRows):
        weight = embed.weight.detach().clone()
        plain = nn.Embedding(weight.shape[0], weight.shape[1]).to(weight)
        plain.weight.copy_(weight)
        unet.class_embed = plain
    return unet

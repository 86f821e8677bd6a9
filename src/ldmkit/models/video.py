"""A video UNet: an image `UNet` plus temporal layers, starting as the image model per frame.

Sources: Blattmann et al. 2023 (Video LDM: temporal layers interleaved with the frozen spatial
ones of an image LDM), Guo et al. 2024 (AnimateDiff: motion modules of temporal attention with a
sinusoidal frame encoding and zero-initialised output projections), Ho et al. 2022 (VDM:
factorised space-time attention over a 2-D UNet applied to every frame).

The image UNet sees the frames of B clips as a batch of B*F images. After the last block
(resnet, attention) of each chosen resolution level, on the way down and up, and after the
middle block, a `TemporalBlock` mixes information across the F frames at each spatial position:

    h <- h + out_attn(Attn_F(GN(h) + pos(f)))        attention over frames, sinusoidal pos(f)
    h <- h + out_conv(SiLU(Conv1d_k(SiLU(GN(h)))))  a 1-D convolution over frames

`out_attn` and `out_conv` start at zero, so a fresh `VideoUNet` computes exactly what its image
UNet computes frame by frame (tests/models/test_video.py checks it with torch.equal), and
frames interact only through these layers. The temporal blocks are attached to the image UNet's
modules by forward hooks: the image UNet keeps its modules, parameter names (`unet.*`) and
forward, so an image run's weights load into `video_unet.unet` as they are ("inflating").

Shapes: x (B, F, C, H, W); t a number, (B,) or (B, F) (one step per frame); class_labels (B,);
context (B, L, D) and context_mask (B, L), shared by the clip's frames -> (B, F, C_out, H, W).
The models know nothing of training: `freeze_spatial` is a setting for the trainer, which
finds the two groups of parameters with `temporal_parameters` and `spatial_parameters`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ldmkit.checkpoint import ModelFolder
from ldmkit.config import ConfigError, check_int
from ldmkit.models.layers import (
    Attention,
    ResnetBlock,
    TimestepMLP,
    timestep_embedding,
    zero_module,
)
from ldmkit.models.unet import UNet, UNetConfig

logger = logging.getLogger(__name__)

MAX_FRAMES = 256  # frames a forward accepts (the attention over frames is quadratic in F)
LAYOUTS = ("temporal", "stacked")  # VideoUNetConfig.layout


def check_layout(name: str, layout: str) -> None:
    """A one-line ConfigError unless `layout` is one of LAYOUTS (`name`: the setting's name)."""
    if layout not in LAYOUTS:
        raise ConfigError(
            f"{name}={layout!r}: choose {' or '.join(LAYOUTS)} (temporal: the image UNet per "
            "frame plus temporal layers; stacked: one UNet on the frames as channels)"
        )


@dataclass
class VideoUNetConfig:
    """Architecture of a `VideoUNet`: the image UNet's config plus the temporal layers'."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    frames: int = 16  # frames per clip the model is trained and samples at
    temporal_heads: int = 4  # heads of the attention over frames (divides each level's channels)
    temporal_levels: tuple[int, ...] | None = None  # level indices with temporal layers; None: all
    temporal_mid: bool = True  # a temporal block after the middle block too
    temporal_kernel: int = 3  # width of the temporal convolution (odd)
    freeze_spatial: bool = False  # for the trainer: train the temporal layers only
    # Direction-like conditioning of the temporal layers (0: none). With M > 0 the model's class
    # labels are joint: y = c * M + m for the image UNet's class c (unet.num_classes of them)
    # and the motion class m (e.g. the direction); the null label is `num_classes` (= C * M).
    # c conditions the image UNet as before; m selects a learned embedding that every temporal
    # block adds to its input, so an inflated model with frozen spatial layers can still be
    # told the direction, and an unseen (c, m) pair is a composition of two seen parts.
    motion_classes: int = 0
    # A learned embedding of (motion class, frame index) added to every frame's time embedding,
    # which conditions every resnet of the image UNet: each frame knows where it is in the clip
    # and which way the clip moves, so the spatial layers can place the object per frame
    # (against the clip's shared noise, see noise_mixing) without any exchange between frames.
    # Zero-initialised: a fresh model is still the image model per frame. Trained with the
    # temporal layers (it is one of them for temporal_parameters and freeze_spatial).
    frame_embedding: bool = False
    temporal_lr_mult: float = 1.0  # for the trainer: the temporal layers' LR = lr * this
    # The "mixed" noise prior of Ge et al. 2023: each frame's noise is
    # (alpha * shared + own) / sqrt(1 + alpha^2), a share common to the clip (0: independent).
    # The trainer draws eps this way; samplers start from `clip_noise` with the same alpha.
    noise_mixing: float = 0.0
    # How frames meet. "temporal": the image UNet per frame plus the temporal layers above (can
    # start as an image run: inflating). "stacked": one 2-D UNet sees a clip's F frames as F * C
    # channels (its first convolution mixes them all, every level sees the whole clip); the
    # image class conditions it as a class, the motion class through its own embedding added to
    # the time embedding; cheaper per clip by about F, but it cannot start
    # as an image model (from scratch only) and samples exactly `frames` frames. `unet` stays
    # the per-frame description (in_channels, sample_size: what a frame's latent is); the
    # temporal_* fields, frame_embedding and freeze_spatial do not apply to it.
    layout: str = "temporal"
    # stacked only: per-frame layers of this width (0: none) after the stacked UNet, their
    # weights shared by the frames (frames are the batch): a stem (a 3x3 convolution and a
    # resnet on each frame's noisy latent) and a head (a resnet on the stem's features plus the
    # stacked UNet's prediction for that frame), whose zero-initialised last convolution adds a
    # correction to that prediction; a fresh shell leaves the stacked UNet's output as it is.
    # The stacked UNet decides where things go across the clip; the shell gives every frame
    # the full-resolution width an image UNet's first level has, trained on batch * frames
    # images a step. Conditioned on t and the image class.
    frame_channels: int = 0
    # stacked with frame_channels: a `TemporalBlock` between the shell's stem and head
    # (attention and a convolution over the frames at each position, zero-initialised, told the
    # motion class when there is one), so the per-frame layers see their neighbours' features
    frame_temporal: bool = False

    def __post_init__(self) -> None:
        if self.temporal_levels is not None:
            self.temporal_levels = tuple(sorted(set(self.temporal_levels)))
        levels = len(self.unet.block_out_channels)
        check_int("frames", self.frames, 1, MAX_FRAMES)
        check_int("temporal_heads", self.temporal_heads, 1, 4096)
        check_int("temporal_kernel", self.temporal_kernel, 1, 15)
        check_int("motion_classes", self.motion_classes, 0, 4096)
        if self.motion_classes and not self.unet.num_classes:
            raise ConfigError(
                "motion_classes needs a class-conditional UNet (unet.num_classes); for a model "
                "conditioned on motion alone use num_classes=1"
            )
        if not self.temporal_lr_mult > 0:
            raise ConfigError(f"temporal_lr_mult must be > 0, got {self.temporal_lr_mult}")
        if not 0 <= self.noise_mixing <= 100:
            raise ConfigError(f"noise_mixing must be in [0, 100], got {self.noise_mixing}")
        check_layout("layout", self.layout)
        check_int("frame_channels", self.frame_channels, 0, 4096)
        if self.frame_channels and self.layout != "stacked":
            raise ConfigError(
                "frame_channels (per-frame layers around a stacked UNet) applies to "
                "layout=stacked only; drop it or set layout=stacked"
            )
        if self.frame_temporal and not self.frame_channels:
            raise ConfigError("frame_temporal needs per-frame layers: set frame_channels too")
        if self.frame_temporal and self.frame_channels % self.temporal_heads:
            raise ConfigError(
                f"temporal_heads {self.temporal_heads} does not divide frame_channels "
                f"{self.frame_channels} (the temporal block of frame_temporal); choose a divisor"
            )
        if self.frame_channels % self.unet.norm_num_groups:
            raise ConfigError(
                f"frame_channels={self.frame_channels} must be a multiple of the UNet's "
                f"norm_num_groups ({self.unet.norm_num_groups})"
            )
        if self.layout == "stacked" and (self.freeze_spatial or self.frame_embedding):
            raise ConfigError(
                "a stacked video UNet trains from scratch as one model: freeze_spatial and "
                "frame_embedding apply to layout=temporal only; drop them"
            )
        if self.temporal_kernel % 2 == 0:
            raise ConfigError(f"temporal_kernel must be odd, got {self.temporal_kernel}")
        for i in self.levels:
            if not 0 <= i < levels:
                raise ConfigError(
                    f"temporal level {i} does not exist; the UNet has levels 0..{levels - 1}"
                )
        for ch in self.temporal_channels:
            if ch % self.temporal_heads:
                raise ConfigError(
                    f"temporal_heads {self.temporal_heads} does not divide the {ch} channels of "
                    "a level with temporal layers; choose a divisor of it"
                )

    @property
    def num_classes(self) -> int | None:
        """Class labels the model takes (the null label is this number): the image UNet's,
        times `motion_classes` when that is set."""
        c = self.unet.num_classes
        return c * self.motion_classes if c and self.motion_classes else c

    def joint_label(self, image_class: int, motion_class: int) -> int:
        """The class label for image class c and motion class m (see `motion_classes`)."""
        if not self.motion_classes:
            raise ValueError("joint_label needs motion_classes > 0")
        return image_class * self.motion_classes + motion_class

    @property
    def stacked_unet(self) -> UNetConfig:
        """The 2-D UNet of a stacked layout: the frame's UNet with F times its channels in and
        out (its class labels the image classes; the motion class has its own embedding)."""
        u = self.unet
        return replace(
            u, in_channels=u.in_channels * self.frames, out_channels=u.out_channels * self.frames
        )

    @property
    def levels(self) -> tuple[int, ...]:
        """The indices of the resolution levels that get temporal layers."""
        if self.layout == "stacked":
            return ()
        n = len(self.unet.block_out_channels)
        return tuple(range(n)) if self.temporal_levels is None else self.temporal_levels

    @property
    def temporal_channels(self) -> list[int]:
        chs = self.unet.block_out_channels
        mid = self.temporal_mid and self.layout == "temporal"
        return [chs[i] for i in self.levels] + ([chs[-1]] if mid else [])


def frame_encoding(frames: int, channels: int, device: torch.device) -> Tensor:
    """Sinusoidal encoding (F, channels) of the frame index 0..F-1 (Vaswani et al. 2017)."""
    index = torch.arange(frames, device=device)
    return timestep_embedding(index, channels, flip_sin_to_cos=False)


def clip_noise(
    shape: tuple[int, ...], alpha: float = 0.0, *, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:  # fmt: skip
    """Unit-variance noise for clips (B, F, ...): frames share a part of weight alpha (the
    mixed prior of Ge et al. 2023); alpha = 0 gives independent frames, torch.randn's draws."""
    noise = torch.randn(shape, generator=generator, device=device)
    return mix_frame_noise(noise, alpha, generator=generator) if alpha else noise


def mix_frame_noise(
    noise: Tensor, alpha: float, *, shared: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:  # fmt: skip
    """(alpha * shared + noise) / sqrt(1 + alpha^2) for noise (..., F, C, H, W); `shared`
    (..., 1, C, H, W) is drawn from `generator` unless given. Each frame stays N(0, I); two
    frames correlate by alpha^2 / (1 + alpha^2)."""
    if shared is None:
        shape = (*noise.shape[:-4], 1, *noise.shape[-3:])
        shared = torch.randn(shape, generator=generator, device=noise.device, dtype=noise.dtype)
    return (alpha * shared + noise) / math.sqrt(1.0 + alpha * alpha)


class TemporalBlock(nn.Module):
    """Attention over frames, then a 1-D convolution over frames, at every spatial position;
    each residual, each ending in a zero-initialised projection (module docstring)."""

    def __init__(
        self, channels: int, *, heads: int, kernel: int = 3, norm_groups: int = 16,
        eps: float = 1e-5, cond_dim: int = 0,
    ):  # fmt: skip
        super().__init__()
        # a per-clip condition (the motion class's embedding) added to both branches' inputs
        self.cond_proj = nn.Linear(cond_dim, channels) if cond_dim else None
        self.attn_norm = nn.GroupNorm(norm_groups, channels, eps=eps)
        self.attn = Attention(
            channels, heads=heads, head_dim=channels // heads, qkv_bias=True, zero_init=True
        )
        self.conv_norm = nn.GroupNorm(norm_groups, channels, eps=eps)
        # the 1-D convolution over frames as a (kernel x 1) 2-D one on (B, C, F, H*W): the same
        # arithmetic without moving positions into the batch, 2-4x faster than Conv1d on a CPU
        self.conv = nn.Conv2d(channels, channels, (kernel, 1), padding=(kernel // 2, 0))
        self.conv_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, h: Tensor, frames: int, cond: Tensor | None = None) -> Tensor:
        """h (B*F, C, H, W), the frames of each clip consecutive -> the same shape; `cond`
        (B, cond_dim) a clip's condition when the block was built with cond_dim."""
        BF, C, H, W = h.shape
        if frames < 1 or BF % frames:
            raise ValueError(f"a batch of {BF} frames is not whole clips of {frames} frames")
        B = BF // frames
        x = h.view(B, frames, C, H, W)
        bias = None
        if self.cond_proj is not None:
            if cond is None or cond.shape[0] != B:
                raise ValueError(f"this temporal block needs a condition (B={B}, cond_dim)")
            bias = self.cond_proj(cond).to(h.dtype)  # (B, C)
        # Attention over frames: one sequence of F tokens per clip and position.
        n = self.attn_norm(x.transpose(1, 2))  # (B, C, F, H, W): statistics over the clip
        tokens = n.permute(0, 3, 4, 2, 1).reshape(B * H * W, frames, C)
        tokens = tokens + frame_encoding(frames, C, h.device).to(tokens.dtype)
        if bias is not None:
            tokens = tokens + bias.repeat_interleave(H * W, dim=0)[:, None, :]
        a = self.attn(tokens).view(B, H, W, frames, C).permute(0, 3, 4, 1, 2)
        x = x + a
        # Convolution over frames, at each position.
        n = self.conv_norm(x.transpose(1, 2))
        if bias is not None:
            n = n + bias[:, :, None, None, None]
        n = F.silu(n).reshape(B, C, frames, H * W)
        c = self.conv_out(F.silu(self.conv(n))).view(B, C, frames, H, W).transpose(1, 2)
        return (x + c).reshape(BF, C, H, W)


class FrameShell(nn.Module):
    """The per-frame layers after a stacked UNet (`VideoUNetConfig.frame_channels`): every
    frame of every clip is one image of a batch, so the weights are shared by the frames.

    For frame f with noisy latent x_f and the stacked UNet's prediction u_f:
        h0 = Res(conv3x3(x_f)); h = Res(h0 + conv1x1(u_f)); out_f = u_f + conv3x3(SiLU(GN(h)))
    both resnets taking an embedding of t and the image class. The last convolution starts at
    zero, so a fresh shell returns u_f: the model starts as the stacked UNet alone (tested).
    """

    def __init__(self, cfg: UNetConfig, channels: int, temporal: TemporalBlock | None = None):
        super().__init__()
        s, emb = channels, 4 * channels
        self.temporal = temporal
        self.time_embed = TimestepMLP(s, emb)
        self.flip_sin_to_cos, self.freq_shift = cfg.flip_sin_to_cos, cfg.freq_shift
        self.class_embed = nn.Embedding(cfg.num_classes + 1, emb) if cfg.num_classes else None
        self.num_classes = cfg.num_classes

        def res() -> ResnetBlock:
            return ResnetBlock(
                s, s, emb, norm_groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                dropout=cfg.dropout, time_injection=cfg.time_injection,
                zero_init=cfg.zero_init_residual,
            )  # fmt: skip

        self.conv_in = nn.Conv2d(cfg.in_channels, s, 3, padding=1)
        self.stem = res()
        self.from_core = nn.Conv2d(cfg.out_channels, s, 1)
        self.head = res()
        self.norm_out = nn.GroupNorm(cfg.norm_num_groups, s, eps=cfg.norm_eps)
        self.conv_out = zero_module(nn.Conv2d(s, cfg.out_channels, 3, padding=1))

    def forward(
        self, x: Tensor, core: Tensor, temb: Tensor, frames: int, cond: Tensor | None = None
    ) -> Tensor:
        """x (N, C, H, W) frames (N = clips * `frames`, each clip's consecutive), core
        (N, C_out, H, W) the stacked UNet's prediction of each, temb (N, 4 * channels) from
        `embed`, cond the temporal block's clip condition -> the predictions (N, C_out, H, W)."""
        h = self.stem(self.conv_in(x), temb)
        if self.temporal is not None:
            h = self.temporal(h, frames, cond)
        h = self.head(h + self.from_core(core), temb)
        return core + self.conv_out(F.silu(self.norm_out(h)))

    def embed(self, t: Tensor, class_labels: Tensor | None, batch: int, dtype) -> Tensor:
        """The (batch, 4 * channels) embedding of t (batch,) and the image classes (batch,)."""
        s = self.time_embed.linear_1.in_features
        temb = timestep_embedding(
            t, s, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift
        )
        temb = self.time_embed(temb.to(dtype))
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full((batch,), self.num_classes, device=t.device)
            temb = temb + self.class_embed(class_labels.long())
        return temb


def _last_block(level: nn.Module) -> nn.Module:
    """The module whose output ends a level's blocks (before its down- or upsample)."""
    return level.attentions[-1] if len(level.attentions) else level.resnets[-1]


class _TemporalHook:
    """A forward hook that runs a temporal block on a module's output while its `VideoUNet`
    is inside forward (and leaves the image UNet called on its own unchanged). An object, not
    a closure, so that `copy.deepcopy` of the model (EMA) points the copy's hooks at the copy's
    blocks."""

    def __init__(self, owner: VideoUNet, temporal: TemporalBlock):
        self.owner = owner
        self.temporal = temporal

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        frames = self.owner._frames
        if frames is None:
            return None
        return self.temporal(output, frames, self.owner._motion)


class _FrameEmbeddingHook:
    """Adds the owner's per-frame embedding (B*F, E) to the image UNet's time embedding while
    the `VideoUNet` is inside forward (an object for deepcopy, as `_TemporalHook`)."""

    def __init__(self, owner: VideoUNet):
        self.owner = owner

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        extra = self.owner._frame_emb
        return None if extra is None else output + extra.to(output.dtype)


class VideoUNet(ModelFolder, nn.Module):
    """`forward(x, t, *, class_labels=None, context=None, context_mask=None)` on clips
    x (B, F, C, H, W) -> (B, F, out_channels, H, W); see the module docstring."""

    config_class = VideoUNetConfig

    def __init__(self, config: VideoUNetConfig):
        super().__init__()
        if not isinstance(config, VideoUNetConfig):
            raise TypeError(f"VideoUNet takes a VideoUNetConfig, got {type(config).__name__}")
        self.config = cfg = config
        stacked = cfg.layout == "stacked"
        self.unet = UNet(cfg.stacked_unet if stacked else cfg.unet)
        ucfg, chs = cfg.unet, cfg.unet.block_out_channels
        levels = len(chs)

        # the temporal blocks' motion condition (a stacked layout has its own, below)
        cond_dim = ucfg.time_embed_dim if cfg.motion_classes and not stacked else 0
        # the motion classes' embedding (row motion_classes: the null), shared by the blocks
        self.temporal_motion_embedding = (
            nn.Embedding(cfg.motion_classes + 1, cond_dim) if cond_dim else None
        )

        def block(ch: int) -> TemporalBlock:
            return TemporalBlock(
                ch, heads=cfg.temporal_heads, kernel=cfg.temporal_kernel,
                norm_groups=ucfg.norm_num_groups, eps=ucfg.norm_eps, cond_dim=cond_dim,
            )  # fmt: skip

        self.temporal_down = nn.ModuleDict({str(i): block(chs[i]) for i in cfg.levels})
        self.temporal_mid = block(chs[-1]) if cfg.temporal_mid and not stacked else None
        self.temporal_up = nn.ModuleDict({str(i): block(chs[i]) for i in cfg.levels})
        self._frames: int | None = None  # set during forward; the hooks act only then
        self._motion: Tensor | None = None  # the clips' motion embedding during forward
        self._frame_emb: Tensor | None = None  # the frames' (motion, index) embedding, too
        self.temporal_frame_embedding = None
        self.frame_shell = None
        if cfg.frame_channels:
            motion_dim = ucfg.time_embed_dim if cfg.motion_classes else 0
            temporal = TemporalBlock(
                cfg.frame_channels, heads=cfg.temporal_heads, kernel=cfg.temporal_kernel,
                norm_groups=ucfg.norm_num_groups, eps=ucfg.norm_eps, cond_dim=motion_dim,
            ) if cfg.frame_temporal else None  # fmt: skip
            self.frame_shell = FrameShell(ucfg, cfg.frame_channels, temporal)
        # stacked: the motion class's embedding added to the UNet's time embedding (beside the
        # image class's), so an unseen (class, motion) pair is a sum of two trained rows
        self.stacked_motion_embedding = None
        if stacked and cfg.motion_classes:
            self.stacked_motion_embedding = nn.Embedding(
                cfg.motion_classes + 1, ucfg.time_embed_dim
            )
            self.unet.time_embed.register_forward_hook(_FrameEmbeddingHook(self))
        if cfg.frame_embedding:
            rows = (cfg.motion_classes + 1) * cfg.frames
            self.temporal_frame_embedding = nn.Embedding(rows, ucfg.time_embed_dim)
            nn.init.zeros_(self.temporal_frame_embedding.weight)
            self.unet.time_embed.register_forward_hook(_FrameEmbeddingHook(self))
        for i in cfg.levels:
            down = self.unet.down_levels[i]
            up = self.unet.up_levels[levels - 1 - i]  # up_levels run from the lowest level
            _last_block(down).register_forward_hook(_TemporalHook(self, self.temporal_down[str(i)]))
            _last_block(up).register_forward_hook(_TemporalHook(self, self.temporal_up[str(i)]))
        if self.temporal_mid is not None:
            self.unet.mid.register_forward_hook(_TemporalHook(self, self.temporal_mid))

    def split_labels(self, class_labels: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """Joint labels (B,) -> (image classes, motion classes), the null mapping to both nulls;
        without `motion_classes` the labels pass unchanged and the motion classes are None."""
        m = self.config.motion_classes
        if not m:
            return class_labels, None
        c = self.config.unet.num_classes
        if class_labels is None:
            return None, None
        y = torch.as_tensor(class_labels, device=self.unet.conv_in.weight.device).long()
        if y.ndim != 1 or (y < 0).any() or (y > c * m).any():
            raise ValueError(
                f"class_labels must be (B,) joint labels in [0, {c * m}] (class * {m} + motion "
                f"class; {c * m} the null), got {tuple(y.shape)} in "
                f"[{int(y.min()) if y.numel() else 0}, {int(y.max()) if y.numel() else 0}]"
            )
        null = y == c * m
        image = torch.where(null, torch.full_like(y, c), y // m)
        motion = torch.where(null, torch.full_like(y, m), y % m)
        return image, motion

    @classmethod
    def from_image_unet(cls, unet: UNet, **settings) -> VideoUNet:
        """A video UNet whose spatial layers are a copy of `unet`'s weights ("inflating" an
        image model); `settings` are the other `VideoUNetConfig` fields."""
        if settings.get("layout", "temporal") != "temporal":
            raise ConfigError(
                "only layout=temporal can start as an image run (a stacked UNet sees a clip's "
                "frames as channels); train a stacked video run from scratch"
            )
        model = cls(VideoUNetConfig(unet=unet.config, **settings))
        model.unet.load_state_dict(unet.state_dict())
        return model.to(next(unet.parameters()).device)

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        x: Tensor,
        t: Tensor | float | int,
        *,
        class_labels: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        if x.ndim != 5:
            raise ValueError(f"x must be clips (B, F, C, H, W), got {tuple(x.shape)}")
        B, frames = x.shape[:2]
        check_int("frames", frames, 1, MAX_FRAMES)
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape not in ((B,), (B, frames)):
            raise ValueError(f"t must be a scalar, ({B},) or ({B}, {frames}), got {tuple(t.shape)}")
        if self.config.layout == "stacked":
            return self._forward_stacked(x, t, class_labels, context, context_mask)
        t = t.repeat_interleave(frames) if t.ndim == 1 else t.reshape(B * frames)

        def per_frame(c: Tensor | None) -> Tensor | None:
            return None if c is None else c.repeat_interleave(frames, dim=0)

        if self.temporal_frame_embedding is not None and frames > self.config.frames:
            raise ValueError(
                f"this model embeds frame positions up to {self.config.frames}; "
                f"got clips of {frames} frames"
            )
        class_labels, motion = self.split_labels(class_labels)
        if self.temporal_motion_embedding is not None:
            if motion is None:  # no labels: the unconditional (null) motion
                motion = torch.full((B,), self.config.motion_classes, device=x.device)
            self._motion = self.temporal_motion_embedding(motion.to(x.device))
        if self.temporal_frame_embedding is not None:
            m = motion if motion is not None else torch.zeros(B, dtype=torch.long)
            index = m.to(x.device)[:, None] * self.config.frames + torch.arange(
                frames, device=x.device
            )
            self._frame_emb = self.temporal_frame_embedding(index.reshape(B * frames))
        self._frames = frames
        try:
            out = self.unet(
                x.reshape(B * frames, *x.shape[2:]),
                t,
                class_labels=per_frame(class_labels),
                context=per_frame(context),
                context_mask=per_frame(context_mask),
            )
        finally:
            self._frames = None
            self._motion = None
            self._frame_emb = None
        return out.view(B, frames, *out.shape[1:])

    def _forward_stacked(
        self, x: Tensor, t: Tensor, class_labels: Tensor | None, context: Tensor | None,
        context_mask: Tensor | None,
    ) -> Tensor:  # fmt: skip
        """The stacked layout: (B, F, C, H, W) -> one 2-D UNet on (B, F * C, H, W); t (B,) or
        (B, F), as forward checked it."""
        B, frames, C, H, W = x.shape
        if frames != self.config.frames:
            raise ValueError(
                f"this stacked video UNet sees clips of exactly {self.config.frames} frames "
                f"(its frames are channels); got {frames}"
            )
        if t.ndim == 2:
            if not (t == t[:, :1]).all():
                raise ValueError("a stacked video UNet takes one step per clip, not per frame")
            t = t[:, 0]
        class_labels, motion = self.split_labels(class_labels)
        motion_emb = None
        if self.stacked_motion_embedding is not None:
            if motion is None:  # no labels: the unconditional (null) motion
                motion = torch.full((B,), self.config.motion_classes, device=x.device)
            self._frame_emb = motion_emb = self.stacked_motion_embedding(motion.to(x.device))
        try:
            out = self.unet(
                x.reshape(B, frames * C, H, W), t, class_labels=class_labels, context=context,
                context_mask=context_mask,
            )  # fmt: skip
        finally:
            self._frame_emb = None
        shell = self.frame_shell
        if shell is None:
            return out.view(B, frames, -1, H, W)
        labels = None if class_labels is None else class_labels.repeat_interleave(frames)
        temb = shell.embed(t.repeat_interleave(frames), labels, B * frames, x.dtype)
        out = shell(
            x.reshape(B * frames, C, H, W), out.reshape(B * frames, -1, H, W), temb, frames,
            motion_emb,
        )  # fmt: skip
        return out.view(B, frames, -1, H, W)

    # ---------------------------------------------------------------- parameters

    def temporal_parameters(self) -> Iterator[nn.Parameter]:
        for name, p in self.named_parameters():
            if name.startswith("temporal_"):
                yield p

    def spatial_parameters(self) -> Iterator[nn.Parameter]:
        return self.unet.parameters()

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def summary(self) -> str:
        cfg = self.config
        temporal = sum(p.numel() for p in self.temporal_parameters())
        if cfg.layout == "stacked":
            shell = ""
            if self.frame_shell is not None:
                n = sum(p.numel() for p in self.frame_shell.parameters())
                shell = (
                    f", in per-frame layers of {cfg.frame_channels} channels"
                    f"{' with a temporal block' if cfg.frame_temporal else ''} "
                    f"({n / 1e6:.2f} M params)"
                )
            return (
                f"VideoUNet (stacked): {cfg.frames} frames as {cfg.frames} x "
                f"{cfg.unet.in_channels} channels of one {self.unet.summary()}{shell}"
            )
        where = ", ".join(str(cfg.unet.resolutions[i]) for i in cfg.levels) or "none"
        return (
            f"VideoUNet: {cfg.frames} frames, temporal layers at {where}"
            f"{' + mid' if cfg.temporal_mid else ''} ({temporal / 1e6:.2f} M params, "
            f"{cfg.temporal_heads} heads); {self.unet.summary()}"
        )

    # ---------------------------------------------------------------- persistence

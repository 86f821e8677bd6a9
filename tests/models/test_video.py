"""The video UNet: exactly the image UNet per frame at initialisation, frames mixed only by the
temporal layers, the temporal block against a loop-by-loop reference, config and folders."""

import copy
import json

import pytest
import torch
from torch.nn import functional as F

from ldmkit.config import ConfigError, from_dict, to_dict
from ldmkit.models.unet import UNet, UNetConfig
from ldmkit.models.video import TemporalBlock, VideoUNet, VideoUNetConfig, frame_encoding


def tiny_unet(seed: int = 0, **kw) -> UNet:
    """A 2-level UNet with every weight random (the zero-initialised ones too), so that it
    computes something nonzero everywhere."""
    torch.manual_seed(seed)
    cfg = dict(sample_size=8, in_channels=3, block_out_channels=(8, 16), attention_resolutions=(4,),
               head_dim=8, norm_num_groups=4)  # fmt: skip
    unet = UNet(UNetConfig(**{**cfg, **kw}))
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return unet.eval()


def randomise_temporal(model: VideoUNet, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.temporal_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("cond", ["none", "class", "text"])
def test_fresh_video_unet_is_the_image_unet_per_frame(cond):
    kw = {"none": {}, "class": {"num_classes": 3}, "text": {"context_dim": 6}}[cond]
    unet = tiny_unet(**kw)
    video = VideoUNet.from_image_unet(unet, frames=4, temporal_heads=2).eval()
    B, Fr = 2, 4
    x = torch.randn(B, Fr, 3, 8, 8)
    t = torch.tensor([3, 700])
    extra, per_frame = {}, {}
    if cond == "class":
        extra = {"class_labels": torch.tensor([0, 2])}
        per_frame = {"class_labels": extra["class_labels"].repeat_interleave(Fr)}
    if cond == "text":
        extra = {
            "context": torch.randn(B, 5, 6),
            "context_mask": torch.ones(B, 5, dtype=torch.bool),
        }
        per_frame = {k: v.repeat_interleave(Fr, dim=0) for k, v in extra.items()}
    with torch.no_grad():
        out = video(x, t, **extra)
        ref = unet(x.reshape(B * Fr, 3, 8, 8), t.repeat_interleave(Fr), **per_frame)
        loop = torch.stack([
            torch.stack([unet(x[b, f][None], t[b : b + 1], **{k: v[b * Fr + f][None]
                                                              for k, v in per_frame.items()})[0]
                         for f in range(Fr)]) for b in range(B)])  # fmt: skip
    assert out.shape == (B, Fr, 3, 8, 8) and out.abs().mean() > 0.01
    assert torch.equal(out, ref.view(B, Fr, 3, 8, 8))  # bit for bit: the projections are zero
    assert torch.allclose(out, loop, atol=1e-5)  # and the batch is frame by frame
    # the image UNet, called on its own, is untouched by the hooks
    with torch.no_grad():
        assert torch.equal(video.unet(x[0], t[0]), unet(x[0], t[0]))


def test_one_step_on_the_temporal_layers_changes_the_output():
    video = VideoUNet.from_image_unet(tiny_unet(), frames=3, temporal_heads=2)
    x, t = torch.randn(2, 3, 3, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        before = video(x, t)
    spatial = [p.detach().clone() for p in video.spatial_parameters()]
    video.unet.requires_grad_(False)  # what freeze_spatial asks of a trainer
    opt = torch.optim.Adam(video.temporal_parameters(), lr=1e-3)
    loss = (video(x, t) - torch.randn(2, 3, 3, 8, 8)).pow(2).mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = video(x, t)
    assert (after - before).abs().max() > 1e-4
    assert all(torch.equal(a, b) for a, b in zip(spatial, video.spatial_parameters()))


def _input_gradient(video: VideoUNet, x: torch.Tensor, b: int, i: int) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    video(x, torch.tensor([40, 400]))[b, i].square().sum().backward()
    return x.grad.abs().sum(dim=(2, 3, 4))  # (B, F): how much each input frame matters


def test_frames_interact_only_through_the_temporal_layers():
    video = VideoUNet.from_image_unet(tiny_unet(), frames=4, temporal_heads=2)
    x = torch.randn(2, 4, 3, 8, 8)
    g = _input_gradient(video, x, b=1, i=2)
    assert g[1, 2] > 0
    others = g.clone()
    others[1, 2] = 0
    assert torch.equal(others, torch.zeros_like(others))  # exactly no path between frames
    randomise_temporal(video)
    g = _input_gradient(video, x, b=1, i=2)
    assert (g[1] > 0).all()  # now every frame of the clip reaches frame 2
    assert torch.equal(g[0], torch.zeros(4))  # but never another clip


@pytest.mark.parametrize("B, frames", [(1, 1), (2, 3), (1, 5)])
def test_temporal_block_shapes_and_reference(B, frames):
    torch.manual_seed(B * 10 + frames)
    C, H, W, heads = 8, 3, 2, 2
    block = TemporalBlock(C, heads=heads, kernel=3, norm_groups=4)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    h = torch.randn(B * frames, C, H, W)
    out = block(h, frames)
    assert out.shape == h.shape
    # reference: explicit loops over clips and positions, attention written out
    x = h.view(B, frames, C, H, W).clone()
    gn = F.group_norm(x.transpose(1, 2), 4, block.attn_norm.weight, block.attn_norm.bias, 1e-5)
    pos = frame_encoding(frames, C, h.device)
    a = block.attn
    d = C // heads
    y = x.clone()
    for b in range(B):
        for r in range(H):
            for c in range(W):
                tok = gn[b, :, :, r, c].T + pos  # (F, C)
                q, k, v = a.to_q(tok), a.to_k(tok), a.to_v(tok)
                heads_out = []
                for j in range(heads):
                    s = slice(j * d, (j + 1) * d)
                    w = torch.softmax(q[:, s] @ k[:, s].T / d**0.5, dim=-1)
                    heads_out.append(w @ v[:, s])
                y[b, :, :, r, c] += a.to_out(torch.cat(heads_out, dim=1))
    gn2 = F.group_norm(y.transpose(1, 2), 4, block.conv_norm.weight, block.conv_norm.bias, 1e-5)
    z = y.clone()
    for b in range(B):
        for r in range(H):
            for c in range(W):
                seq = F.silu(gn2[b, :, :, r, c])[None]  # (1, C, F): a 1-D convolution over F
                hidden = F.silu(
                    F.conv1d(seq, block.conv.weight[..., 0], block.conv.bias, padding=1)
                )
                proj = F.conv1d(hidden, block.conv_out.weight[..., 0], block.conv_out.bias)
                z[b, :, :, r, c] += proj[0].T
    assert torch.allclose(out, z.view_as(out), atol=1e-5)
    with pytest.raises(ValueError, match="whole clips"):
        block(torch.randn(5, C, H, W), 2)


@pytest.mark.parametrize("B, frames", [(1, 1), (3, 2), (2, 6)])
def test_video_unet_any_frames_and_batch(B, frames):
    video = VideoUNet.from_image_unet(tiny_unet(), frames=4, temporal_heads=2)
    randomise_temporal(video)
    with torch.no_grad():
        out = video(torch.randn(B, frames, 3, 8, 8), torch.full((B, frames), 100))
    assert out.shape == (B, frames, 3, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="clips"):
        video(torch.randn(2, 3, 8, 8), 1)
    with pytest.raises(ValueError, match="t must be"):
        video(torch.randn(B, frames, 3, 8, 8), torch.zeros(B + 1))


def test_deepcopy_gets_its_own_temporal_layers():
    video = VideoUNet.from_image_unet(tiny_unet(), frames=3, temporal_heads=2)
    randomise_temporal(video)
    x, t = torch.randn(1, 3, 3, 8, 8), torch.tensor([50])
    with torch.no_grad():
        before = video(x, t)
        twin = copy.deepcopy(video)  # how EMA copies a model
        randomise_temporal(video, seed=9)
        assert torch.equal(twin(x, t), before)
        assert not torch.equal(video(x, t), before)


def test_config_and_folder_round_trip(tmp_path):
    video = VideoUNet.from_image_unet(tiny_unet(), frames=5, temporal_heads=4,
                                      temporal_levels=(1,), freeze_spatial=True)  # fmt: skip
    randomise_temporal(video)
    assert set(video.temporal_down) == {"1"} and video.temporal_mid is not None
    video.save_pretrained(tmp_path / "video")
    data = json.loads((tmp_path / "video" / "config.json").read_text())
    assert (
        data["frames"] == 5 and data["freeze_spatial"] is True and data["unet"]["in_channels"] == 3
    )
    assert from_dict(VideoUNetConfig, to_dict(video.config)) == video.config
    loaded = VideoUNet.from_pretrained(tmp_path / "video")
    x = torch.randn(1, 5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, 7), video.eval()(x, 7))
    assert "VideoUNet: 5 frames" in loaded.summary()


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"temporal_heads": 3}, "does not divide"),
        ({"temporal_levels": (2,)}, "does not exist"),
        ({"temporal_kernel": 4}, "odd"),
        ({"frames": 0}, "frames"),
    ],
)
def test_bad_video_configs(settings, words):
    unet = UNetConfig(sample_size=8, block_out_channels=(8, 16), attention_resolutions=(4,),
                      head_dim=8, norm_num_groups=4)  # fmt: skip
    with pytest.raises(ConfigError, match=words):
        VideoUNetConfig(unet=unet, **settings)


# ---------------------------------------------------------------- motion classes, mixed noise


def test_motion_classes_split_joint_labels_and_start_as_the_image_unet():
    unet = tiny_unet(num_classes=3)
    video = VideoUNet.from_image_unet(unet, frames=3, temporal_heads=2, motion_classes=4).eval()
    assert video.config.num_classes == 12 and video.config.joint_label(2, 1) == 9
    y = torch.tensor([0, 5, 11, 12])  # (0, 0), (1, 1), (2, 3), the null
    image, motion = video.split_labels(y)
    assert image.tolist() == [0, 1, 2, 3] and motion.tolist() == [0, 1, 3, 4]
    x, t = torch.randn(4, 3, 3, 8, 8), torch.tensor([5, 300, 600, 999])
    with torch.no_grad():
        out = video(x, t, class_labels=y)
        ref = unet(x.reshape(12, 3, 8, 8), t.repeat_interleave(3),
                   class_labels=image.repeat_interleave(3))  # fmt: skip
    assert torch.equal(out, ref.view_as(out))  # fresh: the image UNet on the image class
    with pytest.raises(ValueError, match="joint labels in \\[0, 12\\]"):
        video(x, t, class_labels=torch.tensor([0, 1, 2, 13]))
    with pytest.raises(ConfigError, match="motion_classes needs a class-conditional"):
        VideoUNetConfig(unet=UNetConfig(sample_size=8), motion_classes=4)


def test_the_motion_class_acts_through_the_temporal_layers_only():
    video = VideoUNet.from_image_unet(tiny_unet(num_classes=3), frames=3, temporal_heads=2,
                                      motion_classes=4).eval()  # fmt: skip
    randomise_temporal(video)
    x, t = torch.randn(1, 3, 3, 8, 8).expand(4, -1, -1, -1, -1), torch.tensor(400)
    y = torch.tensor([4, 5, 6, 5])  # image class 1 throughout; motion 0, 1, 2, 1
    with torch.no_grad():
        out = video(x, t, class_labels=y)
    assert torch.equal(out[1], out[3])  # the same joint label: the same clip
    assert (out[0] - out[1]).abs().max() > 1e-3 and (out[1] - out[2]).abs().max() > 1e-3
    # and a frozen image UNet still passes the gradient to the motion embedding
    video.unet.requires_grad_(False)
    video(x, t, class_labels=y).pow(2).mean().backward()
    grad = video.temporal_motion_embedding.weight.grad
    assert grad[:3].abs().sum(1).gt(0).all() and grad[3:].abs().sum() == 0  # rows 0-2 used only
    assert all(p.grad is None for p in video.spatial_parameters())


def test_mixed_frame_noise_has_unit_variance_and_the_prior_correlation():
    from ldmkit.models.video import clip_noise, mix_frame_noise

    g = torch.Generator().manual_seed(0)
    for alpha in (0.5, 1.0, 2.0):
        n = clip_noise((20000, 4, 1, 1, 1), alpha, generator=g).flatten(1)  # (N, F)
        cov = torch.cov(n.T)
        off = cov[~torch.eye(4, dtype=torch.bool)]
        assert torch.allclose(cov.diagonal(), torch.ones(4), atol=0.04)
        assert torch.allclose(off, torch.full_like(off, alpha**2 / (1 + alpha**2)), atol=0.04)
    a = clip_noise((2, 3, 4, 2, 2), 0.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, torch.randn((2, 3, 4, 2, 2), generator=torch.Generator().manual_seed(7)))
    own, shared = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 1, 4, 2, 2)
    mixed = mix_frame_noise(own, 1.0, shared=shared)
    assert torch.allclose(mixed, (shared + own) / 2**0.5)
    with pytest.raises(ConfigError, match="noise_mixing"):
        VideoUNetConfig(unet=UNetConfig(sample_size=8), noise_mixing=-1)


def test_frame_embedding_starts_at_zero_and_tells_each_frame_its_place():
    unet = tiny_unet(num_classes=3)
    video = VideoUNet.from_image_unet(unet, frames=4, temporal_heads=2, motion_classes=2,
                                      frame_embedding=True).eval()  # fmt: skip
    x = torch.randn(1, 1, 3, 8, 8).expand(2, 4, -1, -1, -1)  # the same image in every frame
    y, t = torch.tensor([2, 3]), torch.tensor(300)  # image class 1; motion 0 and 1
    with torch.no_grad():
        out = video(x, t, class_labels=y)
        ref = unet(x[0, :1], t, class_labels=torch.tensor([1]))
    assert torch.allclose(out, ref.expand_as(out), atol=1e-5)  # fresh: the image model per frame
    # a fresh (zero) embedding still gets a gradient, through the frozen image UNet
    video.unet.requires_grad_(False)
    video(x, t, class_labels=y).pow(2).mean().backward()
    grad = video.temporal_frame_embedding.weight.grad  # rows: motion * frames + frame
    assert grad[:8].abs().sum(1).gt(0).all() and grad[8:].abs().sum() == 0  # null rows unused
    with torch.no_grad():
        video.temporal_frame_embedding.weight.normal_()
        out = video(x, t, class_labels=y)
    assert all((out[0, f] - out[0, 0]).abs().max() > 1e-3 for f in range(1, 4))  # per frame
    assert (out[0] - out[1]).abs().max() > 1e-3  # and per motion class
    with pytest.raises(ValueError, match="frame positions up to 4"):
        video(torch.randn(1, 5, 3, 8, 8), t)


# ---------------------------------------------------------------- the stacked layout


def test_stacked_layout_is_one_unet_on_the_clip_as_channels(tmp_path):
    """layout=stacked: the clip (B, F, C, H, W) is one image of F * C channels for a 2-D UNet;
    checked against that UNet called directly, after a save and load, and frames do interact (a
    change in frame 0 moves the output of the last frame)."""
    base = tiny_unet(num_classes=2).config
    cfg = VideoUNetConfig(unet=base, frames=3, layout="stacked")
    torch.manual_seed(0)
    video = VideoUNet(cfg).eval()
    assert video.unet.config.in_channels == 9 and video.unet.config.out_channels == 9
    assert video.unet.config.num_classes == 2 and not list(video.temporal_parameters())
    with torch.no_grad():
        for p in video.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    x = torch.randn(2, 3, 3, 8, 8)
    y = torch.tensor([1, 2])  # class 1 and the null
    t = torch.tensor([5, 700])
    with torch.no_grad():
        out = video(x, t, class_labels=y)
        ref = video.unet(x.reshape(2, 9, 8, 8), t, class_labels=y).view(2, 3, 3, 8, 8)
        assert torch.equal(out, ref)
        assert torch.equal(video(x, t[:, None].expand(2, 3), class_labels=y), out)
        same = torch.tensor([5, 5])
        assert torch.equal(video(x, 5, class_labels=y), video(x, same, class_labels=y))
        x2 = x.clone()
        x2[:, 0] += 1.0
        assert (video(x2, t, class_labels=y)[:, 2] - out[:, 2]).abs().max() > 1e-3
    video.save_pretrained(tmp_path / "v")
    loaded = VideoUNet.from_pretrained(tmp_path / "v").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, class_labels=y), out)
    assert "stacked" in loaded.summary()


def test_stacked_motion_classes_are_a_sum_of_two_embeddings():
    """With motion classes, a stacked UNet's joint label c * M + m is its image class c plus a
    motion row m added to the time embedding: with that row zero the output is the UNet's for
    class c; the joint null is both nulls; each motion row moves the output."""
    base = tiny_unet(num_classes=2).config
    video = VideoUNet(VideoUNetConfig(unet=base, frames=3, motion_classes=4, layout="stacked"))
    assert video.unet.config.num_classes == 2 and video.config.num_classes == 8
    with torch.no_grad():
        for p in video.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    video.eval()
    emb = video.stacked_motion_embedding.weight
    x, t = torch.randn(1, 3, 3, 8, 8), torch.tensor([300])
    plain = lambda c: video.unet(x.reshape(1, 9, 8, 8), t, class_labels=torch.tensor([c]))  # noqa: E731
    with torch.no_grad():
        moved = video(x, t, class_labels=torch.tensor([video.config.joint_label(1, 3)]))
        assert (moved.reshape(1, 9, 8, 8) - plain(1)).abs().max() > 1e-3
        emb[3] = 0
        got = video(x, t, class_labels=torch.tensor([video.config.joint_label(1, 3)]))
        assert torch.equal(got.reshape(1, 9, 8, 8), plain(1))
        emb[4] = 0  # the null motion row
        assert torch.equal(
            video(x, t, class_labels=torch.tensor([8])).reshape(1, 9, 8, 8), plain(2)
        )
        with pytest.raises(ValueError, match="joint labels"):
            video(x, t, class_labels=torch.tensor([9]))


def test_frame_shell_is_per_frame_layers_after_the_stacked_unet(tmp_path):
    """frame_channels: each frame goes through the same stem and head, which correct the
    stacked UNet's prediction for it; checked against the shell run frame by frame by hand,
    after a save and load. A fresh shell leaves the stacked UNet's output as it is (its last
    layer is zero). Frames meet only in the stacked UNet: with its output layer at zero, a
    change in frame 0 leaves the other frames alone."""
    base = tiny_unet(num_classes=2).config
    cfg = VideoUNetConfig(unet=base, frames=3, layout="stacked", frame_channels=8)
    video = VideoUNet(cfg).eval()
    assert video.unet.config.in_channels == 9 and video.unet.config.out_channels == 9
    x, t, y = torch.randn(2, 3, 3, 8, 8), torch.tensor([5, 700]), torch.tensor([1, 2])
    stacked = lambda x: video.unet(x.reshape(2, 9, 8, 8), t, class_labels=y).view(2, 3, 3, 8, 8)  # noqa: E731
    with torch.no_grad():
        for p in video.unet.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        assert torch.equal(video(x, t, class_labels=y), stacked(x))  # a fresh shell
        for p in video.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        out = video(x, t, class_labels=y)
        core = stacked(x)
        shell = video.frame_shell
        temb = shell.embed(t, y, 2, x.dtype)
        for f in range(3):
            h = shell.stem(shell.conv_in(x[:, f]), temb)
            h = shell.head(h + shell.from_core(core[:, f]), temb)
            ref = core[:, f] + shell.conv_out(F.silu(shell.norm_out(h)))
            torch.testing.assert_close(out[:, f], ref, rtol=1e-5, atol=1e-5)
        assert (out - core).abs().max() > 1e-3  # the shell does act
        x2 = x.clone()
        x2[:, 0] += 1.0
        assert (video(x2, t, class_labels=y)[:, 2] - out[:, 2]).abs().max() > 1e-3
        video.unet.conv_out.weight.zero_()
        video.unet.conv_out.bias.zero_()
        alone = video(x, t, class_labels=y)
        assert torch.equal(video(x2, t, class_labels=y)[:, 1:], alone[:, 1:])
        assert (video(x2, t, class_labels=y)[:, 0] - alone[:, 0]).abs().max() > 1e-3
    video.save_pretrained(tmp_path / "v")
    loaded = VideoUNet.from_pretrained(tmp_path / "v").eval()
    assert loaded.config.frame_channels == 8
    with torch.no_grad():
        assert torch.equal(loaded(x, t, class_labels=y), alone)
    assert "per-frame layers of 8 channels" in loaded.summary()


def test_frame_temporal_block_sits_between_the_shells_stem_and_head():
    """frame_temporal: a temporal block (told the motion class) between the shell's stem and
    head. Fresh, its outputs are zero, so the model computes what the same weights do without
    it; randomised, frames meet in the shell too, and the motion class reaches it."""
    base = tiny_unet(num_classes=2).config
    kw = dict(unet=base, frames=3, layout="stacked", frame_channels=8, motion_classes=4)
    torch.manual_seed(0)
    plain = VideoUNet(VideoUNetConfig(**kw)).eval()
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    video = VideoUNet(VideoUNetConfig(**kw, frame_temporal=True, temporal_heads=2)).eval()
    missing = video.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("frame_shell.temporal.") for k in missing)
    x, t = torch.randn(2, 3, 3, 8, 8), torch.tensor([5, 700])
    y = torch.tensor([video.config.joint_label(1, 2), 8])  # class 1 moving 2, and the null
    with torch.no_grad():
        assert torch.equal(video(x, t, class_labels=y), plain(x, t, class_labels=y))
        for p in video.frame_shell.temporal.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        video.unet.conv_out.weight.zero_()
        video.unet.conv_out.bias.zero_()
        out = video(x, t, class_labels=y)
        x2 = x.clone()
        x2[:, 0] += 1.0
        assert (video(x2, t, class_labels=y)[:, 2] - out[:, 2]).abs().max() > 1e-3
        y2 = torch.tensor([video.config.joint_label(1, 3), 8])
        moved = video(x, t, class_labels=y2)
        assert (moved[0] - out[0]).abs().max() > 1e-3 and torch.equal(moved[1], out[1])
    assert "with a temporal block" in video.summary()


def test_frame_shell_refusals():
    base = tiny_unet(num_classes=2).config
    with pytest.raises(ConfigError, match="layout=stacked only"):
        VideoUNetConfig(unet=base, frames=3, frame_channels=8)
    with pytest.raises(ConfigError, match="frame_temporal needs per-frame layers"):
        VideoUNetConfig(unet=base, frames=3, layout="stacked", frame_temporal=True)
    with pytest.raises(ConfigError, match="temporal_heads 3 does not divide frame_channels 8"):
        VideoUNetConfig(unet=base, frames=3, layout="stacked", frame_channels=8,
                        frame_temporal=True, temporal_heads=3)  # fmt: skip
    with pytest.raises(ConfigError, match="multiple of the UNet's norm_num_groups"):
        VideoUNetConfig(unet=base, frames=3, layout="stacked", frame_channels=6)


def test_stacked_layout_refusals():
    base = tiny_unet(num_classes=2).config
    video = VideoUNet(VideoUNetConfig(unet=base, frames=3, layout="stacked"))
    with pytest.raises(ValueError, match="exactly 3 frames"):
        video(torch.randn(1, 4, 3, 8, 8), 1)
    with pytest.raises(ValueError, match="one step per clip"):
        video(torch.randn(1, 3, 3, 8, 8), torch.tensor([[1, 2, 3]]))
    with pytest.raises(ConfigError, match="layout"):
        VideoUNetConfig(unet=base, layout="sideways")
    with pytest.raises(ConfigError, match="temporal only"):
        VideoUNetConfig(unet=base, layout="stacked", freeze_spatial=True)
    with pytest.raises(ConfigError, match="from scratch"):
        VideoUNet.from_image_unet(tiny_unet(num_classes=2), frames=3, layout="stacked")

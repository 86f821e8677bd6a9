"""The video path end to end at toy size: moving shapes -> per-frame latents -> video UNet
trained with the diffusion loss -> clips sampled with the image samplers -> animated GIF."""

import numpy as np
import pytest
import torch

from ldmkit.config import ConfigError
from ldmkit.data import DataError
from ldmkit.data.animations import read_animation, read_animation_params, save_animation
from ldmkit.data.moving_shapes import generate_moving_shapes
from ldmkit.models.conditioning import ClassConditioner
from ldmkit.models.unet import UNetConfig
from ldmkit.models.vae import Autoencoder, AutoencoderConfig
from ldmkit.models.video import VideoUNet, VideoUNetConfig
from ldmkit.recipe import DiffusionConfig, TrainConfig
from ldmkit.runs import RunFolder
from ldmkit.training.step import MicroBatch, optimizer_step
from ldmkit.training.video import encode_clip_moments, train_video_unet, video_diffusion_stage
from ldmkit.video_sampling import sample_clips

FRAMES = 4


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    clips = generate_moving_shapes(8, frames=FRAMES, image_size=16, seed=0)
    vae = Autoencoder(
        AutoencoderConfig(block_out_channels=(8, 16), norm_groups=4, image_size=16)
    ).eval()
    moments = encode_clip_moments(vae, torch.from_numpy(clips.videos), torch.device("cpu"))
    return clips, vae, moments


def video_unet(freeze: bool = False, num_classes: int | None = None) -> VideoUNet:
    torch.manual_seed(1)
    unet = UNetConfig(sample_size=8, in_channels=4, block_out_channels=(16, 32),
                      attention_resolutions=(), head_dim=8, norm_num_groups=8,
                      num_classes=num_classes)  # fmt: skip
    return VideoUNet(VideoUNetConfig(unet=unet, frames=FRAMES, temporal_heads=2,
                                     freeze_spatial=freeze))  # fmt: skip


def test_moments_are_the_autoencoder_per_frame(toy):
    clips, vae, moments = toy
    assert moments.shape == (8, FRAMES, 8, 8, 8)
    one = vae.encode(torch.from_numpy(clips.videos[3, 2][None]).float() / 127.5 - 1)
    assert torch.allclose(moments[3, 2, :4], one.mean[0], atol=1e-5)


def test_loss_finite_and_falling_on_a_fixed_batch(toy):
    clips, _, moments = toy
    model = video_unet(num_classes=5)
    stage = video_diffusion_stage(
        model, moments, ClassConditioner(5), torch.from_numpy(clips.labels), 1.0,
        DiffusionConfig(), TrainConfig(lr=2e-3), torch.device("cpu"),
    )  # fmt: skip

    # the same step index every time: the same posterior noise, t, eps and dropout
    def fixed() -> MicroBatch:  # fresh generators, same seeds
        return MicroBatch(torch.arange(8), torch.arange(8), step=0, batch_size=8, key="video/0")

    losses = [optimizer_step(stage, [fixed()], grad_clip=1.0)["loss"] for _ in range(25)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def test_freeze_spatial_trains_the_temporal_layers_only(toy):
    _, _, moments = toy
    model = video_unet(freeze=True)
    with pytest.raises(ConfigError, match="trained image UNet"):
        video_diffusion_stage(model, moments, ClassConditioner(None), None, 1.0,
                              DiffusionConfig(), TrainConfig(), torch.device("cpu"))  # fmt: skip
    with torch.no_grad():  # stand-in for a trained image run: no zero layers left
        for p in model.spatial_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    spatial = [p.detach().clone() for p in model.spatial_parameters()]
    temporal = [p.detach().clone() for p in model.temporal_parameters()]
    stage = video_diffusion_stage(model, moments, ClassConditioner(None), None, 1.0,
                                  DiffusionConfig(), TrainConfig(), torch.device("cpu"))  # fmt: skip
    for step in range(2):
        mb = MicroBatch(torch.arange(4), torch.arange(4), step=step, batch_size=4, key="video/0")
        optimizer_step(stage, [mb], grad_clip=1.0)
    assert all(torch.equal(a, b) for a, b in zip(spatial, model.spatial_parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(temporal, model.temporal_parameters()))


def test_train_sample_and_write_a_gif(toy, tmp_path):
    _, vae, moments = toy
    model = video_unet()
    cfg = TrainConfig(steps=3, batch_size=4, warmup_steps=1, checkpoint_every=3, sample_every=0,
                      log_every=1, ema_decay=0.9)  # fmt: skip
    result = train_video_unet(model, moments, RunFolder(tmp_path / "run"), diff=DiffusionConfig(),
                              cfg=cfg, scaling_factor=1.0)  # fmt: skip
    assert result.steps_done == 3 and np.isfinite(result.last_loss)
    assert result.checkpoint is not None and result.checkpoint.is_dir()
    schedule = DiffusionConfig().make_schedule()
    model.eval()
    a = sample_clips(model, vae, schedule, n=2, scaling_factor=1.0, steps=3, seed=5)
    b = sample_clips(model, vae, schedule, n=2, scaling_factor=1.0, steps=3, seed=5)
    assert a.shape == (2, FRAMES, 3, 16, 16) and a.dtype == torch.uint8 and torch.equal(a, b)
    params = {"seed": 5, "steps": 3, "sampler": "dpm++2m"}
    path = save_animation(tmp_path / "clip.gif", a[0].numpy(), fps=6, params=params)
    back = read_animation(path)
    assert back.shape == (FRAMES, 3, 16, 16)
    assert read_animation_params(path) == params


def test_animation_round_trip_and_one_frame_refused(tmp_path):
    clip = generate_moving_shapes(1, frames=5, image_size=16, seed=3).videos[0]
    gif = save_animation(tmp_path / "a.gif", clip, fps=10)
    back = read_animation(gif)
    assert back.shape == clip.shape
    # an adaptive palette per frame: a frame has at most 16*16 colours, so nearly exact
    assert np.abs(back.astype(int) - clip).max() <= 8
    webp = save_animation(tmp_path / "a.webp", clip, fps=10)
    assert np.array_equal(read_animation(webp), clip)  # lossless
    still = tmp_path / "still.gif"
    from PIL import Image

    Image.fromarray(clip[0].transpose(1, 2, 0)).save(still)
    with pytest.raises(DataError, match="at least 2") as e:
        read_animation(still)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="at least 2 frames"):
        save_animation(tmp_path / "b.gif", clip[:1])


def test_temporal_layers_get_their_own_lr_and_mixed_noise_reaches_the_loss(toy, monkeypatch):
    import ldmkit.training.video as tv

    clips, _, moments = toy
    seen = []

    def spy(*args, eps, **kw):
        seen.append(eps)
        return real(*args, eps=eps, **kw)

    real = tv.training_loss
    monkeypatch.setattr(tv, "training_loss", spy)
    corr = {}
    for alpha in (0.0, 3.0):
        model = video_unet(num_classes=5)
        model.config.temporal_lr_mult, model.config.noise_mixing = 10.0, alpha
        stage = video_diffusion_stage(
            model, moments, ClassConditioner(5), torch.from_numpy(clips.labels), 1.0,
            DiffusionConfig(), TrainConfig(lr=1e-4), torch.device("cpu"),
        )  # fmt: skip
        fast, slow = stage.optimizer.param_groups
        assert {id(p) for p in fast["params"]} == {id(p) for p in model.temporal_parameters()}
        assert fast["base_lr"] == pytest.approx(1e-3) and slow["base_lr"] == pytest.approx(1e-4)
        mb = MicroBatch(torch.arange(8), torch.arange(8), step=0, batch_size=8, key="video/0")
        optimizer_step(stage, [mb], grad_clip=1.0)
        eps = seen[-1]  # (8, F, 4, 8, 8)
        assert eps.shape == (8, FRAMES, 4, 8, 8) and abs(eps.std().item() - 1) < 0.1
        a, b = eps[:, 0].flatten(), eps[:, 1].flatten()
        corr[alpha] = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr[0.0]) < 0.1 and abs(corr[3.0] - 0.9) < 0.05, corr

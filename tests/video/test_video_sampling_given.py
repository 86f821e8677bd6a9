"""Given first frames (`video_sampling`): imposed at every step like inpainting's kept region,
so they come back exactly at the end, through every sampler; the rest is still sampled."""

import pytest
import torch

from ldmkit.diffusion.schedules import make_schedule
from ldmkit.models.unet import UNetConfig
from ldmkit.models.video import VideoUNet, VideoUNetConfig
from ldmkit.video_sampling import sample_video_latents, start_state

FRAMES, GIVEN = 4, 2


def randomised_video_unet() -> VideoUNet:
    torch.manual_seed(3)
    unet = UNetConfig(sample_size=4, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                      attention_resolutions=(), head_dim=4, norm_num_groups=4)  # fmt: skip
    model = VideoUNet(VideoUNetConfig(unet=unet, frames=FRAMES, temporal_heads=2)).eval()
    with torch.no_grad():  # every weight random: the zero-initialised layers too
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun", "dpm++2m", "dpm++2m-sde", "ddpm"])
def test_given_frames_come_back_exactly(sampler):
    model, schedule = randomised_video_unet(), make_schedule("linear", 1000)
    known = torch.randn(1, GIVEN, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    out = sample_video_latents(model, schedule, (3, FRAMES, 2, 4, 4), prediction_type="v",
                               sampler=sampler, steps=4, seed=1, known=known)  # fmt: skip
    assert out.shape == (3, FRAMES, 2, 4, 4)
    assert torch.allclose(out[:, :GIVEN], known.expand(3, -1, -1, -1, -1), atol=1e-5)
    free = sample_video_latents(model, schedule, (3, FRAMES, 2, 4, 4), prediction_type="v",
                                sampler=sampler, steps=4, seed=1)  # fmt: skip
    # without them the first frames are something else, and the given ones change the rest
    assert (free[:, :GIVEN] - known).abs().mean() > 0.1
    assert (
        out[:, GIVEN:] - free[:, GIVEN:]
    ).abs().max() > 1e-4  # exactly equal without the temporal layers


def test_seeded_and_reproducible():
    model, schedule = randomised_video_unet(), make_schedule("linear", 1000)
    known = torch.randn(2, GIVEN, 2, 4, 4)
    a, b, c = (sample_video_latents(model, schedule, (2, FRAMES, 2, 4, 4), prediction_type="v",
                                    sampler="dpm++2m-sde", steps=3, seed=s, known=known)
               for s in (5, 5, 6))  # fmt: skip
    assert torch.equal(a, b) and not torch.equal(a[:, GIVEN:], c[:, GIVEN:])


def test_start_state_holds_the_known_frames_at_the_first_level():
    known = torch.randn(2, GIVEN, 2, 4, 4)
    sigma0 = 3.0
    x = start_state((2, FRAMES, 2, 4, 4), sigma0, torch.Generator().manual_seed(0), known)
    noise = torch.randn((2, FRAMES, 2, 4, 4), generator=torch.Generator().manual_seed(0))
    # VP state: (known + sigma0 * noise) / sqrt(1 + sigma0^2); the free frames plain noise
    assert torch.allclose(x[:, :GIVEN] * (1 + sigma0**2) ** 0.5, known + sigma0 * noise[:, :GIVEN],
                          atol=1e-5)  # fmt: skip
    assert torch.equal(x[:, GIVEN:], noise[:, GIVEN:])


def test_known_frames_that_do_not_fit_are_refused():
    model, schedule = randomised_video_unet(), make_schedule("linear", 1000)
    with pytest.raises(ValueError, match="do not fit"):
        sample_video_latents(model, schedule, (1, FRAMES, 2, 4, 4), prediction_type="v",
                             steps=2, known=torch.zeros(1, FRAMES, 2, 4, 4))  # fmt: skip


def test_start_state_with_mixed_frame_noise():
    shape, alpha = (64, 4, 2, 4, 4), 3.0
    x = start_state(shape, 1.0, torch.Generator().manual_seed(0), None, noise_mixing=alpha)
    own = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert x.std().item() == pytest.approx(1.0, abs=0.05)  # each frame stays N(0, 1)
    # frames of a clip correlate by alpha^2 / (1 + alpha^2) = 0.9; independent noise does not
    a, b = x[:, 0].flatten(), x[:, 1].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1].item() == pytest.approx(0.9, abs=0.03)
    assert torch.equal(start_state(shape, 1.0, torch.Generator().manual_seed(0), None), own)

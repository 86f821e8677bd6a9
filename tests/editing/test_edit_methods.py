"""Editing with a LatentDiffusion: paste-back exactness, strength semantics, batch = singles,
conditions, and the input checks. Tiny untrained models: these are properties of the method,
not of a trained network."""

import pytest
import torch

from ldmkit import editing
from ldmkit.data import masks as masklib
from ldmkit.models.unet import UNet, UNetConfig
from ldmkit.models.vae import Autoencoder, AutoencoderConfig
from ldmkit.pipeline import LatentDiffusion
from ldmkit.recipe import DiffusionConfig


def perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def tiny_ldm(num_classes=None, channels=3, prediction_type="v"):
    torch.manual_seed(0)
    vae = Autoencoder(
        AutoencoderConfig(
            image_channels=channels, latent_channels=2, block_out_channels=(8, 8),
            layers_per_block=1, norm_groups=4, image_size=16,
        )
    )  # fmt: skip
    unet = UNet(
        UNetConfig(
            sample_size=8, in_channels=2, block_out_channels=(8, 16), num_res_blocks=1,
            attention_resolutions=(4,), head_dim=4, norm_num_groups=4, num_classes=num_classes,
            prediction_type=prediction_type,
        )
    )  # fmt: skip
    perturbed(unet)
    return LatentDiffusion(vae, unet, DiffusionConfig().make_schedule(), device="cpu")


@pytest.fixture(scope="module")
def ldm():
    return tiny_ldm()


def photos(n=2, seed=0):
    """uint8-exact images: what a PNG on disk gives."""
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (n, 3, 16, 16), generator=g)
    return u8.float() / 127.5 - 1


def box_mask(n=1):
    m = torch.zeros(n, 1, 16, 16)
    m[..., 4:10, 5:12] = 1
    return m


def test_ldm_knows_its_image_size(ldm):
    assert ldm.downsampling == 2 and ldm.image_shape == (3, 16, 16)


@pytest.mark.parametrize(
    "sampler", ["dpm++2m-sde", "ddim", "euler", "heun", "ddpm", "dpm++2m", "langevin"]
)
def test_inpaint_keeps_every_unmasked_pixel_bit_for_bit(ldm, sampler):
    images, mask = photos(), box_mask()
    result = editing.inpaint(ldm, images, mask, sampler=sampler, steps=4, seed=0)
    out = result.images
    keep = mask.expand_as(images) == 0
    assert torch.equal(out[keep], images[keep])
    assert not torch.equal(out[~keep], images[~keep])
    assert out.shape == images.shape and result.network_calls >= 4


def test_feathered_paste_back_is_exact_beyond_the_blur_radius(ldm):
    images, mask = photos(), box_mask()
    out = editing.inpaint(ldm, images, mask, steps=3, mask_blur=2).images
    far = masklib.grow(mask, 2) == 0
    far = far.expand_as(images)
    assert torch.equal(out[far], images[far])
    ring = (masklib.grow(mask, 2) - mask).bool().expand_as(images)
    assert not torch.equal(out[ring], images[ring])  # the edge is blended


def test_a_one_pixel_stroke_survives_the_latent_downsampling_and_is_regenerated(ldm):
    images = photos(1)
    mask = torch.zeros(1, 1, 16, 16)
    mask[0, 0, 7, 3:13] = 1  # a 1-pixel-wide horizontal stroke
    lat = masklib.to_latent(mask, 2)
    assert lat.sum() == 6 and lat[0, 0, 3, 1:7].sum() == 6  # columns 3..12 -> cells 1..6
    out = editing.inpaint(ldm, images, mask, steps=3).images
    assert not torch.equal(out[..., 7, 3:13], images[..., 7, 3:13])
    assert torch.equal(out[..., 8:, :], images[..., 8:, :])


def test_all_black_mask_returns_the_input_and_all_white_says_it_is_a_fresh_sample(ldm):
    images = photos()
    black = editing.inpaint(ldm, images, torch.zeros(1, 1, 16, 16), steps=3)
    assert torch.equal(black.images, images) and black.network_calls == 0
    assert "all black" in black.notes[0]
    white = editing.inpaint(ldm, images, torch.ones(1, 1, 16, 16), steps=3)
    assert any("all white" in n for n in white.notes) and white.network_calls == 3


def test_batch_of_edits_equals_single_edits_with_the_same_seeds(ldm):
    images, masks = photos(3), box_mask(3)
    batch = editing.inpaint(ldm, images, masks, steps=3, seed=5).images
    for i in range(3):
        one = editing.inpaint(ldm, images[i : i + 1], masks[i : i + 1], steps=3, seed=5 + i)
        assert torch.allclose(one.images, batch[i : i + 1], atol=1e-5)
    batch = editing.img2img(ldm, images, strength=0.5, steps=4, seed=2).images
    one = editing.img2img(ldm, images[1:2], strength=0.5, steps=4, seed=3).images
    assert torch.allclose(one, batch[1:2], atol=1e-5)


def test_repaint_needs_a_single_step_sampler_and_calls_the_network_on_its_path(ldm):
    with pytest.raises(ValueError, match="RePaint.*ddpm or ddim"):
        editing.inpaint(ldm, photos(), box_mask(), sampler="dpm++2m", repaint_resample=2)
    out = editing.inpaint(
        ldm, photos(), box_mask(), sampler="ddpm", steps=6, repaint_jump=2, repaint_resample=3
    )
    # 6 down steps + 2 extra down steps per jump, jumps at 2 and 4, twice each
    assert out.network_calls == 6 + 2 * 2 * 2


@pytest.mark.parametrize(
    ("sampler", "steps", "strength"),
    [("ddim", 10, 0.3), ("dpm++2m-sde", 20, 0.55), ("euler", 8, 1.0)],
)
def test_img2img_calls_the_network_round_steps_times_strength(ldm, sampler, steps, strength):
    out = editing.img2img(ldm, photos(), strength=strength, sampler=sampler, steps=steps)
    assert out.network_calls == round(steps * strength)
    assert f"{round(steps * strength)} of {steps} steps" in out.notes[-1]


def test_img2img_at_strength_one_does_not_depend_on_the_input(ldm):
    a = editing.img2img(ldm, photos(seed=0), strength=1.0, steps=4).images
    b = editing.img2img(ldm, photos(seed=1), strength=1.0, steps=4).images
    assert torch.equal(a, b)
    c = editing.img2img(ldm, photos(seed=1), strength=0.5, steps=4).images
    assert not torch.equal(a, c)


def test_img2img_strength_that_runs_no_step_is_an_error(ldm):
    with pytest.raises(ValueError, match="leaves no step"):
        editing.img2img(ldm, photos(), strength=0.01, steps=20)


def test_inversion_reports_its_error_and_warns_under_guidance():
    ldm = tiny_ldm(num_classes=3)
    out = editing.invert(ldm, photos(1), steps=10)
    assert out.extra["noise"].shape == (1, 2, 8, 8)
    assert len(out.extra["psnr"]) == 1 and out.extra["psnr"][0] > 0
    guided = editing.invert(ldm, photos(1), steps=4, class_labels=[1], guidance_scale=3.0)
    assert any("exact only without guidance" in n for n in guided.notes)


def test_interpolation_between_seeds_images_and_classes():
    ldm = tiny_ldm(num_classes=3)
    seeds = editing.interpolate(ldm, seeds=(1, 2), frames=5, steps=4)
    assert seeds.images.shape == (5, 3, 16, 16)
    assert not torch.equal(seeds.images[0], seeds.images[-1])
    imgs = editing.interpolate(ldm, images=photos(2), frames=3, steps=4)
    assert imgs.images.shape[0] == 3
    # the ends are the images' DDIM inversions: frame 0 is image 0's round trip, and the
    # inversion's 4 calls (no reconstruction, no decode) plus the frames' 4 are all it costs
    roundtrip = editing.invert(ldm, photos(2), steps=4)
    torch.testing.assert_close(imgs.images[0], roundtrip.images[0], atol=1e-4, rtol=0)
    assert imgs.network_calls == 4 + 4
    classes = editing.interpolate(ldm, class_labels=(0, 2), frames=4, steps=4, seed=3)
    ends = [ldm.sample(1, sampler="ddim", steps=4, class_labels=[c]) for c in (0, 2)]
    assert classes.images.shape[0] == 4
    assert not torch.equal(classes.images[0], classes.images[-1])
    assert ends[0].shape == classes.images[:1].shape
    with pytest.raises(ValueError, match="exactly one kind"):
        editing.interpolate(ldm, seeds=(1, 2), class_labels=(0, 1))


def test_noise_estimate_matches_the_added_noise():
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    smooth = (0.5 * torch.sin(3 * xx) * torch.cos(2 * yy)).expand(2, 3, 64, 64)
    g = torch.Generator().manual_seed(0)
    for std in (0.05, 0.2):
        noisy = smooth + std * torch.randn(smooth.shape, generator=g)
        est = editing.estimate_noise_std(noisy)
        assert torch.allclose(est, torch.full_like(est, std), rtol=0.1)


def test_denoise_starts_part_way_and_fill_finds_white_holes(ldm):
    images = photos(1)
    out = editing.denoise(ldm, images, noise_std=0.05, steps=10)
    assert 0 < out.network_calls < 10
    holed = images.clone()
    holed[..., 2:5, 2:5] = 1.0
    filled = editing.fill(ldm, holed, steps=3)
    assert "detected 9 hole pixels" in filled.notes[0]
    assert torch.equal(filled.images[..., 6:, :], holed[..., 6:, :])


def test_size_mismatch_names_both_sizes_and_channels_are_converted(ldm):
    with pytest.raises(ValueError, match="20x16 but the model makes 16x16"):
        editing.img2img(ldm, torch.zeros(1, 3, 16, 20), strength=0.5)
    with pytest.raises(ValueError, match="mask is 8x8 but the image is 16x16"):
        editing.inpaint(ldm, photos(1), torch.ones(1, 1, 8, 8))
    grey = editing.img2img(ldm, torch.zeros(1, 1, 16, 16), strength=0.5, steps=2)
    assert "greyscale and the model RGB" in grey.notes[0]


def test_mask_arrays_are_checked_and_converted():
    import numpy as np

    m, notes = masklib.mask_from_array(np.array([[0, 255], [255, 0]], dtype=np.uint8))
    assert m.tolist() == [[[[0.0, 1.0], [1.0, 0.0]]]] and notes == []
    m, notes = masklib.mask_from_array(np.full((2, 2, 3), 200, dtype=np.uint8))
    assert m.sum() == 4 and "colour" in notes[0] and "grey values" in notes[1]


def test_random_training_masks_cover_every_kind():
    gens = [torch.Generator().manual_seed(i) for i in range(64)]
    m = masklib.random_masks(64, 16, gens)
    share = m.flatten(1).mean(1)
    assert ((m == 0) | (m == 1)).all()
    assert (share == 1).any() and (share < 1).sum() > 40 and (share > 0).all()
    again = masklib.random_masks(64, 16, [torch.Generator().manual_seed(i) for i in range(64)])
    assert torch.equal(m, again)


def test_edits_report_their_steps_to_a_callback(ldm):
    seen = []
    editing.inpaint(ldm, photos(1), box_mask(), steps=4, callback=lambda i, *_: seen.append(i))
    assert seen == [0, 1, 2, 3]
    seen.clear()
    editing.img2img(ldm, photos(1), strength=0.5, steps=4, callback=lambda i, *_: seen.append(i))
    assert seen == [0, 1]

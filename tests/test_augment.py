import math

import pytest
import torch

from farcluss.augment import (
    StrongAugment,
    StrongAugmentParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_cutmix,
    cutmix_masks,
    cutmix_partners,
    gaussian_blur,
    rgb_to_hsv,
    hsv_to_rgb,
)
from farcluss.config import load_config
from farcluss.errors import ConfigError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def normalised_batch(batch_size=4, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(batch_size, 3, size, size, generator=generator)
    return (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def denormalise(images):
    return images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


# ------------------------------------------------------------------------- colour operations


def test_hue_rotation_by_a_third_maps_red_to_green_and_blue():
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).repeat(2, 1, 1, 1)
    rotated = adjust_hue(red, torch.tensor([1 / 3, -1 / 3]))
    assert torch.allclose(rotated[0].flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    assert torch.allclose(rotated[1].flatten(), torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)


def test_hsv_of_known_colours_and_round_trip():
    # orange (1, 0.5, 0): hue 30° = 1/12 turn, saturation 1, value 1; grey: hue 0, saturation 0.
    colours = torch.tensor([[1.0, 0.5, 0.0], [0.4, 0.4, 0.4], [0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    hsv = rgb_to_hsv(colours)
    assert torch.allclose(hsv[0, :, 0, 0], torch.tensor([1 / 12, 1.0, 1.0]), atol=1e-6)
    assert torch.allclose(hsv[0, :, 0, 1], torch.tensor([0.0, 0.0, 0.4]), atol=1e-6)
    assert torch.equal(hsv[0, :, 0, 2], torch.zeros(3))
    pixels = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(pixels)), pixels, atol=1e-6)


def test_brightness_contrast_saturation_match_hand_values():
    # One image, two pixels: (0.2, 0.4, 0.6) and (0.6, 0.6, 0.6).
    image = torch.tensor([[0.2, 0.6], [0.4, 0.6], [0.6, 0.6]]).view(1, 3, 1, 2)
    brighter = adjust_brightness(image, torch.tensor([2.0]))
    assert torch.allclose(brighter[0, :, 0, 0], torch.tensor([0.4, 0.8, 1.0]))  # 1.2 clamped
    # luma of pixel 0 = 0.299·0.2 + 0.587·0.4 + 0.114·0.6 = 0.3630; pixel 1 = 0.6; mean 0.4815
    flat = adjust_contrast(image, torch.tensor([0.0]))
    assert torch.allclose(flat, torch.full_like(image, 0.4815), atol=1e-6)
    half_contrast = adjust_contrast(image, torch.tensor([0.5]))
    assert torch.allclose(half_contrast[0, 0, 0, 0], torch.tensor(0.5 * 0.2 + 0.5 * 0.4815))
    grey = adjust_saturation(image, torch.tensor([0.0]))
    assert torch.allclose(grey[0, :, 0, 0], torch.full((3,), 0.3630), atol=1e-6)


def test_gaussian_blur_impulse_response_is_the_separable_kernel():
    image = torch.zeros(2, 3, 15, 15)
    image[:, :, 7, 7] = 1.0
    sigmas = torch.tensor([0.8, 1.5])
    blurred = gaussian_blur(image, sigmas, kernel_size=5)
    for index, sigma in enumerate(sigmas.tolist()):
        taps = torch.tensor([math.exp(-(t**2) / (2 * sigma**2)) for t in range(-2, 3)])
        taps = taps / taps.sum()
        expected = torch.zeros(15, 15)
        expected[5:10, 5:10] = torch.outer(taps, taps)
        for channel in range(3):
            assert torch.allclose(blurred[index, channel], expected, atol=1e-6)


def test_gaussian_blur_is_per_sample_and_keeps_constant_images():
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    sigmas = torch.tensor([0.1, 1.0, 2.0])
    batched = gaussian_blur(images, sigmas, kernel_size=13)
    for index in range(3):
        alone = gaussian_blur(images[index:index + 1], sigmas[index:index + 1], kernel_size=13)
        assert torch.allclose(batched[index:index + 1], alone, atol=1e-6)
    constant = torch.full((1, 3, 4, 4), 0.3)  # kernel radius 6 >= size: replicate padding
    assert torch.allclose(gaussian_blur(constant, torch.tensor([2.0]), 13), constant, atol=1e-6)


# ------------------------------------------------------------------------- StrongAugment


def test_strong_augment_is_reproducible_from_the_generator_seed():
    augment = StrongAugment(mean=MEAN, std=STD)
    images = normalised_batch()
    first = augment(images, torch.Generator().manual_seed(7))
    second = augment(images, torch.Generator().manual_seed(7))
    other = augment(images, torch.Generator().manual_seed(8))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_generator_consumption_does_not_depend_on_probabilities():
    # Resuming from a saved generator state replays the stream only if every call draws the same amount.
    images = normalised_batch(batch_size=3)
    generators = [torch.Generator().manual_seed(3) for _ in range(2)]
    StrongAugment(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, mean=MEAN, std=STD)(images, generators[0])
    StrongAugment(jitter_prob=1.0, grayscale_prob=1.0, blur_prob=1.0, mean=MEAN, std=STD)(images, generators[1])
    assert torch.equal(generators[0].get_state(), generators[1].get_state())


def test_each_image_gets_its_own_parameters():
    augment = StrongAugment(jitter_prob=1.0, grayscale_prob=0.0, blur_prob=1.0, mean=MEAN, std=STD)
    params = augment.sample_params(8, torch.Generator().manual_seed(0))
    for values in (params.brightness, params.contrast, params.saturation, params.hue, params.blur_sigma):
        assert values.unique().numel() == 8
    assert params.brightness.min() >= 0.5 and params.brightness.max() <= 1.5
    assert params.hue.abs().max() <= 0.25
    assert params.blur_sigma.min() >= 0.1 and params.blur_sigma.max() <= 2.0
    assert all(sorted(row.tolist()) == [0, 1, 2, 3] for row in params.order)
    # The same image repeated gives four different strong views.
    images = normalised_batch(batch_size=1).repeat(4, 1, 1, 1)
    views = augment(images, torch.Generator().manual_seed(0))
    assert all(not torch.allclose(views[i], views[j]) for i in range(4) for j in range(i + 1, 4))


def test_output_is_finite_same_shape_and_in_the_normalised_pixel_range():
    augment = StrongAugment(jitter_prob=1.0, grayscale_prob=0.5, blur_prob=1.0, mean=MEAN, std=STD)
    images = normalised_batch(batch_size=4)
    views = augment(images, torch.Generator().manual_seed(5))
    assert views.shape == images.shape and views.dtype == images.dtype
    assert torch.isfinite(views).all()
    pixels = denormalise(views)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_grayscale_makes_the_channels_equal():
    augment = StrongAugment(jitter_prob=0.0, grayscale_prob=1.0, blur_prob=0.0, mean=MEAN, std=STD)
    pixels = denormalise(augment(normalised_batch(), torch.Generator().manual_seed(0)))
    assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-5)
    assert torch.allclose(pixels[:, 1], pixels[:, 2], atol=1e-5)


def test_zero_probabilities_return_the_input_unchanged():
    augment = StrongAugment(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, mean=MEAN, std=STD)
    images = normalised_batch() * 3.0  # values outside [0, 1] after denormalisation stay untouched too
    assert torch.equal(augment(images, torch.Generator().manual_seed(0)), images)


def test_jitter_operations_run_in_each_images_own_order():
    augment = StrongAugment(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25, mean=MEAN, std=STD)
    images = normalised_batch(batch_size=1).repeat(2, 1, 1, 1)
    factor = torch.tensor([1.4, 1.4])
    hue = torch.tensor([0.1, 0.1])
    params = StrongAugmentParams(
        jitter=torch.tensor([True, True]),
        brightness=factor, contrast=torch.tensor([0.6, 0.6]), saturation=factor, hue=hue,
        order=torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]),
        grayscale=torch.tensor([False, False]), blur=torch.tensor([False, False]),
        blur_sigma=torch.tensor([1.0, 1.0]),
    )
    out = denormalise(augment.apply(images, params))
    pixels = denormalise(images).clamp(0, 1)
    forward = adjust_hue(adjust_saturation(adjust_contrast(adjust_brightness(
        pixels[:1], factor[:1]), torch.tensor([0.6])), factor[:1]), hue[:1])
    backward = adjust_brightness(adjust_contrast(adjust_saturation(adjust_hue(
        pixels[1:], hue[1:]), factor[1:]), torch.tensor([0.6])), factor[1:])
    assert torch.allclose(out[:1], forward, atol=1e-5)
    assert torch.allclose(out[1:], backward, atol=1e-5)
    assert not torch.allclose(forward, backward, atol=1e-3)  # same image, so only the order differs


def test_invalid_strong_augment_settings_raise_config_error():
    # the ranges are declared once, in config; only the derived kernel size is checked here
    with pytest.raises(ConfigError, match=r"'augment.hue' must be in \[0, 0.5\]"):
        load_config(None, ["augment.hue=0.7"])
    with pytest.raises(ConfigError, match=r"'augment.grayscale_prob' must be in \[0, 1\]"):
        load_config(None, ["augment.grayscale_prob=1.5"])
    with pytest.raises(ConfigError, match=r"'augment.cutmix_area' must be 0 < low <= high < 1"):
        load_config(None, ["augment.cutmix_area=[0.5, 0.2]"])
    with pytest.raises(ConfigError, match="blur_kernel"):
        StrongAugment(blur_kernel=4, mean=MEAN, std=STD)


# ------------------------------------------------------------------------- CutMix


def test_cutmix_with_probability_zero_has_no_box():
    masks = cutmix_masks(6, 32, 32, prob=0.0, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (6, 32, 32) and masks.dtype == torch.bool
    assert not masks.any()


def test_cutmix_boxes_are_rectangles_inside_the_area_bounds():
    height, width = 40, 48
    masks = cutmix_masks(64, height, width, prob=1.0, area=(0.02, 0.4), generator=torch.Generator().manual_seed(0))
    for mask in masks:
        rows, cols = mask.any(dim=1), mask.any(dim=0)
        assert torch.equal(mask, rows[:, None] & cols[None, :])  # a single axis-aligned box
        box_height, box_width = int(rows.sum()), int(cols.sum())
        fraction = box_height * box_width / (height * width)
        # rounding each side moves the area by at most one row and one column
        slack = (box_height + box_width + 1) / (height * width)
        assert 0.02 - slack <= fraction <= 0.4 + slack
    sizes = masks.flatten(1).sum(dim=1)
    assert sizes.unique().numel() > 10  # the box size is random, not fixed


def test_cutmix_masks_are_reproducible():
    first = cutmix_masks(4, 16, 16, generator=torch.Generator().manual_seed(4))
    second = cutmix_masks(4, 16, 16, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, second)


def test_cutmix_partner_is_never_self_and_each_image_is_used_once():
    for seed in range(20):
        for batch_size in (2, 3, 8):
            partners = cutmix_partners(batch_size, torch.Generator().manual_seed(seed))
            assert not (partners == torch.arange(batch_size)).any()
            assert sorted(partners.tolist()) == list(range(batch_size))
    assert cutmix_partners(1, torch.Generator().manual_seed(0)).tolist() == [0]


def test_apply_cutmix_moves_the_same_pixels_in_images_probabilities_and_masks():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=generator)
    probs = torch.softmax(torch.randn(4, 5, 16, 16, generator=generator), dim=1)
    labels = torch.arange(4).view(4, 1, 1).expand(4, 16, 16).clone()  # image i is labelled i
    box = cutmix_masks(4, 16, 16, prob=1.0, generator=generator)
    partners = cutmix_partners(4, generator)

    mixed_images = apply_cutmix(images, box, partners)
    mixed_probs = apply_cutmix(probs, box, partners)
    mixed_labels = apply_cutmix(labels, box, partners)

    for index in range(4):
        partner = int(partners[index])
        inside = box[index]
        assert (mixed_labels[index][inside] == partner).all()
        assert (mixed_labels[index][~inside] == index).all()
        assert torch.equal(mixed_images[index][:, inside], images[partner][:, inside])
        assert torch.equal(mixed_images[index][:, ~inside], images[index][:, ~inside])
        assert torch.equal(mixed_probs[index][:, inside], probs[partner][:, inside])
    # the replaced pixels are exactly where labels changed
    assert torch.equal(mixed_labels != labels, box)


def test_cutmix_of_a_single_image_is_the_identity():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, 8, 8)
    box = cutmix_masks(1, 8, 8, prob=1.0, generator=generator)
    assert box.any()
    assert torch.equal(apply_cutmix(images, box, cutmix_partners(1, generator)), images)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_a_cpu_generator():
    augment = StrongAugment(jitter_prob=1.0, grayscale_prob=0.5, blur_prob=1.0, mean=MEAN, std=STD)
    images = normalised_batch()
    on_cpu = augment(images, torch.Generator().manual_seed(0))
    on_cuda = augment(images.cuda(), torch.Generator().manual_seed(0))
    assert on_cuda.device.type == "cuda"
    assert torch.allclose(on_cuda.cpu(), on_cpu, atol=1e-4)
    box = cutmix_masks(4, 32, 32, prob=1.0, generator=torch.Generator().manual_seed(0), device="cuda")
    partners = cutmix_partners(4, torch.Generator().manual_seed(0), device="cuda")
    assert torch.equal(apply_cutmix(images.cuda(), box, partners).cpu(),
                       apply_cutmix(images, box.cpu(), partners.cpu()))

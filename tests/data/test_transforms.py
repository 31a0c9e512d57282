import numpy as np
import pytest
import torch
from PIL import Image

from farcluss.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    WeakAugment,
    denormalize,
    normalize,
)

IGNORE = 255
# Class c is painted in PALETTE[c]; an ignored region is painted grey.
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=np.uint8)


def class_coded_pair(height=40, width=48):
    """A mask of four blocks plus an ignored stripe, and an image whose colour is its class."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[: height // 2, width // 3 :] = 1
    mask[height // 2 :, : width // 2] = 2
    mask[height // 2 :, width // 2 :] = 3
    mask[:, 5:8] = IGNORE
    pixels = np.full((height, width, 3), 128, dtype=np.uint8)
    labeled = mask != IGNORE
    pixels[labeled] = PALETTE[mask[labeled]]
    return Image.fromarray(pixels), mask


def colour_classes(image_tensor):
    """The palette class nearest to each pixel of a normalised 3×H×W image."""
    rgb = denormalize(image_tensor, IMAGENET_MEAN, IMAGENET_STD).permute(1, 2, 0) * 255
    distances = ((rgb[:, :, None, :] - torch.from_numpy(PALETTE).float()) ** 2).sum(-1)
    return distances.argmin(-1)


def interior(mask):
    """Pixels whose 3×3 neighbourhood holds one label: bilinear blending cannot touch them."""
    padded = torch.nn.functional.pad(mask[None, None].float(), (1, 1, 1, 1), mode="replicate")
    neighbours = torch.nn.functional.unfold(padded, 3).view(9, *mask.shape)
    return (neighbours == mask.float()).all(0)


@pytest.mark.parametrize("seed", range(6))
def test_image_and_mask_stay_aligned_under_rescale_crop_flip(seed):
    image, mask = class_coded_pair()
    augment = WeakAugment(crop_size=32, scale_range=(0.5, 2.0), ignore_index=IGNORE)
    image_tensor, mask_tensor, ignore_mask = augment(image, mask, np.random.default_rng(seed))
    assert image_tensor.shape == (3, 32, 32) and image_tensor.dtype == torch.float32
    assert mask_tensor.shape == (32, 32) and mask_tensor.dtype == torch.int64
    # Nearest resizing never invents values.
    assert set(mask_tensor.unique().tolist()) <= {0, 1, 2, 3, IGNORE}
    checked = interior(mask_tensor) & (mask_tensor != IGNORE)
    assert checked.sum() > 100
    assert torch.equal(colour_classes(image_tensor)[checked], mask_tensor[checked])
    # Padding is the only source of ignore_mask; it is also ignored in the mask.
    assert torch.all(mask_tensor[ignore_mask == IGNORE] == IGNORE)


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_unit_scale_full_crop_is_identity_or_mirror(flip_prob):
    image, mask = class_coded_pair()
    augment = WeakAugment(crop_size=(40, 48), scale_range=(1.0, 1.0), flip_prob=flip_prob)
    image_tensor, mask_tensor, ignore_mask = augment(image, mask, np.random.default_rng(0))
    expected_image = EvalTransform()(image, None)[0]
    expected_mask = torch.from_numpy(mask.astype(np.int64))
    if flip_prob:
        expected_image, expected_mask = expected_image.flip(-1), expected_mask.flip(-1)
    torch.testing.assert_close(image_tensor, expected_image)
    assert torch.equal(mask_tensor, expected_mask)
    assert torch.all(ignore_mask == 0)


def test_crop_larger_than_image_pads_with_ignore_and_mean():
    image, mask = class_coded_pair(height=10, width=12)
    augment = WeakAugment(crop_size=16, scale_range=(1.0, 1.0), flip_prob=0.0, ignore_index=IGNORE)
    image_tensor, mask_tensor, ignore_mask = augment(image, mask, np.random.default_rng(3))
    # The image sits top-left; the bottom 6 rows and right 4 columns are padding.
    assert torch.equal(mask_tensor[:10, :12], torch.from_numpy(mask.astype(np.int64)))
    padding = torch.ones(16, 16, dtype=torch.bool)
    padding[:10, :12] = False
    assert torch.all(mask_tensor[padding] == IGNORE)
    assert torch.all(ignore_mask[padding] == IGNORE) and torch.all(ignore_mask[~padding] == 0)
    # Padded with the mean colour: exactly 0 after normalisation.
    assert torch.all(image_tensor[:, padding] == 0)


def test_unlabeled_view_has_only_ignore_mask():
    image, _ = class_coded_pair(height=10, width=12)
    augment = WeakAugment(crop_size=16)
    image_tensor, mask_tensor, ignore_mask = augment(image, None, np.random.default_rng(0))
    assert mask_tensor is None
    assert image_tensor.shape == (3, 16, 16) and ignore_mask.shape == (16, 16)
    assert set(ignore_mask.unique().tolist()) == {0, IGNORE}


def test_same_seed_same_view_and_other_seed_differs():
    image, mask = class_coded_pair()
    augment = WeakAugment(crop_size=24)
    first = augment(image, mask, np.random.default_rng(11))
    again = augment(image, mask, np.random.default_rng(11))
    other = augment(image, mask, np.random.default_rng(12))
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_wide_mask_values_survive_nearest_resize():
    image = Image.new("RGB", (8, 8))
    mask = np.full((8, 8), 300, dtype=np.int64)
    mask[:, :4] = 299
    _, mask_tensor, ignore_mask = WeakAugment(crop_size=8, scale_range=(2.0, 2.0))(
        image, mask, np.random.default_rng(0)
    )
    assert set(mask_tensor.unique().tolist()) <= {299, 300}


def test_normalize_round_trip_keeps_device_and_dtype():
    images = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    normalised = normalize(images, IMAGENET_MEAN, IMAGENET_STD)
    assert normalised.dtype == torch.float64
    expected_red = (images[:, 0] - 0.485) / 0.229
    torch.testing.assert_close(normalised[:, 0], expected_red)
    torch.testing.assert_close(denormalize(normalised, IMAGENET_MEAN, IMAGENET_STD), images)


def test_eval_transform_keeps_full_size():
    image, mask = class_coded_pair(height=10, width=12)
    image_tensor, mask_tensor = EvalTransform()(image, mask)
    assert image_tensor.shape == (3, 10, 12)
    assert torch.equal(mask_tensor, torch.from_numpy(mask.astype(np.int64)))
    red = torch.tensor([(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225])
    torch.testing.assert_close(image_tensor[:, 0, 0], red)


def test_quarter_turn_of_a_square_is_rot90_of_image_and_mask():
    from farcluss.data.transforms import _rotate

    image, mask = class_coded_pair(height=40, width=40)
    rotated_image, rotated_mask, content = _rotate(image, mask, 90.0, IGNORE)
    # PIL turns anticlockwise, as np.rot90 does: every pixel lands on a pixel, nothing is lost
    assert np.array_equal(np.asarray(rotated_image), np.rot90(np.asarray(image)))
    assert np.array_equal(rotated_mask, np.rot90(mask))
    assert content.all()


@pytest.mark.parametrize("seed", range(4))
def test_rotation_keeps_image_and_mask_aligned_and_ignores_the_corners(seed):
    image, mask = class_coded_pair(height=40, width=40)
    augment = WeakAugment(crop_size=40, scale_range=(1.0, 1.0), flip_prob=0.0,
                          ignore_index=IGNORE, rotate_degrees=45.0)
    rng = np.random.default_rng(seed)
    angle = np.random.default_rng(seed).uniform(-45.0, 45.0)
    image_tensor, mask_tensor, ignore_mask = augment(image, mask, rng)
    checked = interior(mask_tensor) & (mask_tensor != IGNORE)
    assert torch.equal(colour_classes(image_tensor)[checked], mask_tensor[checked])
    # the view is turned: it is not the unrotated mask
    assert not torch.equal(mask_tensor, torch.from_numpy(mask.astype(np.int64)))
    corners = ignore_mask == IGNORE
    if abs(angle) > 5:  # a turn of a few degrees brings in a corner triangle at each corner
        assert corners[0, 0] and corners[-1, -1] and corners[0, -1] and corners[-1, 0]
    assert torch.all(mask_tensor[corners] == IGNORE)
    assert torch.all(image_tensor[:, corners] == 0)  # the mean colour, as the padding
    assert not corners[20, 20]


def test_no_rotation_draws_nothing_so_old_streams_replay():
    image, mask = class_coded_pair()
    plain = WeakAugment(crop_size=32, ignore_index=IGNORE)
    off = WeakAugment(crop_size=32, ignore_index=IGNORE, rotate_degrees=0.0)
    on = WeakAugment(crop_size=32, ignore_index=IGNORE, rotate_degrees=10.0)
    rngs = [np.random.default_rng(5) for _ in range(3)]
    views = [augment(image, mask, rng) for augment, rng in zip((plain, off, on), rngs)]
    assert all(torch.equal(a, b) for a, b in zip(views[0], views[1]))
    assert rngs[0].random() == rngs[1].random() != rngs[2].random()

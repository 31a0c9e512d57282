import pytest
import torch
from torch import nn

from farcluss.errors import ConfigError, DataError
from farcluss.evaluate import (
    confusion_matrix,
    eval_mode,
    evaluate,
    predict,
    predict_center_crop,
    predict_sliding,
    predict_whole,
    segmentation_metrics,
    sliding_window_counts,
)


class ConvModel(nn.Module):
    """Model contract stand-in: returns (logits at input size, feature)."""

    def __init__(self, num_classes=3, kernel_size=1, identity=False):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, kernel_size, padding=kernel_size // 2)
        if identity:  # logits = the input channels, so the prediction is the argmax channel
            with torch.no_grad():
                self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
                self.conv.bias.zero_()
        self.input_shapes = []
        self.training_flags = []

    def forward(self, images):
        self.input_shapes.append(tuple(images.shape[-2:]))
        self.training_flags.append(self.training)
        logits = self.conv(images)
        return logits, logits


class WindowMeanModel(nn.Module):
    """Not translation-equivariant: class-0 logit = mean of the window's first channel, class-1 logit = 0."""

    def forward(self, images):
        mean = images[:, 0].mean(dim=(1, 2)).view(-1, 1, 1, 1).expand(-1, 1, *images.shape[-2:])
        return torch.cat((mean, torch.zeros_like(mean)), dim=1), None


def random_images(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------- metrics


def test_confusion_matrix_and_metrics_match_hand_computation():
    # 4 classes; class 3 appears only as a prediction on an ignored pixel, so it is absent.
    target = torch.tensor([[0, 0, 0, 1], [1, 2, 255, 255]]).unsqueeze(0)
    pred = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 0]]).unsqueeze(0)
    confusion = confusion_matrix(pred, target, num_classes=4)
    expected = torch.tensor([[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    assert confusion.dtype == torch.int64
    assert torch.equal(confusion, expected)

    metrics = segmentation_metrics(confusion, class_names=["a", "b", "c", "d"])
    # IoU_0 = 2/(3+2-2), IoU_1 = 1/(2+2-1), IoU_2 = 1/(1+2-1), class 3 has no pixel at all
    per_class = metrics["per_class_iou"]
    assert per_class[0] == pytest.approx(200 / 3)
    assert per_class[1] == pytest.approx(100 / 3)
    assert per_class[2] == pytest.approx(50.0)
    assert per_class[3] is None
    assert metrics["miou"] == pytest.approx((200 / 3 + 100 / 3 + 50) / 3)
    assert metrics["pixel_accuracy"] == pytest.approx(100 * 4 / 6)
    assert metrics["class_names"] == ["a", "b", "c", "d"]
    # a's 3 pixels: 1 predicted as b (33 %); b's 2: 1 as c (50 %); c's 1 pixel is right; no d
    assert metrics["confused_with"] == [["b", pytest.approx(100 / 3)], ["c", 50.0], None, None]


def test_confused_with_names_the_class_taking_most_of_the_wrong_pixels():
    # class 0's 10 pixels: 6 right, 3 as class 2, 1 as class 1
    confusion = torch.tensor([[6, 1, 3], [0, 4, 0], [2, 0, 0]])
    metrics = segmentation_metrics(confusion, class_names=["bg", "ball", "moon"])
    assert metrics["confused_with"] == [["moon", 30.0], None, ["bg", 100.0]]


def test_class_predicted_but_absent_from_ground_truth_counts_as_zero_iou():
    confusion = torch.tensor([[3, 1], [0, 0]])  # class 1 only predicted: IoU 0, in the mean
    metrics = segmentation_metrics(confusion)
    assert metrics["per_class_iou"] == [75.0, 0.0]
    assert metrics["miou"] == pytest.approx(37.5)
    assert metrics["class_names"] == ["0", "1"]


def test_metrics_of_an_empty_confusion_matrix_are_none():
    metrics = segmentation_metrics(torch.zeros(3, 3, dtype=torch.int64))
    assert metrics["miou"] is None and metrics["pixel_accuracy"] is None
    assert metrics["per_class_iou"] == [None, None, None]


def test_label_outside_the_class_range_is_a_data_error():
    target = torch.tensor([[[0, 7]]])
    with pytest.raises(DataError, match="label 7"):
        confusion_matrix(torch.zeros_like(target), target, num_classes=3)


def test_wrong_number_of_class_names_is_a_config_error():
    with pytest.raises(ConfigError, match="class_names"):
        segmentation_metrics(torch.eye(3, dtype=torch.int64), class_names=["a", "b"])


# ------------------------------------------------------------------------- inference modes


def test_predict_whole_pads_to_the_output_stride_and_crops_back():
    model = ConvModel().eval()
    images = random_images(2, 3, 33, 50)
    with torch.no_grad():
        probs = predict_whole(model, images, output_stride=16)
        unpadded = torch.softmax(model(images)[0], dim=1)
    assert model.input_shapes[0] == (48, 64)
    assert probs.shape == (2, 3, 33, 50)
    assert torch.allclose(probs, unpadded, atol=1e-6)  # 1×1 conv: padding does not leak


def test_sliding_equals_whole_when_the_window_covers_the_image():
    # 3×3 conv with zero padding: zero-padding the image to the window changes nothing inside it.
    model = ConvModel(kernel_size=3).eval()
    images = random_images(1, 3, 20, 24)
    with torch.no_grad():
        sliding = predict_sliding(model, images, window=32)
        whole = predict_whole(model, images, output_stride=None)
    assert model.input_shapes[0] == (32, 32)
    assert sliding.shape == whole.shape == (1, 3, 20, 24)
    assert torch.allclose(sliding, whole, atol=1e-6)


def test_sliding_with_small_windows_equals_whole_for_a_per_pixel_model():
    model = ConvModel(kernel_size=1).eval()
    images = random_images(2, 3, 40, 52)
    with torch.no_grad():
        sliding = predict_sliding(model, images, window=16, stride_ratio=2 / 3)
        # stride 10: row starts 0, 10, 20 + clamped 24; column starts 0, 10, 20, 30 + clamped 36
        assert model.input_shapes == [(16, 16)] * 20
        whole = predict_whole(model, images, output_stride=None)
    assert torch.allclose(sliding, whole, atol=1e-6)


def test_window_counts_with_the_last_window_clamped_to_the_border():
    # length 10, window 6, stride int(6·0.5) = 3: windows [0,6), [3,9) and the clamped [4,10)
    counts = sliding_window_counts(10, 6, window=6, stride_ratio=0.5)
    expected_rows = torch.tensor([1, 1, 1, 2, 3, 3, 2, 2, 2, 1], dtype=torch.float32)
    assert torch.equal(counts, expected_rows.view(10, 1).expand(10, 6))
    # an image smaller than the window is covered once
    assert torch.equal(sliding_window_counts(4, 5, window=8), torch.ones(4, 5))


def test_sliding_averages_overlapping_windows_by_their_count():
    # Height 10, window 6×4, stride 4: windows rows [0,6) and [4,10), overlapping on rows 4–5.
    images = torch.zeros(1, 3, 10, 4)
    images[:, 0, :6] = 1.0
    images[:, 0, 6:] = -2.0
    probs = predict_sliding(WindowMeanModel(), images, window=(6, 4), stride_ratio=2 / 3)
    top_mean, bottom_mean = 1.0, (2 * 1.0 + 4 * -2.0) / 6  # first-channel means of the two windows
    top = torch.softmax(torch.tensor([top_mean, 0.0]), dim=0)
    bottom = torch.softmax(torch.tensor([bottom_mean, 0.0]), dim=0)
    assert torch.allclose(probs[0, :, :4], top.view(2, 1, 1).expand(2, 4, 4))
    assert torch.allclose(probs[0, :, 6:], bottom.view(2, 1, 1).expand(2, 4, 4))
    assert torch.allclose(probs[0, :, 4:6], ((top + bottom) / 2).view(2, 1, 1).expand(2, 2, 4))
    assert torch.allclose(probs.sum(dim=1), torch.ones(1, 10, 4))


def test_center_crop_predicts_the_central_region_and_reports_it():
    model = ConvModel(identity=True).eval()
    images = random_images(1, 3, 10, 12)
    with torch.no_grad():
        probs, (rows, cols) = predict_center_crop(model, images, crop_size=6, output_stride=None)
    assert (rows, cols) == (slice(2, 8), slice(3, 9))
    assert probs.shape == (1, 3, 6, 6)
    assert torch.allclose(probs, torch.softmax(images[:, :, 2:8, 3:9], dim=1), atol=1e-6)
    # a crop larger than the image shrinks to the image
    _, (rows, cols) = predict_center_crop(model, images, crop_size=(16, 8), output_stride=None)
    assert (rows, cols) == (slice(0, 10), slice(2, 10))


def test_predict_rejects_unknown_mode_and_missing_crop_size():
    model = ConvModel().eval()
    images = random_images(1, 3, 8, 8)
    with pytest.raises(ConfigError, match="mode"):
        predict(model, images, mode="tiles")
    with pytest.raises(ConfigError, match="crop size"):
        predict(model, images, mode="sliding")


# ------------------------------------------------------------------------- evaluate


def identity_model_batches(shapes, seed=0):
    """Batches whose mask is the argmax of the image channels, so an identity model is perfect."""
    batches = []
    for index, shape in enumerate(shapes):
        images = random_images(*shape, seed=seed + index)
        batches.append({"image": images, "mask": images.argmax(dim=1), "name": [f"img{index}"] * shape[0]})
    return batches


@pytest.mark.parametrize("mode", ["whole", "center_crop", "sliding"])
def test_identity_model_scores_100_in_every_mode(mode):
    model = ConvModel(identity=True)
    loader = identity_model_batches([(1, 3, 20, 30), (2, 3, 18, 18)])
    metrics = evaluate(model, loader, num_classes=3, mode=mode, crop_size=12, device="cpu")
    assert metrics["miou"] == pytest.approx(100.0)
    assert metrics["pixel_accuracy"] == pytest.approx(100.0)


def test_center_crop_evaluation_ignores_pixels_outside_the_crop():
    model = ConvModel(identity=True)
    images = random_images(1, 3, 16, 16)
    mask = images.argmax(dim=1)
    mask[:, :4] = (mask[:, :4] + 1) % 3  # wrong labels only outside the central 8×8 crop
    mask[:, :, 12:] = (mask[:, :, 12:] + 1) % 3
    loader = [{"image": images, "mask": mask}]
    assert evaluate(model, loader, 3, mode="center_crop", crop_size=8)["pixel_accuracy"] == pytest.approx(100.0)
    assert evaluate(model, loader, 3, mode="whole")["pixel_accuracy"] < 100.0


def test_evaluate_counts_ignored_pixels_out_and_applies_reduce():
    model = ConvModel(identity=True)
    images = random_images(1, 3, 4, 4)
    mask = images.argmax(dim=1)
    mask[0, 0] = 255  # 4 ignored pixels: 12 valid, all correct
    other_rank = torch.tensor([[0, 12, 0], [0, 0, 0], [0, 0, 0]])  # 12 wrong pixels elsewhere
    seen = []

    def reduce(confusion):
        seen.append(confusion.clone())
        return confusion + other_rank

    metrics = evaluate(model, [{"image": images, "mask": mask}], 3, reduce=reduce)
    assert int(seen[0].sum()) == 12
    assert metrics["pixel_accuracy"] == pytest.approx(50.0)


def test_evaluate_runs_in_eval_mode_and_restores_the_previous_mode():
    model = ConvModel(identity=True)
    loader = identity_model_batches([(1, 3, 8, 8)])
    model.train()
    evaluate(model, loader, 3)
    assert model.training and model.training_flags == [False]
    model.eval()
    evaluate(model, loader, 3)
    assert not model.training


def test_evaluate_under_bfloat16_autocast():
    model = ConvModel(identity=True)
    images = torch.zeros(1, 3, 8, 8)
    images[:, 1, :4] = 4.0  # channel margins large enough for bfloat16
    images[:, 2, 4:] = 4.0
    loader = [{"image": images, "mask": images.argmax(dim=1)}]
    metrics = evaluate(model, loader, 3, amp_dtype=torch.bfloat16, class_names=["x", "y", "z"])
    assert metrics["per_class_iou"] == [None, 100.0, 100.0]
    assert metrics["miou"] == pytest.approx(100.0)


def test_evaluate_rejects_a_mask_of_another_size():
    loader = [{"image": torch.zeros(1, 3, 8, 8), "mask": torch.zeros(1, 8, 6, dtype=torch.int64), "name": ["a.png"]}]
    with pytest.raises(DataError, match="a.png"):
        evaluate(ConvModel(), loader, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evaluate_on_cuda_matches_cpu():
    model = ConvModel(kernel_size=3)
    loader = identity_model_batches([(1, 3, 20, 30), (2, 3, 18, 18)])
    on_cpu = evaluate(model, loader, 3, mode="sliding", crop_size=12, device="cpu")
    on_cuda = evaluate(model.cuda(), loader, 3, mode="sliding", crop_size=12)
    assert on_cuda["pixel_accuracy"] == pytest.approx(on_cpu["pixel_accuracy"], abs=0.5)


def test_eval_mode_runs_without_gradients_and_gives_the_mode_back_also_on_error():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2), nn.Dropout(0.5))
    model.train()
    with eval_mode(model) as same:
        assert same is model and not model.training and not model[1].training
        assert not model(torch.ones(1, 3, 4, 4)).requires_grad
    assert model.training and model[1].training
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(model):
            raise RuntimeError("boom")
    assert model.training
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training  # a model in eval mode stays there

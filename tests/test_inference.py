"""Loading a trained model from a run checkpoint, the device it runs on, evaluating it and
predicting validation examples for the reports (`farcluss.inference`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_CLASSES, tiny_overrides, write_tiny_checkpoint, write_tiny_dataset
from farcluss.config import load_config
from farcluss.errors import CheckpointError, ConfigError
from farcluss.inference import (
    checkpoint_models,
    evaluate_checkpoint,
    load_trained_model,
    predict_masks,
    predict_validation_examples,
    resolve_inference_device,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A dataset and a checkpoint whose teacher differs from its student."""
    tmp = tmp_path_factory.mktemp("inference")
    root = write_tiny_dataset(tmp / "tiny", n_train=4, n_val=4)
    path = write_tiny_checkpoint(tmp / "run" / "checkpoints" / "last.pt", root)
    state = torch.load(path, weights_only=True)
    state["teacher"] = {key: value + 0.5 if value.is_floating_point() and "running_var" not in key
                        else value for key, value in state["student"].items()}
    torch.save(state, path)
    return root, path


def _cfg(root, *overrides):
    return load_config(None, tiny_overrides(root) + list(overrides))


def test_the_named_model_is_loaded_in_eval_mode(tiny):
    _, path = tiny
    saved = torch.load(path, weights_only=True)
    for name in ("teacher", "student"):
        model, cfg, classes = load_trained_model(path, name)
        assert not model.training and classes == TINY_CLASSES
        assert cfg.model.backbone == "resnet18"
        for key, value in model.state_dict().items():
            assert torch.equal(value, saved[name][key]), (name, key)


def test_a_run_without_teacher_gives_its_student_for_either_name(tiny, tmp_path):
    _, path = tiny
    state = torch.load(path, weights_only=True)
    state["teacher"] = None
    alone = tmp_path / "supervised.pt"
    torch.save(state, alone)
    assert checkpoint_models(alone) == ("student",)
    assert checkpoint_models(path) == ("teacher", "student")
    model, _, _ = load_trained_model(alone, "teacher")
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["student"][key])


def test_a_checkpoint_that_is_not_a_run_is_refused_naming_the_entry(tiny, tmp_path):
    _, path = tiny
    state = torch.load(path, weights_only=True)
    del state["config"]
    broken = tmp_path / "weights.pt"
    torch.save(state, broken)
    with pytest.raises(CheckpointError, match=r"weights\.pt has no 'config' entry"):
        load_trained_model(broken)


def test_a_checkpoint_with_an_invalid_config_is_a_checkpoint_error(tiny, tmp_path):
    _, path = tiny
    state = torch.load(path, weights_only=True)
    state["config"]["train"]["lr"] = "fast"
    broken = tmp_path / "bad_config.pt"
    torch.save(state, broken)
    with pytest.raises(CheckpointError, match="invalid config.*train.lr"):
        load_trained_model(broken)


def test_a_class_count_that_disagrees_names_the_shape_mismatch(tiny):
    _, path = tiny
    with pytest.raises(CheckpointError, match="shape"):
        load_trained_model(path, num_classes=len(TINY_CLASSES) + 2)


def test_inference_device():
    assert resolve_inference_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_inference_device("auto").type == expected
    with pytest.raises(ConfigError, match="'gpu0' is not a device"):
        resolve_inference_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda: CUDA is not available"):
            resolve_inference_device("cuda")


def test_evaluate_checkpoint_evaluates_the_chosen_model(tiny):
    root, path = tiny
    cfg = _cfg(root, "train.device=cpu")
    teacher = evaluate_checkpoint(cfg, str(path), "teacher", progress=False)
    student = evaluate_checkpoint(cfg, str(path), "student", progress=False)
    default = evaluate_checkpoint(_cfg(root, "train.device=cpu", "eval.model=student"), str(path),
                                  progress=False)
    assert teacher["class_names"] == TINY_CLASSES and len(teacher["per_class_iou"]) == 3
    assert default == student
    assert teacher != student  # the teacher's weights differ, so do its predictions


def test_predict_masks_leaves_pixels_outside_the_centre_crop_unpredicted(tiny):
    root, path = tiny
    cfg = _cfg(root, "eval.mode=center_crop", "eval.crop_size=16")
    model, _, _ = load_trained_model(path, "student")
    model.train()
    images = [np.zeros((40, 40, 3), np.uint8), np.full((24, 32, 3), 200, np.uint8)]
    masks = predict_masks(model, cfg, images)
    assert model.training  # the mode the caller had comes back
    for image, mask in zip(images, masks):
        assert mask.shape == image.shape[:2] and mask.dtype == np.int64
        height, width = mask.shape
        top, left = (height - 16) // 2, (width - 16) // 2
        inside = mask[top:top + 16, left:left + 16]
        assert ((inside >= 0) & (inside < len(TINY_CLASSES))).all()
        outside = mask.copy()
        outside[top:top + 16, left:left + 16] = cfg.data.ignore_index
        assert (outside == cfg.data.ignore_index).all()


def test_validation_examples_for_a_grid(tiny):
    root, path = tiny
    cfg = _cfg(root)
    examples = predict_validation_examples(cfg, {"T": (path, "teacher"), "S": (path, "student")}, 3)
    val_names = [line.split()[0] for line in (root / "splits" / "val.txt").read_text().splitlines()]
    assert len(examples.images) == len(examples.masks) == len(examples.names) == 3
    assert [name for name in examples.names] == [n.rsplit("/", 1)[-1].rsplit(".", 1)[0]
                                                  for n in val_names[:3]]
    assert examples.class_names == TINY_CLASSES and list(examples.predictions) == ["T", "S"]
    for image, mask, predicted in zip(examples.images, examples.masks, examples.predictions["T"]):
        assert image.dtype == np.uint8 and image.shape[:2] == mask.shape == predicted.shape
    assert any((t != s).any() for t, s in zip(examples.predictions["T"], examples.predictions["S"]))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        predict_validation_examples(cfg, {"T": (path.parent / "missing.pt", "teacher")}, 1)

"""Shared fixtures: a tiny folder dataset written to disk, and tiny-model config overrides."""

from __future__ import annotations

import logging
import os

# Tiny models gain nothing from a second thread, and OpenMP threads that spin-wait make a step
# up to 100x slower when the other core is busy (subprocesses, DDP ranks, data workers).
# One thread per process keeps the suite fast and its timing stable; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("KMP_BLOCKTIME", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)

TINY_CLASSES = ["background", "square", "disc"]


def write_tiny_dataset(root: Path, n_train: int = 12, n_val: int = 4, size: int = 40,
                       n_labeled: int = 4, seed: int = 0, n_test: int = 0) -> Path:
    """Squares (class 1) and discs (class 2) of class-specific colours on a noisy background;
    `n_test` > 0 adds that many images after val, listed in splits/test.txt."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    (root / "splits").mkdir(exist_ok=True)
    (root / "classes.txt").write_text("\n".join(TINY_CLASSES) + "\n")
    yy, xx = np.mgrid[:size, :size]
    names = []
    for i in range(n_train + n_val + n_test):
        image = rng.normal(0.3, 0.05, size=(size, size, 3))
        mask = np.zeros((size, size), np.uint8)
        for cls in (1, 2):
            cy, cx = rng.integers(8, size - 8, size=2)
            r = int(rng.integers(4, 8))
            if cls == 1:
                inside = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
                colour = (0.9, 0.2, 0.2)
            else:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                colour = (0.2, 0.3, 0.9)
            image[inside] = colour
            mask[inside] = cls
        name = f"{i:03d}"
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
        names.append(name)
    lines = [f"images/{n}.png masks/{n}.png" for n in names]
    (root / "splits" / "labeled.txt").write_text("\n".join(lines[:n_labeled]) + "\n")
    (root / "splits" / "unlabeled.txt").write_text(
        "\n".join(f"images/{n}.png" for n in names[n_labeled:n_train]) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(lines[n_train:n_train + n_val]) + "\n")
    if n_test:
        (root / "splits" / "test.txt").write_text("\n".join(lines[n_train + n_val:]) + "\n")
    return root


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return write_tiny_dataset(tmp_path / "tiny")


def tiny_overrides(root: Path, method: str = "farcluss", iterations: int = 4) -> list[str]:
    """A ResNet-18 at 1/8 width, 32 px crops, batch 2+2: a training step takes ~0.1 s on CPU."""
    return [
        f"data.root={root}", "data.crop_size=32", "data.scale_range=[0.75, 1.25]",
        "model.backbone=resnet18", "model.base_width=8", f"method.name={method}",
        f"train.iterations={iterations}", "train.batch_size=2", "train.num_workers=0",
        "train.eval_interval=1000", "train.log_interval=1", "train.checkpoint_interval=1000",
        "train.lr=0.01", "train.progress=false", "method.projection_dim=16",
        "method.ema_momentum=0.9", "train.amp=off",
    ]


def write_tiny_checkpoint(path: Path, root: Path, seed: int = 0) -> Path:
    """A run checkpoint (config, classes, student, teacher) of the tiny model, without training.

    BatchNorm statistics are measured on the dataset's images, so the logits have a trained
    model's scale (tens, not the thousands two training steps leave in the running stats) and
    the predictions vary across each image.
    """
    import torch

    from farcluss.config import load_config
    from farcluss.data.io import load_image
    from farcluss.data.transforms import image_to_tensor
    from farcluss.methods import build_method

    torch.manual_seed(seed)
    cfg = load_config(None, tiny_overrides(root, "farcluss"))
    model = build_method(cfg, len(TINY_CLASSES)).build_student()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    images = torch.stack([image_to_tensor(load_image(path), cfg.data.mean, cfg.data.std)
                          for path in sorted((root / "images").glob("*.png"))[:8]])
    model.train()
    with torch.no_grad():
        model(images)
    state = model.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cfg.to_dict(), "classes": TINY_CLASSES, "student": state,
                "teacher": state}, path)
    return path


@pytest.fixture
def restore_logging():
    """Puts the ``farcluss`` logger back as it was after a test that calls `setup_logging`."""
    logger = logging.getLogger("farcluss")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved

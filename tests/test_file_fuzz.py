"""Any file, any bytes (issue 17 §5): every reader of a user's file — run checkpoint (eval,
predict, export, resume), pretrained weights, image, mask, split list, config — answers a damaged
or foreign file with one FarclussError line that names the file and says what is wrong, never
another exception. Seeded: a failure reproduces.

Per path: a valid file truncated at 20 offsets, bytes flipped at random places, random bytes, an
empty file, a text file and another format's file. Flipped bytes may leave a file that is still
valid (a pixel, a letter of a path): those may load. Most cases call the loaders directly; two
run the command line in a subprocess."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CLASSES, tiny_overrides, write_tiny_checkpoint, write_tiny_dataset
from farcluss.config import load_config
from farcluss.data.io import load_image, load_mask
from farcluss.data.splits import read_split
from farcluss.engine.checkpoint import load_checkpoint
from farcluss.engine.trainer import Trainer
from farcluss.errors import FarclussError
from farcluss.inference import load_trained_model
from farcluss.models.pretrained import load_pretrained
from farcluss.models.resnet import resnet

SEED = 17
#: length of a PNG's closing IEND chunk: PIL decodes every pixel without it
PNG_END = 12
TEXT = b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(SEED).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()


def _checkpoint_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.arange(64.0)}, buffer)
    return buffer.getvalue()


def variants(valid: bytes, other_format: bytes, seed: int = SEED) -> List[Tuple[str, bytes, bool]]:
    """(name, bytes, must_fail) for every damaged version of `valid`."""
    rng = random.Random(seed)
    cases = []
    for offset in sorted(rng.sample(range(1, len(valid)), min(20, len(valid) - 1))):
        cases.append((f"truncated at {offset} of {len(valid)}", valid[:offset], True))
    for index in range(8):
        flipped = bytearray(valid)
        for _ in range(rng.randint(1, 6)):
            position = rng.randrange(len(flipped))
            flipped[position] ^= 1 << rng.randrange(8)
        cases.append((f"flipped bytes #{index}", bytes(flipped), False))
    for length in (1, 100, 5000):
        cases.append((f"{length} random bytes", bytes(rng.getrandbits(8) for _ in range(length)), True))
    cases += [("empty", b"", True), ("text", TEXT, True), ("JSON", b'{"a": [1, 2]}\n', True),
              ("other format", other_format, True)]
    return cases


def _assert_one_line(load: Callable[[Path], object], path: Path, data: bytes, must_fail: bool,
                     name: str, names_key: bool = False) -> None:
    path.write_bytes(data)
    try:
        load(path)
    except FarclussError as error:
        message = str(error)
        assert "\n" not in message, (name, message)
        # a config that parses names the key that is wrong, as every config error does
        named = str(path) in message or (names_key and "config key" in message)
        assert named, (name, message)
        return
    except Exception as error:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{name}: {type(error).__name__} escaped: {error}")
    assert not must_fail, f"{name}: loaded without an error"


def _fuzz(load, path: Path, valid: bytes, other_format: bytes, text_format: bool = False,
          intact_tail: int = 0, seed: int = SEED) -> None:
    """`intact_tail`: a cut inside the last bytes (a PNG's IEND marker) loses no data."""
    for name, data, must_fail in variants(valid, other_format, seed):
        # a cut text file is a shorter text file, often still a valid one (an empty config
        # is the defaults)
        if text_format and (name.startswith("truncated") or name in ("text", "JSON", "empty")):
            must_fail = False
        if name.startswith("truncated") and len(data) >= len(valid) - intact_tail:
            must_fail = False
        _assert_one_line(load, path, data, must_fail, name, names_key=text_format)


# ---- the loading paths ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("fuzz") / "tiny", n_train=6, n_val=2)


@pytest.fixture(scope="module")
def run_checkpoint(dataset) -> bytes:
    return write_tiny_checkpoint(dataset.parent / "run.pt", dataset).read_bytes()


def test_run_checkpoint_for_eval_predict_export(dataset, run_checkpoint, tmp_path):
    # every one of them calls load_trained_model
    _fuzz(lambda path: load_trained_model(path, num_classes=len(TINY_CLASSES)),
          tmp_path / "best.pt", run_checkpoint, _png_bytes())


def test_checkpoint_that_is_valid_but_not_a_farcluss_one(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(2)}, path)
    with pytest.raises(FarclussError, match="not a farcluss run checkpoint"):
        load_trained_model(path)
    torch.save({"config": "nonsense", "student": {"a": 1}}, path)
    with pytest.raises(FarclussError, match="not a farcluss checkpoint"):
        load_trained_model(path)


def test_resume_checkpoint(dataset, tmp_path):
    cfg = load_config(None, tiny_overrides(dataset, "supervised", 2)
                      + ["train.checkpoint_interval=1"])
    run = tmp_path / "run"
    Trainer(cfg, run).fit()
    last = run / "checkpoints" / "last.pt"
    valid = last.read_bytes()

    def resume(path: Path) -> None:
        assert path == last
        Trainer(cfg, run, resume=True)

    # a Trainer is slower to build than the other loaders: fewer, still seeded, cases
    cases = variants(valid, _png_bytes())
    chosen = random.Random(SEED).sample([c for c in cases if c[0].startswith("truncated")], 4) + [
        c for c in cases if not c[0].startswith("truncated")]
    for name, data, must_fail in chosen:
        _assert_one_line(resume, last, data, must_fail, name)


def test_pretrained_weights(tmp_path):
    torch.manual_seed(SEED)
    backbone = resnet(18, base_width=8)
    valid = tmp_path / "valid.pth"
    torch.save(backbone.state_dict(), valid)
    _fuzz(lambda path: load_pretrained(resnet(18, base_width=8), path),
          tmp_path / "weights.pth", valid.read_bytes(), _png_bytes())


def test_image(tmp_path):
    _fuzz(load_image, tmp_path / "image.png", _png_bytes(), _checkpoint_bytes(),
          intact_tail=PNG_END)


def test_mask(tmp_path):
    buffer = io.BytesIO()
    mask = np.random.default_rng(SEED).integers(0, 3, (24, 24), dtype=np.uint8)
    Image.fromarray(mask).save(buffer, format="PNG")
    _fuzz(lambda path: load_mask(path, num_classes=3), tmp_path / "mask.png", buffer.getvalue(),
          _checkpoint_bytes(), intact_tail=PNG_END)


def test_split_list(dataset, tmp_path):
    valid = (dataset / "splits" / "labeled.txt").read_bytes()
    _fuzz(lambda path: read_split(path, dataset, require_mask=True), tmp_path / "labeled.txt",
          valid, _png_bytes(), text_format=True)


def test_config(dataset, tmp_path):
    valid = (f"data:\n  root: {dataset}\n  crop_size: 32\nmodel:\n  backbone: resnet18\n"
             "  base_width: 8\ntrain:\n  iterations: 4\n  lr: 0.01\n").encode()
    _fuzz(load_config, tmp_path / "config.yaml", valid, _png_bytes(), text_format=True)


# ---- through the command line, as a new user would ----------------------------------------------------
def _farcluss(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KMP_BLOCKTIME="0", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "farcluss", *args], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_eval_of_a_text_file_is_one_line_and_exit_2(dataset, tmp_path):
    text = tmp_path / "passwd"
    text.write_bytes(TEXT)
    argv = ["eval", "--checkpoint", str(text)]
    for override in tiny_overrides(dataset):
        argv += ["--set", override]
    done = _farcluss(*argv)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: checkpoint {text} is a text file, not a farcluss checkpoint"]


@pytest.mark.slow
def test_predict_with_a_truncated_checkpoint_is_one_line_and_exit_2(dataset, run_checkpoint,
                                                                    tmp_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(run_checkpoint[: len(run_checkpoint) - 100])
    done = _farcluss("predict", str(dataset / "images" / "000.png"), "--checkpoint", str(cut),
                     "--out", str(tmp_path / "predictions"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: checkpoint {cut} is truncated (the end of the file is missing)"]
    assert not (tmp_path / "predictions").exists()

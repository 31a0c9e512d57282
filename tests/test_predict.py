import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_tiny_checkpoint, write_tiny_dataset
from farcluss.cli import main
from farcluss.data.io import load_image
from farcluss.data.transforms import image_to_tensor
from farcluss.evaluate import predict_sliding, predict_whole
from farcluss.inference import load_trained_model
from farcluss.predict import ImageJob, find_images, group_by_size, predict_images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny dataset and an untrained-but-calibrated checkpoint of the tiny model."""
    base = tmp_path_factory.mktemp("predict")
    root = write_tiny_dataset(base / "tiny", n_train=4, n_val=0, n_labeled=2)
    checkpoint = write_tiny_checkpoint(base / "model.pt", root)
    return root, checkpoint


@pytest.fixture(scope="module")
def model(tiny):
    model, saved_cfg, classes = load_trained_model(tiny[1], "teacher")
    return model, saved_cfg


def _model_probs(model, saved_cfg, path):
    images = image_to_tensor(load_image(path), saved_cfg.data.mean, saved_cfg.data.std)[None]
    with torch.no_grad():
        return predict_whole(model, images, saved_cfg.model.output_stride)[0]


def _decode(path):
    with Image.open(path) as image:
        assert image.mode == "P"
        return np.array(image)


def test_corrupt_image_is_named_and_the_others_are_written(tiny, tmp_path, capsys):
    root, checkpoint = tiny
    inputs = tmp_path / "inputs"
    shutil.copytree(root / "images", inputs)
    good = sorted(path.stem for path in inputs.glob("*.png"))
    truncated = inputs / "truncated.png"
    truncated.write_bytes((inputs / f"{good[0]}.png").read_bytes()[:200])
    (inputs / "notes.jpg").write_text("not an image")
    out = tmp_path / "out"

    code = main(["predict", "--checkpoint", str(checkpoint), str(inputs), "--out", str(out),
                 "--batch-size", "3"])

    assert code == 2
    err = capsys.readouterr().err
    assert str(truncated) in err and str(inputs / "notes.jpg") in err
    for stem in good:
        assert (out / f"{stem}.png").is_file() and (out / f"{stem}_overlay.png").is_file()
        assert not (out / f"{stem}_probs.npy").exists()  # only with --probs
    assert not (out / "truncated.png").exists() and not (out / "notes.png").exists()
    assert (out / "legend.txt").read_text().splitlines()[1].startswith("1\tsquare\t#")


def test_palette_png_holds_the_model_argmax(tiny, model, tmp_path, capsys):
    root, checkpoint = tiny
    image_path = root / "images" / "000.png"
    out = tmp_path / "out"
    code = main(["predict", "--checkpoint", str(checkpoint), str(image_path), "--out", str(out),
                 "--probs", "--device", "cpu"])
    assert code == 0
    assert "wrote predictions of 1 image(s)" in capsys.readouterr().out

    expected_probs = _model_probs(*model, image_path)
    expected = expected_probs.argmax(0).numpy()
    assert len(np.unique(expected)) >= 2  # a one-class prediction would prove little
    assert np.array_equal(_decode(out / "000.png"), expected)
    saved_probs = np.load(out / "000_probs.npy")
    assert saved_probs.dtype == np.float16 and saved_probs.shape == (3, 40, 40)
    np.testing.assert_allclose(saved_probs.astype(np.float32), expected_probs.numpy(), atol=1e-3)
    overlay = np.array(Image.open(out / "000_overlay.png"))
    assert overlay.shape == (40, 40, 3)


def test_large_images_are_predicted_in_sliding_windows(tiny, model, tmp_path):
    root, checkpoint = tiny
    image_path = root / "images" / "001.png"
    summary = predict_images(checkpoint, [image_path], tmp_path, save_probs=True,
                             sliding_size=24, progress=False, report=lambda line: None)
    assert [job.path for job in summary.written] == [image_path] and not summary.failed

    net, saved_cfg = model
    images = image_to_tensor(load_image(image_path), saved_cfg.data.mean, saved_cfg.data.std)[None]
    with torch.no_grad():
        sliding = predict_sliding(net, images, 24, saved_cfg.eval.stride_ratio)[0]
    whole = _model_probs(net, saved_cfg, image_path)
    saved = torch.from_numpy(np.load(tmp_path / "001_probs.npy").astype(np.float32))
    assert torch.allclose(saved, sliding, atol=1e-3)
    assert not torch.allclose(saved, whole, atol=1e-2)  # the windows were really used
    assert np.array_equal(_decode(tmp_path / "001.png"), sliding.argmax(0).numpy())


def test_batched_and_single_predictions_agree(tiny, tmp_path):
    root, checkpoint = tiny
    quiet = dict(progress=False, report=lambda line: None)
    predict_images(checkpoint, [root / "images"], tmp_path / "one", batch_size=1, **quiet)
    predict_images(checkpoint, [root / "images"], tmp_path / "four", batch_size=4, **quiet)
    for stem in ("000", "001", "002", "003"):
        assert np.array_equal(_decode(tmp_path / "one" / f"{stem}.png"),
                              _decode(tmp_path / "four" / f"{stem}.png"))


def _write_image(path: Path, height: int, width: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (10, 20, 30)).save(path)
    return path


def test_same_size_images_are_batched_in_input_order(tmp_path):
    sizes = [(8, 8), (8, 12), (8, 8), (8, 8), (8, 12)]
    jobs = [ImageJob(_write_image(tmp_path / f"{i}.png", *size), Path(str(i)))
            for i, size in enumerate(sizes)]
    (tmp_path / "junk.png").write_text("junk")
    batches, failed = group_by_size(jobs + [ImageJob(tmp_path / "junk.png", Path("junk"))], 2)
    assert [[job.output_stem.name for job in batch] for batch in batches] == [
        ["0", "2"], ["3"], ["1", "4"]]
    assert failed == [(tmp_path / "junk.png", "not a readable image")]


def test_output_names_keep_subfolders_and_never_collide(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    _write_image(first / "a.png", 4, 4)
    _write_image(first / "city" / "a.png", 4, 4)
    _write_image(first / "a.jpg", 4, 4)
    _write_image(second / "A.png", 4, 4)
    _write_image(first / ".hidden" / "b.png", 4, 4)
    _write_image(first / "out" / "old.png", 4, 4)  # earlier predictions inside an input folder
    (tmp_path / "empty").mkdir()

    jobs, failed, renamed = find_images(
        [first, second, first / "a.png", tmp_path / "missing.png", tmp_path / "empty"],
        exclude=first / "out")

    names = {job.path.relative_to(tmp_path).as_posix(): job.output_stem.as_posix() for job in jobs}
    assert names == {"first/a.jpg": "a", "first/a.png": "a-2", "first/city/a.png": "city/a",
                     "second/A.png": "A-3"}
    assert [(job.output_stem.as_posix(), stem.as_posix()) for job, stem in renamed] == [
        ("a-2", "a"), ("A-3", "A")]
    assert [(path.name, reason.split()[0]) for path, reason in failed] == [
        ("missing.png", "not"), ("empty", "folder")]


def test_unreadable_checkpoint_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    _write_image(tmp_path / "x.png", 4, 4)
    code = main(["predict", "--checkpoint", str(bad), str(tmp_path / "x.png"), "--out",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(bad) in err[0]
    assert not (tmp_path / "out").exists()

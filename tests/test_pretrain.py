"""`farcluss pretrain` and `model.pretrained: builtin:pretrained`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_overrides

from farcluss import pretrain as pt
from farcluss.cli import main
from farcluss.engine.trainer import Trainer
from farcluss.config import ModelConfig, load_config
from farcluss.errors import CheckpointError, ConfigError
from farcluss.log import setup_logging
from farcluss.models import build_model, load_pretrained

pytest.importorskip("skimage")

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = pt.TrainSettings(iterations=3, batch_size=4, warmup_iterations=1, heldout_samples=8)
TINY_TASK = pt.TaskSettings(photo_size=64, crop=32)


def tiny_pretrain(out: Path, **kwargs) -> dict:
    kwargs.setdefault("base_width", 8)
    return pt.pretrain(out, train=TINY_TRAIN, task_settings=TINY_TASK, **kwargs)


# ---- determinism ------------------------------------------------------------------------------
def test_same_seed_writes_the_same_file_and_another_seed_does_not(tmp_path):
    first = tiny_pretrain(tmp_path / "a.pt", seed=3)
    second = tiny_pretrain(tmp_path / "b.pt", seed=3)
    other = tiny_pretrain(tmp_path / "c.pt", seed=4)
    assert first["sha256"] == second["sha256"]
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert other["sha256"] != first["sha256"]
    # the sidecar records the hash of the file beside it, and the settings
    sidecar = json.loads((tmp_path / "a.json").read_text())
    assert sidecar["sha256"] == pt.file_sha256(str(tmp_path / "a.pt"))
    assert sidecar["seed"] == 3 and sidecar["base_width"] == 8
    assert sidecar["train"]["iterations"] == TINY_TRAIN.iterations
    assert 0.0 <= sidecar["train_accuracy"] <= 100.0


def test_pretrain_leaves_the_global_rng_and_thread_count_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    tiny_pretrain(tmp_path / "a.pt", threads=1)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


# ---- the file strict-loads through the real loader ----------------------------------------------
@pytest.mark.parametrize("recipe", ["benchmark.yaml", "own_data_cpu.yaml"])
def test_file_strict_loads_into_the_recipe_model(tmp_path, recipe):
    cfg = load_config(str(ROOT / "configs" / recipe), [])
    path = tmp_path / "w.pt"
    record = pt.pretrain(path, backbone=cfg.model.backbone, base_width=cfg.model.base_width,
                         train=pt.TrainSettings(iterations=1, batch_size=2, heldout_samples=2),
                         task_settings=TINY_TASK)
    model = build_model(11, backbone=cfg.model.backbone, output_stride=cfg.model.output_stride,
                        base_width=cfg.model.base_width)
    report = load_pretrained(model, str(path), sha256=record["sha256"])
    saved = torch.load(path, weights_only=True)
    assert set(saved) == set(model.backbone.state_dict())
    assert report["loaded_keys"] == len(saved)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, saved[key]), key
    if recipe == "own_data_cpu.yaml":  # the CPU recipe names the built-in file for its model
        iterations = pt.builtin_iterations(cfg.model.pretrained)
        assert iterations == 9000
        assert pt.default_pretrained_path(cfg.model.backbone, cfg.model.base_width,
                                          iterations=iterations).name == \
            f"pretrained-resnet18-w32-v{pt.RECIPE_VERSION}-seed0-it9000.pt"


def test_corrupt_mismatched_or_wrong_width_files_give_the_loaders_one_line_error(tmp_path):
    path = tmp_path / "w.pt"
    record = tiny_pretrain(path)
    model = build_model(5, backbone="resnet18", base_width=8)

    with pytest.raises(CheckpointError, match="sha256 mismatch") as error:
        load_pretrained(model, str(path), sha256="0" * 64)
    assert "\n" not in str(error.value) and str(path) in str(error.value)

    broken = tmp_path / "broken.pt"
    broken.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as error:
        load_pretrained(model, str(broken))
    assert "\n" not in str(error.value) and str(broken) in str(error.value)

    wider = build_model(5, backbone="resnet18", base_width=16)
    with pytest.raises(CheckpointError, match="shape") as error:
        load_pretrained(wider, str(path), sha256=record["sha256"])
    assert "\n" not in str(error.value)


# ---- builtin:pretrained ---------------------------------------------------------------------------
def test_builtin_pretrained_is_made_once_in_the_cache_and_hash_checked(tmp_path, monkeypatch, capsys,
                                                                    restore_logging):
    monkeypatch.setenv("FARCLUSS_CACHE", str(tmp_path))
    real = pt.pretrain
    calls = []

    def quick(*args, **kwargs):
        calls.append(kwargs)
        kwargs.pop("train", None)
        return real(*args, train=TINY_TRAIN, task_settings=TINY_TASK, **kwargs)

    monkeypatch.setattr(pt, "pretrain", quick)
    model_cfg = ModelConfig(backbone="resnet18", base_width=8, pretrained=pt.BUILTIN_PRETRAINED)
    # the log line a user sees: the farcluss logger on stderr, as the CLI sets it up
    setup_logging(rank=0)
    source, sha256 = pt.resolve_pretrained(model_cfg)
    assert Path(source) == tmp_path / f"pretrained-resnet18-w8-v{pt.RECIPE_VERSION}-seed0.pt"
    assert Path(source).is_file() and len(calls) == 1
    assert "making the built-in pretrained" in capsys.readouterr().err
    assert sha256 == json.loads(Path(source).with_suffix(".json").read_text())["sha256"]

    # second use: the cached file, not made again; loads strictly into the model
    assert pt.resolve_pretrained(model_cfg) == (source, sha256)
    assert len(calls) == 1
    model = build_model(5, backbone="resnet18", base_width=8)
    load_pretrained(model, source, sha256=sha256)

    # a file changed after it was recorded fails the loader's hash check
    data = bytearray(Path(source).read_bytes())
    data[-30] ^= 0xFF
    Path(source).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_pretrained(model, *pt.resolve_pretrained(model_cfg))

    # a pinned model.pretrained_sha256 wins over the recorded one
    pinned = ModelConfig(backbone="resnet18", base_width=8, pretrained=pt.BUILTIN_PRETRAINED,
                         pretrained_sha256="abc123")
    assert pt.resolve_pretrained(pinned) == (source, "abc123")


def test_builtin_pretrained_at_n_is_its_own_file_made_with_n_iterations(tmp_path, monkeypatch):
    monkeypatch.setenv("FARCLUSS_CACHE", str(tmp_path))
    real = pt.pretrain
    schedules = []

    def quick(*args, train, **kwargs):
        schedules.append(train.iterations)
        return real(*args, train=TINY_TRAIN, task_settings=TINY_TASK, **kwargs)

    monkeypatch.setattr(pt, "pretrain", quick)
    longer = ModelConfig(backbone="resnet18", base_width=8, pretrained="builtin:pretrained@9000")
    source, _ = pt.resolve_pretrained(longer)
    assert Path(source).name == f"pretrained-resnet18-w8-v{pt.RECIPE_VERSION}-seed0-it9000.pt"
    default = ModelConfig(backbone="resnet18", base_width=8, pretrained=pt.BUILTIN_PRETRAINED)
    assert Path(pt.resolve_pretrained(default)[0]).name == \
        f"pretrained-resnet18-w8-v{pt.RECIPE_VERSION}-seed0.pt"
    assert schedules == [9000, pt.DEFAULT_ITERATIONS]
    # the default schedule written out is the bare name: one file for one schedule
    assert pt.builtin_iterations(f"builtin:pretrained@{pt.DEFAULT_ITERATIONS}") == \
        pt.DEFAULT_ITERATIONS
    assert pt.builtin_iterations("resnet50") is None and pt.builtin_iterations(None) is None


@pytest.mark.parametrize("value", ["builtin:pretrained@", "builtin:pretrained@0",
                                   "builtin:pretrained@nine", "builtin:pretrainedx"])
def test_a_malformed_builtin_name_is_one_line_naming_the_key(value):
    with pytest.raises(ConfigError, match="model.pretrained") as error:
        pt.resolve_pretrained(ModelConfig(backbone="resnet18", base_width=8, pretrained=value))
    assert "\n" not in str(error.value) and "@N" in str(error.value)


def test_builtin_pretrained_refuses_models_it_was_not_made_for_and_passes_others_through(
        tmp_path, monkeypatch):
    monkeypatch.setenv("FARCLUSS_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="model.pretrained"):
        pt.resolve_pretrained(ModelConfig(backbone="resnet18", deep_stem=True,
                                          pretrained=pt.BUILTIN_PRETRAINED))
    with pytest.raises(ConfigError, match="model.pretrained"):
        pt.resolve_pretrained(ModelConfig(backbone="dinov2_vits14",
                                          pretrained=pt.BUILTIN_PRETRAINED))
    assert pt.resolve_pretrained(ModelConfig(pretrained="resnet50", pretrained_sha256="ab")) == (
        "resnet50", "ab")
    assert pt.resolve_pretrained(ModelConfig()) == (None, None)
    assert not list(tmp_path.iterdir())


def test_an_unreadable_sidecar_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FARCLUSS_CACHE", str(tmp_path))
    path = pt.default_pretrained_path("resnet18", 8)
    path.write_bytes(b"weights")
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(CheckpointError) as error:
        pt.resolve_pretrained(ModelConfig(backbone="resnet18", base_width=8,
                                          pretrained=pt.BUILTIN_PRETRAINED))
    assert str(path.with_suffix(".json")) in str(error.value) and "\n" not in str(error.value)


# ---- the task's labels ----------------------------------------------------------------------------
def _best_matching_photo(view: torch.Tensor, bank: torch.Tensor) -> int:
    """The photograph holding the patch closest to `view` (sum of squared differences over every
    position, by convolution)."""
    kernel = view[None]
    cross = F.conv2d(bank, kernel)[:, 0]  # P×H'×W'
    patch_energy = F.conv2d(bank * bank, torch.ones_like(kernel))[:, 0]
    ssd = patch_energy - 2 * cross + (view * view).sum()
    return int(ssd.flatten(1).min(1).values.argmin())


def test_a_view_labelled_photo_k_is_cut_from_photo_k():
    # no jitter or flip, and a view at the bank's resolution, so it is a patch of its photo
    settings = pt.TaskSettings(photo_size=64, crop=32, scale_range=(0.5, 0.5), jitter=0.0,
                               flip_prob=0.0)
    task = pt.PretrainTask(settings, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    images, labels = task.sample(96, torch.Generator().manual_seed(0))
    photo_rows = (labels < len(pt.PHOTOS)).nonzero().flatten()
    assert len(set(labels[photo_rows].tolist())) >= 8  # many photos are drawn
    for row in photo_rows.tolist():
        assert _best_matching_photo(images[row], task.photos) == int(labels[row]), row
    assert task.names[: len(pt.PHOTOS)] == tuple(f"photo:{n}" for n in pt.PHOTOS)


def test_a_view_labelled_with_a_shape_holds_that_polygon():
    """The painted region's area over its circumscribed circle's is the polygon's
    (k/2π)·sin(2π/k) (1 for the circle); the shape classes are told apart by it."""
    size, radius = 64, 26.0
    expected = {sides: (sides / (2 * math.pi)) * math.sin(2 * math.pi / sides) if sides else 1.0
                for sides in pt.SHAPES}
    for sides in pt.SHAPES:
        for angle in (0.0, 0.7):
            mask = pt.polygon_masks(torch.tensor([sides]), torch.tensor([radius]),
                                    torch.tensor([angle]), torch.tensor([[32.0, 32.0]]), size)
            ratio = float(mask.sum()) / (math.pi * radius ** 2)
            closest = min(expected, key=lambda k: abs(expected[k] - ratio))
            assert closest == sides and abs(ratio - expected[sides]) < 0.03

    # in a real batch (no jitter), a shape view has one flat colour over at least a ~3-gon's area
    settings = pt.TaskSettings(photo_size=64, crop=32, jitter=0.0)
    task = pt.PretrainTask(settings, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    images, labels = task.sample(64, torch.Generator().manual_seed(1))
    polygon_classes = len(pt.PHOTOS) + len(pt.SHAPES)
    shape_rows = ((labels >= len(pt.PHOTOS)) & (labels < polygon_classes)).nonzero().flatten().tolist()
    assert shape_rows
    min_area = expected[3] * math.pi * (0.25 * settings.crop) ** 2
    for row in shape_rows:
        pixels = images[row].flatten(1).T  # N×3
        _, counts = torch.unique(pixels, dim=0, return_counts=True)
        assert int(counts.max()) >= 0.9 * min_area, row


def test_stroke_masks_cover_the_pixels_within_half_a_width_of_a_segment():
    # one horizontal segment from (10, 16) to (22, 16), width 4: the pixel centres (x+.5, y+.5)
    # within 2 of it are x + .5 in [8, 24] on rows whose centre is within 2 of 16, rounded ends
    points = torch.tensor([[[[10.0, 16.0], [22.0, 16.0], [22.0, 16.0]]]])
    mask = pt.stroke_masks(points, torch.tensor([4.0]), 32)[0]
    ys, xs = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    along = xs.clamp(10, 22)
    expected = (xs - along).square() + (ys - 16).square() <= 4.0
    assert torch.equal(mask, expected)
    assert mask[16, 15] and mask[14, 15] and not mask[13, 15]  # rows 14..17 of the middle
    assert mask[16, 8] and not mask[16, 7] and not mask[16, 24]


def test_glyphs_are_the_recipes_not_the_seeds_and_a_glyph_view_draws_its_strokes():
    first, again = pt.glyph_strokes(), pt.glyph_strokes()
    assert torch.equal(first, again) and first.shape == (pt.NUM_GLYPHS, 3, 3, 2)
    assert first.min() >= 0.1 and first.max() <= 0.9
    assert len({tuple(g.flatten().tolist()) for g in first}) == pt.NUM_GLYPHS
    settings = pt.TaskSettings(photo_size=64, crop=32, jitter=0.0)
    task = pt.PretrainTask(settings, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert task.names[-pt.NUM_GLYPHS:] == tuple(f"glyph:{k}" for k in range(pt.NUM_GLYPHS))
    images, labels = task.sample(96, torch.Generator().manual_seed(2))
    glyph_rows = (labels >= len(pt.PHOTOS) + len(pt.SHAPES)).nonzero().flatten().tolist()
    assert len(glyph_rows) > 30
    for row in glyph_rows:
        # the strokes are one flat colour: its pixels are a stroke's area, not the whole view
        pixels = images[row].flatten(1).T
        _, counts = torch.unique(pixels, dim=0, return_counts=True)
        assert 20 <= int(counts.max()) < 0.8 * settings.crop ** 2, row


# ---- the command -----------------------------------------------------------------------------------
def test_cli_pretrain_writes_weights_and_sidecar(tmp_path, capsys):
    out = tmp_path / "enc.pt"
    assert main(["pretrain", "--iterations", "2", "--base-width", "4", "--batch-size", "2",
                 "--seed", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["sha256"] in printed and "train accuracy" in printed
    assert record["seed"] == 1 and record["train"]["iterations"] == 2
    with pytest.raises(SystemExit):
        main(["pretrain", "--iterations", "0"])


# ---- the trainer ------------------------------------------------------------------------------------
def test_trainer_loads_builtin_pretrained_and_refuses_a_tampered_file(tiny_dataset, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.setenv("FARCLUSS_CACHE", str(tmp_path / "cache"))
    real = pt.pretrain
    monkeypatch.setattr(pt, "pretrain", lambda *a, train=None, **k: real(
        *a, train=TINY_TRAIN, task_settings=TINY_TASK, **k))
    overrides = tiny_overrides(tiny_dataset, "supervised", iterations=1) + [
        "model.pretrained=builtin:pretrained"]
    trainer = Trainer(load_config(None, overrides), tmp_path / "run")
    path = tmp_path / "cache" / f"pretrained-resnet18-w8-v{pt.RECIPE_VERSION}-seed0.pt"
    saved = torch.load(path, weights_only=True)
    for key, value in trainer.student.backbone.state_dict().items():
        assert torch.equal(value, saved[key]), key

    data = bytearray(path.read_bytes())
    data[-30] ^= 0xFF
    path.write_bytes(bytes(data))
    capsys.readouterr()
    code = main(["train", "--out", str(tmp_path / "run2"),
                 *[arg for item in overrides for arg in ("--set", item)]])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(err) == 1 and "sha256 mismatch" in err[0] and str(path) in err[0]

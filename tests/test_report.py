import json
import sys
import types

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_CLASSES, tiny_overrides, write_tiny_dataset
from doubles import FakeSummaryWriter
from farcluss.cli import main
from farcluss.config import load_config
from farcluss.engine.trainer import Trainer
from farcluss.palette import IGNORE_COLOUR, class_colours
from farcluss.report import (
    best_record,
    colourise,
    median_seconds_per_iteration,
    miou_curve,
    read_metrics,
)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A 4-iteration farcluss run evaluated at iterations 2 and 4, with TensorBoard logging
    through a fake SummaryWriter (the tensorboard package is optional)."""
    root = write_tiny_dataset(tmp_path_factory.mktemp("data"))
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(None, tiny_overrides(root, "farcluss", 4) + [
        "train.eval_interval=2", "train.tensorboard=true"])
    FakeSummaryWriter.instances.clear()
    fake_module = types.ModuleType("torch.utils.tensorboard")
    fake_module.SummaryWriter = FakeSummaryWriter
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "torch.utils.tensorboard", fake_module)
        Trainer(cfg, run_dir, resume=False).fit()
    return run_dir, list(FakeSummaryWriter.instances)


def test_report_writes_plots_and_page(short_run, tmp_path):
    run_dir, _ = short_run
    out = tmp_path / "report"
    assert main(["report", str(run_dir), "--out", str(out), "--num-images", "2"]) == 0
    page = (out / "index.html").read_text()
    for name in ("losses.png", "miou.png", "per_class_iou.png", "predictions.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 100
        assert f"src='{name}'" in page
    assert "teacher" in page and "student" in page


def test_report_without_checkpoint_still_writes_plots(short_run, tmp_path, capsys):
    run_dir, _ = short_run
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("metrics.jsonl", "config.yaml"):
        (bare / name).write_bytes((run_dir / name).read_bytes())
    assert main(["report", str(bare)]) == 0
    assert "prediction grid skipped" in capsys.readouterr().err
    assert (bare / "report" / "miou.png").is_file()
    assert not (bare / "report" / "predictions.png").exists()


def test_report_of_a_folder_without_metrics_is_a_user_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


def test_trainer_mirrors_records_into_tensorboard(short_run):
    run_dir, writers = short_run
    assert len(writers) == 1 and writers[0].log_dir == str(run_dir / "tensorboard")
    tags = {tag for tag, _, _ in writers[0].scalars}
    assert {"train/loss", "train/loss_sup", "train/lr", "eval/teacher/miou", "eval/student/miou"} <= tags
    # vector statistics are split per class by name
    assert "train/pseudo_label_frequency/disc" in tags
    eval_steps = sorted(step for tag, _, step in writers[0].scalars if tag == "eval/teacher/miou")
    assert eval_steps == [2, 4]
    teacher_mious = [r["miou"] for r in read_metrics(run_dir / "metrics.jsonl")
                     if r["type"] == "eval" and r["model"] == "teacher"]
    logged = [value for tag, value, _ in writers[0].scalars if tag == "eval/teacher/miou"]
    assert logged == teacher_mious


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"type": "train", "iteration": 1}) + "\n" + '{"type": "tr')
    assert read_metrics(path) == [{"type": "train", "iteration": 1}]


def test_miou_curve_keeps_the_latest_value_of_a_repeated_iteration():
    records = [{"type": "eval", "model": "teacher", "iteration": 10, "miou": 5.0},
               {"type": "eval", "model": "student", "iteration": 10, "miou": 9.0},
               {"type": "eval", "model": "teacher", "iteration": 20, "miou": 7.0},
               {"type": "eval", "model": "teacher", "iteration": 10, "miou": 6.0}]
    assert miou_curve(records, "teacher") == ([10, 20], [6.0, 7.0])


def test_median_step_time_leaves_out_start_up_and_evaluation_windows():
    train = [{"type": "train", "iteration": i, "seconds_per_iteration": s}
             for i, s in ((5, 9.0), (10, 0.2), (15, 5.0), (20, 0.4), (25, 0.3))]
    # the evaluation after step 10 lands in the window (10, 15]; the first window is start-up
    records = train + [{"type": "eval", "iteration": 10, "model": "student", "miou": 1.0}]
    assert median_seconds_per_iteration(records) == pytest.approx(0.3)
    assert median_seconds_per_iteration(train[:1]) == 9.0
    assert median_seconds_per_iteration([]) is None


def test_colourise_paints_classes_and_ignored_pixels():
    colours = class_colours(len(TINY_CLASSES))
    mask = np.array([[0, 1], [2, 255]])
    image = colourise(mask, colours, ignore_index=255)
    assert image.dtype == np.uint8 and image.shape == (2, 2, 3)
    np.testing.assert_array_equal(image[0, 1], colours[1])
    np.testing.assert_array_equal(image[1, 0], colours[2])
    np.testing.assert_array_equal(image[1, 1], IGNORE_COLOUR)
    # another ignore label: 255 is then an ordinary (out-of-range) value, 2 the ignored one
    np.testing.assert_array_equal(colourise(mask, colours, ignore_index=2)[1, 0], IGNORE_COLOUR)


def test_best_record_is_the_earliest_highest_miou():
    records = [{"type": "eval", "model": "teacher", "iteration": i, "miou": m}
               for i, m in ((5, 10.0), (10, 30.0), (15, 30.0), (20, 20.0))]
    assert best_record(records, "teacher")["iteration"] == 10
    assert best_record(records, "student") is None


def test_report_plots_the_test_curves_beside_val_when_the_run_scored_a_test_split(
        short_run, tmp_path, monkeypatch):
    import farcluss.report as report

    run_dir, _ = short_run
    folder = tmp_path / "with_test"
    folder.mkdir()
    (folder / "config.yaml").write_bytes((run_dir / "config.yaml").read_bytes())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:  # as a run with data.test writes them
        if record["type"] == "eval":
            record["test_miou"] = record["miou"] / 2
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    drawn = {}
    real = report.plot_miou_curves

    def spy(curves, path, title="validation mIoU"):
        drawn.update(curves=dict(curves), title=title)
        return real(curves, path, title)

    monkeypatch.setattr(report, "plot_miou_curves", spy)
    report.make_report(folder)
    evals = [r for r in records if r["type"] == "eval" and r["model"] == "student"]
    assert drawn["curves"]["student (test)"] == ([r["iteration"] for r in evals],
                                                 [r["miou"] / 2 for r in evals])
    assert drawn["curves"]["student"][1] == [r["miou"] for r in evals]
    assert "test" in drawn["title"]
    # a run without test scores draws val only
    drawn.clear()
    report.make_report(run_dir, out_dir=tmp_path / "plain")
    assert not any("(test)" in label for label in drawn["curves"])

import json

import pytest
from PIL import Image

import farcluss.demo as demo
from farcluss.cli import main
from farcluss.config import load_config
from farcluss.data.benchmark import BENCHMARK_CLASSES, make_benchmark
from farcluss.demo import (Calibration, curve_settings, plan_iterations, shared_settings,
                           short_schedule_warning)

TINY_MODEL = ["data.crop_size=32", "data.scale_range=[0.75, 1.25]", "model.base_width=8",
              "train.batch_size=2", "train.num_workers=0", "train.progress=false",
              "method.projection_dim=16", "method.ema_momentum=0.9"]


def test_demo_with_a_tiny_budget_writes_its_report(tmp_path, monkeypatch):
    data = make_benchmark(tmp_path / "bench", num_train=8, num_val=3, num_test=2, size_range=(32, 40), progress=False)
    monkeypatch.setattr(demo, "CALIBRATION_ITERATIONS", 3)
    out = tmp_path / "demo"
    argv = ["demo", "--data", str(data), "--out", str(out), "--minutes", "0.05", "--seed", "1",
            "--num-images", "2"]
    for override in TINY_MODEL:
        argv += ["--set", override]
    assert main(argv) == 0

    for name in ("per_class_iou.png", "miou.png", "predictions.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG"
    page = (out / "index.html").read_text()
    assert all(f"src='{name}'" in page for name in ("per_class_iou.png", "miou.png", "predictions.png"))
    summary = json.loads((out / "summary.json").read_text())
    # 3 seconds cannot hold any training after calibration: the minimum, equal for all three
    assert summary["iteration_choice"]["source"] == "calibrated"
    assert summary["iterations"] == demo.MIN_ITERATIONS
    calibration = {c["method"]: c for c in summary["iteration_choice"]["calibration"]}
    # fixmatch is calibrated too, but 3 seconds cannot afford the full schedule with it
    assert list(calibration) == ["supervised", "unimatch", "farcluss", "fixmatch"]
    # 3 val images are all curve images: the final evaluation costs the calibration's one,
    # of one model where the calibration evaluated two (teacher and student)
    supervised, farcluss = calibration["supervised"], calibration["farcluss"]
    assert supervised["final_eval_seconds"] == pytest.approx(supervised["eval_seconds"])
    assert farcluss["final_eval_seconds"] == pytest.approx(farcluss["eval_seconds"] / 2)
    assert [m["method"] for m in summary["methods"]] == ["supervised", "unimatch", "farcluss"]
    # UniMatch V1 takes pseudo-labels from the online model: there is no teacher to judge
    assert [m["model"] for m in summary["methods"]] == ["student", "student", "teacher"]
    for method in summary["methods"]:
        run_cfg = load_config(out / "runs" / method["method"] / "config.yaml")
        assert run_cfg.train.iterations == demo.MIN_ITERATIONS and run_cfg.train.seed == 1
        assert run_cfg.method.name == method["method"]
        assert list(method["per_class_iou"]) == BENCHMARK_CLASSES
    # the rare classes are the object classes with the fewest labeled pixels
    counts = summary["labeled_pixel_counts"]
    rare = summary["rare_classes"]
    assert len(rare) == 3 and "background" not in rare
    assert max(counts[name] for name in rare) <= min(
        counts[name] for name in BENCHMARK_CLASSES[1:] if name not in rare)
    assert not (out / "calibration").exists()


def test_demo_iterations_option_skips_calibration(tmp_path):
    data = make_benchmark(tmp_path / "bench", num_train=4, num_val=2, num_test=1, size_range=(32, 32), progress=False)
    out = tmp_path / "demo"
    argv = ["demo", "--data", str(data), "--out", str(out), "--iterations", "1", "--num-images", "1",
            "--methods", "supervised,fixmatch"]
    for override in TINY_MODEL:
        argv += ["--set", override]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 1 and summary["iteration_choice"]["source"] == "--iterations"
    assert "calibration" not in summary["iteration_choice"]
    assert [m["method"] for m in summary["methods"]] == ["supervised", "fixmatch"]
    assert "supervised vs FixMatch" in (out / "index.html").read_text()


def test_demo_rejects_an_unknown_method(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--methods", "supervised,mixmatch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mixmatch" in err[0] and "unimatch" in err[0]
    assert not (tmp_path / "d").exists()


def test_fixmatch_joins_only_when_the_full_schedule_still_fits():
    calibrations = {"supervised": Calibration("supervised", 0.1, 1.0, 0.5, 2.5),
                    "unimatch": Calibration("unimatch", 0.4, 1.0, 1.5, 2.5),
                    "farcluss": Calibration("farcluss", 0.2, 1.0, 1.5, 2.5),
                    "fixmatch": Calibration("fixmatch", 0.2, 1.0, 1.5, 2.5)}
    base = list(demo.DEMO_METHODS)
    # with fixmatch: fixed 4 · 1 + 6 · 5 + 4 · 2.5 = 44 s, 0.9 s per iteration; 1000 iterations
    # need 0.9 · T ≥ 944, T ≥ 1048.9 s
    assert demo.with_optional_methods(base, calibrations, 1049, cap=1000) == [
        "supervised", "unimatch", "fixmatch", "farcluss"]
    assert demo.with_optional_methods(base, calibrations, 1048, cap=1000) == base
    # an explicit fixmatch is not added twice
    assert demo.with_optional_methods(["fixmatch", "farcluss"], calibrations, 1e6, cap=10) == [
        "fixmatch", "farcluss"]


def test_plan_iterations_fits_the_budget():
    # fixed cost: builds 3 · 1 + (6 evaluations + 1) · (0.5 + 1.5 + 1.5) + final evaluations
    # 3 · 2.5 = 35 s; (0.9 · 600 − 35) / 0.5 = 1010
    calibrations = [Calibration("supervised", 0.1, 1.0, 0.5, 2.5),
                    Calibration("fixmatch", 0.2, 1.0, 1.5, 2.5),
                    Calibration("farcluss", 0.2, 1.0, 1.5, 2.5)]
    assert plan_iterations(calibrations, 600, cap=1200, eval_points=6) == 1010
    assert plan_iterations(calibrations, 600, cap=800, eval_points=6) == 800
    # (0.9 · 126.4 − 35) / 0.5 = 157.5 → 157, rounded down to 150
    assert plan_iterations(calibrations, 126.4, cap=1200, eval_points=6) == 150
    # (0.9 · 90 − 35) / 0.5 = 92 stays as it is below 100
    assert plan_iterations(calibrations, 90, cap=1200, eval_points=6) == 92
    assert plan_iterations(calibrations, 10, cap=1200, eval_points=6) == demo.MIN_ITERATIONS


def test_shared_settings_scale_the_warmup_with_the_schedule():
    cfg = load_config(None, ["train.iterations=1200", "method.warmup_iterations=200",
                             "train.log_interval=20"])
    settings = shared_settings(cfg, 600, seed=3)
    assert settings["method.warmup_iterations"] == 100
    assert settings["train.eval_interval"] == 600 // demo.EVAL_POINTS
    assert settings["train.checkpoint_interval"] == 600
    assert settings["train.seed"] == 3 and settings["train.log_interval"] == 20
    assert shared_settings(cfg, 50, seed=0)["train.log_interval"] == 5


def test_curve_evaluations_use_the_first_images_and_final_ones_all():
    cfg = load_config(None, [])
    assert curve_settings(cfg, 300) == {"eval.max_images": demo.CURVE_IMAGES}
    assert curve_settings(cfg, 40) == {"eval.max_images": None}
    limited = load_config(None, ["eval.max_images=30"])
    assert curve_settings(limited, 300) == {"eval.max_images": 30}


def test_demo_rejects_a_non_positive_budget(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--minutes", "0"]) == 2
    assert "--minutes" in capsys.readouterr().err


def test_a_short_calibrated_schedule_is_flagged():
    assert short_schedule_warning(1200, 1200) is None
    assert short_schedule_warning(900, 1200) is None  # exactly 75 %: not short
    assert short_schedule_warning(899, 1200) is not None
    warning = short_schedule_warning(410, 1200)
    assert warning is not None and "410 of the config's 1200" in warning

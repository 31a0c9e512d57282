import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import TINY_CLASSES, tiny_overrides, write_tiny_dataset
from farcluss.bench import (
    aggregate_curves,
    mean_per_class,
    full_label_list,
    labeled_pixel_counts,
    T_975,
    format_paired_table,
    mean_iou_over,
    paired_difference,
    paired_statistics,
    rarest_object_classes,
    summarize,
    t_quantile_975,
)
from farcluss.cli import main
from farcluss.config import load_config
from farcluss.data.splits import Sample
from farcluss.errors import DataError


def _write_mask(path: Path, values: dict, size=(6, 10)) -> Sample:
    """A mask whose class `c` covers exactly `values[c]` pixels (row-major), background the rest."""
    flat = np.zeros(size[0] * size[1], np.uint8)
    start = 0
    for cls, count in values.items():
        flat[start:start + count] = cls
        start += count
    Image.fromarray(flat.reshape(size)).save(path)
    return Sample(image=path.with_suffix(".jpg"), mask=path)


def test_rare_classes_from_hand_made_masks(tmp_path):
    # classes: background, ball, brick, kite, moon, star; 255 is ignored and never counted
    names = ["background", "ball", "brick", "kite", "moon", "star"]
    samples = [
        _write_mask(tmp_path / "a.png", {1: 20, 2: 3, 255: 30}),
        _write_mask(tmp_path / "b.png", {1: 5, 3: 7, 2: 2}),
        _write_mask(tmp_path / "c.png", {5: 4, 255: 56}),
    ]
    counts = labeled_pixel_counts(samples, len(names))
    # background: a 60-20-3-30 = 7, b 60-14 = 46, c 0 → 53
    np.testing.assert_array_equal(counts, [53, 25, 5, 7, 0, 4])
    # moon has no labeled pixel (rarest), then star 4, brick 5; kite (7) and ball (25) are not rare
    assert rarest_object_classes(counts, names) == [4, 5, 2]


def test_background_is_never_a_rare_class_and_ties_go_to_the_lower_index():
    names = ["Background", "a", "b", "c", "d"]
    assert rarest_object_classes([0, 9, 3, 3, 3], names) == [2, 3, 4]
    # no background class (Cityscapes-like): class 0 competes like any other
    assert rarest_object_classes([1, 9, 3, 3, 3], ["road", "a", "b", "c", "d"]) == [0, 2, 3]


def test_rare_mean_iou_leaves_out_classes_without_iou():
    assert mean_iou_over([90.0, 10.0, None, 30.0], [1, 2, 3]) == pytest.approx(20.0)
    assert mean_iou_over([90.0, None], [1]) is None


def test_summary_mean_and_sample_std():
    results = [
        {"method": "farcluss", "seed": 0, "miou": 30.0, "rare_miou": 5.0},
        {"method": "farcluss", "seed": 1, "miou": 34.0, "rare_miou": 9.0},
        {"method": "supervised", "seed": 0, "miou": 25.0, "rare_miou": None},
    ]
    farcluss, supervised = summarize(results, ["farcluss", "supervised"])
    # std of {30, 34} with n-1: sqrt(((−2)² + 2²) / 1) = sqrt(8)
    assert farcluss == {"method": "farcluss", "miou_mean": 32.0, "miou_std": pytest.approx(math.sqrt(8)),
                        "rare_miou_mean": 7.0}
    assert supervised == {"method": "supervised", "miou_mean": 25.0, "miou_std": None,
                          "rare_miou_mean": None}


def _with_unlabeled_masks(root: Path, extra_lines=()) -> Path:
    """Give the tiny dataset's unlabeled lines their masks, then append `extra_lines`."""
    unlabeled = root / "splits" / "unlabeled.txt"
    lines = [f"{line} {line.replace('images/', 'masks/')}" for line in unlabeled.read_text().split()]
    unlabeled.write_text("\n".join(lines + list(extra_lines)) + "\n")
    return root


def test_full_label_list_is_the_union_of_masked_train_lines(tmp_path, capsys):
    root = write_tiny_dataset(tmp_path / "tiny")
    first_labeled = (root / "splits" / "labeled.txt").read_text().splitlines()[0]
    _with_unlabeled_masks(root, [first_labeled, "images/no_mask.png"])
    cfg = load_config(None, [f"data.root={root}"])
    path = full_label_list(cfg, tmp_path / "work")
    lines = path.read_text().splitlines()
    # 4 labeled + 8 unlabeled with masks; the repeated labeled image once; no_mask.png left out
    assert len(lines) == 12
    images = [Path(line.split()[0]) for line in lines]
    assert len(set(images)) == 12 and all(p.is_absolute() and p.is_file() for p in images)
    assert "1 of 10 unlabeled images" in capsys.readouterr().out


def test_full_label_list_needs_unlabeled_masks(tmp_path):
    root = write_tiny_dataset(tmp_path / "tiny")
    cfg = load_config(None, [f"data.root={root}"])
    with pytest.raises(DataError, match="unlabeled.txt gives none"):
        full_label_list(cfg, tmp_path / "work")


def test_bench_accuracy_writes_the_results_document(tmp_path):
    root = _with_unlabeled_masks(write_tiny_dataset(tmp_path / "tiny"))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(root)}}))
    # 0.75 epochs of the 8 unlabeled images at batch 2: 3 iterations for both
    # methods (supervised_full counts the unlabeled list too), not train.iterations' 5
    overrides = [o for o in tiny_overrides(root, iterations=5)
                 if not o.startswith(("data.root", "method.name"))] + ["train.epochs=0.75"]
    json_path = tmp_path / "results" / "bench.json"
    argv = ["bench", "accuracy", str(config), "--methods", "farcluss,supervised_full", "--seeds", "0",
            "--json", str(json_path), "--out", str(tmp_path / "runs"), "--reference", "supervised_full"]
    for override in overrides:
        argv += ["--set", override]
    assert main(argv) == 0

    document = json.loads(json_path.read_text())
    assert set(document) == {"split", "results", "summary", "rare_classes", "config", "paired"}
    assert document["split"] == "val"  # no data.test
    (paired,) = document["paired"]
    assert paired["method"] == "farcluss" and paired["reference"] == "supervised_full"
    assert paired["seeds"] == [0]
    farcluss_run, full_run = document["results"]
    assert paired["miou"]["differences"] == [pytest.approx(farcluss_run["miou"] - full_run["miou"])]
    assert paired["miou"]["ci95_low"] is None  # one seed: no interval
    runs = [(r["method"], r["seed"]) for r in document["results"]]
    assert runs == [("farcluss", 0), ("supervised_full", 0)]
    for result in document["results"]:
        assert set(result) == {"method", "seed", "miou", "rare_miou", "per_class_iou",
                               "iterations", "seconds", "seconds_per_iteration"}
        assert result["iterations"] == 3
        assert result["seconds_per_iteration"] == pytest.approx(result["seconds"] / 3, abs=0.01)  # seconds: 2 decimals
        assert list(result["per_class_iou"]) == TINY_CLASSES
        assert 0 <= result["miou"] <= 100 and result["seconds"] > 0
    assert [row["method"] for row in document["summary"]] == ["farcluss", "supervised_full"]
    for row in document["summary"]:
        assert set(row) == {"method", "miou_mean", "miou_std", "rare_miou_mean"}
        assert row["miou_std"] is None  # one seed
    # the tiny dataset has two object classes: both are "rare"
    assert sorted(document["rare_classes"]) == ["disc", "square"]
    assert document["config"]["iterations"] == 5 and document["config"]["epochs"] == 0.75
    assert (tmp_path / "runs" / "bench_accuracy.json").read_text() == json_path.read_text()

    # equal iterations; supervised_full trained the supervised method on the 12-image list
    full_cfg = yaml.safe_load((tmp_path / "runs" / "supervised_full-seed0" / "config.yaml").read_text())
    assert full_cfg["method"]["name"] == "supervised" and full_cfg["train"]["iterations"] == 3
    assert len(Path(full_cfg["data"]["labeled"]).read_text().splitlines()) == 12

    # a second run into the same folder would mix logs: refused
    assert main(argv) == 2


def test_bench_rejects_an_unknown_method(tmp_path, capsys):
    root = write_tiny_dataset(tmp_path / "tiny")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(root)}}))
    assert main(["bench", "accuracy", str(config), "--methods", "farcluss,mean_teacher"]) == 2
    assert "unknown method 'mean_teacher'" in capsys.readouterr().err


# ---- paired statistics ------------------------------------------------------------------------

def test_paired_difference_against_a_hand_computed_t_interval():
    stats = paired_difference([34.0, 31.0, 36.0], [30.0, 30.0, 30.0])
    # d = [4, 1, 6]; mean 11/3; deviations 1/3, −8/3, 7/3 → s² = (1 + 64 + 49)/9 / 2 = 19/3
    # half-width t_{0.975, 2} · s/√3 = 4.3027 · √19 / 3
    half = 4.3027 * math.sqrt(19) / 3
    assert stats["differences"] == [4.0, 1.0, 6.0] and stats["n"] == 3
    assert stats["mean"] == pytest.approx(11 / 3)
    assert stats["std"] == pytest.approx(math.sqrt(19 / 3))
    assert stats["t"] == 4.3027
    assert stats["ci95_low"] == pytest.approx(11 / 3 - half)  # −2.585
    assert stats["ci95_high"] == pytest.approx(11 / 3 + half)  # 9.918
    assert stats["ci95_low"] == pytest.approx(-2.585, abs=1e-3)


def test_paired_difference_drops_missing_pairs_and_needs_two_for_an_interval():
    stats = paired_difference([2.0, None, 5.0], [1.0, 3.0, None])
    assert stats["differences"] == [1.0] and stats["mean"] == 1.0
    assert stats["std"] is None and stats["ci95_low"] is None and stats["ci95_high"] is None
    assert paired_difference([], [])["mean"] is None
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])


def _t_cdf(x: float, df: int, steps: int = 20000) -> float:
    """P(T ≤ x) for Student's t by Simpson's rule on its density (independent of the table)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(t):
        return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    h = x / steps
    total = pdf(0.0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, steps))
    return 0.5 + total * h / 3


@pytest.mark.parametrize("df", sorted(T_975))
def test_the_t_table_holds_the_975_quantiles(df):
    assert _t_cdf(T_975[df], df) == pytest.approx(0.975, abs=1e-5)


def test_t_quantile_between_entries_is_conservative_and_normal_beyond_120():
    assert t_quantile_975(4) == 2.7764
    assert t_quantile_975(35) == T_975[30] and t_quantile_975(35) > 2.0301  # exact t_{.975,35}
    assert t_quantile_975(100) == T_975[60]
    assert t_quantile_975(121) == 1.96
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_paired_statistics_pair_by_seed_for_every_method_but_the_reference(capsys):
    results = [
        {"method": "unimatch", "seed": 0, "miou": 40.0, "rare_miou": 10.0},
        {"method": "unimatch", "seed": 1, "miou": 44.0, "rare_miou": 12.0},
        {"method": "farcluss", "seed": 1, "miou": 47.0, "rare_miou": 18.0},
        {"method": "farcluss", "seed": 0, "miou": 41.0, "rare_miou": 14.0},
        {"method": "fixmatch", "seed": 2, "miou": 30.0, "rare_miou": None},
    ]
    farcluss, fixmatch = paired_statistics(results, ["unimatch", "farcluss", "fixmatch"], "unimatch")
    assert farcluss["seeds"] == [1, 0]
    assert farcluss["miou"]["differences"] == [3.0, 1.0]
    assert farcluss["rare_miou"]["differences"] == [6.0, 4.0]
    # n = 2: mean 2, s = √2, half-width 12.7062 · √2/√2
    assert farcluss["miou"]["ci95_low"] == pytest.approx(2 - 12.7062)
    assert fixmatch["seeds"] == [] and fixmatch["miou"]["mean"] is None
    table = format_paired_table([farcluss, fixmatch])
    assert "paired differences to unimatch" in table
    assert "+3.0 +1.0" in table and "n/a" in table.splitlines()[-1]


def test_bench_reference_must_be_one_of_the_methods(tmp_path, capsys):
    root = write_tiny_dataset(tmp_path / "tiny")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(root)}}))
    assert main(["bench", "accuracy", str(config), "--methods", "farcluss,fixmatch",
                 "--reference", "unimatch", "--out", str(tmp_path / "runs")]) == 2
    assert "--reference unimatch is not among --methods" in capsys.readouterr().err


# ---- the test split and the pictures ---------------------------------------------------------

def test_curves_aggregate_over_seeds_at_the_iterations_every_seed_has():
    # seed 0 was evaluated at 100, 200, 300; seed 1 at 100, 300 (e.g. a resumed run)
    iterations, mean, low, high = aggregate_curves([([100, 200, 300], [10.0, 20.0, 40.0]),
                                                    ([100, 300], [14.0, 30.0])])
    assert iterations == [100, 300]
    assert mean == [12.0, 35.0] and low == [10.0, 30.0] and high == [14.0, 40.0]
    assert aggregate_curves([]) == ([], [], [], [])
    assert mean_per_class([{"a": 10.0, "b": None}, {"a": 30.0, "b": None}], ["a", "b"]) == [20.0, None]


def test_summary_and_paired_statistics_on_the_test_split():
    results = [
        {"method": "farcluss", "seed": 0, "miou": 30.0, "rare_miou": 5.0, "test_miou": 28.0, "test_rare_miou": 4.0},
        {"method": "farcluss", "seed": 1, "miou": 34.0, "rare_miou": 9.0, "test_miou": 32.0, "test_rare_miou": 2.0},
        {"method": "supervised", "seed": 0, "miou": 25.0, "rare_miou": 1.0, "test_miou": 20.0, "test_rare_miou": 1.0},
        {"method": "supervised", "seed": 1, "miou": 26.0, "rare_miou": 3.0, "test_miou": 27.0, "test_rare_miou": 1.0},
    ]
    farcluss, _ = summarize(results, ["farcluss", "supervised"], with_test=True)
    assert (farcluss["miou_mean"], farcluss["test_miou_mean"], farcluss["test_rare_miou_mean"]) == (32.0, 30.0, 3.0)
    assert farcluss["test_miou_std"] == pytest.approx(math.sqrt(8))
    (val,) = paired_statistics(results, ["farcluss", "supervised"], "supervised")
    (test,) = paired_statistics(results, ["farcluss", "supervised"], "supervised", split="test")
    assert val["split"] == "val" and val["miou"]["differences"] == [5.0, 8.0]
    assert test["split"] == "test" and test["miou"]["differences"] == [8.0, 5.0]
    assert test["rare_miou"]["differences"] == [3.0, 1.0]
    assert "to supervised on test" in format_paired_table([test])


def _is_png(path: Path) -> bool:
    with Image.open(path) as image:
        image.verify()
        return image.format == "PNG" and image.size[0] > 100


def test_bench_accuracy_reports_val_and_test_and_draws_the_pictures(tmp_path, capsys):
    root = write_tiny_dataset(tmp_path / "tiny", n_test=3)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(root), "test": "splits/test.txt"}}))
    overrides = [o for o in tiny_overrides(root, iterations=2)
                 if not o.startswith(("data.root", "method.name", "train.eval_interval"))]
    out = tmp_path / "runs"
    argv = ["bench", "accuracy", str(config), "--methods", "supervised,fixmatch", "--seeds", "0,1",
            "--out", str(out), "--reference", "supervised", "--set", "train.eval_interval=1"]
    for override in overrides:
        argv += ["--set", override]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "test split (held back" in printed and "paired differences to supervised on test" in printed

    document = json.loads((out / "bench_accuracy.json").read_text())
    assert document["split"] == "test"
    assert [row["split"] for row in document["paired"]] == ["val"]
    assert [row["split"] for row in document["paired_test"]] == ["test"]
    for result in document["results"]:
        run = out / f"{result['method']}-seed{result['seed']}"
        evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        model = "teacher" if any(r.get("model") == "teacher" for r in evals if r["type"] == "eval") else "student"
        last = [r for r in evals if r["type"] == "eval" and r["model"] == model][-1]
        # val fields keep meaning val; test fields are the same judged model on the test list
        assert result["miou"] == last["miou"] and result["test_miou"] == last["test_miou"]
        assert list(result["test_per_class_iou"].values()) == last["test_per_class_iou"]
    fixmatch = [r for r in document["results"] if r["method"] == "fixmatch"]
    (row,) = [row for row in document["summary"] if row["method"] == "fixmatch"]
    assert row["test_miou_mean"] == pytest.approx(sum(r["test_miou"] for r in fixmatch) / 2)
    (paired_test,) = document["paired_test"]
    supervised = {r["seed"]: r for r in document["results"] if r["method"] == "supervised"}
    assert paired_test["miou"]["differences"] == pytest.approx(
        [r["test_miou"] - supervised[r["seed"]]["test_miou"] for r in fixmatch])
    for name in ("miou_curves.png", "per_class_iou.png", "frontier.png"):
        assert _is_png(out / name)


def test_a_signal_during_a_run_ends_bench_with_its_status_and_keeps_finished_runs(
        tmp_path, capsys, monkeypatch):
    import os
    import signal

    from farcluss.engine.trainer import Trainer

    root = write_tiny_dataset(tmp_path / "tiny")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(root)}}))
    original_step = Trainer.train_step

    def step_then_signal(self, batch):
        output = original_step(self, batch)
        if self.method.name == "supervised" and self.iteration == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # as a cluster's stop signal would arrive
        return output

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    overrides = [o for o in tiny_overrides(root, iterations=4)
                 if not o.startswith(("data.root", "method.name"))]
    argv = ["bench", "accuracy", str(config), "--methods", "fixmatch,supervised", "--seeds", "0",
            "--out", str(tmp_path / "runs")]
    for override in overrides:
        argv += ["--set", override]
    assert main(argv) == 128 + signal.SIGUSR1
    err = capsys.readouterr().err
    assert "stopped by SIGUSR1 after iteration 1 of the run in" in err
    assert "supervised-seed0" in err and "Traceback" not in err
    document = json.loads((tmp_path / "runs" / "bench_accuracy.json").read_text())
    assert [r["method"] for r in document["results"]] == ["fixmatch"]


def _tiny_bench_argv(tmp_path: Path, out: Path, methods: str, seeds: str, iterations: int) -> list:
    root = tmp_path / "tiny"
    if not root.exists():
        write_tiny_dataset(root)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(root)}}))
    argv = ["bench", "accuracy", str(config), "--methods", methods, "--seeds", seeds, "--out", str(out)]
    for override in tiny_overrides(root, iterations=iterations):
        if not override.startswith(("data.root", "method.name")):
            argv += ["--set", override]
    return argv


def test_jobs_run_side_by_side_and_give_what_one_after_another_gives(tmp_path, capsys):
    import torch

    from farcluss.bench import threads_per_job

    assert threads_per_job(2, threads=2) == 1 and threads_per_job(2, threads=5) == 2
    assert threads_per_job(4, threads=2) == 1  # never 0
    methods, seeds = "supervised,fixmatch", "0,1"
    one_at_a_time = tmp_path / "serial"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of 2 jobs gets on a 2-thread process: equal arithmetic
    try:
        assert main(_tiny_bench_argv(tmp_path, one_at_a_time, methods, seeds, 3)) == 0
    finally:
        torch.set_num_threads(previous)
    side_by_side = tmp_path / "jobs"
    argv = _tiny_bench_argv(tmp_path, side_by_side, methods, seeds, 3) + ["--jobs", "2"]
    os_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(os_threads)
    printed = capsys.readouterr().out
    assert "4 runs, 2 at a time, 1 thread(s) each" in printed

    serial = json.loads((one_at_a_time / "bench_accuracy.json").read_text())
    parallel = json.loads((side_by_side / "bench_accuracy.json").read_text())
    # seed-major order whichever run finished first, and the same numbers run for run
    order = [(r["method"], r["seed"]) for r in parallel["results"]]
    assert order == [("supervised", 0), ("fixmatch", 0), ("supervised", 1), ("fixmatch", 1)]
    assert order == [(r["method"], r["seed"]) for r in serial["results"]]
    for a, b in zip(serial["results"], parallel["results"]):
        assert a["miou"] == pytest.approx(b["miou"], abs=1e-6)
        assert a["per_class_iou"] == pytest.approx(b["per_class_iou"], abs=1e-6)
    for method, seed in order:
        console = side_by_side / f"{method}-seed{seed}" / "console.log"
        assert console.is_file()  # the run's own console, not interleaved with the others
    # a folder that already holds runs is refused before anything starts
    assert main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_jobs_must_be_positive(tmp_path, capsys):
    argv = _tiny_bench_argv(tmp_path, tmp_path / "runs", "supervised", "0", 2) + ["--jobs", "0"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "--jobs" in capsys.readouterr().err


def test_a_signal_to_bench_with_jobs_stops_the_running_children_and_keeps_their_runs(tmp_path, capsys):
    import os
    import signal
    import threading
    import time

    out = tmp_path / "runs"
    argv = _tiny_bench_argv(tmp_path, out, "supervised,fixmatch", "0,1", 400) + ["--jobs", "2"]
    running = [out / "supervised-seed0" / "metrics.jsonl", out / "fixmatch-seed0" / "metrics.jsonl"]

    def signal_once_both_train():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if all(p.is_file() and p.stat().st_size > 0 for p in running):
                os.kill(os.getpid(), signal.SIGUSR1)  # to the bench process only, as SLURM may
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=signal_once_both_train, daemon=True)
    watcher.start()
    assert main(argv) == 128 + signal.SIGUSR1
    watcher.join()
    err = capsys.readouterr().err
    assert "stopped by SIGUSR1 after iteration" in err and "Traceback" not in err
    # both children saved where they stopped; the second seed never started
    for path in running:
        assert (path.parent / "checkpoints" / "last.pt").is_file()
    assert not (out / "supervised-seed1").exists()


def test_a_run_that_fails_in_a_child_ends_bench_with_one_line_naming_its_console(tmp_path, capsys):
    out = tmp_path / "runs"
    argv = _tiny_bench_argv(tmp_path, out, "supervised", "0,1,2", 3) + ["--jobs", "2"]
    # images are read when a batch needs them: the children fail, not the parent's checks
    for image in sorted((tmp_path / "tiny" / "images").glob("*.png")):
        image.write_bytes(b"not a png")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "failed:" in err and "console.log" in err and "Traceback" not in err
    assert not (out / "supervised-seed2").exists()  # nothing new starts after a failure
    logs = [p.read_text() for p in out.glob("supervised-seed*/console.log")]
    assert logs and all("Traceback" in text for text in logs)  # the detail is in the run's log


# ---- bench compare: paired statistics across results documents --------------------------------

def _document(path: Path, runs: dict, rare=("moon", "cross", "star"), split="test",
              overrides=()) -> Path:
    """A results document as bench accuracy writes it; runs: (method, seed) → (val, test) mIoU,
    rare mIoU = mIoU − 10."""
    results = [{"method": method, "seed": seed, "miou": val, "rare_miou": val - 10,
                "test_miou": test, "test_rare_miou": test - 10}
               for (method, seed), (val, test) in runs.items()]
    path.write_text(json.dumps({"split": split, "results": results, "rare_classes": list(rare),
                                "config": {"overrides": list(overrides)}}))
    return path


def test_bench_compare_pairs_seeds_across_documents(tmp_path, capsys):
    plain = _document(tmp_path / "plain.json", {
        ("supervised", 0): (50.0, 52.0), ("farcluss", 0): (55.0, 56.0),
        ("supervised", 1): (48.0, 49.0), ("farcluss", 1): (51.0, 53.0),
        ("supervised", 2): (49.0, 50.0), ("farcluss", 2): (54.0, 54.0)})
    variant = _document(tmp_path / "variant.json", {
        ("farcluss", 0): (57.0, 58.0), ("farcluss", 1): (52.0, 55.0), ("farcluss", 2): (53.0, 56.0)},
        overrides=["method.strong_views=2"])
    out = tmp_path / "merged.json"
    assert main(["bench", "compare", str(plain), f"{variant}=two_views", "--reference", "farcluss",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{variant} as @two_views: method.strong_views=2" in printed
    merged = json.loads(out.read_text())
    rows = {row["method"]: row for row in merged["paired_test"]}
    # test differences to farcluss per seed: +2, +2, +2 → mean 2, std 0
    assert rows["farcluss@two_views"]["miou"]["differences"] == [2.0, 2.0, 2.0]
    assert rows["farcluss@two_views"]["miou"]["ci95_low"] == pytest.approx(2.0)
    # supervised − farcluss on test: −4, −4, −4; on val −5, −3, −5 → mean −13/3, s = 2/√3
    assert rows["supervised"]["miou"]["mean"] == pytest.approx(-4.0)
    val_rows = {row["method"]: row for row in merged["paired"]}
    half = T_975[2] * (2 / math.sqrt(3)) / math.sqrt(3)
    assert val_rows["supervised"]["miou"]["mean"] == pytest.approx(-13 / 3)
    assert val_rows["supervised"]["miou"]["ci95_high"] == pytest.approx(-13 / 3 + half)
    assert val_rows["farcluss@two_views"]["rare_miou"]["differences"] == [2.0, 1.0, -1.0]
    assert "farcluss@two_views" in printed and "paired differences to farcluss on test" in printed


def test_bench_compare_refuses_documents_whose_seeds_do_not_pair(tmp_path, capsys):
    first = _document(tmp_path / "a.json", {("farcluss", 0): (50.0, 51.0)})
    same_names = _document(tmp_path / "b.json", {("farcluss", 0): (52.0, 53.0)})
    assert main(["bench", "compare", str(first), str(same_names), "--reference", "farcluss"]) == 2
    assert "farcluss seed 0 is in two documents; name one with PATH=LABEL" in capsys.readouterr().err
    other_labels = _document(tmp_path / "c.json", {("fixmatch", 0): (52.0, 53.0)},
                             rare=("star", "cross", "moon"))
    assert main(["bench", "compare", str(first), str(other_labels), "--reference", "farcluss"]) == 2
    assert "another labeled list, so its seeds do not pair" in capsys.readouterr().err
    assert main(["bench", "compare", str(tmp_path / "missing.json"), "--reference", "x"]) == 2
    assert "missing.json: cannot read the results document" in capsys.readouterr().err
    assert main(["bench", "compare", str(first), "--reference", "unimatch"]) == 2
    assert "--reference unimatch is not among the documents' methods (farcluss)" in capsys.readouterr().err

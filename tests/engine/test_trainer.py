"""The training loop: what a run folder holds, that a tiny model learns, NaN/Inf losses, and
when a run resumes."""

from __future__ import annotations

import json
import subprocess
import sys
import re
from pathlib import Path

import pytest
import torch
import yaml

import farcluss
from conftest import tiny_overrides, write_tiny_dataset
from farcluss import cli
from farcluss.config import load_config
from farcluss.engine.checkpoint import load_checkpoint
from farcluss.engine.trainer import Trainer, TrainingError
from farcluss.errors import CheckpointError
from farcluss.log import setup_logging
from farcluss.methods.farcluss import Farcluss




def _records(run: Path, kind: str) -> list:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if record["type"] == kind]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-iteration FARCLUSS run evaluated and checkpointed after every iteration."""
    root = write_tiny_dataset(tmp_path_factory.mktemp("trainer") / "tiny", n_train=6, n_val=2)
    cfg = load_config(overrides=tiny_overrides(root, "farcluss", 2) + [
        "train.eval_interval=1", "train.checkpoint_interval=1", "train.seed=5"])
    run = root.parent / "run"
    torch.set_num_threads(1)
    summary = Trainer(cfg, run, resume=False).fit()
    return root, cfg, run, summary


def test_run_folder_holds_config_run_info_metrics_and_checkpoints(finished_run):
    root, cfg, run, summary = finished_run
    assert summary["iteration"] == 2 and summary["run_dir"] == str(run)

    # the resolved config: loading it again gives the same config
    assert load_config(run / "config.yaml").to_dict() == cfg.to_dict()
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["root"] == str(root)

    info = json.loads((run / "run.json").read_text())
    assert info["farcluss_version"] == farcluss.__version__
    assert info["seed"] == 5
    assert "git_revision" in info
    assert info["git_revision"] is None or re.fullmatch(r"[0-9a-f]{40}", info["git_revision"])
    assert info["classes"] == ["background", "square", "disc"]

    evals = _records(run, "eval")
    assert [(r["iteration"], r["model"]) for r in evals] == [
        (1, "teacher"), (1, "student"), (2, "teacher"), (2, "student")]
    for record in evals:
        assert len(record["per_class_iou"]) == 3
        assert 0 <= record["miou"] <= 100
    assert [r["iteration"] for r in _records(run, "train")] == [1, 2]
    assert all("loss_sup" in r and "lr" in r for r in _records(run, "train"))

    last = load_checkpoint(run / "checkpoints" / "last.pt")
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert last["iteration"] == 2 and last["classes"] == info["classes"]
    teacher_mious = {r["iteration"]: r["miou"] for r in evals if r["model"] == "teacher"}
    assert best["miou"] == max(teacher_mious.values())
    assert best["iteration"] == max(teacher_mious, key=lambda i: (teacher_mious[i], -i))
    assert last["best_miou"] == best["miou"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_resuming_with_an_incompatible_config_names_the_way_out(finished_run):
    root, cfg, run, _ = finished_run
    wider = load_config(overrides=tiny_overrides(root, "farcluss", 2) + ["model.base_width=16"])
    with pytest.raises(CheckpointError, match=r"shape mismatch.*--no-resume"):
        Trainer(wider, run)


def test_no_resume_starts_afresh_and_sets_the_old_log_aside(tmp_path):
    root = write_tiny_dataset(tmp_path / "tiny", n_train=6, n_val=2)
    cfg = load_config(overrides=tiny_overrides(root, "supervised", 2))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_text("garbage")
    old_log = '{"type": "train", "iteration": 7, "loss": 0.5}\n'
    (run / "metrics.jsonl").write_text(old_log)
    with pytest.raises(CheckpointError, match=r"checkpoint .*last\.pt is a text file, not a farcluss checkpoint"):
        Trainer(cfg, run)  # the default resumes whenever last.pt exists

    trainer = Trainer(cfg, run, resume=False)
    assert trainer.iteration == 0
    trainer.fit()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == 2
    assert [r["iteration"] for r in _records(run, "train")] == [1, 2]
    (set_aside,) = run.glob("metrics.*.jsonl")
    assert set_aside.read_text() == old_log


def test_resume_and_no_resume_together_are_refused(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--resume", "--no-resume"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_tiny_supervised_model_overfits_four_images(tmp_path):
    root = write_tiny_dataset(tmp_path / "tiny", n_train=6, n_val=2)
    cfg = load_config(overrides=tiny_overrides(root, "supervised", 80) + [
        # the four labeled images are also the validation set, seen whole and unchanged
        "data.val=splits/labeled.txt", "data.scale_range=[1, 1]", "data.crop_size=40",
        "data.flip_prob=0", "train.batch_size=4", "model.output_stride=8",
        "train.lr=0.01", "train.head_lr_multiplier=3", "train.eval_interval=1000",
        "train.checkpoint_interval=1000"])
    summary = Trainer(cfg, tmp_path / "run", resume=False).fit()
    assert summary["final"]["student"]["miou"] > 90.0


# ---- numerical faults ---------------------------------------------------------------------------
def _poison(monkeypatch, at_iteration: int, how: str) -> None:
    """Make the FARCLUSS losses of one iteration non-finite."""
    original = Farcluss.losses

    def losses(self, batch, student, teacher, iteration):
        if iteration == at_iteration and how == "images":
            batch.images_l = torch.full_like(batch.images_l, float("nan"))
        output = original(self, batch, student, teacher, iteration)
        if iteration == at_iteration and how == "unsup":
            output.terms["unsup"] = output.terms["unsup"] * float("inf")
        return output

    monkeypatch.setattr(Farcluss, "losses", losses)


def test_a_non_finite_loss_stops_with_the_iteration_and_term_and_keeps_the_checkpoint(
        tmp_path, monkeypatch, capsys):
    root = write_tiny_dataset(tmp_path / "tiny", n_train=6, n_val=2)
    run = tmp_path / "run"
    argv = ["train", "--out", str(run)]
    for override in tiny_overrides(root, "farcluss", 6) + ["train.checkpoint_interval=2"]:
        argv += ["--set", override]
    _poison(monkeypatch, at_iteration=2, how="unsup")  # the third step
    last = run / "checkpoints" / "last.pt"
    written = {}
    original_save = Trainer._save_last

    def save_and_remember(self):
        original_save(self)
        written[self.iteration] = last.read_bytes()

    monkeypatch.setattr(Trainer, "_save_last", save_and_remember)

    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: non-finite loss at iteration 3 in term(s) unsup;")
    assert str(last) in err[0]
    assert list(written) == [2]
    assert last.read_bytes() == written[2]
    assert [r["iteration"] for r in _records(run, "train")] == [1, 2]


def test_skip_policy_drops_the_bad_step_and_restores_the_buffers_it_poisoned(tmp_path, monkeypatch):
    root = write_tiny_dataset(tmp_path / "tiny", n_train=6, n_val=2)
    cfg = load_config(overrides=tiny_overrides(root, "farcluss", 3) + [
        "train.nan_policy=skip", "method.rebalance=ema"])
    # NaN images reach the BN statistics and the prototype bank during the forward pass
    _poison(monkeypatch, at_iteration=1, how="images")
    trainer = Trainer(cfg, tmp_path / "run", resume=False)
    trainer.fit()

    skipped = _records(tmp_path / "run", "skip")
    assert len(skipped) == 1 and skipped[0]["iteration"] == 2
    # the labeled and unlabeled crops share one forward pass (and its batch statistics)
    assert set(skipped[0]["non_finite"]) == {"sup", "unsup", "con"}
    for name, tensor in list(trainer.student.state_dict().items()) + list(
            trainer.teacher.state_dict().items()):
        if tensor.is_floating_point():
            assert bool(torch.isfinite(tensor).all()), name
    assert bool(trainer.student.farcluss_state.prototype_initialized.any())
    assert trainer.method.ema_steps == 2  # the skipped step does not move the teacher


def test_skip_policy_is_not_the_default(tmp_path, monkeypatch):
    root = write_tiny_dataset(tmp_path / "tiny", n_train=6, n_val=2)
    cfg = load_config(overrides=tiny_overrides(root, "farcluss", 3))
    _poison(monkeypatch, at_iteration=0, how="images")
    with pytest.raises(TrainingError, match="iteration 1 in term.*no checkpoint was written yet"):
        Trainer(cfg, tmp_path / "run", resume=False).fit()


def test_deterministic_mode_turns_on_deterministic_algorithms(tmp_path):
    root = write_tiny_dataset(tmp_path / "tiny", n_train=6, n_val=2)
    cfg = load_config(overrides=tiny_overrides(root, "supervised", 1) + ["train.deterministic=true"])
    was_on = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        Trainer(cfg, tmp_path / "run", resume=False)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(was_on)


def test_a_training_run_whose_output_is_a_file_writes_no_progress_frames(tmp_path):
    root = write_tiny_dataset(tmp_path / "tiny", n_train=6, n_val=2)
    argv = [sys.executable, "-m", "farcluss", "train", "--out", str(tmp_path / "run")]
    for override in tiny_overrides(root, "farcluss", 6) + ["train.progress=true",
                                                           "train.log_interval=2"]:
        argv += ["--set", override]
    with open(tmp_path / "train.log", "w") as handle:
        done = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, timeout=300)
    text = (tmp_path / "train.log").read_bytes().decode()  # bytes: read_text turns \r into \n
    assert done.returncode == 0, text
    assert "\r" not in text and "farcluss: 6/6 (100%)" in text


@pytest.mark.parametrize("per_class_iou, flagged", [([95.0, 0.0, 0.1], True),
                                                     ([95.0, 60.0, 41.0], False)])
def test_the_final_evaluation_says_when_the_model_is_not_learning(tmp_path, monkeypatch, capsys,
                                                                  restore_logging, per_class_iou,
                                                                  flagged):
    setup_logging(rank=0)  # as the CLI does: warnings are lines on stderr
    root = write_tiny_dataset(tmp_path / "data")
    cfg = load_config(overrides=tiny_overrides(root, "supervised", 2))
    trainer = Trainer(cfg, tmp_path / "run", resume=False)
    names = list(trainer.data.classes)
    # the final evaluation as the loop sees it; the run itself is the real loop
    monkeypatch.setattr(trainer, "evaluate_models", lambda: {"student": {
        "miou": sum(per_class_iou) / 3, "per_class_iou": per_class_iou,
        "pixel_accuracy": 90.0, "class_names": names}})
    trainer.fit()
    err = capsys.readouterr().err
    assert ("not learning" in err) is flagged
    if flagged:
        assert f"only {names[0]} (95.0) are predicted" in err


# ---- the held-back test split -------------------------------------------------------------------
def _test_split_cfg(root, *extra):
    return load_config(overrides=tiny_overrides(root, "farcluss", 2) + [
        "train.eval_interval=1", "train.checkpoint_interval=1", "train.seed=5", *extra])


def test_the_test_split_is_evaluated_beside_val_without_changing_the_run(tmp_path):
    root = write_tiny_dataset(tmp_path / "tiny", n_train=6, n_val=2, n_test=2)
    torch.set_num_threads(1)
    plain = Trainer(_test_split_cfg(root), tmp_path / "plain", resume=False).fit()
    # the val list as the test list: the test numbers must be the val numbers exactly
    same = Trainer(_test_split_cfg(root, "data.test=splits/val.txt"), tmp_path / "same",
                   resume=False).fit()
    assert plain["final_test"] == {}
    assert set(same["final_test"]) == set(same["final"]) == {"teacher", "student"}
    for name, metrics in same["final"].items():
        assert same["final_test"][name] == metrics
    # evaluating the test split draws no random number: the weights are the plain run's
    plain_weights = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.pt")["student"]
    same_weights = load_checkpoint(tmp_path / "same" / "checkpoints" / "last.pt")["student"]
    assert all(torch.equal(plain_weights[k], same_weights[k]) for k in plain_weights)
    for record in _records(tmp_path / "same", "eval"):
        assert record["test_miou"] == record["miou"]
        assert record["test_per_class_iou"] == record["per_class_iou"]
    assert all("test_miou" not in r for r in _records(tmp_path / "plain", "eval"))

    other = Trainer(_test_split_cfg(root, "data.test=splits/test.txt"), tmp_path / "other",
                    resume=False).fit()
    evals = _records(tmp_path / "other", "eval")
    assert [(r["iteration"], r["model"]) for r in evals] == [
        (1, "teacher"), (1, "student"), (2, "teacher"), (2, "student")]
    assert evals[-2]["test_miou"] == other["final_test"]["teacher"]["miou"]
    assert 0 <= other["final_test"]["student"]["miou"] <= 100


def test_best_checkpoint_follows_val_only_never_test(tmp_path, monkeypatch):
    root = write_tiny_dataset(tmp_path / "tiny", n_train=6, n_val=2, n_test=2)
    cfg = _test_split_cfg(root, "data.test=splits/test.txt", "train.iterations=3",
                          "method.name=supervised")
    trainer = Trainer(cfg, tmp_path / "run", resume=False)
    # val peaks at iteration 2, test at iteration 3: best.pt must be iteration 2's
    scores = {"val": iter([10.0, 30.0, 20.0]), "test": iter([50.0, 5.0, 60.0])}

    def fake_split(split):
        miou = next(scores[split])
        return {"student": {"miou": miou, "per_class_iou": [miou] * 3, "pixel_accuracy": 50.0,
                            "class_names": list(trainer.data.classes)}}

    monkeypatch.setattr(trainer, "_evaluate_split", fake_split)
    summary = trainer.fit()
    assert (summary["best_miou"], summary["best_iteration"]) == (30.0, 2)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["iteration"] == 2
    assert summary["final"]["student"]["miou"] == 20.0
    assert summary["final_test"]["student"]["miou"] == 60.0
    assert [r["test_miou"] for r in _records(tmp_path / "run", "eval")] == [50.0, 5.0, 60.0]


def test_a_timing_run_built_with_diagnose_false_says_nothing_of_learning(tmp_path, monkeypatch,
                                                                          capsys, restore_logging):
    # the demo's calibration: a few iterations are a timing, not a result
    setup_logging(rank=0)
    root = write_tiny_dataset(tmp_path / "data")
    cfg = load_config(overrides=tiny_overrides(root, "supervised", 2))
    trainer = Trainer(cfg, tmp_path / "run", resume=False, diagnose=False)
    names = list(trainer.data.classes)
    monkeypatch.setattr(trainer, "evaluate_models", lambda: {"student": {
        "miou": 95.0 / 3, "per_class_iou": [95.0, 0.0, 0.1], "pixel_accuracy": 90.0,
        "class_names": names}})
    trainer.fit()
    assert "not learning" not in capsys.readouterr().err


def test_the_demo_calibrates_without_the_not_learning_line(tmp_path, monkeypatch):
    import farcluss.demo as demo

    built = []
    real = demo.Trainer

    def spy(*args, **kwargs):
        built.append(kwargs.get("diagnose", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "Trainer", spy)
    root = write_tiny_dataset(tmp_path / "data")
    cfg = load_config(overrides=tiny_overrides(root, "supervised", 2))
    demo.calibrate(cfg, "supervised", 4, tmp_path / "calibration")
    assert built == [False]

"""`train.epochs` → `train.iterations` (`engine/schedule.py`) and a run that stops there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_overrides, write_tiny_dataset
from farcluss.config import load_config
from farcluss.data.build import DataBundle, build_data
from farcluss.engine.schedule import epoch_iterations, with_epoch_schedule
from farcluss.engine.trainer import Trainer
from farcluss.errors import ConfigError
from farcluss.log import setup_logging


def bundle(labeled: int, unlabeled: int) -> DataBundle:
    # only the list lengths matter to the schedule
    return DataBundle(Path("."), ["a", "b"], [object()] * labeled, [object()] * unlabeled, [])


def cfg_with(*overrides: str):
    return load_config(None, list(overrides))


def test_without_epochs_the_config_is_unchanged():
    cfg = cfg_with("train.iterations=77")
    assert with_epoch_schedule(cfg, bundle(10, 1500), 4) is cfg


@pytest.mark.parametrize("overrides, world_size, expected", [
    # 10 × 1500 / (8 × 1) = 1875 exactly
    (["method.name=farcluss", "train.batch_size=8"], 1, 1875),
    # 10 × 1500 / (8 × 2) = 937.5 → 938
    (["method.name=farcluss", "train.batch_size=8"], 2, 938),
    # the unlabeled stream has its own batch size: 10 × 1500 / 6 = 2500
    (["method.name=fixmatch", "train.batch_size=8", "train.unlabeled_batch_size=6"], 1, 2500),
    # supervised counts the unlabeled list too when the data has one: the same 1875 as farcluss
    (["method.name=supervised", "train.batch_size=8"], 1, 1875),
    # a fraction of an epoch: 0.5 × 1500 / 8 = 93.75 → 94
    (["method.name=farcluss", "train.batch_size=8", "train.epochs=0.5"], 1, 94),
])
def test_epochs_give_the_hand_worked_iteration_count(overrides, world_size, expected):
    epochs = [] if any(o.startswith("train.epochs") for o in overrides) else ["train.epochs=10"]
    cfg = cfg_with(*overrides, *epochs, "train.iterations=5")
    derived = with_epoch_schedule(cfg, bundle(94, 1500), world_size)
    assert derived.train.iterations == expected
    # everything else is kept, and the derived config is still a valid one
    assert derived.train.epochs == cfg.train.epochs
    assert {**derived.to_dict()["train"], "iterations": 5} == cfg.to_dict()["train"]
    assert derived.method == cfg.method


def test_the_log_says_epochs_replace_iterations_and_names_longer_intervals(capsys, restore_logging):
    setup_logging(rank=0)
    cfg = cfg_with("train.epochs=10", "train.batch_size=8", "train.iterations=1000",
                   "train.eval_interval=5000", "train.checkpoint_interval=100")
    with_epoch_schedule(cfg, bundle(94, 1500), 1)
    err = capsys.readouterr().err
    assert "train.epochs=10 over 1500 unlabeled images → 1875 iterations" in err
    assert "replacing train.iterations=1000" in err
    assert "train.eval_interval=5000 exceed" in err and "checkpoint_interval" not in err


def test_supervised_without_an_unlabeled_list_counts_the_labeled_images():
    # 10 × 94 / 8 = 117.5 → 118
    cfg = cfg_with("method.name=supervised", "train.batch_size=8", "train.epochs=10")
    assert with_epoch_schedule(cfg, bundle(94, 0), 1).train.iterations == 118


def test_supervised_with_epochs_reads_the_unlabeled_list_only_to_count_it(tmp_path):
    root = write_tiny_dataset(tmp_path / "tiny", n_train=8, n_val=2, n_labeled=2)
    base = tiny_overrides(root, "supervised", 1000)
    assert build_data(load_config(overrides=base)).unlabeled == []
    with_epochs = load_config(overrides=base + ["train.epochs=1"])
    assert len(build_data(with_epochs).unlabeled) == 6
    # every method of a comparison runs the same count: 1 × 6 unlabeled / batch
    fixmatch = load_config(overrides=tiny_overrides(root, "fixmatch", 1000) + ["train.epochs=1"])
    assert (with_epoch_schedule(with_epochs, build_data(with_epochs)).train.iterations
            == with_epoch_schedule(fixmatch, build_data(fixmatch)).train.iterations)
    # no unlabeled list on disk: the labeled images (2 / batch)
    missing = load_config(overrides=base + ["train.epochs=1", "data.unlabeled=splits/none.txt"])
    data = build_data(missing)
    assert data.unlabeled == [] and with_epoch_schedule(missing, data).train.iterations == \
        epoch_iterations(1, 2, missing.train.batch_size, 1)


def test_epochs_over_an_empty_stream_is_a_config_error():
    with pytest.raises(ConfigError, match="train.epochs.*unlabeled"):
        with_epoch_schedule(cfg_with("train.epochs=1"), bundle(4, 0), 1)


def test_a_run_with_epochs_stops_at_the_derived_iteration(tmp_path):
    # 4 labeled images, batch 2, supervised: 1.5 epochs = ceil(1.5 × 4 / 2) = 3 iterations
    root = write_tiny_dataset(tmp_path / "tiny", n_train=8, n_val=2, n_labeled=4)
    cfg = load_config(overrides=tiny_overrides(root, "supervised", 1000) + ["train.epochs=1.5"])
    torch.set_num_threads(1)
    trainer = Trainer(cfg, tmp_path / "run", resume=False)
    assert trainer.cfg.train.iterations == 3
    summary = trainer.fit()
    assert summary["iteration"] == 3
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["iteration"] for r in records if r["type"] == "train") == 3
    assert [r["iteration"] for r in records if r["type"] == "eval"] == [3]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]
    assert saved["iterations"] == 3 and saved["epochs"] == 1.5

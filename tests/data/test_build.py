"""From a config to the class list, the split lists and the evaluation loader (`data/build.py`)."""

from __future__ import annotations


import pytest
import torch

from conftest import TINY_CLASSES, tiny_overrides, write_tiny_dataset
from farcluss.cli import main
from farcluss.config import load_config
from farcluss.data.benchmark import default_benchmark_dir, make_benchmark
from farcluss.data.build import (
    BUILTIN_BENCHMARK,
    build_data,
    dataset_root,
    eval_loader,
    resolve_classes,
    val_dataset,
)
from farcluss.data.datasets import VOC_CLASSES
from farcluss.engine.distributed import DistEnv
from farcluss.errors import ConfigError, DataError
from farcluss.log import setup_logging


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("build") / "tiny", n_train=8, n_val=5)


def _cfg(root, *overrides, method="farcluss"):
    return load_config(None, tiny_overrides(root, method) + list(overrides))


def test_an_empty_root_is_a_config_error_naming_the_key():
    cfg = load_config(None, ["data.root="])
    with pytest.raises(ConfigError, match="'data.root' is empty"):
        dataset_root(cfg)


def test_the_root_expands_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert dataset_root(load_config(None, ["data.root=~/datasets/x"])) == tmp_path / "datasets" / "x"


def test_the_builtin_benchmark_is_reused_once_complete(monkeypatch, tmp_path, capsys, restore_logging):
    monkeypatch.setenv("FARCLUSS_CACHE", str(tmp_path / "cache"))
    made = make_benchmark(default_benchmark_dir(), num_train=8, num_val=4, num_test=2, progress=False)
    setup_logging(rank=0)
    capsys.readouterr()
    assert dataset_root(load_config(None, [f"data.root={BUILTIN_BENCHMARK}"])) == made
    assert "making" not in capsys.readouterr().err


def test_classes_come_from_the_config_a_file_or_the_preset(root, tmp_path):
    assert resolve_classes(_cfg(root), root) == TINY_CLASSES  # root/classes.txt
    assert resolve_classes(_cfg(root, "data.classes=[a, b]", "method.top_k=2"), root) == ["a", "b"]
    (root / "other.txt").write_text("x\ny\nz\n")
    assert resolve_classes(_cfg(root, "data.classes=other.txt"), root) == ["x", "y", "z"]
    assert resolve_classes(_cfg(root, "data.preset=voc"), tmp_path) == list(VOC_CLASSES)
    with pytest.raises(DataError, match="names 3 classes but num_classes is 4"):
        resolve_classes(_cfg(root, "data.num_classes=4"), root)


def test_the_split_lists_a_run_needs(root):
    full = build_data(_cfg(root))
    assert full.root == root and full.classes == TINY_CLASSES
    assert (len(full.labeled), len(full.unlabeled), len(full.val)) == (4, 4, 5)
    assert all(sample.mask is not None for sample in full.labeled + full.val)

    supervised = build_data(_cfg(root, method="supervised"))
    assert len(supervised.labeled) == 4 and supervised.unlabeled == []
    assert len(build_data(_cfg(root, method="supervised"), need_unlabeled=True).unlabeled) == 4

    evaluation = build_data(_cfg(root), need_train=False)
    assert evaluation.labeled == [] and evaluation.unlabeled == [] and len(evaluation.val) == 5


def test_split_paths_may_be_absolute(root):
    data = build_data(_cfg(root, f"data.val={root / 'splits' / 'labeled.txt'}"), need_train=False)
    assert [s.name for s in data.val] == [s.name for s in build_data(_cfg(root)).labeled]


def test_an_image_in_both_training_lists_is_a_warning_line(tmp_path, capsys, restore_logging):
    root = write_tiny_dataset(tmp_path / "tiny", n_train=6, n_val=2)
    with open(root / "splits" / "unlabeled.txt", "a") as handle:
        handle.write("images/000.png\n")
    setup_logging(rank=0)
    data = build_data(_cfg(root))
    assert len(data.unlabeled) == 3
    assert capsys.readouterr().err.splitlines() == [
        f"warning: 1 image(s) are in both splits/labeled.txt and splits/unlabeled.txt, "
        f"e.g. {root / 'images' / '000.png'}"]


def test_validation_can_be_limited_to_the_first_images(root):
    cfg = _cfg(root, "eval.max_images=2")
    data = build_data(cfg, need_train=False)
    dataset = val_dataset(cfg, data, len(data.classes))
    assert len(dataset) == 2
    assert [dataset[i]["name"] for i in range(2)] == [s.name for s in data.val[:2]]


def test_the_eval_loader_shards_without_padding_and_leaves_the_global_stream(root):
    cfg = _cfg(root)
    data = build_data(cfg, need_train=False)
    seen = []
    for rank in (0, 1):
        loader = eval_loader(cfg, data, len(data.classes), DistEnv(rank=rank, world_size=2))
        state = torch.get_rng_state()
        names = [name for batch in loader for name in batch["name"]]
        assert torch.equal(torch.get_rng_state(), state)
        assert all(batch["image"].shape[0] == 1 for batch in loader)
        seen.append(names)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(s.name for s in data.val)


def test_the_test_split_is_read_when_set_and_empty_otherwise(tmp_path):
    root = write_tiny_dataset(tmp_path / "tiny", n_train=6, n_val=2, n_test=3)
    assert build_data(_cfg(root)).test == []
    cfg = _cfg(root, "data.test=splits/test.txt")
    data = build_data(cfg, need_train=False)
    assert [s.name for s in data.test] == ["008", "009", "010"]
    assert all(s.mask is not None for s in data.test)
    # one loader for either split: the test loader yields the test images, the default val
    env = DistEnv()
    assert [b["name"][0] for b in eval_loader(cfg, data, 3, env, split="test")] == ["008", "009", "010"]
    assert [b["name"][0] for b in eval_loader(cfg, data, 3, env)] == ["006", "007"]
    limited = _cfg(root, "data.test=splits/test.txt", "eval.max_images=2")
    assert len(val_dataset(limited, data, 3, split="test")) == 2
    with pytest.raises(ConfigError, match="'data.test' is not set"):
        eval_loader(_cfg(root), data, 3, env, split="test")
    with pytest.raises(DataError, match="missing.txt"):
        build_data(_cfg(root, "data.test=splits/missing.txt"))


def test_check_scans_the_test_list_only_when_it_is_set(tmp_path, capsys):
    root = write_tiny_dataset(tmp_path / "tiny", n_train=6, n_val=2, n_test=2)
    base = ["check", "--set", f"data.root={root}"]
    assert main(base) == 0
    assert "test:" not in capsys.readouterr().out
    (root / "masks" / "009.png").write_bytes(b"not a png")  # the second test image's mask
    assert main(base) == 0  # not in any list the config names
    capsys.readouterr()
    assert main(base + ["--set", "data.test=splits/test.txt"]) == 2
    out = capsys.readouterr().out
    assert "test: 2 samples, 1 problem(s)" in out and "009.png" in out

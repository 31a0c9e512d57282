"""DDP on CPU (gloo): W ranks × batch b train exactly like one process × batch W·b (issue 5).

One `torch.multiprocessing.spawn` of two ranks runs every distributed check (the gradient of
`all_reduce_sum`, fixmatch and farcluss training, sharded evaluation); the single-process
references run in the test process. Exactness needs the batch split to change nothing but the
summation order, so the runs use:

- `train.freeze_bn=true` and dropout p = 0 (set on the modules: a test-only hook): BatchNorm
  batch statistics and dropout masks depend on which images share a rank;
- `augment.cutmix_prob=0`: a CutMix partner is another image of the local batch;
- `data.scale_range=[1,1]` with crops inside the images: the supervised CE is a mean over the
  rank's own valid pixels, equal to the global mean only when every rank has the same count;
- `method.max_pixels_per_class` above the pixel count: the contrastive cap applies per rank.

Under torchrun none of this is needed for correct training; it only makes the check exact.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import farcluss.methods.farcluss as farcluss_method
from conftest import write_tiny_dataset
from farcluss.config import load_config
from farcluss.data.build import build_data, eval_loader
from farcluss.engine.distributed import (DistEnv, all_reduce_sum, cleanup, env_from_environment,
                                         init_distributed)
from farcluss.engine.trainer import Trainer
from farcluss.evaluate import evaluate
from farcluss.methods import build_method
from farcluss.methods.base import Batch

WORLD_SIZE = 2
BATCH_PER_RANK = 1
ITERATIONS = 3
# "<method>_dinov2": the method on a tiny DINOv2 ViT + DPT (no BatchNorm: W ranks × b ≡ 1 × W·b);
# "<method>_aligned": with distribution alignment (its running means are global)
METHODS = ("fixmatch", "unimatch", "farcluss", "unimatch_dinov2", "fixmatch_aligned")


def _overrides(root: Path, method: str, batch_size: int) -> list[str]:
    method, _, variant = method.partition("_")
    model = (["model.backbone=dinov2_vits14", "model.vit_embed_dim=32", "model.vit_depth=2"]
             if variant == "dinov2" else ["model.backbone=resnet18", "model.base_width=8"])
    if variant == "aligned":
        model.append("method.distribution_alignment=labels")
    return [
        f"data.root={root}", "data.crop_size=32", "data.scale_range=[1,1]",
        *model, f"method.name={method}",
        f"train.iterations={ITERATIONS}", f"train.batch_size={batch_size}", "train.device=cpu",
        "train.num_workers=0", "train.eval_interval=1000", "train.log_interval=1",
        "train.checkpoint_interval=1000", "train.progress=false", "train.freeze_bn=true",
        "train.amp=off",
        # frozen statistics of a random init: a small step keeps the tiny net finite
        "train.lr=0.002", "train.head_lr_multiplier=1.0",
        "augment.cutmix_prob=0", "method.ramp=0", "method.ema_momentum=0.9",
        "method.projection_dim=16", "method.max_pixels_per_class=100000",
        # fixmatch: a threshold the young teacher passes, so the unlabeled term is not empty
        *(["method.threshold=0.4"] if method in ("fixmatch", "unimatch") else []),
    ]


def _train(root: Path, out: Path, method: str, batch_size: int, env: DistEnv) -> dict:
    """Train; return the student's weights and the class weights of every iteration."""
    recorded = []
    original = farcluss_method.class_weights

    def recording_class_weights(*args, **kwargs):
        weights = original(*args, **kwargs)
        recorded.append(weights.clone())
        return weights

    farcluss_method.class_weights = recording_class_weights
    try:
        trainer = Trainer(load_config(None, _overrides(root, method, batch_size)), out, env=env,
                          resume=False)
        for module in trainer.student.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        # a small classifier makes the young teacher spread its pseudo-labels over all classes,
        # so the class weights are not all 1 (the default init predicts background everywhere)
        classifier = trainer.student.classifier.weight
        with torch.no_grad():
            classifier.copy_(0.05 * torch.randn(classifier.shape,
                                                generator=torch.Generator().manual_seed(1)))
            if trainer.teacher is not None:
                trainer.teacher.load_state_dict(trainer.student.state_dict())
        trainer.fit()
    finally:
        farcluss_method.class_weights = original
    return {"student": {k: v.clone() for k, v in trainer.student.state_dict().items()},
            "class_weights": recorded}


def _evaluate(root: Path, weights: dict, env: DistEnv) -> dict:
    """The trainer's evaluation path: rank-sharded loader, confusion matrix summed over ranks."""
    cfg = load_config(None, _overrides(root, "farcluss", 1))
    data = build_data(cfg)
    model = build_method(cfg, len(data.classes)).build_student()
    model.load_state_dict(weights)
    return evaluate(model, eval_loader(cfg, data, len(data.classes), env), len(data.classes),
                    reduce=all_reduce_sum, output_stride=cfg.model.output_stride)


def _rank_worker(rank: int, port: int, root: str, work: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env = DistEnv(rank=rank, world_size=WORLD_SIZE, local_rank=rank)
    init_distributed(env, torch.device("cpu"), timeout_s=60)
    work_dir = Path(work)
    try:
        results = {}
        # d/dx_r Σ_r' (c_r' · Σ_s x_s) = Σ_r' c_r': every rank's loss reaches every rank's input
        x = torch.full((2,), float(rank + 1), requires_grad=True)
        total = all_reduce_sum(x)
        (total * (rank + 1.0)).sum().backward()
        results["reduce_value"], results["reduce_grad"] = total.detach(), x.grad
        for method in METHODS:
            results[method] = _train(Path(root), work_dir / f"ddp-{method}", method,
                                     BATCH_PER_RANK, env)
        reference = torch.load(work_dir / "reference-farcluss.pt")["student"]
        results["eval"] = _evaluate(Path(root), reference, env)
        torch.save(results, work_dir / f"rank{rank}.pt")
    finally:
        cleanup()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process × batch W·b and W ranks × batch b, for every method, plus evaluations."""
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("ddp")
    # 5 validation images: shards of 3 and 2, where a padding sampler would count one twice
    root = write_tiny_dataset(work / "data", n_val=5)
    reference = {}
    for method in METHODS:
        reference[method] = _train(root, work / f"one-{method}", method,
                                   BATCH_PER_RANK * WORLD_SIZE, DistEnv())
        torch.save(reference[method], work / f"reference-{method}.pt")
    reference["eval"] = _evaluate(root, reference["farcluss"]["student"], DistEnv())
    mp.spawn(_rank_worker, args=(_free_port(), str(root), str(work)), nprocs=WORLD_SIZE)
    ranks = [torch.load(work / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    return {"reference": reference, "ranks": ranks, "work": work}


@pytest.mark.slow
def test_all_reduce_sum_sums_values_and_gradients_over_ranks(runs):
    for rank in runs["ranks"]:
        assert rank["reduce_value"].tolist() == [3.0, 3.0]  # 1 + 2
        assert rank["reduce_grad"].tolist() == [3.0, 3.0]  # c_0 + c_1 = 1 + 2


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_of_batch_b_train_like_one_process_of_batch_2b(runs, method):
    expected = runs["reference"][method]["student"]
    for rank in runs["ranks"]:
        weights = rank[method]["student"]
        assert weights.keys() == expected.keys()
        worst = max((weights[k].double() - expected[k].double()).abs().max().item()
                    for k in expected if expected[k].is_floating_point())
        assert worst <= 1e-5, f"{method}: max |Δw| = {worst:.3g}"
    # the runs really trained: every rank moved away from the shared initialisation
    torch.manual_seed(0)  # train.seed, as the trainer seeds before building the student
    cfg = load_config(None, _overrides(runs["work"] / "data", method, 1))
    initial = build_method(cfg, num_classes=3).build_student().state_dict()
    assert (expected["classifier.weight"] - initial["classifier.weight"]).abs().max() > 1e-4


@pytest.mark.slow
def test_class_weights_and_prototypes_are_global(runs):
    rank0, rank1 = (rank["farcluss"] for rank in runs["ranks"])
    reference = runs["reference"]["farcluss"]
    assert len(rank0["class_weights"]) == len(reference["class_weights"]) == ITERATIONS
    for step, (w0, w1, w_one) in enumerate(zip(rank0["class_weights"], rank1["class_weights"],
                                               reference["class_weights"])):
        assert torch.equal(w0, w1), f"ranks apply different class weights at step {step}"
        # from the global counts: the same weights as one process that sees the whole batch
        assert torch.allclose(w0, w_one, rtol=0, atol=1e-6)
    assert any((w - 1).abs().max() > 0.1 for w in reference["class_weights"])
    # the prototype bank is updated after DDP's buffer broadcast, by each rank on its own
    bank0 = rank0["student"]["farcluss_state.prototypes"]
    bank1 = rank1["student"]["farcluss_state.prototypes"]
    assert torch.equal(bank0, bank1)
    assert torch.allclose(bank0, reference["student"]["farcluss_state.prototypes"], atol=1e-5)
    assert bank0.abs().sum() > 0


@pytest.mark.slow
def test_sharded_evaluation_equals_one_process(runs):
    one = runs["reference"]["eval"]
    for rank in runs["ranks"]:
        assert rank["eval"]["miou"] == one["miou"]
        assert rank["eval"]["per_class_iou"] == one["per_class_iou"]
        assert rank["eval"]["pixel_accuracy"] == one["pixel_accuracy"]


@pytest.mark.slow
def test_only_rank_zero_writes_and_the_run_records_the_global_batch(runs):
    run_dir = runs["work"] / "ddp-fixmatch"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["world_size"] == WORLD_SIZE
    assert info["global_batch_labeled"] == WORLD_SIZE * BATCH_PER_RANK
    assert info["global_batch_unlabeled"] == WORLD_SIZE * BATCH_PER_RANK
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines if r["type"] == "train"] == list(range(1, ITERATIONS + 1))


def test_strong_view_of_an_image_does_not_depend_on_its_batch(tiny_dataset):
    """Per-sample seeds: the halves of a batch get the same strong views as the whole batch."""
    cfg = load_config(None, _overrides(tiny_dataset, "fixmatch", 4))
    method = build_method(cfg, num_classes=3)
    teacher = method.build_student().eval()
    images = torch.randn(4, 3, 32, 32)
    seeds = torch.tensor([11, 2**62 + 5, 7, 123456789], dtype=torch.int64)

    def view(index):
        batch = Batch(images_l=images[:1], masks_l=torch.zeros(1, 32, 32, dtype=torch.long),
                      images_u_weak=images[index], ignore_mask_u=torch.zeros(len(index), 32, 32, dtype=torch.long),
                      seeds_u=seeds[index])
        return method.strong_view(batch, method.weak_view(batch, None, teacher)[0]).images_u_strong

    whole = view(torch.arange(4))
    halves = torch.cat([view(torch.tensor([0, 1])), view(torch.tensor([2, 3]))])
    reordered = view(torch.tensor([3, 2, 1, 0])).flip(0)
    assert torch.equal(whole, halves)
    assert torch.equal(whole, reordered)
    assert not torch.equal(whole, images)


def test_env_from_torchrun_then_slurm_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert env_from_environment() == DistEnv(0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert env_from_environment() == DistEnv(5, 8, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert env_from_environment() == DistEnv(2, 4, 0)  # torchrun's variables win


def test_freeze_bn_keeps_running_statistics(tiny_dataset, tmp_path):
    cfg = load_config(None, _overrides(tiny_dataset, "supervised", 2) + ["train.iterations=2"])
    trainer = Trainer(cfg, tmp_path / "run", resume=False)
    before = {k: v.clone() for k, v in trainer.student.state_dict().items() if "running" in k}
    trainer.fit()
    after = trainer.student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.student.training  # BN layers were switched to eval, the model was not


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank(tmp_path):
    """Two plain processes (no torchrun to kill the survivor): one reads a corrupt image."""
    root = write_tiny_dataset(tmp_path / "data")
    # each rank reads one labeled image per iteration: whichever gets 002.png fails first
    (root / "images" / "002.png").write_bytes(b"not a png")
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({
        "data": {"root": str(root), "crop_size": 32},
        "model": {"backbone": "resnet18", "base_width": 8},
        "method": {"name": "fixmatch"},
        "train": {"iterations": 20, "batch_size": 1, "num_workers": 0, "device": "cpu",
                  "eval_interval": 1000, "checkpoint_interval": 1000, "progress": False}}))
    env = dict(os.environ, KMP_BLOCKTIME="0", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), WORLD_SIZE=str(WORLD_SIZE))
    processes = [
        subprocess.Popen([sys.executable, "-m", "farcluss", "train", str(config),
                          "--out", str(tmp_path / "run")],
                         env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(WORLD_SIZE)]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=90))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    codes = [process.returncode for process in processes]
    assert all(code != 0 for code in codes), codes
    stderr = "\n".join(err for _, err in outputs)
    assert "002.png" in stderr
    assert any(f"rank {rank} of {WORLD_SIZE} failed" in stderr for rank in range(WORLD_SIZE))

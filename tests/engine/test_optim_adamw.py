"""`train.optimizer=adamw` with its betas and the head multiplier, and `model.freeze_backbone`:
the frozen encoder stays bit-identical, out of the optimizer and out of its checkpointed state."""

import pytest
import torch

from conftest import tiny_overrides, write_tiny_dataset
from farcluss.config import load_config
from farcluss.engine.checkpoint import load_checkpoint
from farcluss.engine.optim import build_optimizer
from farcluss.engine.trainer import Trainer
from farcluss.models import build_model

VIT = ["model.backbone=dinov2_vits14", "model.vit_embed_dim=32", "model.vit_depth=2",
       "data.crop_size=28"]


def test_adamw_groups_lrs_betas_and_decay():
    model = build_model(3, "dinov2_vits14", vit_embed_dim=32, vit_depth=2)
    optimizer = build_optimizer(model, 5e-6, 40.0, 0.9, 0.01, "adamw", (0.8, 0.95))
    assert isinstance(optimizer, torch.optim.AdamW)
    backbone, head = optimizer.param_groups
    assert (backbone["lr"], head["lr"]) == (5e-6, pytest.approx(2e-4))
    assert backbone["betas"] == (0.8, 0.95) and head["weight_decay"] == 0.01
    assert len(backbone["params"]) == len(list(model.backbone.parameters()))


def test_sgd_stays_the_default():
    cfg = load_config(overrides=[])
    assert (cfg.train.optimizer, cfg.train.betas) == ("sgd", (0.9, 0.999))
    optimizer = build_optimizer(build_model(3, "resnet18", base_width=8), 0.01, 10.0, 0.9, 1e-4)
    assert isinstance(optimizer, torch.optim.SGD)


@pytest.mark.parametrize("backbone", ["vit", "resnet"])
def test_frozen_backbone_is_bit_identical_and_out_of_the_optimizer(tmp_path, backbone):
    root = write_tiny_dataset(tmp_path / "tiny", n_train=6, n_val=1, n_labeled=2)
    extra = (VIT if backbone == "vit" else []) + [
        "model.freeze_backbone=true", "train.optimizer=adamw", "train.lr=0.001",
        "train.checkpoint_interval=3"]
    cfg = load_config(overrides=tiny_overrides(root, "fixmatch", 3) + extra)
    trainer = Trainer(cfg, tmp_path / "run", resume=False)
    before = {k: v.clone() for k, v in trainer.student.backbone.state_dict().items()}
    head_before = trainer.student.classifier.weight.clone()
    trainer.fit()
    after = trainer.student.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    assert not torch.equal(head_before, trainer.student.classifier.weight)
    assert trainer.optimizer.param_groups[0]["params"] == []
    frozen = {id(p) for p in trainer.student.backbone.parameters()}
    assert not any(id(p) in frozen for p in trainer.optimizer.state)
    assert all(p.grad is None for p in trainer.student.backbone.parameters())
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["optimizer"]
    assert saved["param_groups"][0]["params"] == []
    assert len(saved["state"]) == len(trainer.optimizer.param_groups[1]["params"])

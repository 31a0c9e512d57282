"""FARCLUSS and UniMatch V2 on a tiny DINOv2 + DPT: train, checkpoint, resume bitwise, evaluate;
and `farcluss train ... --set model.pretrained=PATH` with an official-layout file and a wrong one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides, write_tiny_dataset
from farcluss import cli
from farcluss.config import load_config
from farcluss.engine.checkpoint import load_checkpoint
from farcluss.engine.trainer import Trainer
from farcluss.models import build_model

ITERATIONS = 4
TINY_VIT = ["model.backbone=dinov2_vits14", "model.vit_embed_dim=32", "model.vit_depth=2",
            "train.optimizer=adamw", "train.lr=0.0005", "train.weight_decay=0.01",
            "train.head_lr_multiplier=4.0"]
# UniMatch V2's reading of the method (docs/method.md): EMA teacher, complementary dropout
METHODS = {"farcluss": [], "unimatch": ["method.teacher=ema", "method.ema_momentum=0.9",
                                        "method.feature_perturbation=complementary",
                                        "method.strong_views=2"]}


def _sets(overrides):
    return [arg for override in overrides for arg in ("--set", override)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("vit") / "tiny", n_train=6, n_val=2,
                              n_labeled=2)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_tiny_dinov2_run_trains_resumes_bitwise_and_evaluates(root, tmp_path, method,
                                                              monkeypatch, capsys):
    overrides = tiny_overrides(root, method, ITERATIONS) + TINY_VIT + METHODS[method] + [
        "train.deterministic=true", "train.checkpoint_interval=2", "train.eval_interval=4"]
    cfg = load_config(overrides=overrides)
    # the uninterrupted run keeps a copy of its last.pt at iteration 2
    saved_at_2 = tmp_path / "last_at_2.pt"
    original = Trainer._save_last

    def save_and_keep(self):
        original(self)
        if self.iteration == 2:
            shutil.copy(self.paths.last, saved_at_2)

    monkeypatch.setattr(Trainer, "_save_last", save_and_keep)
    full = tmp_path / "full"
    Trainer(cfg, full, resume=False).fit()
    monkeypatch.setattr(Trainer, "_save_last", original)

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(saved_at_2, resumed / "checkpoints" / "last.pt")
    trainer = Trainer(cfg, resumed, resume=True)
    assert trainer.iteration == 2
    trainer.fit()

    want = load_checkpoint(full / "checkpoints" / "last.pt")
    got = load_checkpoint(resumed / "checkpoints" / "last.pt")
    for part in ("student", "teacher"):
        differing = [k for k in want[part] if not torch.equal(want[part][k], got[part][k])]
        assert not differing, f"{part} differs after the resume in {differing[:4]}"
    assert "backbone.pos_embed" in want["student"] and "decoder.head_conv.weight" in want["student"]
    # the ViT learned (AdamW moved the encoder too)
    assert not torch.equal(want["student"]["backbone.pos_embed"],
                           torch.load(saved_at_2, weights_only=True)["student"]["backbone.pos_embed"])

    capsys.readouterr()
    assert cli.main(["eval", *_sets(overrides), "--checkpoint",
                     str(full / "checkpoints" / "last.pt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["miou"] <= 100.0 and len(result["per_class_iou"]) == 3


def _official_file(path: Path, **kwargs) -> Path:
    torch.manual_seed(3)
    model = build_model(3, "dinov2_vits14", vit_embed_dim=32, vit_depth=2, **kwargs)
    state = dict(model.backbone.state_dict())
    state["mask_token"] = torch.zeros(1, 32)
    torch.save(state, path)
    return path


def test_cli_train_with_an_official_layout_file_and_with_a_wrong_one(root, tmp_path, capsys):
    # the random-init benchmark recipe: the shipped benchmark's builtin:pretrained is a ResNet
    config = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    base = ["train", str(config), "--out", str(tmp_path / "run"), *_sets([
        f"data.root={root}", "data.test=null", "data.crop_size=28", "model.backbone=dinov2_vits14",
        "model.vit_embed_dim=32", "model.vit_depth=2", "train.iterations=1",
        "method.warmup_iterations=0", "train.batch_size=2", "train.num_workers=0",
        "train.progress=false", "train.amp=off", "method.projection_dim=16",
        "eval.max_images=1"])]
    good = _official_file(tmp_path / "dinov2_tiny_pretrain.pth")
    assert cli.main(base + ["--set", f"model.pretrained={good}"]) == 0
    capsys.readouterr()

    wrong = tmp_path / "wrong.pth"
    state = torch.load(good, weights_only=True)
    state.pop("blocks.1.attn.qkv.weight")
    state["head.weight"] = torch.zeros(2, 2)
    torch.save(state, wrong)
    code = cli.main(base + ["--set", f"model.pretrained={wrong}", "--no-resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "missing keys: blocks.1.attn.qkv.weight" in err[0]
    assert "unexpected keys: head.weight" in err[0]

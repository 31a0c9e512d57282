"""Mixed precision and memory layout: `train.amp`, `train.channels_last`, and the losses that
must stay in float32 under autocast."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_overrides
from farcluss.augment import StrongAugment
from farcluss.config import load_config
from farcluss.engine.trainer import Trainer
from farcluss.errors import ConfigError
from farcluss.losses.contrastive import prototype_contrastive_loss, prototype_sums
from farcluss.losses.fuzzy import fuzzy_targets, soft_cross_entropy
from farcluss.losses.weighting import normalized_entropy

BF16_CPU = torch.autocast(device_type="cpu", dtype=torch.bfloat16)


def _train_records(root, out, *extra):
    cfg = load_config(None, tiny_overrides(root, "farcluss", iterations=3) + list(extra))
    trainer = Trainer(cfg, out, resume=False)
    initial = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.fit()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return trainer, initial, [r for r in records if r["type"] == "train"]


def test_bf16_autocast_trains_a_tiny_model_on_cpu_without_nan(tiny_dataset, tmp_path):
    trainer, initial, records = _train_records(tiny_dataset, tmp_path / "bf16", "train.amp=bf16")
    assert len(records) == 3
    for record in records:
        for key in ("loss", "loss_sup", "loss_unsup", "loss_con"):
            assert record[key] is not None and math.isfinite(record[key]), (key, record)
    weights = trainer.student.state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    # parameters stay float32 (autocast casts per operation) and they were updated
    assert weights["classifier.weight"].dtype == torch.float32
    assert not torch.equal(weights["classifier.weight"], initial["classifier.weight"])


def test_fp16_without_cuda_is_a_config_error(tiny_dataset, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_dataset) + ["train.amp=fp16", "train.device=cpu"])
    with pytest.raises(ConfigError, match="train.amp"):
        Trainer(cfg, tmp_path / "run", resume=False)


def test_channels_last_trains_and_keeps_the_model_function(tiny_dataset, tmp_path, monkeypatch):
    trainer, _, records = _train_records(tiny_dataset, tmp_path / "nhwc", "train.iterations=1",
                                         "train.channels_last=true")
    assert math.isfinite(records[0]["loss"])
    student = trainer.student.eval()
    assert student.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    # the layout changes strides, not the function (dropout is off in eval mode)
    reference = copy.deepcopy(student).to(memory_format=torch.contiguous_format)
    device = student.backbone.conv1.weight.device
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    # on CUDA each layout gets its own cuDNN kernels: compare them in full fp32, not TF32
    # (matrix products are fp32 already: torch.backends.cuda.matmul.allow_tf32 defaults to False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    with torch.no_grad():
        nhwc = student(images.contiguous(memory_format=torch.channels_last))[0]
        nchw = reference(images)[0]
    assert torch.allclose(nhwc, nchw, rtol=1e-4, atol=1e-4)


def test_entropy_soft_ce_and_contrastive_compute_in_float32_under_autocast():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, 6, generator=generator) * 3
    teacher_probs = torch.softmax(torch.randn(2, 5, 6, 6, generator=generator) * 3, dim=1)
    targets = fuzzy_targets(teacher_probs, top_k=3)
    embeddings = F.normalize(torch.randn(64, 16, generator=generator), dim=1)
    labels = torch.randint(0, 5, (64,), generator=generator)
    bank, bank_initialized = torch.zeros(5, 16), torch.zeros(5, dtype=torch.bool)

    def compute():
        sums, counts = prototype_sums(embeddings, labels, 5)
        prototypes = F.normalize(sums, dim=1)
        contrastive, _ = prototype_contrastive_loss(embeddings, labels, prototypes, counts > 0,
                                                    bank, bank_initialized, temperature=0.1)
        return {"entropy": normalized_entropy(teacher_probs),
                "soft_ce": soft_cross_entropy(logits, targets),
                "sums": sums, "contrastive": contrastive}

    exact = compute()
    with BF16_CPU:
        mixed = compute()
    for name, value in mixed.items():
        assert value.dtype == torch.float32, name
        # a bf16 product keeps 8 bits of mantissa: errors of ~1e-2, far above this bound
        assert torch.allclose(value, exact[name], rtol=1e-6, atol=1e-6), name


def test_strong_view_is_computed_in_float32_under_autocast():
    augment = StrongAugment(jitter_prob=1.0, blur_prob=1.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    params = augment.sample_params(3, torch.Generator().manual_seed(1))
    with BF16_CPU:
        mixed = augment.apply(images, params)
    assert torch.equal(mixed, augment.apply(images, params))


def test_auto_amp_resolves_to_a_concrete_mode():
    from farcluss.engine.device import _cpu_has_native_bf16, resolve_amp

    cpu = torch.device("cpu")
    assert resolve_amp("off", cpu) == "off"
    assert resolve_amp("bf16", cpu) == "bf16"
    assert resolve_amp("auto", cpu) == ("bf16" if _cpu_has_native_bf16() else "off")

import json
import math
import re

import pytest
import torch
from conftest import tiny_overrides, write_tiny_dataset
from torch import nn

from farcluss.config import load_config
from farcluss.engine.trainer import Trainer
from farcluss.log import setup_logging
from farcluss.methods import METHODS, build_method
from farcluss.methods.base import Batch, LossOutput, confidence_stats, unsup_ramp

NUM_CLASSES = 3
# the strong view without photometric changes, and a box in every image: only CutMix moves pixels
CUTMIX_ONLY = ["augment.jitter_prob=0", "augment.grayscale_prob=0", "augment.blur_prob=0",
               "augment.cutmix_prob=1", "augment.cutmix_area=[0.2, 0.4]"]




class IdentityTeacher(nn.Module):
    """Test double: each pixel's logits say, with certainty, which batch image it came from
    (image i is filled with the value i)."""

    def forward(self, images):
        source = images[:, 0].round().long().clamp(0, NUM_CLASSES - 1)
        logits = torch.nn.functional.one_hot(source, NUM_CLASSES).permute(0, 3, 1, 2).float()
        return logits * 100.0, images


def _method(*overrides: str, name: str = "fixmatch"):
    cfg = load_config(overrides=["model.backbone=resnet18", "model.base_width=8",
                                 f"method.name={name}", *overrides])
    return build_method(cfg, NUM_CLASSES)


def _identity_batch(height: int = 32, width: int = 32) -> Batch:
    images_u = torch.arange(NUM_CLASSES, dtype=torch.float32).view(-1, 1, 1, 1).expand(
        -1, 3, height, width).contiguous()
    ignore = torch.zeros(NUM_CLASSES, height, width, dtype=torch.long)
    ignore[1, :, width // 2:] = 255  # image 1 is padded on its right half
    return Batch(images_l=torch.zeros(1, 3, height, width),
                 masks_l=torch.zeros(1, height, width, dtype=torch.long),
                 images_u_weak=images_u, ignore_mask_u=ignore,
                 seeds_u=torch.tensor([101, 202, 303]))


def _view(method, teacher, batch, index=0):
    """Strong view `index` as training makes it: the weak view's teacher, then the seeded view."""
    weak, _ = method.weak_view(batch, None, teacher)
    return method.strong_view(batch, weak, index)


@pytest.mark.parametrize("iteration, warmup, ramp, total, expected", [
    (0, 0, 0.1, 100, 0.0),
    (5, 0, 0.1, 100, 0.5),
    (10, 0, 0.1, 100, 1.0),
    (80, 0, 0.1, 100, 1.0),
    (9, 10, 0.1, 100, 0.0),   # warm-up
    (10, 10, 0.1, 100, 0.0),  # the ramp starts at the end of the warm-up
    (15, 10, 0.1, 100, 0.5),
    (0, 0, 0.0, 100, 1.0),    # no ramp
    (3, 5, 0.0, 100, 0.0),
])
def test_unsup_ramp_by_hand(iteration, warmup, ramp, total, expected):
    assert unsup_ramp(iteration, warmup, ramp, total) == pytest.approx(expected)


def test_ramp_weight_scales_lambda_u():
    method = _method("method.lambda_u=2.0", "method.ramp=0.1", "train.iterations=100")
    assert method.ramp_weight(5) == pytest.approx(1.0)
    assert method.ramp_weight(50) == pytest.approx(2.0)


def test_total_is_the_weighted_sum_and_keeps_zero_weight_terms_in_the_graph():
    x = torch.tensor(1.0, requires_grad=True)
    output = LossOutput(terms={"sup": 2 * x, "unsup": 3 * x, "con": 5 * x},
                        weights={"unsup": 0.0, "con": 0.5})
    total = output.total()
    assert total.item() == pytest.approx(2 + 0 + 2.5)
    total.backward()
    assert x.grad.item() == pytest.approx(4.5)


def test_cutmix_moves_strong_images_teacher_probs_and_ignore_mask_together():
    method = _method(*CUTMIX_ONLY)
    batch = _identity_batch()
    view = _view(method, IdentityTeacher(), batch)
    # every pixel's value says which image it came from
    source = view.images_u_strong[:, 0].round().long()
    own = torch.arange(NUM_CLASSES).view(-1, 1, 1)
    assert ((source != own).flatten(1).any(dim=1)).all(), "every image receives a box"
    assert (view.images_u_strong == source[:, None].float()).all()
    assert torch.equal(view.teacher_probs.argmax(dim=1), source)
    assert torch.allclose(view.teacher_probs.sum(dim=1), torch.ones(source.shape))
    # the ignore region travels with the pixels: image 1's padded half is invalid wherever it lands
    columns = torch.arange(32).view(1, 1, -1).expand_as(source)
    expected_valid = ~((source == 1) & (columns >= 16))
    assert torch.equal(view.valid_mask, expected_valid)


def test_teacher_outputs_carry_no_gradient():
    method = _method()
    teacher = nn.Conv2d(3, NUM_CLASSES, 1)  # requires grad on purpose

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = teacher

        def forward(self, images):
            return self.conv(images), images

    batch = _identity_batch()
    view = _view(method, Wrapped(), batch)
    assert not view.teacher_probs.requires_grad
    assert not view.images_u_strong.requires_grad


def test_an_images_seed_alone_decides_its_strong_views():
    batch = _identity_batch()
    batch.images_u_weak = torch.randn_like(batch.images_u_weak)
    first, second = _method(), _method("train.seed=7")
    view_a = _view(first, IdentityTeacher(), batch)
    # the method's own state (seed, earlier draws) plays no part: a resumed run redraws it
    _view(first, IdentityTeacher(), batch)
    view_b = _view(second, IdentityTeacher(), batch)
    assert torch.equal(view_a.images_u_strong, view_b.images_u_strong)
    assert not torch.equal(view_a.images_u_strong, batch.images_u_weak)
    batch.seeds_u = batch.seeds_u + 1
    view_c = _view(first, IdentityTeacher(), batch)
    assert not torch.equal(view_a.images_u_strong, view_c.images_u_strong)


def test_two_strong_views_differ_and_each_has_its_own_cutmix_boxes():
    method = _method(*CUTMIX_ONLY, "method.strong_views=2", name="farcluss")
    batch = _identity_batch()
    views = [_view(method, IdentityTeacher(), batch, k) for k in range(2)]
    sources = [v.images_u_strong[:, 0].round().long() for v in views]
    own = torch.arange(NUM_CLASSES).view(-1, 1, 1)
    boxes = [s != own for s in sources]
    assert all(b.flatten(1).any(dim=1).all() for b in boxes)
    assert not torch.equal(boxes[0], boxes[1])
    # view 1 is the view a one-view run makes: adding a view leaves it alone
    single = _view(_method(*CUTMIX_ONLY, name="farcluss"), IdentityTeacher(), batch)
    assert torch.equal(single.images_u_strong, views[0].images_u_strong)
    for view, source in zip(views, sources):
        assert torch.equal(view.teacher_probs.argmax(dim=1), source)


def test_confidence_stats_count_valid_pixels_only():
    probs = torch.tensor([[0.97, 0.02, 0.01], [0.5, 0.3, 0.2], [0.96, 0.02, 0.02],
                          [0.99, 0.005, 0.005]])
    teacher_probs = probs.t().reshape(1, 3, 2, 2)
    valid = torch.tensor([[[True, True], [True, False]]])
    stats = confidence_stats(teacher_probs, valid)
    assert stats["confident_fraction"].item() == pytest.approx(2 / 3)
    none_valid = confidence_stats(teacher_probs, torch.zeros_like(valid))
    assert none_valid["confident_fraction"].item() == 0.0


def test_supervised_loss_follows_train_loss():
    logits = torch.randn(2, NUM_CLASSES, 8, 8)
    masks = torch.randint(0, NUM_CLASSES, (2, 8, 8))
    ce = _method("train.loss=ce").supervised_loss(logits, masks)
    ohem = _method("train.loss=ohem", "train.ohem_threshold=0.7",
                   "train.ohem_min_kept=10").supervised_loss(logits, masks)
    expected_ce = torch.nn.functional.cross_entropy(logits, masks)
    assert ce.item() == pytest.approx(expected_ce.item(), rel=1e-6)
    # OHEM keeps the hard pixels only, whose mean loss is larger
    assert ohem.item() > ce.item()


# ---- each method end to end on tiny data ---------------------------------------------------------

def _train_tiny(tmp_path, method: str, iterations: int, *extra: str) -> tuple[Trainer, list]:
    root = write_tiny_dataset(tmp_path / "data")
    cfg = load_config(overrides=tiny_overrides(root, method, iterations) + list(extra))
    trainer = Trainer(cfg, tmp_path / "run", resume=False)
    trainer.fit()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return trainer, [json.loads(line) for line in lines]


FARCLUSS_LOG_KEYS = {"loss_sup", "loss_unsup", "loss_con", "pixel_weight_mean",
                     "confident_fraction", "class_weight_min", "class_weight_max",
                     "pseudo_label_frequency"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_lowers_its_training_loss_on_tiny_data(tmp_path, name):
    trainer, records = _train_tiny(tmp_path, name, 24)
    train = [r for r in records if r["type"] == "train"]
    assert len(train) == 24
    losses = [r["loss_sup"] for r in train]
    assert all(loss is not None and math.isfinite(loss) for loss in losses)
    # random init starts far off; the mean of the last steps is well below that of the first
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    evaluated = {r["model"] for r in records if r["type"] == "eval"}
    if name in ("supervised", "unimatch"):
        # unimatch's pseudo-labels come from the student itself (V1): there is no teacher
        assert trainer.teacher is None and evaluated == {"student"}
        return
    assert evaluated == {"teacher", "student"}
    assert not trainer.teacher.training
    teacher_params = dict(trainer.teacher.named_parameters())
    assert any(not torch.equal(teacher_params[key], param)
               for key, param in trainer.student.named_parameters())
    if name == "farcluss":
        last = train[-1]
        assert FARCLUSS_LOG_KEYS <= set(last)
        assert len(last["pseudo_label_frequency"]) == 3
        assert all(value is not None for key, value in last.items() if key in FARCLUSS_LOG_KEYS)


def test_teacher_equals_the_student_at_momentum_zero(tmp_path):
    trainer, _ = _train_tiny(tmp_path, "farcluss", 3, "method.ema_momentum=0.0")
    teacher_state = trainer.teacher.state_dict()
    for key, value in trainer.student.state_dict().items():
        assert torch.equal(teacher_state[key], value), key


def test_teacher_and_unsup_loss_wait_through_the_warm_up(tmp_path, capsys, restore_logging):
    root = write_tiny_dataset(tmp_path / "data")
    cfg = load_config(overrides=tiny_overrides(root, "fixmatch", 3)
                      + ["method.warmup_iterations=3"])
    setup_logging(rank=0)  # as the CLI does; earlier tests may have left another setup
    trainer = Trainer(cfg, tmp_path / "run", resume=False)
    # a logger warning: a line on stderr (the farcluss handler, or logging's last resort)
    assert re.search("method.warmup_iterations .3. is not below train.iterations .3.",
                     capsys.readouterr().err)
    initial = {key: value.clone() for key, value in trainer.teacher.state_dict().items()}
    trainer.fit()
    for key, value in trainer.teacher.state_dict().items():
        assert torch.equal(value, initial[key]), key
    assert not torch.equal(trainer.student.classifier.weight, initial["classifier.weight"])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert all("loss_unsup" not in r for r in records if r["type"] == "train")


def test_the_teacher_is_evaluated_and_kept_as_best_only_after_the_warm_up(tmp_path, capsys,
                                                                          restore_logging):
    root = write_tiny_dataset(tmp_path / "data")
    cfg = load_config(overrides=tiny_overrides(root, "farcluss", 4)
                      + ["method.warmup_iterations=2", "train.eval_interval=2"])
    setup_logging(rank=0)
    Trainer(cfg, tmp_path / "run", resume=False).fit()
    # a warm-up shorter than the schedule is the normal case: no warning
    assert "warmup_iterations" not in capsys.readouterr().err
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    evals = [(r["iteration"], r["model"]) for r in map(json.loads, lines) if r["type"] == "eval"]
    assert evals == [(2, "student"), (4, "teacher"), (4, "student")]
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert best["iteration"] == 4

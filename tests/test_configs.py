"""Every shipped config loads and validates; each ablation changes its named switch only; the
paper recipes follow docs/method.md §7."""

import dataclasses
from pathlib import Path

import pytest

from farcluss.config import load_config
from farcluss.data.benchmark import BENCHMARK_CLASSES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))

# the method keys each ablation sets on top of configs/benchmark.yaml (configs/demo.yaml is the
# demo's random-init copy of the benchmark)
ABLATIONS = {
    "no_fuzzy": {"top_k": 1},
    "no_weighting": {"weighting": "none"},
    "no_rebalance": {"rebalance": "off"},
    "no_contrastive": {"contrastive": "off"},
    "k1": {"top_k": 1},
    "k2": {"top_k": 2},
    "k3": {"top_k": 3},
    "kC": {"top_k": len(BENCHMARK_CLASSES)},
    "weighting_exp": {"weighting": "exp", "weighting_beta": 1.0},
    "weighting_power": {"weighting": "power", "weighting_gamma": 2.0},
    "rebalance_ema": {"rebalance": "ema", "rebalance_momentum": 0.99},
    "rebalance_pixels": {"rebalance_normalize": "pixels"},
    "unsup_weighted_mean": {"unsup_normalize": "weights"},
    "contrastive_all_pixels": {"contrastive_weight_threshold": 0.0},
    "distribution_alignment": {"distribution_alignment": "labels", "alignment_momentum": 0.99},
    "fixmatch_equivalent": {"top_k": 1, "weighting": "none", "rebalance": "off",
                            "contrastive": "off", "threshold": 0.95},
}
# the ablations that switch a train key instead (the labeled loss every method shares)
TRAIN_ABLATIONS = {
    "logit_adjustment": {"logit_adjustment": 1.0, "logit_adjustment_momentum": 0.99},
}


def test_configs_are_found():
    assert CONFIGS / "benchmark.yaml" in ALL_CONFIGS
    assert {p.stem for p in (CONFIGS / "ablation").glob("*.yaml")} == \
        set(ABLATIONS) | set(TRAIN_ABLATIONS)


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.train.iterations > 0


@pytest.mark.parametrize("name", sorted(ABLATIONS) + sorted(TRAIN_ABLATIONS))
def test_each_ablation_changes_only_its_switch(name):
    section, switch = (("method", ABLATIONS[name]) if name in ABLATIONS
                       else ("train", TRAIN_ABLATIONS[name]))
    benchmark = load_config(CONFIGS / "benchmark.yaml").to_dict()
    ablation = load_config(CONFIGS / "ablation" / f"{name}.yaml").to_dict()
    expected = {**benchmark, section: {**benchmark[section], **switch}}
    assert ablation == expected


# published cell → (labeled images, training images the split is drawn from), docs/method.md §7
VOC_CELLS = {
    "classic_92": (92, 10582), "classic_183": (183, 10582), "classic_366": (366, 10582),
    "classic_732": (732, 10582), "classic_1464": (1464, 10582),
    "blended_1_16": (662, 10582), "blended_1_8": (1323, 10582), "blended_1_4": (2646, 10582),
}
CITYSCAPES_CELLS = {"1_16": (186, 2975), "1_8": (372, 2975), "1_4": (744, 2975),
                    "1_2": (1488, 2975)}
# iterations worked out by hand: epochs × floor((total − labeled) / 8)
EXPECTED_ITERATIONS = {
    "classic_92": 80 * 1311, "classic_183": 80 * 1299, "classic_366": 80 * 1277,
    "classic_732": 80 * 1231, "classic_1464": 80 * 1139, "blended_1_16": 80 * 1240,
    "blended_1_8": 80 * 1157, "blended_1_4": 80 * 992,
    "1_16": 240 * 348, "1_8": 240 * 325, "1_4": 240 * 278, "1_2": 240 * 185,
}
GPUS = 4  # the recipes' stated GPU count


def test_configs_exist():
    assert len(ALL_CONFIGS) >= 1 + 2 * len(VOC_CELLS) + 2 * len(CITYSCAPES_CELLS)


def _recipes(dataset, cells):
    return [(cell, backbone, CONFIGS / dataset / f"{cell}_{backbone}.yaml")
            for cell in cells for backbone in ("r50", "r101")]


@pytest.mark.parametrize("cell,backbone,path", _recipes("voc", VOC_CELLS) + _recipes(
    "cityscapes", CITYSCAPES_CELLS), ids=lambda value: str(value))
def test_paper_recipe_follows_the_protocol(cell, backbone, path):
    assert path.is_file(), f"missing recipe {path}"
    cfg = load_config(path)
    d, m, t, e = cfg.data, cfg.model, cfg.train, cfg.eval
    is_voc = path.parent.name == "voc"
    folder = "pascal" if is_voc else "cityscapes"
    split = cell.replace("classic_", "").replace("blended_", "")
    assert d.labeled == f"splits/{folder}/{split}/labeled.txt"
    assert d.unlabeled == f"splits/{folder}/{split}/unlabeled.txt"
    assert d.val == f"splits/{folder}/val.txt"
    assert d.preset == ("voc_blended" if cell.startswith("blended") else "voc" if is_voc
                        else "cityscapes")
    assert d.num_classes == (21 if is_voc else 19)
    assert cfg.method.name == "farcluss"
    assert (t.batch_size * GPUS, (t.unlabeled_batch_size or t.batch_size) * GPUS) == (8, 8)
    assert t.iterations == EXPECTED_ITERATIONS[cell]
    assert (m.backbone, m.deep_stem, m.stem_width) == (
        "resnet50" if backbone == "r50" else "resnet101", True, 128)
    assert m.pretrained == f"pretrained/{m.backbone}.pth"
    assert (t.momentum, t.weight_decay, t.poly_power) == (0.9, 1e-4, 0.9)
    if is_voc:
        assert (d.crop_size, t.lr, t.head_lr_multiplier, t.loss, e.mode) == (
            321, 1e-3, 10.0, "ce", "whole")
    else:
        assert (d.crop_size, t.lr, t.head_lr_multiplier, t.loss, e.mode) == (
            801, 5e-3, 1.0, "ohem", "sliding")
        assert (t.ohem_threshold, t.ohem_min_kept) == (0.7, 200000)
        assert (e.crop_size or d.crop_size, e.stride_ratio) == (801, pytest.approx(2 / 3))


@pytest.mark.parametrize("dataset,cells", [("voc", VOC_CELLS), ("cityscapes", CITYSCAPES_CELLS)])
def test_r50_and_r101_recipes_differ_only_in_the_backbone(dataset, cells):
    for cell in cells:
        r50 = load_config(CONFIGS / dataset / f"{cell}_r50.yaml").to_dict()
        r101 = load_config(CONFIGS / dataset / f"{cell}_r101.yaml").to_dict()
        for section in r50:
            if section != "model":
                assert r50[section] == r101[section], (cell, section)
        changed = {key for key in r50["model"] if r50["model"][key] != r101["model"][key]}
        assert changed == {"backbone", "pretrained"}


# UniMatch V2's DINOv2 protocol: global batch 16 + 16 and 60 epochs on VOC, 8 + 8 and 180 on
# Cityscapes; iterations = epochs × floor((total − labeled) / global unlabeled batch)
V2_VOC = {"classic_92": 60 * 655, "classic_183": 60 * 649, "classic_366": 60 * 638,
          "classic_732": 60 * 615, "classic_1464": 60 * 569}
V2_CITYSCAPES = {"1_16": 180 * 348, "1_8": 180 * 325, "1_4": 180 * 278, "1_2": 180 * 185}


@pytest.mark.parametrize("dataset,cell,method", [
    (dataset, cell, method) for dataset, cells in (("voc", V2_VOC), ("cityscapes", V2_CITYSCAPES))
    for cell in cells for method in ("farcluss", "unimatch")], ids=str)
def test_dinov2_recipes_follow_unimatch_v2(dataset, cell, method):
    from farcluss.config import Skeleton, resolved_arch, resolved_skeleton, resolved_threshold

    suffix = "_unimatch" if method == "unimatch" else ""
    cfg = load_config(CONFIGS / dataset / f"{cell}_vitb14{suffix}.yaml")
    d, m, t, e = cfg.data, cfg.model, cfg.train, cfg.eval
    is_voc = dataset == "voc"
    assert (m.backbone, resolved_arch(cfg), m.freeze_backbone) == ("dinov2_vitb14", "dpt", False)
    assert m.pretrained == "pretrained/dinov2_vitb14_pretrain.pth"
    assert (t.optimizer, t.lr, t.head_lr_multiplier, t.weight_decay, t.betas, t.poly_power) == (
        "adamw", 5e-6, 40.0, 0.01, (0.9, 0.999), 0.9)
    per_gpu = 4 if is_voc else 2
    assert (t.batch_size, t.unlabeled_batch_size) == (per_gpu, per_gpu)
    assert t.iterations == (V2_VOC if is_voc else V2_CITYSCAPES)[cell]
    assert d.crop_size == (518 if is_voc else 798)
    assert (t.loss, e.mode) == (("ce", "whole") if is_voc else ("ohem", "sliding"))
    assert cfg.method.name == method and cfg.method.ema_momentum == 0.996
    if method == "unimatch":
        assert resolved_skeleton(cfg) == Skeleton("ema", 2, "complementary")
        assert (resolved_threshold(cfg), cfg.method.ramp) == (0.95, 0.0)
    # the FARCLUSS and UniMatch cells differ in the method alone
    other = load_config(CONFIGS / dataset / f"{cell}_vitb14{'' if suffix else '_unimatch'}.yaml")
    for section in ("data", "model", "train", "eval", "augment"):
        assert cfg.to_dict()[section] == other.to_dict()[section], section


def test_the_demo_runs_the_benchmark_data_and_methods_from_a_random_init_model():
    benchmark = load_config(CONFIGS / "benchmark.yaml")
    demo = load_config(CONFIGS / "demo.yaml")
    # the same data and method settings; the model's start, its schedule and the label budget
    # differ (the benchmark labels half as many images, so all labels lead by more: method.md)
    assert dataclasses.replace(demo.data, labeled=benchmark.data.labeled,
                               unlabeled=benchmark.data.unlabeled) == benchmark.data
    assert demo.method == benchmark.method
    assert (demo.data.labeled, benchmark.data.labeled) == ("splits/labeled.txt",
                                                           "splits/labeled_half.txt")
    assert benchmark.model.pretrained == "builtin:pretrained"
    assert demo.model.pretrained is None  # nothing to make before the demo's 10 minutes start

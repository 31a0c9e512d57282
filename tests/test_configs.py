"""Every shipped config loads and validates; each ablation changes its named switch only."""

from pathlib import Path

import pytest

from farcluss.config import load_config
from farcluss.data.benchmark import BENCHMARK_CLASSES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))

# the method keys each ablation sets on top of configs/benchmark.yaml
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
    "fixmatch_equivalent": {"top_k": 1, "weighting": "none", "rebalance": "off",
                            "contrastive": "off", "threshold": 0.95},
}


def test_configs_are_found():
    assert CONFIGS / "benchmark.yaml" in ALL_CONFIGS
    assert {p.stem for p in (CONFIGS / "ablation").glob("*.yaml")} == set(ABLATIONS)


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.train.iterations > 0


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_each_ablation_changes_only_its_switch(name):
    benchmark = load_config(CONFIGS / "benchmark.yaml").to_dict()
    ablation = load_config(CONFIGS / "ablation" / f"{name}.yaml").to_dict()
    expected = {**benchmark, "method": {**benchmark["method"], **ABLATIONS[name]}}
    assert ablation == expected

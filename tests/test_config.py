import dataclasses

import pytest

from farcluss.config import (Bounds, Config, TrainConfig, all_keys, describe_schema, field_bounds,
                             load_config, parse_override, resolved_threshold)
from farcluss.errors import ConfigError


def test_defaults_follow_the_method_spec():
    cfg = Config()
    assert cfg.method.top_k == 3 and cfg.method.weighting == "entropy"
    assert cfg.method.rebalance == "batch" and cfg.method.contrastive == "prototype"
    assert cfg.method.lambda_c == pytest.approx(0.1) and cfg.method.ema_momentum == pytest.approx(0.999)
    assert cfg.augment.hue == pytest.approx(0.25) and cfg.augment.cutmix_prob == pytest.approx(0.5)


def test_overrides_are_parsed_as_yaml_and_typed():
    cfg = load_config(overrides=["train.lr=0.02", "data.classes=[bg, cat, dog]", "train.amp=bf16",
                                 "data.scale_range=[1, 1]", "model.deep_stem=true"])
    assert cfg.train.lr == pytest.approx(0.02)
    assert cfg.data.classes == ["bg", "cat", "dog"]
    assert cfg.train.amp == "bf16"
    assert cfg.data.scale_range == (1.0, 1.0)
    assert cfg.model.deep_stem is True


@pytest.mark.parametrize("override, named", [
    ("train.lrr=0.1", "did you mean 'train.lr'"),
    ("trian.lr=0.1", "unknown config key 'trian.lr'"),
    ("train.lr=fast", "'train.lr' must be float"),
    ("train.iterations=1.5", "'train.iterations' must be int"),
    ("train.iterations=0", "'train.iterations' must be positive"),
    ("train.batch_size=-2", "'train.batch_size' must be positive"),
    ("method.weighting=softmax", "'method.weighting' must be"),
    ("model.output_stride=32", "'model.output_stride' must be 8 | 16"),
    ("model.deep_stem=yes please", "'model.deep_stem' must be bool"),
    ("method.contrastive_weight_threshold=-1", "'method.contrastive_weight_threshold' must be in"),
    ("method.unsup_normalize=mean", "'method.unsup_normalize' must be"),
])
def test_bad_keys_and_values_name_the_key(override, named):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    message = str(info.value)
    assert named in message and "\n" not in message


def test_top_k_larger_than_class_count_is_rejected_at_load():
    with pytest.raises(ConfigError, match="method.top_k"):
        load_config(overrides=["data.classes=[a, b]", "method.top_k=3"])
    assert load_config(overrides=["data.classes=[a, b]", "method.top_k=2"]).method.top_k == 2


def test_yaml_file_with_base_and_unknown_section(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  lr: 0.05\n  iterations: 10\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\ntrain:\n  iterations: 20\n")
    cfg = load_config(child)
    assert cfg.train.lr == pytest.approx(0.05) and cfg.train.iterations == 20
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'trainer.lr'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_threshold_default_depends_on_method():
    assert resolved_threshold(load_config(overrides=["method.name=fixmatch"])) == pytest.approx(0.95)
    assert resolved_threshold(load_config(overrides=["method.name=farcluss"])) == 0.0
    assert resolved_threshold(load_config(overrides=["method.threshold=0.7"])) == pytest.approx(0.7)


def test_round_trip_and_schema_reference():
    cfg = load_config(overrides=["train.lr=0.3"])
    again = load_config(base=cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    table = describe_schema()
    for key in all_keys():
        assert f"`{key}`" in table


def test_parse_override_requires_equals():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")


def test_configuration_reference_is_up_to_date():
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert describe_schema() in doc.read_text(), "run: python -m farcluss.config docs/configuration.md"


def test_declared_ranges_drive_validation_and_docs():
    bounds = field_bounds(TrainConfig)
    assert bounds["lr"] == Bounds(low=0, low_open=True)
    assert bounds["momentum"].describe() == "in [0, 1)"
    assert bounds["momentum"].admits(0.0) and not bounds["momentum"].admits(1.0)
    pair = Bounds(low=0, high=1, low_open=True, high_open=True, ordered=True)
    assert pair.admits([0.1, 0.2]) and not pair.admits([0.2, 0.1]) and not pair.admits([0.0, 0.5])
    assert "| `train.momentum` |" in describe_schema()
    assert "(must be in [0, 1))" in describe_schema()
    for override, message in (("train.momentum=1.0", "'train.momentum' must be in [0, 1)"),
                              ("data.std=[0.2, 0, 0.2]", "'data.std' must be positive"),
                              ("train.lr=0", "'train.lr' must be positive")):
        with pytest.raises(ConfigError) as caught:
            load_config(None, [override])
        assert message in str(caught.value)


def test_a_loaded_config_is_frozen():
    cfg = load_config(None, [])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0

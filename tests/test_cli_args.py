"""The argparse pieces every command shares mean the same thing everywhere."""

import argparse

import pytest

from farcluss.cli_args import (
    add_checkpoint_args,
    add_config_args,
    add_overrides_arg,
    count_or_ratio,
    non_negative_int,
    positive_int,
)


def test_whole_number_types():
    assert positive_int("3") == 3 and non_negative_int("0") == 0
    for parse, text, message in ((positive_int, "0", "must be at least 1"),
                                 (non_negative_int, "-1", "must be at least 0"),
                                 (positive_int, "2.5", "expected a whole number")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)


def test_count_or_ratio():
    assert count_or_ratio("92") == 92 and isinstance(count_or_ratio("92"), int)
    assert count_or_ratio("0.25") == 0.25
    for text, message in (("1.5", "whole number"), ("0", "positive count"), ("x", "count or a ratio")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            count_or_ratio(text)


def test_config_and_repeatable_overrides():
    parser = argparse.ArgumentParser()
    add_config_args(parser, config_required=False)
    args = parser.parse_args(["--set", "train.lr=0.1", "--set", "seed=1"])
    assert args.config is None and args.overrides == ["train.lr=0.1", "seed=1"]
    sub = argparse.ArgumentParser()
    add_overrides_arg(sub, "for every run")
    assert sub.parse_args([]).overrides == []
    assert "for every run" in " ".join(sub.format_help().split())


def test_checkpoint_and_model(capsys):
    parser = argparse.ArgumentParser()
    add_checkpoint_args(parser)
    args = parser.parse_args(["--checkpoint", "last.pt"])
    assert (args.checkpoint, args.model) == ("last.pt", "teacher")
    with pytest.raises(SystemExit):
        parser.parse_args(["--checkpoint", "last.pt", "--model", "ema"])
    assert "invalid choice: 'ema'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args([])

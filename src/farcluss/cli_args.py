"""argparse building blocks shared by every command (`farcluss train`, `eval`, `demo`, `bench`, …).

A command module (``demo.py``, ``predict.py``, …) registers its sub-command with these, so an
argument means the same thing and fails with the same message in every command. The module
imports nothing of farcluss: ``cli.py`` imports the command modules, and they import this.
"""

from __future__ import annotations

import argparse


def _int_at_least(minimum: int, name: str):
    """An argparse type: a whole number >= `minimum`, with a message naming the input."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: expected a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text}: must be at least {minimum}")
        return value

    parse.__name__ = name
    parse.__doc__ = f"argparse type: a whole number >= {minimum}."
    return parse


positive_int = _int_at_least(1, "positive_int")
non_negative_int = _int_at_least(0, "non_negative_int")


def count_or_ratio(text: str):
    """argparse type: a count (a whole number >= 1) or a ratio in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: expected a count or a ratio") from None
    if value >= 1:
        if value != int(value):
            raise argparse.ArgumentTypeError(f"{text}: a count must be a whole number")
        return int(value)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive count or a ratio in (0, 1)")
    return value


def add_overrides_arg(parser: argparse.ArgumentParser, applies_to: str = "") -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``, the list `load_config` takes;
    `applies_to` ends the help text, e.g. "for every run"."""
    suffix = f" {applies_to}" if applies_to else ""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config key, e.g. --set train.lr=0.01{suffix} (repeatable)")


def add_config_args(parser: argparse.ArgumentParser, config_required: bool = True) -> None:
    """The positional YAML ``config`` (optional when `config_required` is False) and ``--set``."""
    if config_required:
        parser.add_argument("config", help="YAML config file")
    else:
        parser.add_argument("config", nargs="?", default=None, help="YAML config file (optional)")
    add_overrides_arg(parser)


#: the models of a run checkpoint
CHECKPOINT_MODELS = ("teacher", "student")


def add_checkpoint_args(parser: argparse.ArgumentParser, model_default: str = "teacher",
                        model_help: str = "default teacher; a supervised run has only the student") -> None:
    """``--checkpoint`` (required) and ``--model teacher|student`` (into ``args.model``)."""
    parser.add_argument("--checkpoint", required=True, help="a run checkpoint (best.pt, last.pt)")
    parser.add_argument("--model", choices=list(CHECKPOINT_MODELS), default=model_default,
                        help=f"which model of the checkpoint ({model_help})")

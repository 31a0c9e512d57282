"""`farcluss` command line. User errors print one line and exit 2; `--debug` shows the traceback."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional

from farcluss import __version__, bench, demo, export, predict, pretrain
from farcluss.cli_args import add_checkpoint_args, add_config_args, count_or_ratio, positive_int
from farcluss.config import load_config
from farcluss.data.benchmark import make_benchmark
from farcluss.data.build import EVAL_SPLITS, build_data
from farcluss.data.check import check_samples
from farcluss.data.digits import make_digits
from farcluss.data.cityscapes import convert_cityscapes
from farcluss.data.splits import make_splits
from farcluss.engine.distributed import cleanup, env_from_environment, init_distributed
from farcluss.engine.signals import (RunStopped, exit_status, print_stop, resume_command,
                                     stop_message)
from farcluss.engine.device import resolve_device
from farcluss.engine.trainer import Trainer
from farcluss.errors import FarclussError
from farcluss.inference import evaluate_checkpoint
from farcluss.log import get_logger, setup_logging
from farcluss.report import make_report

EXIT_USER_ERROR = 2

logger = get_logger(__name__)


def _load(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


def _default_out(cfg, config_path: Optional[str]) -> Path:
    stem = Path(config_path).stem if config_path else "run"
    return Path("runs") / f"{stem}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"


# ---- train / eval ---------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    env = env_from_environment()
    out = Path(args.out) if args.out else _default_out(cfg, args.config)
    init_distributed(env, resolve_device(cfg.train.device, env), timeout_s=cfg.train.dist_timeout)
    try:
        trainer = Trainer(cfg, out, env=env, resume=True if args.resume else (False if args.no_resume else None))
        summary = trainer.fit()
    finally:
        cleanup()
    if summary.get("stopped_by") is not None:

        if env.is_main:
            print_stop(stop_message(summary["iteration"], trainer.cfg.train.iterations,
                                    summary["stopped_by"],
                                    summary["checkpoint"],
                                    resume_command(args.config, args.overrides, out, env.distributed)))
        return exit_status(summary["stopped_by"])
    if env.is_main:
        final = summary["final"]
        for name, metrics in final.items():
            print(f"{name}: mIoU {metrics['miou']:.2f}  pixel accuracy {metrics['pixel_accuracy']:.2f}")
        for name, metrics in summary.get("final_test", {}).items():
            print(f"{name} (test): mIoU {metrics['miou']:.2f}  pixel accuracy "
                  f"{metrics['pixel_accuracy']:.2f}")
        print(f"best mIoU {summary['best_miou']:.2f} at iteration {summary['best_iteration']}; run folder {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = _load(args)
    metrics = evaluate_checkpoint(cfg, args.checkpoint, model_name=args.model, progress=not args.json,
                                  split=args.split)
    if args.json:
        print(json.dumps({"split": args.split, "miou": metrics["miou"], "per_class_iou": metrics["per_class_iou"],
                          "pixel_accuracy": metrics["pixel_accuracy"],
                          "class_names": metrics.get("class_names"),
                          "confused_with": metrics.get("confused_with")}))
        return 0
    print(f"{args.split}: mIoU {metrics['miou']:.2f}   pixel accuracy {metrics['pixel_accuracy']:.2f}")
    names = metrics.get("class_names") or [str(i) for i in range(len(metrics["per_class_iou"]))]
    width = max(len(n) for n in names)
    confused = metrics.get("confused_with") or [None] * len(names)
    for name, iou, mistake in zip(names, metrics["per_class_iou"], confused):
        # where the class's wrong pixels go: a rare class absorbed by a frequent look-alike
        where = "" if mistake is None else f"   {mistake[1]:4.1f} % of its pixels predicted as {mistake[0]}"
        print(f"  {name:<{width}}  {'  n/a' if iou is None else f'{iou:6.2f}'}{where}")
    return 0


# ---- data tools ------------------------------------------------------------------------------------
def cmd_splits(args: argparse.Namespace) -> int:
    written = make_splits(args.out, source_list=args.list, folder=args.folder, root=args.root,
                          labeled=args.labeled, seed=args.seed, val=args.val, test=args.test)
    for name, path in written.items():
        n = sum(1 for line in Path(path).read_text().splitlines() if line.strip())
        print(f"{name}: {n} samples → {path}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args)
    data = build_data(cfg)
    n_classes = len(data.classes)
    problems: List[str] = []
    lists = [("labeled", data.labeled, True), ("unlabeled", data.unlabeled, False),
             ("val", data.val, True)]
    if cfg.data.test:
        lists.append(("test", data.test, True))
    for name, samples, require_mask in lists:
        found = check_samples(samples, n_classes, cfg.data.ignore_index, require_mask=require_mask)
        print(f"{name}: {len(samples)} samples, {len(found)} problem(s)")
        problems.extend(found)
    for line in problems:
        print(f"  {line}")
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return EXIT_USER_ERROR
    print("no problems found")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "make-benchmark":
        kwargs = {}
        if args.num_train is not None:
            kwargs["num_train"] = args.num_train
        if args.num_val is not None:
            kwargs["num_val"] = args.num_val
        if args.num_test is not None:
            kwargs["num_test"] = args.num_test
        path = make_benchmark(args.out, seed=args.seed, **kwargs)
        print(f"benchmark dataset ready in {path}")
        return 0
    if args.data_command == "make-digits":
        kwargs = {name: getattr(args, name) for name in ("num_train", "num_val", "num_test")
                  if getattr(args, name) is not None}
        path = make_digits(args.out, seed=args.seed, **kwargs)
        print(f"digits dataset ready in {path}")
        return 0
    if args.data_command == "cityscapes":
        n = convert_cityscapes(args.root)
        print(f"wrote {n} *_labelTrainIds.png files under {args.root}")
        return 0
    raise FarclussError("farcluss data needs a subcommand: make-benchmark, make-digits or cityscapes")


def cmd_report(args: argparse.Namespace) -> int:
    page = make_report(args.run_dir, args.out, num_images=args.num_images)
    print(f"report written to {page}")
    return 0


# ---- parser ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farcluss", description=__doc__)
    parser.add_argument("--version", action="version", version=f"farcluss {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (one process, or one per rank under torchrun)")
    add_config_args(p, config_required=False)
    p.add_argument("--out", help="run folder (default runs/<config>-<method>-<time>)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="resume from OUT/checkpoints/last.pt, which must exist (by default a "
                             "run resumes when it exists)")
    resume.add_argument("--no-resume", action="store_true",
                        help="start afresh even if last.pt exists")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the validation (or test) list")
    add_config_args(p, config_required=False)
    add_checkpoint_args(p, model_default=None, model_help="default eval.model")
    p.add_argument("--split", choices=EVAL_SPLITS, default="val",
                   help="val (data.val, default) or test (data.test, the held-back list)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("splits", help="write labeled/unlabeled(/val) split lists")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--list", help="a split list to divide (paths relative to --root)")
    src.add_argument("--folder", help="a folder with images/ and masks/")
    p.add_argument("--root", help="dataset root the paths are relative to (default: the folder)")
    p.add_argument("--labeled", type=count_or_ratio, required=True, help="count (≥1) or ratio (<1)")
    p.add_argument("--val", type=count_or_ratio, default=None, help="count or ratio held out for val")
    p.add_argument("--test", type=count_or_ratio, default=None,
                   help="count or ratio held back for test (data.test; drawn after val)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for labeled.txt, unlabeled.txt, val.txt, test.txt")
    p.set_defaults(func=cmd_splits)

    p = sub.add_parser("check", help="scan every image and mask of a config's splits")
    add_config_args(p, config_required=False)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", metavar="TOOL")
    q = data_sub.add_parser("make-benchmark", help="write the built-in long-tailed benchmark")
    q.add_argument("out")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--num-train", type=int, default=None, help="train images (default 2000)")
    q.add_argument("--num-val", type=int, default=None, help="validation images (default 300)")
    q.add_argument("--num-test", type=int, default=None,
                   help="held-back test images, numbered after the val images (default 500)")
    q = data_sub.add_parser("make-digits", help="write the built-in long-tailed digits dataset "
                                                 "(needs pip install farcluss[data])")
    q.add_argument("out")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--num-train", type=int, default=None)
    q.add_argument("--num-val", type=int, default=None)
    q.add_argument("--num-test", type=int, default=None)
    q = data_sub.add_parser("cityscapes", help="convert *_labelIds.png to *_labelTrainIds.png")
    q.add_argument("root", help="Cityscapes root (holding gtFine/)")
    p.set_defaults(func=cmd_data)

    for module in (demo, bench, predict, export, pretrain):
        module.register_command(sub)

    p = sub.add_parser("report", help="plots and an HTML page of a run folder")
    p.add_argument("run_dir", help="run folder (holding metrics.jsonl, config.yaml, checkpoints/)")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/report)")
    p.add_argument("--num-images", type=positive_int, default=6,
                   help="validation images in the prediction grid")
    p.set_defaults(func=cmd_report)
    return parser


def error_line(error: BaseException) -> str:
    """A user error as one line.

    An error raised in a DataLoader worker comes back as the same type carrying the worker's
    whole traceback as its message; the original message is that traceback's last line.
    """
    text = str(error).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        qualified = f"{type(error).__module__}.{type(error).__qualname__}: "
        text = last[len(qualified):] if last.startswith(qualified) else last.split(": ", 1)[-1]
    if isinstance(error, OSError) and error.strerror:
        text = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return " ".join(text.split()) or type(error).__name__


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` of the CLI: a deprecation (or a library's warning) as one line."""
    logger.warning("%s", message)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    setup_logging(debug=args.debug)
    with warnings.catch_warnings():
        if not args.debug:
            warnings.showwarning = _log_warning
        try:
            return int(args.func(args) or 0)
        # an unreadable or unwritable path is the user's environment, not a bug: one line too
        except (FarclussError, OSError) as exc:
            if args.debug:
                raise
            logger.error("%s", error_line(exc))
            return EXIT_USER_ERROR
        except RunStopped as exc:
            print_stop(str(exc))
            return exit_status(exc.signum)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    raise SystemExit(main())

"""`farcluss demo`: supervised vs UniMatch vs FARCLUSS on the built-in benchmark, in minutes.

The methods (`DEMO_METHODS`; FixMatch joins when the budget affords the config's full schedule
with it as well, see `OPTIONAL_METHODS`; ``--methods`` names them instead) share the model, the data, the seed and — for fairness — one iteration count.
That count is chosen to fit the time budget (``--minutes``, 10 by default) on the machine at
hand: each method first trains a few calibration iterations, which give its seconds per step,
the time to build its trainer and the time of one evaluation for the curve (with a checkpoint),
from which the cost of its final evaluation on all validation images is extrapolated; then

    N = ⌊(0.9 · seconds left − Σ_m [build_m + (E + 1) · eval_m + final_m]) / Σ_m step_m⌋

where E is the number of evaluations during training. N is rounded down to a multiple of 10
from 100 on and capped at the config's own ``train.iterations`` (a machine fast enough runs the
benchmark config's full schedule). ``--iterations`` fixes N instead. The choice and its inputs
are recorded in ``summary.json``.

Evaluations during training (the mIoU-over-iterations curve) use the first `CURVE_IMAGES`
validation images to keep the budget for training; the final numbers evaluate the last model
(the teacher; the student for supervised) on the whole validation list.

The report folder (``--out``) holds per-class IoU bars of the methods, their mIoU over
iterations, a grid of validation images with ground truth and each method's prediction,
``summary.json`` and ``index.html``; the runs themselves are under ``runs/``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from farcluss.bench import (
    check_fresh_run_dir,
    judged_metrics,
    mean_iou_over,
    rare_classes_of,
    train_run,
)
from farcluss.cli_args import add_overrides_arg, positive_int
from farcluss.config import Config, derive_config, load_config
from farcluss.data.build import build_data, dataset_root
from farcluss.engine.signals import raise_if_stopped
from farcluss.engine.trainer import Trainer
from farcluss.errors import ConfigError, FarclussError
from farcluss.inference import evaluate_checkpoint, predict_validation_examples
from farcluss.report import (
    html_table,
    median_seconds_per_iteration,
    miou_curve,
    plot_class_iou_bars,
    plot_miou_curves,
    read_metrics,
    save_validation_predictions,
    write_html_page,
)

#: what the demo compares: the floor, the strongest published skeleton, and FARCLUSS
DEMO_METHODS = ("supervised", "unimatch", "farcluss")
#: added (in this order, before farcluss) when the calibrated budget still runs the config's full
#: schedule with them: FixMatch is the skeleton FARCLUSS rides on by default, but a shorter
#: schedule for every method is a worse trade than leaving it out
OPTIONAL_METHODS = ("fixmatch",)
#: what ``--methods`` may name (supervised_full needs bench accuracy's full label list)
METHOD_TITLES = {"supervised": "supervised", "fixmatch": "FixMatch", "unimatch": "UniMatch",
                 "farcluss": "FARCLUSS"}
DEFAULT_MINUTES = 10.0
#: calibration steps per method; the first is dropped (DataLoader workers start, allocator warm-up)
CALIBRATION_ITERATIONS = 5
#: evaluations during training, for the mIoU-over-iterations curve
EVAL_POINTS = 5
#: below this a comparison means nothing, but the demo still runs end to end
MIN_ITERATIONS = 2
#: a calibrated schedule shorter than this share of the config's own is flagged: the table then
#: compares the methods early in training, where the margins are not those of the benchmark
#: (docs/method.md measures the config's full schedule)
SHORT_SCHEDULE_FRACTION = 0.75
#: share of the remaining time planned for training: step times drift on a shared machine
BUDGET_SAFETY = 0.9
#: time kept for the prediction grid, plots and page after training
REPORT_RESERVE_SECONDS = 20.0
#: validation images behind the mIoU-over-iterations curve
CURVE_IMAGES = 60


def default_demo_config() -> Path:
    """``configs/demo.yaml``, shipped inside the package (``configs/`` links to it): the
    benchmark with a random-init model, which needs nothing made beforehand (the benchmark's
    own config starts from ``builtin:pretrained``, minutes to make once)."""
    path = Path(__file__).resolve().parent / "configs" / "demo.yaml"
    if not path.is_file():
        raise ConfigError(f"the demo config {path} was not found; pass --config PATH")
    return path


@dataclass
class Calibration:
    method: str
    seconds_per_iteration: float
    #: building the trainer (data lists, model, teacher) once per run
    build_seconds: float
    #: one evaluation on the curve images plus a checkpoint
    eval_seconds: float
    #: evaluating the judged model on the whole validation list (extrapolated)
    final_eval_seconds: float


def curve_settings(cfg: Config, num_val: int) -> Dict[str, Any]:
    """Evaluations during training look at the first `CURVE_IMAGES` validation images."""
    full = min(cfg.eval.max_images or num_val, num_val)
    return {"eval.max_images": CURVE_IMAGES if CURVE_IMAGES < full else cfg.eval.max_images}


def final_metrics(cfg: Config, run_dir: Path, model_name: str) -> dict:
    """Metrics of the run's last `model_name` on the validation list of `cfg`."""

    return evaluate_checkpoint(cfg, str(run_dir / "checkpoints" / "last.pt"), model_name, progress=False)


def calibrate(cfg: Config, method: str, num_val: int, work_dir: Path) -> Calibration:
    """Time a few training iterations of `method` (its run folder is deleted afterwards).

    The final evaluation is not run but extrapolated from the calibration's one evaluation:
    evaluation time grows with the number of images and the number of models evaluated.
    """

    curve = curve_settings(cfg, num_val)
    changes = {"method.name": method, "train.iterations": CALIBRATION_ITERATIONS, "train.log_interval": 1,
               "train.eval_interval": CALIBRATION_ITERATIONS,
               "train.checkpoint_interval": CALIBRATION_ITERATIONS, "train.progress": False,
               # time the full step: a warm-up would skip the teacher and the unlabeled batch
               "method.warmup_iterations": 0, **curve}
    run_dir = work_dir / method
    check_fresh_run_dir(run_dir)
    start = time.perf_counter()
    trainer = Trainer(derive_config(cfg, changes), run_dir, resume=False, diagnose=False)
    built = time.perf_counter()
    summary = trainer.fit()
    raise_if_stopped(summary, run_dir)
    fitted = time.perf_counter()
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("type") == "train"]
    shutil.rmtree(run_dir)
    # what fit() spent outside the logged steps: loader start-up, the evaluation, the checkpoint
    eval_seconds = max(0.0, fitted - built - sum(float(r["seconds_per_iteration"]) for r in records))
    curve_images = curve["eval.max_images"] or num_val
    final_images = min(cfg.eval.max_images or num_val, num_val)
    final_eval = eval_seconds * final_images / curve_images / len(summary["final"])
    return Calibration(method, median_seconds_per_iteration(records), built - start, eval_seconds, final_eval)


def plan_iterations(calibrations: Sequence[Calibration], seconds_left: float, cap: int,
                    eval_points: int = EVAL_POINTS) -> int:
    """The one iteration count for every method that fits `seconds_left` (see the module doc)."""
    fixed = sum(c.build_seconds + (eval_points + 1) * c.eval_seconds + c.final_eval_seconds
                for c in calibrations)
    per_iteration = sum(c.seconds_per_iteration for c in calibrations)
    affordable = (BUDGET_SAFETY * seconds_left - fixed) / max(per_iteration, 1e-9)
    iterations = int(math.floor(affordable)) if math.isfinite(affordable) else cap
    if iterations >= 100:
        iterations -= iterations % 10
    return max(MIN_ITERATIONS, min(cap, iterations))


def short_schedule_warning(iterations: int, config_iterations: int) -> Optional[str]:
    """The warning printed (and kept in summary.json) when the budget affords only a short schedule."""
    if iterations >= SHORT_SCHEDULE_FRACTION * config_iterations:
        return None
    return (f"the budget affords {iterations} of the config's {config_iterations} iterations, so the "
            f"methods are compared early in training (more --minutes, or a machine with nothing "
            f"else running, trains longer)")


def shared_settings(cfg: Config, iterations: int, seed: int) -> Dict[str, Any]:
    """Schedule keys that follow the iteration count, the same for every method."""
    changes: Dict[str, Any] = {
        "train.iterations": iterations,
        "train.seed": seed,
        "train.eval_interval": max(1, iterations // EVAL_POINTS),
        "train.checkpoint_interval": iterations,
        "train.log_interval": max(1, min(cfg.train.log_interval, iterations // 10)),
    }
    if cfg.method.warmup_iterations > 0 and iterations < cfg.train.iterations:
        # a shortened schedule keeps the warm-up's share of it
        changes["method.warmup_iterations"] = round(cfg.method.warmup_iterations * iterations
                                                    / cfg.train.iterations)
    return changes


def with_optional_methods(methods: Sequence[str], calibrations: Dict[str, Calibration],
                          seconds_left: float, cap: int) -> List[str]:
    """`methods` plus each optional method whose cost still leaves the full schedule (`cap`)."""
    chosen = list(methods)
    for optional in OPTIONAL_METHODS:
        if optional in chosen or optional not in calibrations:
            continue
        trial = chosen[:-1] + [optional] + chosen[-1:]
        if plan_iterations([calibrations[m] for m in trial], seconds_left, cap) >= cap:
            chosen = trial
    return chosen


def run_demo(out_dir, minutes: float = DEFAULT_MINUTES, seed: int = 0, data_dir=None, config_path=None,
             overrides: Sequence[str] = (), iterations: Optional[int] = None, num_images: int = 6,
             methods: Optional[Sequence[str]] = None) -> dict:
    """Train the methods and write the report folder; returns the summary document.

    `methods` None: `DEMO_METHODS`, plus `OPTIONAL_METHODS` the budget affords (calibrated runs).
    """

    start = time.perf_counter()
    if minutes <= 0:
        raise ConfigError(f"--minutes must be positive, got {minutes}")
    if iterations is not None and iterations < 1:
        raise ConfigError(f"--iterations must be positive, got {iterations}")
    if methods is not None:
        unknown = [m for m in methods if m not in METHOD_TITLES]
        if unknown or not methods:
            raise ConfigError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; "
                              f"choose from {', '.join(METHOD_TITLES)}")
    out = Path(out_dir)
    if (out / "runs").exists():
        raise FarclussError(f"{out} already holds a demo; choose another --out")
    config_path = Path(config_path) if config_path is not None else default_demo_config()
    base = load_config(config_path, list(overrides))
    if data_dir is not None:
        base = derive_config(base, {"data.root": str(Path(data_dir).expanduser().resolve())})
    root = dataset_root(base)  # makes the built-in benchmark on first use
    out.mkdir(parents=True, exist_ok=True)
    rare_indices, rare_names, pixel_counts = rare_classes_of(base)
    num_val = len(build_data(base, need_train=False).val)
    curve = curve_settings(base, num_val)

    choice: Dict[str, Any] = {"minutes": minutes, "config_iterations": base.train.iterations}
    if iterations is None:
        print(f"calibrating: {CALIBRATION_ITERATIONS} iterations of each method")
        seeded = derive_config(base, {"train.seed": seed})
        candidates = list(methods) if methods is not None else [*DEMO_METHODS, *OPTIONAL_METHODS]
        calibrations = {method: calibrate(seeded, method, num_val, out / "calibration")
                        for method in candidates}
        shutil.rmtree(out / "calibration", ignore_errors=True)
        seconds_left = minutes * 60 - (time.perf_counter() - start) - REPORT_RESERVE_SECONDS
        if methods is None:
            methods = with_optional_methods(DEMO_METHODS, calibrations, seconds_left,
                                            cap=base.train.iterations)
        iterations = plan_iterations([calibrations[m] for m in methods], seconds_left,
                                     cap=base.train.iterations)
        choice.update(source="calibrated", seconds_left_for_training=round(seconds_left, 1),
                      calibration=[asdict(c) for c in calibrations.values()])
        if iterations == MIN_ITERATIONS:
            print(f"warning: {minutes} minute(s) leave no room for training; running the minimum "
                  f"{MIN_ITERATIONS} iterations per method (the comparison means nothing)")
        else:
            warning = short_schedule_warning(iterations, base.train.iterations)
            if warning:
                print(f"warning: {warning}")
                choice["warning"] = warning
    else:
        choice["source"] = "--iterations"
        methods = list(methods) if methods is not None else list(DEMO_METHODS)
    choice["iterations"] = iterations
    shared = shared_settings(base, iterations, seed)
    print(f"training {', '.join(methods)} for {iterations} iterations each (seed {seed})")

    runs = []
    for method in methods:
        cfg = derive_config(base, {**shared, "method.name": method})
        run_dir = out / "runs" / method
        summary, seconds = train_run(derive_config(cfg, curve), run_dir)
        model_name = judged_metrics(summary["final"])[0]
        metrics = final_metrics(cfg, run_dir, model_name)
        records = read_metrics(run_dir / "metrics.jsonl")
        runs.append({
            "method": method,
            "model": model_name,
            "miou": metrics["miou"],
            "rare_miou": mean_iou_over(metrics["per_class_iou"], rare_indices),
            "per_class_iou": dict(zip(metrics["class_names"], metrics["per_class_iou"])),
            "seconds_per_iteration": median_seconds_per_iteration(records),
            "train_seconds": round(seconds, 1),
            "run_dir": str(run_dir),
        })
        print(f"{method}: mIoU {_num(metrics['miou'])} ({seconds:.0f} s)")

    class_names = list(metrics["class_names"])  # the same for every run: one dataset
    document = {
        "iterations": iterations,
        "seed": seed,
        "iteration_choice": choice,
        "dataset": str(root),
        "class_names": class_names,
        "rare_classes": rare_names,
        "labeled_pixel_counts": dict(zip(class_names, map(int, pixel_counts))),
        "methods": runs,
        "shared_settings": shared,
        "curve_settings": curve,
        "config": str(config_path),
        "overrides": list(overrides),
    }
    _write_report(out, base, document, rare_indices, num_images)
    document["total_seconds"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return document


def _write_report(out: Path, cfg: Config, document: dict, rare_indices: List[int], num_images: int) -> None:
    runs = document["methods"]
    class_names = document["class_names"]
    plot_class_iou_bars({r["method"]: [r["per_class_iou"][n] for n in class_names] for r in runs},
                        class_names, out / "per_class_iou.png",
                        title="per-class IoU (rare classes in bold)", highlight=rare_indices)
    curves = {}
    for run in runs:
        records = read_metrics(Path(run["run_dir"]) / "metrics.jsonl")
        curves[f"{run['method']} ({run['model']})"] = miou_curve(records, run["model"])
    limit = document["curve_settings"]["eval.max_images"]
    plot_miou_curves(curves, out / "miou.png",
                     title="validation mIoU" + (f" (first {limit} images)" if limit else ""))

    models = {run["method"]: (Path(run["run_dir"]) / "checkpoints" / "last.pt", run["model"]) for run in runs}
    save_validation_predictions(predict_validation_examples(cfg, models, num_images), out / "predictions.png",
                                cfg.data.ignore_index)

    table = html_table(["method", "model", "mIoU", "rare mIoU", "s / iteration"],
                       [[r["method"], r["model"], r["miou"], r["rare_miou"], r["seconds_per_iteration"]]
                        for r in runs])
    setup = (f"<p>{document['iterations']} iterations per method ({document['iteration_choice']['source']}), "
             f"seed {document['seed']}, dataset {document['dataset']}. Rare classes (fewest labeled "
             f"pixels): {', '.join(document['rare_classes'])}.</p>")
    title = " vs ".join(METHOD_TITLES.get(r["method"], r["method"]) for r in runs)
    write_html_page(out / "index.html", f"farcluss demo: {title}", [
        ("Results", setup + table),
        ("Per-class IoU", "per_class_iou.png"),
        ("Validation mIoU over iterations", "miou.png"),
        ("Validation predictions (final models)", "predictions.png"),
    ])


def _num(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_demo_table(document: dict) -> str:
    lines = [f"{document['iterations']} iterations per method, seed {document['seed']}; "
             "mIoU of the teacher (student for supervised); "
             f"rare classes: {', '.join(document['rare_classes'])}",
             f"{'method':<12} {'mIoU':>7} {'rare mIoU':>10} {'s/iter':>8}"]
    for run in document["methods"]:
        spi = run["seconds_per_iteration"]
        lines.append(f"{run['method']:<12} {_num(run['miou']):>7} {_num(run['rare_miou']):>10} "
                     f"{'n/a' if spi is None else f'{spi:.3f}':>8}")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    document = run_demo(out, minutes=args.minutes, seed=args.seed, data_dir=args.data,
                        config_path=args.config, overrides=args.overrides, iterations=args.iterations,
                        num_images=args.num_images,
                        methods=_method_list(args.methods) if args.methods else None)
    print(format_demo_table(document))
    print(f"report: {out / 'index.html'} ({document['total_seconds']:.0f} s in all)")
    return 0


def _method_list(text: str) -> List[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def register_command(subparsers) -> None:
    p = subparsers.add_parser("demo", help="supervised vs unimatch vs farcluss on the built-in benchmark")
    p.add_argument("--out", default=None, help="report folder (default runs/demo-<time>)")
    p.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                   help=f"time budget of the whole demo (default {DEFAULT_MINUTES:g})")
    p.add_argument("--seed", type=int, default=0, help="training seed shared by the methods")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated methods (default {','.join(DEMO_METHODS)}, plus "
                        f"{','.join(OPTIONAL_METHODS)} when the budget runs the full schedule with it)")
    p.add_argument("--iterations", type=positive_int, default=None,
                   help="iterations per method (default: as many as fit --minutes)")
    p.add_argument("--data", default=None,
                   help="dataset folder (default: the built-in benchmark, made if absent)")
    p.add_argument("--config", default=None, help="config (default configs/demo.yaml)")
    p.add_argument("--num-images", type=positive_int, default=6,
                   help="validation images in the prediction grid")
    add_overrides_arg(p, "for every method")
    p.set_defaults(func=cmd_demo)

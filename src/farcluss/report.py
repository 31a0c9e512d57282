"""Reports of training runs: PNG plots, a prediction grid and an HTML page.

`farcluss report RUN_DIR` reads what a run folder holds (``metrics.jsonl``, ``config.yaml``,
``checkpoints/best.pt``) and writes into ``RUN_DIR/report`` (or ``--out``)::

    losses.png          every loss term over iterations
    miou.png            validation mIoU over iterations, teacher vs student
    per_class_iou.png   per-class IoU of the main model at the last and at the best evaluation
    predictions.png     validation images, ground truth and predictions
    index.html          a page showing them, with the final metrics

The module draws and writes pages, nothing else: the predictions it shows come from
`farcluss.inference`, the command line is in `farcluss.cli`, TensorBoard scalars in
`farcluss.engine.tensorboard`. The plotting helpers take plain Python data so that
`farcluss demo` and `farcluss bench accuracy` reuse them to compare methods. Figures are drawn with matplotlib's object API
on the Agg canvas (no GUI, no global backend switch); matplotlib is imported by the first
figure, because every command imports this module through the CLI and training never draws.
"""

from __future__ import annotations

import html
import json
import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import yaml
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from farcluss.config import config_from_dict
from farcluss.diagnose import not_learning_message
from farcluss.errors import CheckpointError, FarclussError
from farcluss.inference import ValidationPredictions, checkpoint_models, predict_validation_examples
from farcluss.log import get_logger
from farcluss.palette import IGNORE_COLOUR, class_colours

logger = get_logger(__name__)

MetricRecord = Dict[str, Any]

#: iterations and mIoU values of one line in a curve plot
Curve = Tuple[Sequence[int], Sequence[float]]


# ---------------------------------------------------------------------------------------------
# Reading a run folder
# ---------------------------------------------------------------------------------------------


def read_metrics(path) -> List[MetricRecord]:
    """The records of a ``metrics.jsonl`` file; a torn last line (run killed mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise FarclussError(f"metrics file {path} not found: is this a farcluss run folder?")
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise FarclussError(f"{path}:{number} is not a JSON record") from None
    return records


def train_records(records: Sequence[MetricRecord]) -> List[MetricRecord]:
    return [r for r in records if r.get("type") == "train"]


def eval_records(records: Sequence[MetricRecord], model: Optional[str] = None) -> List[MetricRecord]:
    return [r for r in records if r.get("type") == "eval" and (model is None or r.get("model") == model)]


def main_model(records: Sequence[MetricRecord]) -> str:
    """The model a run is judged by: the teacher when the method has one, else the student."""
    return "teacher" if eval_records(records, "teacher") else "student"


def miou_curve(records: Sequence[MetricRecord], model: str, key: str = "miou") -> Curve:
    """(iterations, mIoU) of every evaluation of `model` (a resumed run may repeat iterations:
    the latest value wins); `key` ``test_miou`` reads the test split's."""
    by_iteration: Dict[int, float] = {}
    for record in eval_records(records, model):
        if record.get(key) is not None:
            by_iteration[int(record["iteration"])] = float(record[key])
    iterations = sorted(by_iteration)
    return iterations, [by_iteration[i] for i in iterations]


def median_seconds_per_iteration(records: Sequence[MetricRecord]) -> Optional[float]:
    """Median of the logged per-window step times, over the windows that measured steps alone.

    A train record at iteration b covers the steps since the previous one at a; its time also
    holds any evaluation at an iteration e with a <= e < b (the trainer evaluates after logging),
    and the first window holds the DataLoader start-up. Those windows are left out unless nothing
    else is left.
    """
    evaluated = {int(r["iteration"]) for r in eval_records(records)}
    windows = []
    previous = 0
    for record in train_records(records):
        end = int(record["iteration"])
        if record.get("seconds_per_iteration") is not None:
            clean = previous > 0 and not any(previous <= e < end for e in evaluated)
            windows.append((clean, float(record["seconds_per_iteration"])))
        previous = end
    times = [t for clean, t in windows if clean] or [t for _, t in windows[1:]] or [t for _, t in windows]
    return statistics.median(times) if times else None


# ---------------------------------------------------------------------------------------------
# Colours
# ---------------------------------------------------------------------------------------------


def colourise(mask: np.ndarray, colours: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """An ``H×W`` index mask → ``H×W×3`` uint8 image in `colours` (``farcluss.palette``);
    `ignore_index` pixels get the palette's ignore colour, whatever that index is."""
    mask = np.asarray(mask)
    out = np.empty(mask.shape + (3,), np.uint8)
    out[...] = IGNORE_COLOUR
    valid = (mask != ignore_index) & (mask >= 0) & (mask < len(colours))
    out[valid] = colours[mask[valid]]
    return out


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    return Figure(figsize=(width, height), layout="constrained")


def _save(figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def loss_terms(records: Sequence[MetricRecord]) -> List[str]:
    """Names of the logged loss terms (``loss_sup``…) in first-seen order, the total ``loss`` last."""
    names: List[str] = []
    for record in train_records(records):
        for key in record:
            if key.startswith("loss_") and key not in names:
                names.append(key)
    if any("loss" in r for r in train_records(records)):
        names.append("loss")
    return names


def plot_loss_terms(records: Sequence[MetricRecord], path) -> Path:
    """One panel per loss term (own y scale: terms differ by orders of magnitude) over iterations."""
    names = loss_terms(records)
    if not names:
        raise FarclussError("the run logged no training losses yet")
    figure = _new_figure(3.2 * len(names), 2.8)
    axes = figure.subplots(1, len(names), squeeze=False)[0]
    rows = train_records(records)
    for ax, name in zip(axes, names):
        points = [(r["iteration"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
        if points:
            iterations, values = zip(*points)
            ax.plot(iterations, values, linewidth=1.2)
        ax.set_title("total" if name == "loss" else name[len("loss_"):])
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    return _save(figure, path)


def plot_miou_curves(curves: Mapping[str, Curve], path, title: str = "validation mIoU") -> Path:
    """One line per label, e.g. {"teacher": (iterations, mious), "student": …}."""
    return plot_miou_bands({label: (iterations, values, None, None)
                            for label, (iterations, values) in curves.items()}, path, title)


#: iterations, mean, band low, band high of one method's curve over seeds (low, high: None = no band)
Band = Tuple[Sequence[int], Sequence[float], Optional[Sequence[float]], Optional[Sequence[float]]]


def plot_miou_bands(bands: Mapping[str, Band], path, title: str = "mIoU") -> Path:
    """One line per label (the mean) with a shaded band (e.g. min–max over seeds) where given."""
    figure = _new_figure(5.5, 3.6)
    ax = figure.subplots()
    for label, (iterations, mean, low, high) in bands.items():
        if len(iterations):
            (line,) = ax.plot(iterations, mean, marker="o", markersize=3, linewidth=1.4, label=label)
            if low is not None and high is not None:
                ax.fill_between(iterations, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("iteration")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if bands:
        ax.legend()
    return _save(figure, path)


def plot_cost_frontier(points: Mapping[str, Tuple[float, float, float, float]], path,
                       title: str = "accuracy against cost") -> Path:
    """One point per label at (seconds per iteration, mean mIoU), whiskers from low to high."""
    figure = _new_figure(5.5, 3.6)
    ax = figure.subplots()
    for label, (seconds, mean, low, high) in points.items():
        ax.errorbar([seconds], [mean], yerr=[[mean - low], [high - mean]], fmt="o", capsize=3,
                    label=label)
        ax.annotate(label, (seconds, mean), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("seconds per iteration")
    ax.set_ylabel("final mIoU (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(figure, path)


def plot_class_iou_bars(series: Mapping[str, Sequence[Optional[float]]], class_names: Sequence[str],
                        path, title: str = "per-class IoU",
                        highlight: Sequence[int] = ()) -> Path:
    """Grouped bars: one group per class, one bar per label. Classes with no IoU (absent from
    ground truth and predictions) have no bar; `highlight` names are drawn in bold (rare classes)."""
    labels = list(series)
    positions = np.arange(len(class_names))
    width = 0.8 / max(len(labels), 1)
    figure = _new_figure(max(5.0, 0.55 * len(class_names) * max(1, len(labels)) ** 0.5 + 2), 3.8)
    ax = figure.subplots()
    for offset, label in enumerate(labels):
        values = series[label]
        shown = [(p, v) for p, v in zip(positions, values) if v is not None]
        if shown:
            xs, heights = zip(*shown)
            ax.bar(np.asarray(xs) + (offset - (len(labels) - 1) / 2) * width, heights, width,
                   label=label)
    ax.set_xticks(positions, list(class_names), rotation=45, ha="right")
    for index in highlight:
        ax.get_xticklabels()[index].set_fontweight("bold")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(labels) > 1:
        ax.legend()
    return _save(figure, path)


def save_prediction_grid(images: Sequence[np.ndarray], ground_truth: Sequence[np.ndarray],
                         predictions: Mapping[str, Sequence[np.ndarray]], class_names: Sequence[str],
                         path, ignore_index: int = 255, row_names: Sequence[str] = ()) -> Path:
    """Rows of [image, ground truth, one column per prediction set], with a colour legend."""
    colours = class_colours(len(class_names))
    columns = ["image", "ground truth", *predictions]
    rows = len(images)
    if rows == 0:
        raise FarclussError("no validation images to show")
    figure = _new_figure(1.7 * len(columns), 1.7 * rows + 0.6)
    axes = figure.subplots(rows, len(columns), squeeze=False)
    for row in range(rows):
        panels = [images[row], colourise(ground_truth[row], colours, ignore_index)]
        panels += [colourise(masks[row], colours, ignore_index) for masks in predictions.values()]
        for column, panel in enumerate(panels):
            ax = axes[row][column]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[column], fontsize=9)
        if row < len(row_names):
            axes[row][0].set_ylabel(row_names[row], fontsize=7)
    handles = [Patch(facecolor=colours[i] / 255.0, label=name) for i, name in enumerate(class_names)]
    figure.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=7)
    return _save(figure, path)


def save_validation_predictions(examples: ValidationPredictions, path, ignore_index: int = 255) -> Path:
    """The prediction grid of `examples` (`farcluss.inference.predict_validation_examples`)."""
    return save_prediction_grid(examples.images, examples.masks, examples.predictions,
                                examples.class_names, path, ignore_index, row_names=examples.names)


# ---------------------------------------------------------------------------------------------
# HTML page
# ---------------------------------------------------------------------------------------------


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c) if isinstance(c, float) or c is None else str(c))}</td>"
                         for c in row) + "</tr>"
        for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html_page(path, title: str, blocks: Sequence[Tuple[str, str]]) -> Path:
    """A self-contained page: `blocks` are (heading, body); a body ending in .png is shown as an
    image (a path relative to the page), anything else is inserted as HTML."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "img{max-width:100%}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for heading, body in blocks:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if body.endswith(".png"):
            parts.append(f"<img src='{html.escape(body)}' alt='{html.escape(heading)}'>")
        else:
            parts.append(body)
    parts.append("</body></html>\n")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# The report of one run
# ---------------------------------------------------------------------------------------------


def best_record(records: Sequence[MetricRecord], model: str) -> Optional[MetricRecord]:
    """The evaluation with the highest mIoU, the earliest on ties (the trainer's best.pt rule)."""
    candidates = [r for r in eval_records(records, model) if r.get("miou") is not None]
    return max(candidates, key=lambda r: r["miou"]) if candidates else None


def make_report(run_dir, out_dir=None, num_images: int = 6) -> Path:
    """Write the plots and ``index.html`` of a run folder; returns the page's path.

    The prediction grid needs the checkpoint and the validation data; when either is missing it
    is skipped with one line on stderr and the rest of the report is still written.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    records = read_metrics(run_dir / "metrics.jsonl")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FarclussError(f"run folder {run_dir} has no config.yaml")
    cfg = config_from_dict(yaml.safe_load(config_path.read_text(encoding="utf-8")) or {})
    model_name = main_model(records)
    evals = eval_records(records, model_name)
    class_names = (evals[-1].get("class_names") if evals else None) or []

    blocks: List[Tuple[str, str]] = []
    rows = []
    for name in ("teacher", "student"):
        latest = eval_records(records, name)
        if latest:
            rows.append([name, latest[-1]["iteration"], latest[-1]["miou"], latest[-1].get("pixel_accuracy")])
    if rows:
        blocks.append(("Final metrics", html_table(["model", "iteration", "mIoU", "pixel accuracy"], rows)))
    if evals:
        warning = not_learning_message(evals[-1]["per_class_iou"], class_names)
        if warning:
            logger.warning(f"{run_dir}: {warning}")
            blocks.insert(0, ("Warning", f"<p><strong>{html.escape(warning)}</strong></p>"))
    if loss_terms(records):
        blocks.append(("Losses", plot_loss_terms(records, out / "losses.png").name))
    curves = {name: miou_curve(records, name) for name in ("teacher", "student")
              if eval_records(records, name)}
    # the held-back test split's curves beside val's, when the run scored one (data.test)
    curves.update({f"{name} (test)": curve for name in ("teacher", "student")
                   for curve in [miou_curve(records, name, key="test_miou")] if curve[0]})
    if curves:
        title = "mIoU (val and test)" if any("(test)" in k for k in curves) else "validation mIoU"
        blocks.append(("mIoU", plot_miou_curves(curves, out / "miou.png", title=title).name))
    if evals:
        final, best = evals[-1], best_record(records, model_name)
        series = {f"final (iteration {final['iteration']})": final["per_class_iou"]}
        if best is not None:
            series[f"best (iteration {best['iteration']})"] = best["per_class_iou"]
        blocks.append((f"Per-class IoU ({model_name})",
                       plot_class_iou_bars(series, class_names, out / "per_class_iou.png",
                                           title=f"per-class IoU of the {model_name}").name))

    checkpoint = run_dir / "checkpoints" / "best.pt"
    if not checkpoint.is_file():
        checkpoint = run_dir / "checkpoints" / "last.pt"
    try:
        grid = _run_prediction_grid(cfg, checkpoint, out / "predictions.png", num_images)
        blocks.append((f"Validation predictions ({checkpoint.name})", grid.name))
    except FarclussError as exc:
        logger.warning("prediction grid skipped: %s", exc)
    return write_html_page(out / "index.html", f"farcluss run {run_dir.name} ({cfg.method.name})", blocks)


def _run_prediction_grid(cfg, checkpoint: Path, path: Path, num_images: int) -> Path:
    if not checkpoint.is_file():
        raise CheckpointError(f"no checkpoint in {checkpoint.parent}")
    models = {name: (checkpoint, name) for name in checkpoint_models(checkpoint)}
    return save_validation_predictions(predict_validation_examples(cfg, models, num_images), path,
                                       cfg.data.ignore_index)

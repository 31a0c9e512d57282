"""`farcluss bench accuracy`: every method × seed at equal iterations, and the rare-class metric.

Every run uses the config's own schedule (``train.iterations``) so methods compare at one budget;
only the method name, the seed and — for ``supervised_full`` — the labeled list change between
runs. ``supervised_full`` trains the supervised baseline on every train image with a mask: the
ceiling that unlabeled data can at best approach.

The "rare" classes are the 3 object classes (every class but a background class) with the fewest
labeled pixels in the config's labeled list, counted from the masks; their mean IoU is reported
beside the mIoU because a long-tailed dataset hides what happens to them in the mean.

The results document (``OUT/bench_accuracy.json``, rewritten after every run, and ``--json``)::

    {"split": "test" | "val",
     "results": [{"method", "seed", "miou", "rare_miou", "per_class_iou": {class: IoU},
                  "iterations", "seconds", "seconds_per_iteration",
                  "test_miou", "test_rare_miou", "test_per_class_iou"}],       (test_*: data.test only)
     "summary": [{"method", "miou_mean", "miou_std", "rare_miou_mean",
                  "test_miou_mean", "test_miou_std", "test_rare_miou_mean"}],
     "rare_classes": [names, rarest first], "config": {"path", "overrides", "iterations", "epochs", "out",
                                                "resolved"},
     "paired": [{"method", "reference", "split": "val", "seeds", "miou": D, "rare_miou": D}],  (--reference)
     "paired_test": [... the same on the test split ...]}                   (--reference and data.test)

    D = {"differences": [per seed], "n", "mean", "std", "t", "ci95_low", "ci95_high"}

Val and test. The unprefixed fields are always the validation split (``data.val``), the one
``best.pt`` is chosen on. When the config sets ``data.test`` (the built-in benchmark's config
does), every run's final judged model is also scored on that held-back list (``test_*``), and
``split`` is ``"test"``: the printed table and the printed paired differences are then the test
split's, as a number nothing was chosen on; the val ones stay in the document.

mIoU is the final teacher's (the student's for the supervised methods), in percent; ``miou_std``
is the sample standard deviation over seeds (null with one seed); ``seconds`` is the wall time
of the whole training run, evaluations included, and ``seconds_per_iteration`` that divided by
the run's ``iterations`` (``train.iterations``, or the count ``train.epochs`` derived from the
data; the cost axis of the frontier picture).

Pictures (``OUT/*.png``, written after the last run, see `write_pictures`)::

    miou_curves.png       mIoU over iterations per method: mean over seeds, min–max band (test
                          split when there is one, else val), from each run's metrics.jsonl
    per_class_iou.png     per-class IoU, one bar per method (mean over seeds; test when there is one)
    frontier.png          final mIoU against seconds per iteration, one point per method (mean
                          over seeds, whiskers min–max)

Side by side (``--jobs N``): N runs train at once, each in a spawned process with this process's
threads shared out (`threads_per_job`) and its console in ``<run folder>/console.log``; the
results are the same as one after another at that thread count (the test checks it run for
run), listed in the same seed-major order. On the 2-core machine the benchmark was made on,
``--jobs 2`` halves the wall time of a comparison: these small models do not keep two threads busy.

Paired statistics (``--reference METHOD``): a seed fixes the initialisation, the data order and
the augmentation streams for every method, so two methods are compared seed by seed; the
per-seed differences' mean and 95 % Student t-interval (`paired_difference`) say whether a lead
is larger than the seed-to-seed spread, which the unpaired means ± std hide.

Across invocations (``farcluss bench compare A.json B.json=LABEL --reference METHOD``): a variant
trained in its own ``bench accuracy`` run (``--set method.strong_views=2``) pairs with the plain
methods of another by seed, as long as both used the same labeled list (`merge_results`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue as queue_module
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from farcluss.cli_args import add_overrides_arg, positive_int
from farcluss.config import Config, derive_config, load_config
from farcluss.data.benchmark import benchmark_is_complete
from farcluss.data.build import build_data, dataset_root
from farcluss.data.io import load_mask
from farcluss.data.splits import Sample, read_split
from farcluss.engine.signals import RunStopped, StopRequest, raise_if_stopped
from farcluss.engine.trainer import Trainer, judged_model
from farcluss.errors import ConfigError, DataError, FarclussError
from farcluss.log import setup_logging
from farcluss.pretrain import resolve_pretrained
from farcluss.report import (Band, Curve, main_model, miou_curve, plot_class_iou_bars,
                             plot_cost_frontier, plot_miou_bands, read_metrics)

BENCH_METHODS = ("supervised", "fixmatch", "unimatch", "farcluss", "supervised_full")
DEFAULT_METHODS = BENCH_METHODS
DEFAULT_SEEDS = (0, 1, 2)
RARE_CLASS_COUNT = 3
#: the results document inside the output folder (also written to --json)
RESULTS_FILE = "bench_accuracy.json"

#: class names treated as background (not an object class) when choosing the rare classes
BACKGROUND_NAMES = frozenset({"background", "_background_", "bg", "backdrop"})


# ---------------------------------------------------------------------------------------------
# Rare classes
# ---------------------------------------------------------------------------------------------


def labeled_pixel_counts(samples: Sequence[Sample], num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Per-class pixel counts (int64, length `num_classes`) over the masks of `samples`;
    ignored pixels are not counted."""

    counts = np.zeros(num_classes, np.int64)
    for sample in samples:
        if sample.mask is None:
            raise DataError(f"labeled sample {sample.image} has no mask")
        mask = load_mask(sample.mask, num_classes, ignore_index)
        counts += np.bincount(mask[mask != ignore_index].ravel().astype(np.int64), minlength=num_classes)
    return counts


def rarest_object_classes(pixel_counts: Sequence[int], class_names: Sequence[str],
                          count: int = RARE_CLASS_COUNT) -> List[int]:
    """Indices of the `count` object classes with the fewest pixels, rarest first.

    Background classes (by name, see `BACKGROUND_NAMES`) are excluded; ties go to the lower
    index. A class with no labeled pixel at all is the rarest there is and is included.
    """
    if len(pixel_counts) != len(class_names):
        raise ValueError(f"{len(pixel_counts)} pixel counts for {len(class_names)} class names")
    objects = [i for i, name in enumerate(class_names) if name.strip().lower() not in BACKGROUND_NAMES]
    return sorted(objects, key=lambda i: (int(pixel_counts[i]), i))[:count]


def rare_classes_of(cfg: Config) -> Tuple[List[int], List[str], np.ndarray]:
    """(indices, names, all per-class labeled pixel counts) of the rare classes of a config's data."""

    data = build_data(cfg, need_unlabeled=False)
    counts = labeled_pixel_counts(data.labeled, len(data.classes), cfg.data.ignore_index)
    indices = rarest_object_classes(counts, data.classes)
    return indices, [data.classes[i] for i in indices], counts


def mean_iou_over(per_class_iou: Sequence[Optional[float]], indices: Sequence[int]) -> Optional[float]:
    """Mean IoU of the classes `indices`; a class without an IoU (absent from ground truth and
    predictions) is left out, as in the mIoU; None when none of them has one."""
    values = [per_class_iou[i] for i in indices if per_class_iou[i] is not None]
    return float(np.mean(values)) if values else None


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def judged_metrics(final: Dict[str, dict]) -> Tuple[str, dict]:
    """(model name, metrics) a method is judged by: the teacher when there is one, else the student."""
    name = judged_model(final)
    return name, final[name]


def run_metrics(final: Dict[str, dict], rare_indices: Sequence[int]) -> Dict[str, Any]:
    """``miou``, ``rare_miou`` and ``per_class_iou`` {class: IoU} of the judged model of `final`."""
    _, metrics = judged_metrics(final)
    per_class = metrics["per_class_iou"]
    names = metrics.get("class_names") or [str(i) for i in range(len(per_class))]
    return {"miou": metrics["miou"], "rare_miou": mean_iou_over(per_class, rare_indices),
            "per_class_iou": dict(zip(names, per_class))}


def check_fresh_run_dir(run_dir: Path) -> None:
    """A benchmark run must start afresh: refuse a folder that already holds a run."""
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists():
        raise FarclussError(f"{run_dir} already holds a run; choose another --out")


def train_run(cfg: Config, run_dir: Path) -> Tuple[Dict[str, Any], float]:
    """Train one config in this process; returns the trainer's summary and the wall seconds."""

    check_fresh_run_dir(run_dir)
    start = time.perf_counter()
    summary = Trainer(cfg, run_dir, resume=False).fit()
    raise_if_stopped(summary, run_dir)
    return summary, time.perf_counter() - start


def bench_run(cfg: Config, run_dir: Path, method: str, seed: int, rare_indices: Sequence[int],
              with_test: bool) -> Tuple[Dict[str, Any], float]:
    """Train one method × seed and return its results row and wall seconds."""
    summary, seconds = train_run(cfg, run_dir)
    result = {"method": method, "seed": seed,
              **run_metrics(summary["final"], rare_indices),
              # the run's own count: train.epochs derives it from the data
              "iterations": summary["iteration"],
              "seconds": round(seconds, 2),
              "seconds_per_iteration": round(seconds / max(1, summary["iteration"]), 5)}
    if with_test:
        name, _ = judged_metrics(summary["final"])
        # the same judged model as on val (the teacher once ready)
        test = run_metrics({name: summary["final_test"][name]}, rare_indices)
        result.update({f"test_{key}": value for key, value in test.items()})
    return result, seconds


# ---------------------------------------------------------------------------------------------
# Runs side by side (--jobs)
# ---------------------------------------------------------------------------------------------

CONSOLE_FILE = "console.log"


def threads_per_job(jobs: int, threads: Optional[int] = None) -> int:
    """Intra-op threads each of `jobs` runs gets: this process's threads shared out, at least 1.

    Two one-thread runs on two cores finish a comparison in about half the time one two-thread
    run after another does: these small models do not keep two threads busy.
    """
    threads = torch.get_num_threads() if threads is None else threads
    return max(1, threads // jobs)


def _child_run(index: int, cfg: Config, run_dir: Path, method: str, seed: int,
               rare_indices: Sequence[int], with_test: bool, threads: int, queue) -> None:
    """One benchmark run in a spawned process; its console goes to ``run_dir/console.log``."""
    torch.set_num_threads(threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / CONSOLE_FILE, "w", encoding="utf-8", buffering=1) as console:
        sys.stdout = sys.stderr = console
        setup_logging()
        try:
            queue.put((index, "ok", bench_run(cfg, run_dir, method, seed, rare_indices, with_test)))
        except RunStopped as exc:
            queue.put((index, "stopped", (exc.signum, exc.iteration, exc.run_dir)))
        except BaseException as exc:  # reported by the parent, which ends the command
            traceback.print_exc()
            queue.put((index, "error", f"{type(exc).__name__}: {exc}"))


def run_in_processes(work: Sequence[Tuple[Tuple[str, int], Config, Path]], jobs: int, base: Config,
                     rare_indices: Sequence[int], with_test: bool, finished) -> None:
    """Train `work` ((method, seed), config, run folder) `jobs` at a time, in seed-major order.

    Each run is a spawned child with `threads_per_job` threads, printing into its folder's
    ``console.log``; ``finished(result, seconds)`` is called here as each ends. A stop signal
    (``train.stop_signals``) reaching this process is passed on to the running children, which
    save and stop like any run; no new run starts, and the command ends with `RunStopped`
    after the running ones have reported. A failed run ends the command the same way, with
    its error and the path of its console log.
    """
    for _, _, run_dir in work:
        check_fresh_run_dir(run_dir)  # before anything starts, not hours in
    # made once here, not raced by two children on first use
    resolve_pretrained(base.model)
    threads = threads_per_job(jobs)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    pending = list(enumerate(work))
    running: Dict[int, Tuple[Any, float]] = {}
    forwarded: set = set()
    stopped: Optional[Tuple[int, int, str]] = None
    failure: Optional[str] = None
    print(f"{len(work)} runs, {jobs} at a time, {threads} thread(s) each; each run's console: "
          f"<run folder>/{CONSOLE_FILE}", flush=True)
    with StopRequest(base.train.stop_signals) as stop:
        while running or (pending and not stop.requested and failure is None):
            while pending and len(running) < jobs and not stop.requested and failure is None:
                index, ((method, seed), cfg, run_dir) = pending.pop(0)
                child = context.Process(target=_child_run, args=(
                    index, cfg, run_dir, method, seed, rare_indices, with_test, threads, queue))
                child.start()
                running[index] = (child, time.perf_counter())
                print(f"started {method} seed {seed} in {run_dir}", flush=True)
            if stop.requested:
                for index, (child, _) in running.items():
                    if index not in forwarded and child.is_alive():
                        os.kill(child.pid, stop.signum)
                        forwarded.add(index)
            try:
                index, status, payload = queue.get(timeout=0.5)
            except queue_module.Empty:
                for index, (child, _) in list(running.items()):
                    if child.exitcode is not None and queue.empty():
                        # died without a word (killed, out of memory)
                        running.pop(index)
                        run_dir = work[index][2]
                        failure = failure or (f"the run in {run_dir} ended with exit code "
                                              f"{child.exitcode} and no result; see "
                                              f"{run_dir / CONSOLE_FILE}")
                continue
            child, _ = running.pop(index)
            child.join()
            if status == "ok":
                finished(*payload)
            elif status == "stopped":
                stopped = stopped or payload
            else:
                run_dir = work[index][2]
                failure = failure or f"the run in {run_dir} failed: {payload} (see {run_dir / CONSOLE_FILE})"
    if failure is not None:
        raise FarclussError(failure)
    if stopped is not None:
        raise RunStopped(*stopped)
    if stop.requested:  # a signal before any run could report it
        raise RunStopped(stop.signum, 0, work[0][2])


def full_label_list(cfg: Config, work_dir: Path) -> Path:
    """The list of every train image with a mask, for ``supervised_full``.

    The built-in benchmark ships it (``splits/train_full.txt``). For other data it is the union
    of the labeled list and the unlabeled lines that give a mask, written to
    ``work_dir/train_full.txt`` with absolute paths.
    """

    root = dataset_root(cfg)
    shipped = root / "splits" / "train_full.txt"
    if benchmark_is_complete(root) and shipped.is_file():
        return shipped.resolve()
    labeled_path, unlabeled_path = (_under(root, cfg.data.labeled), _under(root, cfg.data.unlabeled))
    labeled = read_split(labeled_path, root, require_mask=True)
    unlabeled = read_split(unlabeled_path, root, require_mask=False)
    with_masks = [s for s in unlabeled if s.mask is not None]
    if not with_masks:
        raise DataError(f"supervised_full needs masks for the unlabeled images, but {unlabeled_path} "
                        "gives none (lines 'image mask'); leave supervised_full out of --methods")
    if len(with_masks) < len(unlabeled):
        print(f"supervised_full: {len(unlabeled) - len(with_masks)} of {len(unlabeled)} unlabeled "
              f"images in {unlabeled_path} have no mask and are left out")
    seen = set()
    lines = []
    for sample in labeled + with_masks:
        image = Path(sample.image).resolve()
        if image in seen:
            continue
        seen.add(image)
        lines.append(f"{image} {Path(sample.mask).resolve()}\n")
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / "train_full.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path.resolve()


def _under(root: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


def method_changes(method: str, seed: int, full_list: Optional[Path]) -> Dict[str, Any]:
    if method == "supervised_full":
        if full_list is None:
            raise ValueError("supervised_full needs the full label list")
        return {"method.name": "supervised", "train.seed": seed, "data.labeled": str(full_list)}
    return {"method.name": method, "train.seed": seed}


def _values(results: Sequence[dict], method: str, key: str) -> List[float]:
    return [r[key] for r in results if r["method"] == method and r.get(key) is not None]


def summarize(results: Sequence[dict], methods: Sequence[str], with_test: bool = False) -> List[dict]:
    """Mean and (sample) standard deviation of the val mIoU per method, and the mean rare-class
    IoU; with `with_test` the same of the test split as ``test_*`` keys. A standard deviation
    needs two seeds (None otherwise)."""
    rows = []
    for method in methods:
        row: Dict[str, Any] = {"method": method}
        for prefix in ("", "test_") if with_test else ("",):
            mious = _values(results, method, f"{prefix}miou")
            rares = _values(results, method, f"{prefix}rare_miou")
            row[f"{prefix}miou_mean"] = statistics.fmean(mious) if mious else None
            row[f"{prefix}miou_std"] = statistics.stdev(mious) if len(mious) > 1 else None
            row[f"{prefix}rare_miou_mean"] = statistics.fmean(rares) if rares else None
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Paired statistics
# ---------------------------------------------------------------------------------------------

#: Student t quantiles t_{0.975, df} for df = 1 … 30 (4 decimals, from the standard tables;
#: scipy is not a dependency). Beyond 30 degrees of freedom the table goes on at df 40, 60 and
#: 120, and a df between two entries takes the lower one, so an interval is never too narrow
#: (at df 31 it is 1 % wider than exact); above 120 the normal quantile 1.96 is used.
T_975 = {
    1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 8: 2.3060,
    9: 2.2622, 10: 2.2281, 11: 2.2010, 12: 2.1788, 13: 2.1604, 14: 2.1448, 15: 2.1314,
    16: 2.1199, 17: 2.1098, 18: 2.1009, 19: 2.0930, 20: 2.0860, 21: 2.0796, 22: 2.0739,
    23: 2.0687, 24: 2.0639, 25: 2.0595, 26: 2.0555, 27: 2.0518, 28: 2.0484, 29: 2.0452,
    30: 2.0423, 40: 2.0211, 60: 2.0003, 120: 1.9799,
}
NORMAL_975 = 1.9600


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: the two-sided 95 % Student t quantile (`T_975`, conservative between
    entries, 1.96 above df 120)."""
    if df < 1:
        raise ValueError(f"a t quantile needs df >= 1, got {df}")
    if df > 120:
        return NORMAL_975
    return T_975[max(k for k in T_975 if k <= df)]


def paired_difference(values: Sequence[Optional[float]],
                      reference_values: Sequence[Optional[float]]) -> Dict[str, Any]:
    """Per-seed differences d_i = values[i] − reference_values[i] (paired by position: the same
    seed), their mean d̄ and a 95 % t-interval

        d̄ ± t_{0.975, n−1} · s_d / √n,   s_d² = Σ (d_i − d̄)² / (n − 1).

    A pair with a missing value (None) is left out. Returns ``{"differences", "n", "mean",
    "std", "t", "ci95_low", "ci95_high"}``; std, t and the interval are None below two pairs,
    the mean is None without any.
    """
    if len(values) != len(reference_values):
        raise ValueError(f"{len(values)} values for {len(reference_values)} reference values")
    differences = [float(v) - float(r) for v, r in zip(values, reference_values)
                   if v is not None and r is not None]
    n = len(differences)
    mean = statistics.fmean(differences) if n else None
    result: Dict[str, Any] = {"differences": differences, "n": n, "mean": mean, "std": None,
                              "t": None, "ci95_low": None, "ci95_high": None}
    if n >= 2:
        std = statistics.stdev(differences)
        t = t_quantile_975(n - 1)
        half = t * std / (n ** 0.5)
        result.update(std=std, t=t, ci95_low=mean - half, ci95_high=mean + half)
    return result


PAIRED_METRICS = ("miou", "rare_miou")


def paired_statistics(results: Sequence[dict], methods: Sequence[str], reference: str,
                      split: str = "val") -> List[dict]:
    """For every method but `reference`: `paired_difference` of its mIoU and of its rare-class
    mIoU to the reference's, over the seeds both have run; on `split` (``val``: the results'
    ``miou``/``rare_miou``, ``test``: their ``test_miou``/``test_rare_miou``). The rows carry
    the split and name the differences ``miou``/``rare_miou`` whichever it is."""
    prefix = "test_" if split == "test" else ""
    by_run = {(r["method"], r["seed"]): r for r in results}
    rows = []
    for method in methods:
        if method == reference:
            continue
        seeds = [seed for (m, seed) in by_run if m == method and (reference, seed) in by_run]
        row: Dict[str, Any] = {"method": method, "reference": reference, "split": split,
                               "seeds": seeds}
        for metric in PAIRED_METRICS:
            key = prefix + metric
            row[metric] = paired_difference([by_run[(method, s)].get(key) for s in seeds],
                                            [by_run[(reference, s)].get(key) for s in seeds])
        rows.append(row)
    return rows


def _interval(stats: Dict[str, Any]) -> str:
    if stats["mean"] is None:
        return f"{'n/a':>22}"
    if stats["ci95_low"] is None:
        return f"{stats['mean']:+7.2f} {'[n/a]':>14}"
    return f"{stats['mean']:+7.2f} [{stats['ci95_low']:+6.2f}, {stats['ci95_high']:+6.2f}]"


def format_paired_table(paired: Sequence[dict]) -> str:
    """Per-seed differences to the reference, their mean and 95 % t-interval."""
    if not paired:
        return ""
    reference = paired[0]["reference"]
    split = paired[0].get("split", "val")
    lines = [f"paired differences to {reference} on {split} (same seed; mean [95 % t-interval])",
             f"{'method':<16} {'mIoU Δ per seed':<24} {'mIoU Δ':>22}   {'rare Δ':>22}"]
    for row in paired:
        per_seed = " ".join(f"{d:+.1f}" for d in row["miou"]["differences"]) or "n/a"
        lines.append(f"{row['method']:<16} {per_seed:<24} {_interval(row['miou'])}   "
                     f"{_interval(row['rare_miou'])}")
    return "\n".join(lines)


def _num(value: Optional[float], width: int = 6) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:{width}.2f}"


def format_accuracy_table(summary: Sequence[dict], rare_names: Sequence[str], seeds: Sequence[int],
                          split: str = "val") -> str:
    """The summary on `split` (``val``, or ``test`` from the rows' ``test_*`` keys)."""
    prefix = "test_" if split == "test" else ""
    lines = [f"{len(seeds)} seed(s): {', '.join(map(str, seeds))}; rare classes: {', '.join(rare_names)}",
             f"{split} split" + (" (held back: best.pt was chosen on val)" if split == "test" else ""),
             f"{'method':<16} {'mIoU mean ± std':>17} {'rare mIoU':>10}"]
    for row in summary:
        std_value = row.get(f"{prefix}miou_std")
        std = "   n/a" if std_value is None else f"{std_value:6.2f}"
        lines.append(f"{row['method']:<16} {_num(row.get(f'{prefix}miou_mean'), 8)} ± {std} "
                     f"{_num(row.get(f'{prefix}rare_miou_mean'), 10)}")
    return "\n".join(lines)


def run_accuracy(config_path, methods: Sequence[str] = DEFAULT_METHODS, seeds: Sequence[int] = DEFAULT_SEEDS,
                 overrides: Sequence[str] = (), out_dir=None, reference: Optional[str] = None,
                 jobs: int = 1) -> Dict[str, Any]:
    """Train every method × seed of a config at its iterations; returns the JSON document
    (with ``paired`` differences to `reference` when one is given). ``jobs`` > 1 trains that
    many runs at once in child processes (`run_in_processes`)."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1 (got {jobs})")
    unknown = [m for m in methods if m not in BENCH_METHODS]
    if unknown:
        raise ConfigError(f"unknown method '{unknown[0]}' in --methods "
                          f"(choose from {', '.join(BENCH_METHODS)})")
    if not methods or not seeds:
        raise ConfigError("bench accuracy needs at least one method and one seed")
    if reference is not None and reference not in methods:
        raise ConfigError(f"--reference {reference} is not among --methods ({', '.join(methods)})")
    base = load_config(config_path, list(overrides))
    out = Path(out_dir) if out_dir is not None else Path("runs") / (
        f"bench-{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)

    rare_indices, rare_names, _ = rare_classes_of(base)
    full_list = full_label_list(base, out) if "supervised_full" in methods else None
    print(f"rare classes (fewest labeled pixels): {', '.join(rare_names)}")

    config_record = {"path": str(config_path), "overrides": list(overrides),
                     "iterations": base.train.iterations, "epochs": base.train.epochs,
                     "out": str(out), "resolved": base.to_dict()}
    with_test = bool(base.data.test)
    results: List[dict] = []

    def document() -> Dict[str, Any]:
        doc = {"split": "test" if with_test else "val", "results": results,
               "summary": summarize(results, methods, with_test),
               "rare_classes": rare_names, "config": config_record}
        if reference is not None:
            doc["paired"] = paired_statistics(results, methods, reference)
            if with_test:
                doc["paired_test"] = paired_statistics(results, methods, reference, split="test")
        return doc

    tasks = [(method, seed) for seed in seeds for method in methods]
    configs = [derive_config(base, method_changes(method, seed, full_list)) for method, seed in tasks]
    run_dirs = [out / f"{method}-seed{seed}" for method, seed in tasks]
    total = len(tasks)

    def finished(result: Dict[str, Any], seconds: float) -> None:
        results.append(result)
        # the document lists runs in seed-major order whichever finished first
        results.sort(key=lambda r: tasks.index((r["method"], r["seed"])))
        line = (f"[{len(results)}/{total}] {result['method']} seed {result['seed']}: "
                f"val mIoU {_num(result['miou']).strip()}, rare mIoU {_num(result['rare_miou']).strip()}")
        if with_test:
            line += (f"; test mIoU {_num(result['test_miou']).strip()}, "
                     f"rare mIoU {_num(result['test_rare_miou']).strip()}")
        print(f"{line} ({seconds:.0f} s)", flush=True)
        # rewritten after every run: hours of finished runs survive a later failure
        write_json(out / RESULTS_FILE, document())

    if jobs == 1:
        for (method, seed), cfg, run_dir in zip(tasks, configs, run_dirs):
            finished(*bench_run(cfg, run_dir, method, seed, rare_indices, with_test))
    else:
        run_in_processes(list(zip(tasks, configs, run_dirs)), jobs, base, rare_indices, with_test,
                         finished)
    final = document()
    pictures = write_pictures(final, methods, out)
    print(f"pictures: {', '.join(str(p) for p in pictures)}")
    return final


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------

CURVES_FILE, CLASS_BARS_FILE, FRONTIER_FILE = "miou_curves.png", "per_class_iou.png", "frontier.png"


def aggregate_curves(curves: Sequence[Curve]) -> Band:
    """Mean, minimum and maximum over seeds at every iteration all `curves` evaluated."""
    if not curves:
        return [], [], [], []
    common = sorted(set.intersection(*(set(iterations) for iterations, _ in curves)))
    at = [dict(zip(iterations, values)) for iterations, values in curves]
    columns = [[curve[i] for curve in at] for i in common]
    return (common, [statistics.fmean(c) for c in columns], [min(c) for c in columns],
            [max(c) for c in columns])


def run_curve(run_dir: Path, split: str) -> Curve:
    """The judged model's (teacher if the run evaluated one, else student) mIoU over iterations
    on `split`, from the run's metrics.jsonl."""
    records = read_metrics(run_dir / "metrics.jsonl")
    return miou_curve(records, main_model(records), "test_miou" if split == "test" else "miou")


def mean_per_class(rows: Sequence[Dict[str, Optional[float]]], names: Sequence[str]) -> List[Optional[float]]:
    """Per-class mean over runs, leaving out runs without an IoU for the class (None if none has)."""
    means = []
    for name in names:
        values = [row[name] for row in rows if row.get(name) is not None]
        means.append(statistics.fmean(values) if values else None)
    return means


def write_pictures(document: Dict[str, Any], methods: Sequence[str], out: Path) -> List[Path]:
    """The three PNGs of a finished benchmark (module docstring) on the document's split."""
    split = document["split"]
    prefix = "test_" if split == "test" else ""
    results = document["results"]
    ran = [m for m in methods if any(r["method"] == m for r in results)]
    by_method = {m: [r for r in results if r["method"] == m] for m in ran}
    bands = {m: aggregate_curves([run_curve(out / f"{m}-seed{r['seed']}", split) for r in rows])
             for m, rows in by_method.items()}
    paths = [plot_miou_bands(bands, out / CURVES_FILE,
                             title=f"{split} mIoU (mean over seeds, band min–max)")]
    names = list(results[0][f"{prefix}per_class_iou"]) if results else []
    series = {m: mean_per_class([r[f"{prefix}per_class_iou"] for r in rows], names)
              for m, rows in by_method.items()}
    rare = [names.index(n) for n in document["rare_classes"] if n in names]
    paths.append(plot_class_iou_bars(series, names, out / CLASS_BARS_FILE,
                                     title=f"{split} per-class IoU (mean over seeds; rare in bold)",
                                     highlight=rare))
    points = {}
    for m, rows in by_method.items():
        mious = [r[f"{prefix}miou"] for r in rows if r.get(f"{prefix}miou") is not None]
        if mious:
            seconds = statistics.fmean(r["seconds_per_iteration"] for r in rows)
            points[m] = (seconds, statistics.fmean(mious), min(mious), max(mious))
    paths.append(plot_cost_frontier(points, out / FRONTIER_FILE,
                                    title=f"final {split} mIoU against cost (whiskers min–max)"))
    return paths


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Comparing results documents (`farcluss bench compare`)
# ---------------------------------------------------------------------------------------------


def read_results(path: Path) -> Dict[str, Any]:
    """A results document written by `bench accuracy` (DataError naming the file otherwise)."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise DataError(f"{path}: cannot read the results document ({error.strerror or error})") from None
    except ValueError:
        raise DataError(f"{path}: not a JSON results document of farcluss bench accuracy") from None
    if not isinstance(document, dict) or not isinstance(document.get("results"), list):
        raise DataError(f"{path}: not a results document of farcluss bench accuracy (no 'results' list)")
    return document


def _document_label(argument: str) -> Tuple[Path, Optional[str]]:
    path, separator, label = argument.rpartition("=")
    if not separator or not label or "/" in label:
        return Path(argument), None
    return Path(path), label


def merge_results(arguments: Sequence[str]) -> Tuple[List[dict], List[str], List[str], bool, List[dict]]:
    """Results of several `bench accuracy` documents as one list, for paired statistics across
    separate invocations (a variant run with ``--set`` beside the plain methods).

    An argument ``PATH=LABEL`` renames every method of that document to ``METHOD@LABEL``. Two
    runs of one method and seed, documents with other rare classes (another labeled list) or a
    test split in one and not in the other are refused: their seeds would not pair. Returns the
    results, the method names in order, the rare classes, whether every run has a test score,
    and each document's path, label and overrides.
    """
    results: List[dict] = []
    methods: List[str] = []
    rare_names: Optional[List[str]] = None
    with_test = True
    sources = []
    seen = set()
    for argument in arguments:
        path, label = _document_label(argument)
        document = read_results(path)
        if rare_names is None:
            rare_names = list(document.get("rare_classes", []))
        elif list(document.get("rare_classes", [])) != rare_names:
            raise DataError(f"{path}: its rare classes ({', '.join(document.get('rare_classes', []))}) "
                            f"differ from the first document's ({', '.join(rare_names)}): another "
                            "labeled list, so its seeds do not pair")
        with_test = with_test and document.get("split") == "test"
        for result in document["results"]:
            method = result["method"] if label is None else f"{result['method']}@{label}"
            key = (method, result["seed"])
            if key in seen:
                raise DataError(f"{path}: {method} seed {result['seed']} is in two documents; "
                                "name one with PATH=LABEL")
            seen.add(key)
            results.append({**result, "method": method})
            if method not in methods:
                methods.append(method)
        config = document.get("config", {})
        sources.append({"path": str(path), "label": label, "overrides": config.get("overrides", [])})
    return results, methods, rare_names or [], with_test, sources


def run_compare(arguments: Sequence[str], reference: str) -> Dict[str, Any]:
    """The merged document: results, summary and paired differences to `reference` (val, and
    test when every document has it)."""
    results, methods, rare_names, with_test, sources = merge_results(arguments)
    if reference not in methods:
        raise ConfigError(f"--reference {reference} is not among the documents' methods "
                          f"({', '.join(methods)})")
    document: Dict[str, Any] = {
        "split": "test" if with_test else "val", "results": results,
        "summary": summarize(results, methods, with_test), "rare_classes": rare_names,
        "sources": sources, "paired": paired_statistics(results, methods, reference)}
    if with_test:
        document["paired_test"] = paired_statistics(results, methods, reference, split="test")
    return document


def cmd_compare(args: argparse.Namespace) -> int:
    document = run_compare(args.documents, args.reference)
    for source in document["sources"]:
        label = f" as @{source['label']}" if source["label"] else ""
        overrides = " ".join(source["overrides"]) or "(no overrides)"
        print(f"{source['path']}{label}: {overrides}")
    seeds = sorted({r["seed"] for r in document["results"]})
    split = document["split"]
    print(format_accuracy_table(document["summary"], document["rare_classes"], seeds, split))
    print(format_paired_table(document["paired_test" if split == "test" else "paired"]))
    if split == "test":
        print(format_paired_table(document["paired"]))
    if args.json:
        write_json(Path(args.json), document)
        print(f"results: {args.json}")
    return 0


def _csv(text: str) -> List[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _seed_list(text: str) -> List[int]:
    try:
        seeds = [int(item) for item in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: seeds must be comma-separated integers") from None
    if any(seed < 0 for seed in seeds):
        raise argparse.ArgumentTypeError(f"{text}: seeds must be >= 0")
    return seeds


def write_json(path: Path, document: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def cmd_accuracy(args: argparse.Namespace) -> int:
    document = run_accuracy(args.config, _csv(args.methods), args.seeds, args.overrides, args.out,
                            reference=args.reference, jobs=args.jobs)
    results_path = Path(document["config"]["out"]) / RESULTS_FILE
    if args.json:
        write_json(Path(args.json), document)
    split = document["split"]
    print(format_accuracy_table(document["summary"], document["rare_classes"], args.seeds, split))
    if "paired" in document:
        print(format_paired_table(document["paired_test" if split == "test" else "paired"]))
    print(f"results: {args.json or results_path}")
    return 0


def register_command(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks of the methods")
    bench_sub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    q = bench_sub.add_parser("accuracy", help="every method × seed at equal iterations: mIoU mean ± std")
    q.add_argument("config", help="YAML config (its data, model and schedule are used by every method)")
    q.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {','.join(BENCH_METHODS)} (default all)")
    q.add_argument("--seeds", type=_seed_list, default=list(DEFAULT_SEEDS),
                   help="comma-separated (default 0,1,2)")
    q.add_argument("--reference", default=None, metavar="METHOD",
                   help="also report every other method's per-seed difference to this one, its "
                        "mean and 95 %% t-interval (mIoU and rare-class mIoU)")
    q.add_argument("--jobs", type=positive_int, default=1,
                   help="runs trained at once, each in its own process with this process's threads "
                        "shared out (2 on a 2-core machine: about half the wall time); each run "
                        "then prints into <run folder>/console.log (default 1)")
    q.add_argument("--json", default=None, help="also write the results document here")
    q.add_argument("--out", default=None, help="folder of the runs, the results document and the PNG pictures "
                        "(default runs/bench-<config>-<time>)")
    add_overrides_arg(q, "for every run")
    q.set_defaults(func=cmd_accuracy)

    c = bench_sub.add_parser(
        "compare", help="paired differences across results documents of bench accuracy "
                        "(e.g. a --set variant run apart from the plain methods)")
    c.add_argument("documents", nargs="+", metavar="RESULTS[=LABEL]",
                   help="bench_accuracy.json files; =LABEL renames that document's methods to "
                        "METHOD@LABEL")
    c.add_argument("--reference", required=True, metavar="METHOD",
                   help="the method (or METHOD@LABEL) every other is compared with, seed by seed")
    c.add_argument("--json", default=None, help="also write the merged document here")
    c.set_defaults(func=cmd_compare)

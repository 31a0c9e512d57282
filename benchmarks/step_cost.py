"""What one training iteration costs: time, peak memory and FLOPs of every method and ablation,
each also as a ratio to `fixmatch` measured in the same run (issue 5 §3).

    python benchmarks/step_cost.py                        # small CPU defaults, a few minutes
    python benchmarks/step_cost.py --backbone resnet101 --base-width 64 --crop 321 --batch 8 \\
        --classes 21 --device cuda --amp bf16 --json runs/step_cost_r101.json

Variants: `supervised`, `fixmatch`, `farcluss`, `farcluss_no_<component>` (fuzzy → K = 1,
weighting → none, rebalance → off, contrastive → off), `unimatch` (the engine's
method.name=unimatch) and `farcluss_on_unimatch` (FARCLUSS on UniMatch's skeleton: online
teacher, two strong views, feature dropout).

How each figure is measured (benchmarks/README.md says more):
- time: the trainer's own `train_step` (autocast, method losses, backward, SGD, EMA) on
  synthetic batches already on the device, median over `--iterations`; variants take turns
  step by step, so a change in machine load hits every variant alike.
- peak memory: in a separate process whose allocations ≥ 64 KiB go straight to mmap (glibc
  `MALLOC_MMAP_THRESHOLD_`), so freed memory leaves the resident set; per variant the kernel's
  resident high-water mark (VmHWM, reset through /proc/self/clear_refs) minus the resident size
  just before the first step: activations, gradients, optimizer state and temporaries, not the
  weights. On CUDA: `max_memory_allocated` minus `memory_allocated` before the first step.
- FLOPs: one step under `torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions,
  forward and backward); achieved FLOP/s against a dense matmul measured on this device.
- data wait: the real trainer (`Trainer.fit`, DataLoader with `--workers` workers) on a small
  copy of the built-in dataset; the fraction of iteration time spent waiting for the next batch.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from farcluss.config import load_config
from farcluss.data.build import DataBundle
from farcluss.engine.trainer import Trainer
from farcluss.methods.base import Batch

#: variant name → config overrides (on top of the shared settings)
VARIANTS: Dict[str, List[str]] = {
    "supervised": ["method.name=supervised"],
    "fixmatch": ["method.name=fixmatch"],
    "farcluss": ["method.name=farcluss"],
    "farcluss_no_fuzzy": ["method.name=farcluss", "method.top_k=1"],
    "farcluss_no_weighting": ["method.name=farcluss", "method.weighting=none"],
    "farcluss_no_rebalance": ["method.name=farcluss", "method.rebalance=off"],
    "farcluss_no_contrastive": ["method.name=farcluss", "method.contrastive=off"],
    # the engine's UniMatch (V1: online teacher, two strong views, feature dropout) and
    # FARCLUSS on that skeleton: their ratio is what FARCLUSS's components cost there
    "unimatch": ["method.name=unimatch"],
    "farcluss_on_unimatch": ["method.name=farcluss", "method.teacher=online",
                             "method.strong_views=2", "method.feature_perturbation=dropout"],
}
#: `--backbone dinov2_*`: UniMatch V2's step (EMA teacher, two strong views with complementary
#: channel dropout, AdamW) on the DINOv2 + DPT and on a ResNet-101 DeepLabV3+ at the same crop,
#: each with the encoder trained and frozen (`model.freeze_backbone`)
V2_STEP = ["method.name=unimatch", "method.teacher=ema", "method.ema_momentum=0.996",
           "method.feature_perturbation=complementary", "method.strong_views=2",
           "train.optimizer=adamw", "train.lr=0.000005", "train.head_lr_multiplier=40",
           "train.weight_decay=0.01"]
BACKBONE_VARIANTS: Dict[str, List[str]] = {
    "unimatch_v2": V2_STEP,
    "unimatch_v2_frozen": V2_STEP + ["model.freeze_backbone=true"],
}
#: the variants of the crop and class-count sweeps (their difference is the contrastive cost)
SWEEP_VARIANTS = ("fixmatch", "farcluss", "farcluss_no_contrastive")
TARGETS = {"time_vs_fixmatch": 1.15, "time_vs_unimatch": 1.10,
           "extra_memory_vs_fixmatch": 0.05, "data_wait_fraction": 0.05}
MIB = 2.0**20


@dataclass(frozen=True)
class Settings:
    backbone: str = "resnet18"
    base_width: int = 16
    crop: int = 64
    batch: int = 4
    classes: int = 8
    device: str = "cpu"
    amp: str = "off"

    def overrides(self) -> List[str]:
        return ["data.root=unused", f"data.num_classes={self.classes}",
                f"data.crop_size={self.crop}", f"model.backbone={self.backbone}",
                f"model.base_width={self.base_width}", f"train.batch_size={self.batch}",
                f"train.device={self.device}", f"train.amp={self.amp}",
                "train.iterations=100000", "train.progress=false"]


# ---------------------------------------------------------------------------------------------
# One training step per variant
# ---------------------------------------------------------------------------------------------


def synthetic_batch(settings: Settings, device: torch.device) -> Batch:
    """Labeled and unlabeled crops on the device; masks are 8×8-pixel blocks of random classes,
    so every class is present and the contrastive loss samples its full quota."""
    generator = torch.Generator().manual_seed(0)
    b, crop, classes = settings.batch, settings.crop, settings.classes
    blocks = torch.randint(0, classes, (b, 1, -(-crop // 8), -(-crop // 8)), generator=generator)
    masks = F.interpolate(blocks.float(), scale_factor=8, mode="nearest")[:, 0, :crop, :crop]
    return Batch(
        images_l=torch.randn(b, 3, crop, crop, generator=generator).to(device),
        masks_l=masks.long().to(device),
        images_u_weak=torch.randn(b, 3, crop, crop, generator=generator).to(device),
        ignore_mask_u=torch.zeros(b, crop, crop, dtype=torch.long, device=device),
        seeds_u=torch.arange(b, dtype=torch.int64),
    )


def build_trainer(variant: str, settings: Settings) -> Trainer:
    cfg = load_config(None, settings.overrides() + {**VARIANTS, **BACKBONE_VARIANTS}[variant])
    classes = [f"class{i}" for i in range(settings.classes)]
    # no run folder is written: the benchmark calls train_step, never fit
    return Trainer(cfg, Path(tempfile.gettempdir()) / "farcluss-step-cost-unused",
                   data=DataBundle(Path("."), classes, [], [], []), resume=False)


def build_step(variant: str, settings: Settings) -> Callable[[], None]:
    trainer = build_trainer(variant, settings)
    batch = synthetic_batch(settings, trainer.device)
    return lambda: trainer.train_step(batch)


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def median_step_seconds(steps: Dict[str, Callable[[], None]], warmup: int, iterations: int,
                        device: torch.device) -> Dict[str, float]:
    """Median seconds per step; the variants take turns, one step each per round."""
    sync = synchronizer(device)
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for round_index in range(warmup + iterations):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def step_flops(step: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, size: int = 1024,
                            repeats: int = 5) -> float:
    """Dense n×n matmul rate, 2n³ FLOPs per product, median of `repeats`."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = synchronizer(device)
    a @ b
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / statistics.median(times)


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def step_peak_memory_mb(variant: str, settings: Settings, steps: int = 2) -> Optional[float]:
    """Peak memory of `steps` training steps above what is resident before the first (MiB)."""
    step = build_step(variant, settings)
    device = torch.device(settings.device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - before) / MIB
    if not Path("/proc/self/clear_refs").exists():
        return None
    before = _proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    for _ in range(steps):
        step()
    return (_proc_status_kib("VmHWM") - before) / 1024.0


def memory_worker(specs: List[dict]) -> List[Optional[float]]:
    """Runs in the child process started by `measure_memory`."""
    results = []
    for spec in specs:
        variant, settings = spec["variant"], Settings(**spec["settings"])
        # the first step of a new shape allocates for good (thread pools, oneDNN scratchpads,
        # cuDNN workspaces): a throwaway step pays it so that it counts against no variant
        build_step(variant, settings)()
        gc.collect()
        results.append(step_peak_memory_mb(variant, settings))
        gc.collect()
    return results


def measure_memory(jobs: List[tuple], threads: Optional[int]) -> List[Optional[float]]:
    """Peak step memory of each (variant, settings), in one child process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               KMP_BLOCKTIME=os.environ.get("KMP_BLOCKTIME", "0"))
    specs = [{"variant": variant, "settings": asdict(settings)} for variant, settings in jobs]
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", json.dumps(specs)]
    if threads:
        command += ["--threads", str(threads)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_data_wait(settings: Settings, iterations: int, workers: int) -> dict:
    """The trainer's own data-wait fraction, on a 64-image copy of the built-in dataset."""
    from farcluss.data.benchmark import make_benchmark

    with tempfile.TemporaryDirectory() as folder:
        root = make_benchmark(Path(folder) / "data", num_train=64, num_val=2, progress=False)
        log_interval = max(1, iterations // 4)
        cfg = load_config(None, [
            f"data.root={root}", f"data.crop_size={settings.crop}",
            f"model.backbone={settings.backbone}", f"model.base_width={settings.base_width}",
            "method.name=farcluss", f"train.batch_size={settings.batch}",
            f"train.device={settings.device}", f"train.amp={settings.amp}",
            f"train.iterations={iterations}", f"train.num_workers={workers}",
            f"train.log_interval={log_interval}", f"train.eval_interval={iterations}",
            f"train.checkpoint_interval={iterations}", "eval.max_images=1",
            "train.progress=false"])
        out = Path(folder) / "run"
        Trainer(cfg, out, resume=False).fit()
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if r["type"] == "train"]
    # the first window pays the one-off start of the worker processes
    steady = windows[1:] or windows
    elapsed = sum(r["seconds_per_iteration"] for r in steady)
    waited = sum(r["seconds_per_iteration"] * r["data_wait_fraction"] for r in steady)
    return {"fraction": waited / elapsed, "workers": workers, "iterations": iterations,
            "seconds_per_iteration": elapsed / len(steady),
            "first_window_fraction": windows[0]["data_wait_fraction"]}


def profile_steps(steps: Dict[str, Callable[[], None]], device: torch.device,
                  rows: int = 15) -> None:
    """Top operators of 3 steps per variant, by self CPU time; on CUDA also by GPU time, with the
    step's summed kernel time against its wall time (a gap is launch latency or host syncs)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = synchronizer(device)
    for name, step in steps.items():
        step()
        sync()
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(3):
                step()
            sync()
            wall = (time.perf_counter() - start) / 3
        averages = prof.key_averages()
        print(f"\n--- profile: {name} (3 steps, self CPU time) ---")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=rows))
        if cuda:
            kernel_us = sum(event.self_device_time_total for event in averages) / 3
            print(f"--- profile: {name}: GPU kernels {kernel_us / 1e3:.1f} ms of a "
                  f"{wall * 1e3:.1f} ms step (self GPU time) ---")
            print(averages.table(sort_by="self_device_time_total", row_limit=rows))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _ratio(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    if value is None or not reference:
        return None
    return value / reference


def sweep(settings_list: Sequence[Settings], warmup: int, iterations: int, threads) -> List[dict]:
    """Time and memory of SWEEP_VARIANTS at each settings; contrastive = farcluss − no_contrastive."""
    memory = measure_memory([(v, s) for s in settings_list for v in SWEEP_VARIANTS], threads)
    rows = []
    for index, settings in enumerate(settings_list):
        steps = {v: build_step(v, settings) for v in SWEEP_VARIANTS}
        seconds = median_step_seconds(steps, warmup, iterations, torch.device(settings.device))
        del steps
        gc.collect()
        mem = dict(zip(SWEEP_VARIANTS, memory[index * len(SWEEP_VARIANTS):]))
        contrastive = (None if None in (mem["farcluss"], mem["farcluss_no_contrastive"])
                       else mem["farcluss"] - mem["farcluss_no_contrastive"])
        rows.append({"crop": settings.crop, "classes": settings.classes,
                     "seconds_per_iteration": seconds, "peak_memory_mb": mem,
                     "time_ratio_farcluss_to_fixmatch": _ratio(seconds["farcluss"], seconds["fixmatch"]),
                     "memory_ratio_farcluss_to_fixmatch": _ratio(mem["farcluss"], mem["fixmatch"]),
                     "contrastive_memory_mb": contrastive,
                     "contrastive_memory_per_megapixel_mb":
                         None if contrastive is None else contrastive / (settings.batch * 2 * settings.crop**2 / 1e6)})
    return rows


def run_backbones(args: argparse.Namespace) -> dict:
    """`--backbone dinov2_*`: time, FLOPs and peak memory of UniMatch V2's step on the DINOv2 +
    DPT and on ResNet-101 DeepLabV3+ (full width) at the same crop, trained and frozen."""
    started = time.perf_counter()
    device = torch.device(args.device)
    base = Settings(args.backbone, 64, args.crop, args.batch, args.classes, args.device, args.amp)
    rows = [(f"{args.backbone} + DPT", variant, base) for variant in BACKBONE_VARIANTS]
    rows += [("resnet101 + DeepLabV3+", variant, replace(base, backbone="resnet101"))
             for variant in BACKBONE_VARIANTS]
    steps = {f"{model}|{variant}": build_step(variant, settings)
             for model, variant, settings in rows}
    flops = {name: step_flops(step) for name, step in steps.items()}
    seconds = median_step_seconds(steps, args.warmup, args.iterations, device)
    del steps
    gc.collect()
    memory = measure_memory([(variant, settings) for _, variant, settings in rows], args.threads)
    results = []
    for (model, variant, settings), peak in zip(rows, memory):
        name = f"{model}|{variant}"
        trainer = build_trainer(variant, settings)
        params = sum(p.numel() for p in trainer.student.parameters())
        trainable = sum(p.numel() for p in trainer.student.parameters() if p.requires_grad)
        del trainer
        results.append({"model": model, "frozen_backbone": variant.endswith("_frozen"),
                        "seconds_per_iteration": seconds[name], "flops_per_iteration": flops[name],
                        "peak_memory_mb": peak, "parameters": params,
                        "trainable_parameters": trainable})
    return {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "settings": {**asdict(base), "iterations": args.iterations, "warmup": args.warmup,
                         "threads": torch.get_num_threads(), "torch": torch.__version__},
            "backbones": results, "wall_seconds": time.perf_counter() - started}


def print_backbone_report(report: dict) -> None:
    s = report["settings"]
    print(f"step cost of UniMatch V2's step (EMA teacher, 2 strong views, complementary dropout, "
          f"AdamW): crop {s['crop']}, batch {s['batch']} labeled + {s['batch']} unlabeled, "
          f"{s['classes']} classes, {s['device']}, amp {s['amp']}, {s['threads']} thread(s); "
          f"median of {s['iterations']} iterations")
    header = (f"{'model':<26} {'encoder':<8} {'params M':>9} {'trained M':>10} {'s/iter':>8} "
              f"{'GFLOP/it':>9} {'peak MB':>8}")
    print(header)
    print("-" * len(header))
    for r in report["backbones"]:
        print(f"{r['model']:<26} {'frozen' if r['frozen_backbone'] else 'trained':<8} "
              f"{r['parameters'] / 1e6:>9.1f} {r['trainable_parameters'] / 1e6:>10.1f} "
              f"{r['seconds_per_iteration']:>8.3f} {r['flops_per_iteration'] / 1e9:>9.1f} "
              f"{_fmt(r['peak_memory_mb'], '8.1f'):>8}")
    print(f"benchmark wall time {report['wall_seconds']:.0f} s")


def run(args: argparse.Namespace) -> dict:
    settings = Settings(args.backbone, args.base_width, args.crop, args.batch, args.classes,
                        args.device, args.amp)
    device = torch.device(settings.device)
    started = time.perf_counter()
    matmul = {"fp32": matmul_flops_per_second(device, torch.float32)}
    if device.type == "cuda" or torch.backends.mkldnn.is_available():
        matmul["bf16"] = matmul_flops_per_second(device, torch.bfloat16)

    def stage(text: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f} s] {text}", file=sys.stderr, flush=True)

    stage(f"{len(VARIANTS)} variants: FLOPs and time")
    steps = {name: build_step(name, settings) for name in VARIANTS}
    flops = {name: step_flops(step) for name, step in steps.items()}
    amp_steps = {}
    if args.amp == "off" and not args.no_bf16:
        bf16 = replace(settings, amp="bf16")
        amp_steps = {f"{name}@bf16": build_step(name, bf16) for name in ("fixmatch", "farcluss")}
    seconds = median_step_seconds({**steps, **amp_steps}, args.warmup, args.iterations, device)
    if args.profile:
        profile_steps({name: steps[name] for name in ("fixmatch", "farcluss")}, device)
    del steps, amp_steps
    gc.collect()

    stage("peak memory (child process)")
    memory = dict(zip(VARIANTS, measure_memory([(name, settings) for name in VARIANTS], args.threads)))

    peak = matmul["bf16" if settings.amp == "bf16" and "bf16" in matmul else "fp32"]
    variants = []
    for name in VARIANTS:
        achieved = flops[name] / seconds[name]
        variants.append({
            "name": name,
            "seconds_per_iteration": seconds[name],
            "peak_memory_mb": memory[name],
            "ratio_to_fixmatch": _ratio(seconds[name], seconds["fixmatch"]),
            "memory_ratio_to_fixmatch": _ratio(memory[name], memory["fixmatch"]),
            "flops_per_iteration": flops[name],
            "flops_ratio_to_fixmatch": _ratio(flops[name], flops["fixmatch"]),
            "achieved_flops_per_second": achieved,
            "fraction_of_matmul_peak": achieved / peak,
        })

    crop_sweep, class_sweep = [], []
    if not args.no_sweeps:
        stage("crop sweep")
        crops = [max(16, args.crop // 2), args.crop, args.crop * 3 // 2]
        crop_sweep = sweep([replace(settings, crop=c) for c in crops], 1, args.sweep_iterations,
                           args.threads)
        stage("class sweep")
        class_sweep = sweep([replace(settings, classes=c) for c in (args.classes, args.classes * 4)],
                            1, args.sweep_iterations, args.threads)

    data_wait = None
    if not args.no_data_wait:
        stage("data wait (Trainer.fit with the real DataLoader)")
        data_wait = measure_data_wait(settings, args.data_iterations, args.workers)

    by_name = {v["name"]: v for v in variants}
    farcluss = by_name["farcluss"]
    extra_memory = (None if farcluss["memory_ratio_to_fixmatch"] is None
                    else farcluss["memory_ratio_to_fixmatch"] - 1.0)
    measured = {
        "time_vs_fixmatch": farcluss["ratio_to_fixmatch"],
        "time_vs_unimatch": (by_name["farcluss_on_unimatch"]["seconds_per_iteration"]
                             / by_name["unimatch"]["seconds_per_iteration"]),
        "extra_memory_vs_fixmatch": extra_memory,
        "data_wait_fraction": None if data_wait is None else data_wait["fraction"],
    }
    targets = {key: {"measured": value, "target": TARGETS[key],
                     "met": None if value is None else value <= TARGETS[key]}
               for key, value in measured.items()}
    amp = {}
    if seconds.get("farcluss@bf16"):
        amp = {name: {"fp32": seconds[name], "bf16": seconds[f"{name}@bf16"],
                      "speedup": seconds[name] / seconds[f"{name}@bf16"]}
               for name in ("fixmatch", "farcluss")}
    return {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "settings": {**asdict(settings), "iterations": args.iterations, "warmup": args.warmup,
                     "threads": torch.get_num_threads(), "torch": torch.__version__},
        "matmul_flops_per_second": matmul,
        "variants": variants,
        "amp": amp,
        "crop_sweep": crop_sweep,
        "class_sweep": class_sweep,
        "data_wait": data_wait,
        "targets": targets,
        "wall_seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def print_report(report: dict) -> None:
    s = report["settings"]
    print(f"step cost: {s['backbone']} (base width {s['base_width']}), crop {s['crop']}, "
          f"batch {s['batch']} labeled + {s['batch']} unlabeled, {s['classes']} classes, "
          f"{s['device']}, amp {s['amp']}, {s['threads']} thread(s); "
          f"median of {s['iterations']} iterations")
    matmul = report["matmul_flops_per_second"]
    print("dense matmul: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in matmul.items()))
    header = (f"{'variant':<24} {'s/iter':>8} {'×fix':>6} {'peak MB':>8} {'×fix':>6} "
              f"{'GFLOP/it':>9} {'×fix':>6} {'GFLOP/s':>8} {'%peak':>6}")
    print(header)
    print("-" * len(header))
    for v in report["variants"]:
        print(f"{v['name']:<24} {v['seconds_per_iteration']:>8.3f} {v['ratio_to_fixmatch']:>6.2f} "
              f"{_fmt(v['peak_memory_mb'], '8.1f'):>8} {_fmt(v['memory_ratio_to_fixmatch'], '6.2f'):>6} "
              f"{v['flops_per_iteration'] / 1e9:>9.2f} {v['flops_ratio_to_fixmatch']:>6.2f} "
              f"{v['achieved_flops_per_second'] / 1e9:>8.1f} {100 * v['fraction_of_matmul_peak']:>5.1f}%")
    if report["amp"]:
        print("bf16 autocast vs fp32: " + "; ".join(
            f"{name} {a['fp32']:.3f} → {a['bf16']:.3f} s/iter (×{a['speedup']:.2f})"
            for name, a in report["amp"].items()))
    for title, key, column in (("crop sweep", "crop_sweep", "crop"), ("class sweep", "class_sweep", "classes")):
        rows = report[key]
        if not rows:
            continue
        print(f"{title}: {column:>7} | s/iter fixmatch farcluss ×fix | peak MB fixmatch farcluss ×fix "
              f"| contrastive MB  MB/Mpx")
        for r in rows:
            t, m = r["seconds_per_iteration"], r["peak_memory_mb"]
            print(f"{'':<12}{r[column]:>7} | {t['fixmatch']:>15.3f} {t['farcluss']:>8.3f} "
                  f"{r['time_ratio_farcluss_to_fixmatch']:>4.2f} | {_fmt(m['fixmatch'], '16.1f'):>16} "
                  f"{_fmt(m['farcluss'], '8.1f'):>8} {_fmt(r['memory_ratio_farcluss_to_fixmatch'], '4.2f'):>4} "
                  f"| {_fmt(r['contrastive_memory_mb'], '14.1f'):>14} "
                  f"{_fmt(r['contrastive_memory_per_megapixel_mb'], '7.1f'):>7}")
    if report["data_wait"]:
        d = report["data_wait"]
        print(f"data wait (Trainer.fit, {d['workers']} workers, {d['iterations']} iterations): "
              f"{100 * d['fraction']:.1f}% of the iteration after the first window "
              f"(first window, with worker start-up: {100 * d['first_window_fraction']:.1f}%)")
    labels = {"time_vs_fixmatch": "farcluss time / fixmatch",
              "time_vs_unimatch": "farcluss on the unimatch skeleton, time / unimatch",
              "extra_memory_vs_fixmatch": "farcluss extra memory over fixmatch",
              "data_wait_fraction": "data wait fraction"}
    for key, t in report["targets"].items():
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        print(f"target {labels[key]}: {_fmt(t['measured'], '.3f')} (≤ {t['target']}) {verdict}")
    print(f"benchmark wall time {report['wall_seconds']:.0f} s")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18",
                        choices=["resnet18", "resnet34", "resnet50", "resnet101",
                                 "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14"],
                        help="a DINOv2 backbone compares UniMatch V2's step on it (+ DPT) with "
                             "ResNet-101 DeepLabV3+ at the same crop, encoder trained and frozen")
    parser.add_argument("--base-width", type=int, default=16,
                        help="channels of the first ResNet stage (64 = the standard network)")
    parser.add_argument("--crop", type=int, default=64, help="square crop side in pixels")
    parser.add_argument("--batch", type=int, default=4,
                        help="labeled and unlabeled images per iteration (each)")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per variant")
    parser.add_argument("--sweep-iterations", type=int, default=4)
    parser.add_argument("--data-iterations", type=int, default=20,
                        help="iterations of the real training loop for the data-wait figure")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (train.num_workers)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--no-sweeps", action="store_true", help="skip the crop and class sweeps")
    parser.add_argument("--no-data-wait", action="store_true")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 rows (with --amp off)")
    parser.add_argument("--profile", action="store_true",
                        help="print the top operators of a fixmatch and a farcluss step")
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return 0
    if args.amp == "fp16" and not args.device.startswith("cuda"):
        parser.error("--amp fp16 needs CUDA; use bf16 on CPU")
    if args.backbone.startswith("dinov2"):
        report = run_backbones(args)
        print_backbone_report(report)
    else:
        report = run(args)
        print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

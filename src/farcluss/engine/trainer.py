"""The one training loop. Which method runs is the method object's business; the loop owns
devices, AMP, DDP, the EMA teacher, the schedule, evaluation, checkpoints and logging."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

import farcluss
from farcluss.config import Config, input_stride
from farcluss.data.build import DataBundle, build_data, eval_loader
from farcluss.diagnose import not_learning_message
from farcluss.data.datasets import SegmentationDataset
from farcluss.data.sampler import InfiniteSampler
from farcluss.data.transforms import WeakAugment
from farcluss.engine import checkpoint as ckpt
from farcluss.engine.distributed import (DistEnv, abort, all_reduce_sum, barrier, is_lost_peer,
                                         lost_rank_error, report_failure)
from farcluss.engine.signals import StopRequest, ignore_in_worker, signal_name
from farcluss.engine.optim import build_optimizer, set_poly_lr
from farcluss.engine.device import autocast_context, configure_backends, resolve_amp, resolve_device
from farcluss.engine.run_folder import RunFolder, to_loggable
from farcluss.engine.schedule import with_epoch_schedule
from farcluss.errors import CheckpointError, FarclussError
from farcluss.evaluate import evaluate
from farcluss.log import Progress, get_logger
from farcluss.methods import build_method
from farcluss.methods.base import Batch, LossOutput
from farcluss.models.pretrained import load_pretrained
from farcluss.pretrain import resolve_pretrained


logger = get_logger(__name__)


class TrainingError(FarclussError):
    """Training cannot go on (a NaN loss under nan_policy=stop, …)."""


class WithSampleSeed(Dataset):
    """Adds each item's sampler seed to its dict as ``"seed"`` (int64).

    The seed is fixed by the item's position in the global stream, so the strong view the
    method draws from it (`MeanTeacherMethod.strong_view`) is the same on any rank and in any
    batch split. It also seeds the weak crop through numpy's PCG64; the strong view draws from
    torch's Mersenne Twister, an unrelated generator, so the two are not correlated.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple) -> dict:
        sample = self.dataset[item]
        sample["seed"] = torch.tensor(item[1], dtype=torch.int64)
        return sample


#: layout version of last.pt and best.pt
CHECKPOINT_FORMAT = 2


def judged_model(final: Dict[str, Any]) -> str:
    """The model a run is judged by in its final results: the teacher once it exists (the
    mean-teacher methods after their warm-up), else the student (supervised runs)."""
    return "teacher" if final.get("teacher") is not None else "student"


class Trainer:
    def __init__(self, cfg: Config, out_dir: Path, env: Optional[DistEnv] = None,
                 resume: Optional[bool] = None, data: Optional[DataBundle] = None,
                 diagnose: bool = True):
        """`resume`: True = must resume, False = never, None = resume when last.pt exists.
        `diagnose`: False leaves out the "not learning" line after the final evaluation (a
        timing run of a few iterations, such as the demo's calibration, is not a result)."""
        self.cfg = cfg
        self.diagnose = diagnose
        self.env = env or DistEnv()
        self.device = resolve_device(cfg.train.device, self.env)
        self.amp = resolve_amp(cfg.train.amp, self.device)
        configure_backends(self.device, cfg.train.deterministic)

        # rank 0 may have to write the built-in dataset first; the other ranks then read it
        if data is None and self.env.distributed and not self.env.is_main:
            barrier()
        self.data = data or build_data(cfg)
        if data is None and self.env.distributed and self.env.is_main:
            barrier()
        # train.epochs → train.iterations, before anything reads the schedule length
        cfg = self.cfg = with_epoch_schedule(cfg, self.data, self.env.world_size,
                                             log=self.env.is_main)
        self.num_classes = len(self.data.classes)
        self.run_folder = RunFolder(Path(out_dir), writes=self.env.is_main,
                                    tensorboard=cfg.train.tensorboard, classes=self.data.classes)
        self.paths = self.run_folder.paths
        self.method = build_method(cfg, self.num_classes, reduce=all_reduce_sum,
                                   world_size=self.env.world_size, rank=self.env.rank)

        # every global generator starts from the run seed; checkpoints carry their states on
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        student = self.method.build_student()
        if cfg.model.pretrained:
            # builtin:pretrained → the cached file (rank 0 makes it on first use) and its sha256
            if self.env.distributed and not self.env.is_main:
                barrier()
            source, sha256 = resolve_pretrained(cfg.model, device=str(self.device))
            if self.env.distributed and self.env.is_main:
                barrier()
            load_pretrained(student, source, sha256=sha256)
        if self.env.distributed and self.device.type == "cuda" and cfg.train.sync_bn:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        student.to(self.device)
        if cfg.train.channels_last:
            student.to(memory_format=torch.channels_last)
        self.student = student
        self.teacher = self.method.make_teacher(student)
        if self.env.is_main:
            for message in self.method.startup_warnings():
                logger.warning(message)
        self.optimizer = build_optimizer(student, cfg.train.lr, cfg.train.head_lr_multiplier,
                                         cfg.train.momentum, cfg.train.weight_decay,
                                         cfg.train.optimizer, cfg.train.betas)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        if self.env.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.student_ddp: nn.Module = nn.parallel.DistributedDataParallel(
                student, device_ids=device_ids)
        else:
            self.student_ddp = student

        self.iteration = 0
        self.best_miou = -1.0
        self.best_iteration = -1
        self.resumed_from: Optional[int] = None
        #: the last evaluation's test-split metrics per model ({} without data.test)
        self.test_results: Dict[str, dict] = {}
        self.stop_request = StopRequest(cfg.train.stop_signals)
        self._resume(resume)

    # ---- run folder ---------------------------------------------------------------------------
    def _prepare_run_folder(self) -> None:
        uses_unlabeled = self.method.uses_unlabeled
        self.run_folder.prepare(self.cfg, {
            "seed": self.cfg.train.seed,
            "world_size": self.env.world_size,
            "global_batch_labeled": self.cfg.train.batch_size * self.env.world_size,
            "global_batch_unlabeled": self._unlabeled_batch_size() * self.env.world_size
            if uses_unlabeled else 0,
            "device": str(self.device),
            "amp": self.amp,
            "torch_version": torch.__version__,
            "classes": self.data.classes,
        }, self.resumed_from)

    def _unlabeled_batch_size(self) -> int:
        return self.cfg.train.unlabeled_batch_size or self.cfg.train.batch_size

    def _log(self, record: Dict[str, Any]) -> None:
        self.run_folder.log(record)

    # ---- checkpoints ----------------------------------------------------------------------------
    def _rank_states(self) -> List[dict]:
        """Every rank's generator states (global RNGs and the method's own), indexed by rank.

        Ranks draw different strong augmentations and dropout masks, so each restores its own
        states on resume; a collective, so every rank calls it.
        """
        local = {"rng": ckpt.capture_rng_state(), "method": self.method.state_dict()}
        if not self.env.distributed:
            return [local]
        gathered: List[Any] = [None] * self.env.world_size
        dist.all_gather_object(gathered, local)
        return gathered

    def _model_state(self) -> dict:
        """What every checkpoint holds: enough to rebuild and evaluate the models."""
        return {
            "format": CHECKPOINT_FORMAT,
            "farcluss_version": farcluss.__version__,
            "iteration": self.iteration,
            "config": self.cfg.to_dict(),
            "classes": list(self.data.classes),
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
        }

    def _checkpoint_state(self, rank_states: List[dict]) -> dict:
        return {
            **self._model_state(),
            **self.method.global_state(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "best_miou": self.best_miou,
            "best_iteration": self.best_iteration,
            "rank_states": rank_states,
        }

    def _save_last(self) -> None:
        rank_states = self._rank_states()
        if self.env.is_main:
            ckpt.save_atomic(self._checkpoint_state(rank_states), self.paths.last)

    def _save_best(self, miou: float) -> None:
        if not self.env.is_main:
            return
        ckpt.save_atomic({**self._model_state(), "miou": miou}, self.paths.best)

    def _resume(self, resume: Optional[bool]) -> None:
        exists = self.paths.last.is_file()
        if resume is True and not exists:
            raise FarclussError(f"--resume given but {self.paths.last} does not exist")
        if resume is False or not exists:
            return
        source = str(self.paths.last)
        state = ckpt.load_checkpoint(self.paths.last, map_location="cpu")
        missing = [key for key in ("iteration", "student", "optimizer", "rank_states")
                   if key not in state]
        if missing:
            raise CheckpointError(f"cannot resume from {source}: no {', '.join(missing)} entry "
                                  "(not a last.pt of this farcluss version; use --no-resume)")
        try:
            ckpt.load_model_state(self.student, state["student"], source)
            if self.teacher is not None and state.get("teacher") is not None:
                ckpt.load_model_state(self.teacher, state["teacher"], source)
            self.optimizer.load_state_dict(state["optimizer"])
        except (CheckpointError, ValueError) as error:
            raise CheckpointError(f"cannot resume the run in {self.paths.root} with this config: "
                                  f"{error} (start afresh with --no-resume or another --out)"
                                  ) from None
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.method.load_global_state(state)
        self.best_miou = float(state.get("best_miou", -1.0))
        self.best_iteration = int(state.get("best_iteration", -1))
        rank_states = state["rank_states"]
        if len(rank_states) == self.env.world_size:
            own = rank_states[self.env.rank]
        else:
            own = rank_states[0]
            if self.env.is_main:
                logger.warning(f"{source} was written by {len(rank_states)} process(es), this run "
                               f"has {self.env.world_size}: the random streams will not replay "
                               "exactly")
        self.method.load_state_dict(own["method"])
        ckpt.restore_rng_state(own["rng"])
        self.resumed_from = self.iteration

    # ---- data -----------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, batch_size: int, stream: int) -> Iterator[dict]:
        t = self.cfg.train
        sampler = InfiniteSampler(len(dataset), seed=t.seed * 7 + stream, rank=self.env.rank,
                                  world_size=self.env.world_size, shuffle=True,
                                  start=self.iteration * batch_size)
        # augmentation seeds travel with the indices; a private generator only seeds the
        # workers, so making a loader leaves the global torch stream (dropout) untouched and
        # a resumed run draws the same numbers as an uninterrupted one
        worker_seeds = torch.Generator().manual_seed(t.seed * 7 + stream)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                            num_workers=t.num_workers, pin_memory=self.device.type == "cuda",
                            drop_last=True, persistent_workers=t.num_workers > 0,
                            prefetch_factor=4 if t.num_workers > 0 else None,
                            generator=worker_seeds, worker_init_fn=ignore_in_worker(t.stop_signals))
        return iter(loader)

    def _datasets(self) -> tuple[SegmentationDataset, Optional[Dataset]]:
        d = self.cfg.data
        weak = WeakAugment(d.crop_size, scale_range=d.scale_range, flip_prob=d.flip_prob,
                           mean=d.mean, std=d.std, ignore_index=d.ignore_index,
                           rotate_degrees=d.rotate_degrees)
        labeled = SegmentationDataset(self.data.labeled, self.num_classes, d.ignore_index, weak,
                                      mode="labeled")
        unlabeled = None
        if self.method.uses_unlabeled:
            unlabeled = WithSampleSeed(SegmentationDataset(
                self.data.unlabeled, self.num_classes, d.ignore_index, weak, mode="unlabeled"))
        return labeled, unlabeled

    def _to_batch(self, batch_l: dict, batch_u: Optional[dict]) -> Batch:
        def move(tensor: torch.Tensor, image: bool = False) -> torch.Tensor:
            tensor = tensor.to(self.device, non_blocking=True)
            if image and self.cfg.train.channels_last:
                tensor = tensor.contiguous(memory_format=torch.channels_last)
            return tensor

        batch = Batch(images_l=move(batch_l["image"], True), masks_l=move(batch_l["mask"]).long())
        if batch_u is not None:
            batch.images_u_weak = move(batch_u["image"], True)
            batch.ignore_mask_u = move(batch_u["ignore_mask"]).long()
            batch.seeds_u = batch_u.get("seed")
        return batch

    # ---- evaluation -----------------------------------------------------------------------------
    def _evaluate_split(self, split: str) -> Dict[str, dict]:
        """Metrics of the judged models (the teacher once ready, and the student) on `split`."""
        loader = eval_loader(self.cfg, self.data, self.num_classes, self.env, split=split)
        e = self.cfg.eval
        results = {}
        models = [("student", self.student)]
        if self.teacher is not None and self.method.teacher_ready(self.iteration):
            models.insert(0, ("teacher", self.teacher))
        for name, model in models:
            results[name] = evaluate(model, loader, self.num_classes, mode=e.mode,
                                     crop_size=e.crop_size or self.cfg.data.crop_size,
                                     stride_ratio=e.stride_ratio,
                                     ignore_index=self.cfg.data.ignore_index, device=self.device,
                                     reduce=all_reduce_sum, class_names=self.data.classes,
                                     output_stride=input_stride(self.cfg))
        return results

    def evaluate_models(self) -> Dict[str, dict]:
        """Val metrics per model (what best.pt is chosen by). With ``data.test`` set the same
        models are also evaluated on the test split, kept in `test_results` and logged beside
        val as ``test_*`` fields of the eval record (curves only: nothing is chosen by them)."""
        results = self._evaluate_split("val")
        self.test_results = self._evaluate_split("test") if self.cfg.data.test else {}
        for name, metrics in results.items():
            record = {"type": "eval", "iteration": self.iteration, "model": name,
                      "miou": metrics["miou"], "per_class_iou": metrics["per_class_iou"],
                      "pixel_accuracy": metrics["pixel_accuracy"],
                      "class_names": list(self.data.classes),
                      "confused_with": metrics.get("confused_with")}
            test = self.test_results.get(name)
            if test is not None:
                record.update(test_miou=test["miou"], test_per_class_iou=test["per_class_iou"],
                              test_pixel_accuracy=test["pixel_accuracy"],
                              test_confused_with=test.get("confused_with"))
            self._log(record)
        return results

    # ---- the loop -------------------------------------------------------------------------------
    def _check_finite(self, output: LossOutput, total: torch.Tensor) -> bool:
        """False (or TrainingError under nan_policy=stop) when any rank's loss is NaN/Inf.

        The flags are summed over ranks so that every rank skips or stops together: a rank that
        skipped its backward alone would leave the others waiting in the gradient all-reduce.
        """
        names = list(output.terms)
        flags = torch.stack([~torch.isfinite(output.terms[name].detach()).all() for name in names]
                            + [~torch.isfinite(total.detach())]).float()
        flags = all_reduce_sum(flags)
        if not bool(flags.any()):
            return True
        bad = [name for name, flag in zip(names, flags[:-1].tolist()) if flag > 0] or ["total"]
        if self.cfg.train.nan_policy == "stop":
            last = (f"the last good checkpoint is {self.paths.last}" if self.paths.last.is_file()
                    else "no checkpoint was written yet")
            raise TrainingError(
                f"non-finite loss at iteration {self.iteration + 1} in term(s) {', '.join(bad)}; "
                f"{last} (train.nan_policy=skip skips such steps)")
        self._log({"type": "skip", "iteration": self.iteration + 1, "non_finite": bad})
        return False

    def train_step(self, batch: Batch) -> LossOutput:
        cfg = self.cfg
        set_poly_lr(self.optimizer, self.iteration, cfg.train.iterations, cfg.train.poly_power)
        self.method.before_step(self.iteration, self.student, self.teacher)
        self.student_ddp.train()
        if getattr(self.student, "frozen_backbone", False):
            self.student.backbone.eval()  # a frozen ResNet keeps its BatchNorm statistics too
        if cfg.train.freeze_bn:
            for module in self.student.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        # the forward pass itself writes buffers (BN statistics, prototypes, class counts); a
        # skipped step puts them back so one bad batch cannot poison the rest of the run
        saved_buffers = ([buffer.detach().clone() for buffer in self.student.buffers()]
                         if cfg.train.nan_policy == "skip" else None)
        with autocast_context(self.device, self.amp):
            output = self.method.losses(batch, self.student_ddp, self.teacher, self.iteration)
            total = output.total()
        self.optimizer.zero_grad(set_to_none=True)
        finite = self._check_finite(output, total)
        if not finite and saved_buffers is not None:
            with torch.no_grad():
                for buffer, saved in zip(self.student.buffers(), saved_buffers):
                    buffer.copy_(saved)
        if finite:
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.method.after_step(self.iteration, self.student, self.teacher)
        self.iteration += 1
        output.stats["loss"] = total.detach()
        return output

    def fit(self) -> Dict[str, Any]:
        try:
            return self._fit()
        except BaseException as exc:
            if self.env.distributed and is_lost_peer(exc):
                abort()  # waiting for the lost rank would hang
                raise lost_rank_error(self.env, f"at iteration {self.iteration + 1}", exc,
                                      str(self.paths.last) if self.paths.last.is_file() else None
                                      ) from None
            if self.env.distributed:
                # leave the group so the other ranks fail at their next collective, not hang
                report_failure(self.env, f"at iteration {self.iteration + 1}", exc)
            raise
        finally:
            self.stop_request.uninstall()

    def _warn_if_not_learning(self, final: Dict[str, dict]) -> None:
        """One line when the final model predicts only a few classes (diagnose.py)."""
        name = judged_model(final)
        metrics = final.get(name)
        if not metrics or not self.env.is_main or not self.diagnose:
            return
        message = not_learning_message(metrics["per_class_iou"], metrics["class_names"])
        if message:
            logger.warning(f"{name}: {message}")

    def _stop_run(self, saved: bool) -> Dict[str, Any]:
        """After a stop signal: last.pt at this iteration (unless just written), then return."""
        if not saved:
            self._save_last()
            barrier()
        signum = self.stop_request.signum
        self._log({"type": "stop", "iteration": self.iteration, "signal": signal_name(signum)})
        return {"iteration": self.iteration, "best_miou": self.best_miou,
                "best_iteration": self.best_iteration, "final": {}, "final_test": {},
                "run_dir": str(self.paths.root), "stopped_by": signum,
                "checkpoint": str(self.paths.last)}

    def _fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        t = cfg.train
        self._prepare_run_folder()
        # from here a stop signal only asks the loop to stop after its current iteration
        self.stop_request.install()
        labeled_set, unlabeled_set = self._datasets()
        labeled_iter = self._loader(labeled_set, t.batch_size, stream=0)
        unlabeled_iter = (self._loader(unlabeled_set, self._unlabeled_batch_size(), stream=1)
                          if unlabeled_set is not None else None)
        progress = Progress(t.iterations, initial=self.iteration, desc=self.method.name,
                            every=t.log_interval, enabled=self.env.is_main and t.progress)
        window_start = time.perf_counter()
        data_wait = 0.0
        window_iters = 0
        last_results: Dict[str, dict] = {}
        while self.iteration < t.iterations:
            fetch_start = time.perf_counter()
            batch_l = next(labeled_iter)
            batch_u = next(unlabeled_iter) if unlabeled_iter is not None else None
            batch = self._to_batch(batch_l, batch_u)
            data_wait += time.perf_counter() - fetch_start
            output = self.train_step(batch)
            window_iters += 1
            postfix = None
            if self.iteration % t.log_interval == 0 or self.iteration == t.iterations:
                elapsed = time.perf_counter() - window_start
                record = {"type": "train", "iteration": self.iteration,
                          "lr": self.optimizer.param_groups[0]["lr"],
                          "seconds_per_iteration": round(elapsed / window_iters, 5),
                          "data_wait_fraction": round(data_wait / max(elapsed, 1e-9), 4)}
                for name, term in output.terms.items():
                    record[f"loss_{name}"] = to_loggable(term)
                    record[f"weight_{name}"] = to_loggable(float(output.weights.get(name, 1.0)))
                for name, value in output.stats.items():
                    record[name] = to_loggable(value)
                self._log(record)
                postfix = {"loss": record.get("loss")}
                window_start, data_wait, window_iters = time.perf_counter(), 0.0, 0
            progress.update(1, postfix=postfix)
            if self.iteration % t.eval_interval == 0 or self.iteration == t.iterations:
                last_results = self.evaluate_models()
                main_name = "teacher" if self.teacher is not None else "student"
                # no best.pt during the warm-up: it would hold the untrained teacher
                miou = last_results[main_name]["miou"] if main_name in last_results else None
                if miou is not None and miou > self.best_miou:
                    self.best_miou, self.best_iteration = miou, self.iteration
                    self._save_best(miou)
            if self.iteration % t.checkpoint_interval == 0 or self.iteration == t.iterations:
                self._save_last()
                barrier()
            if self.iteration < t.iterations and self.stop_request.agreed(self.device):
                progress.close()
                return self._stop_run(saved=self.iteration % t.checkpoint_interval == 0)
        progress.close()
        if not last_results:
            last_results = self.evaluate_models()
        self._warn_if_not_learning(last_results)
        return {"iteration": self.iteration, "best_miou": self.best_miou,
                "best_iteration": self.best_iteration, "final": last_results,
                "final_test": self.test_results, "run_dir": str(self.paths.root)}

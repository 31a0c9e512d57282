"""TensorBoard scalars of a run: the trainer mirrors every metric record here when the config
sets ``train.tensorboard`` (the event files go to ``RUN_DIR/tensorboard``)."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

from farcluss.log import get_logger

logger = get_logger(__name__)


class TensorBoardLogger:
    """Mirror the trainer's metric records into TensorBoard scalars.

    Train records become ``train/<key>`` (vector statistics ``train/<key>/<class>``), evaluation
    records ``eval/<model>/miou``, ``eval/<model>/pixel_accuracy`` and ``eval/<model>/iou/<class>``.
    Without the optional `tensorboard` package this logs one warning and does nothing.
    """

    def __init__(self, log_dir, class_names: Sequence[str] = (),
                 writer_factory: Optional[Callable[[str], Any]] = None):
        self.class_names = list(class_names)
        self.writer = None
        if writer_factory is None:
            try:
                # optional dependency: imported only when a run asks for TensorBoard
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("train.tensorboard is set but the tensorboard package is not installed "
                               "(pip install tensorboard); continuing without TensorBoard logs")
                return
            writer_factory = SummaryWriter
        self.writer = writer_factory(str(log_dir))

    def _name(self, index: int) -> str:
        return self.class_names[index] if index < len(self.class_names) else str(index)

    def log(self, record: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(record.get("iteration", 0))
        kind = record.get("type")
        if kind == "train":
            for key, value in record.items():
                if key in ("type", "iteration"):
                    continue
                if _is_number(value):
                    self.writer.add_scalar(f"train/{key}", value, step)
                elif isinstance(value, list):
                    for index, item in enumerate(value):
                        if _is_number(item):
                            self.writer.add_scalar(f"train/{key}/{self._name(index)}", item, step)
        elif kind == "eval":
            model = record.get("model", "model")
            names = record.get("class_names") or self.class_names
            for key in ("miou", "pixel_accuracy", "test_miou", "test_pixel_accuracy"):
                if _is_number(record.get(key)):
                    self.writer.add_scalar(f"eval/{model}/{key}", record[key], step)
            for index, iou in enumerate(record.get("per_class_iou") or []):
                if _is_number(iou):
                    name = names[index] if index < len(names) else str(index)
                    self.writer.add_scalar(f"eval/{model}/iou/{name}", iou, step)
        else:
            return
        # records come every log_interval steps: flushing each keeps the event file current
        # without a close hook at the end of training
        self.writer.flush()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

"""Say when a run is not learning: a final evaluation where most classes have IoU ≈ 0 while
one class takes nearly all the pixels looks like a result in a table, but it is a collapsed
model. `not_learning_message` turns per-class IoU into that one line (or None for a healthy
run); `train` logs it after the final evaluation and `report` shows it on the page.
"""

from __future__ import annotations

from typing import Optional, Sequence

#: a class whose IoU (percent) is below this is not segmented: at 10 % the predicted and true
#: regions overlap on a tenth of their union, which no learned class stays at
DEAD_IOU = 10.0
#: the run is flagged when at least this share of the classes with an IoU are dead
DEAD_SHARE = 0.5
#: the words every not-learning line carries (what a script scanning stderr can match)
NOT_LEARNING = "the model is not learning"


def not_learning_message(per_class_iou: Sequence[Optional[float]], class_names: Sequence[str],
                         dead_iou: float = DEAD_IOU, dead_share: float = DEAD_SHARE) -> Optional[str]:
    """One line when the model has collapsed onto a few classes, else None.

    With ``present`` the classes that have an IoU (None = absent from ground truth and
    predictions) and ``dead = {c ∈ present : IoU_c < dead_iou}``, the run is flagged when
    ``|dead| ≥ dead_share · |present|`` and at least one class is alive (all dead is a broken
    evaluation, not a collapse, and says so too).
    """
    present = [(name, iou) for name, iou in zip(class_names, per_class_iou) if iou is not None]
    if len(present) < 2:
        return None
    dead = [name for name, iou in present if iou < dead_iou]
    if len(dead) < dead_share * len(present):
        return None
    alive = sorted(((iou, name) for name, iou in present if iou >= dead_iou), reverse=True)
    if alive:
        leading = ", ".join(f"{name} ({iou:.1f})" for iou, name in alive[:3])
        what = (f"{NOT_LEARNING}: {len(dead)} of {len(present)} classes have IoU below "
                f"{dead_iou:g} and only {leading} are predicted")
    else:
        what = f"{NOT_LEARNING}: every one of {len(present)} classes has IoU below {dead_iou:g}"
    return (f"{what}. Likely causes: a schedule too short for the dataset (train.epochs or "
            f"train.iterations), crops that cut the objects (data.crop_size), no pretrained "
            f"backbone (model.pretrained), or a learning rate off by 10x (train.lr)")

import sys

from doubles import FakeSummaryWriter
from farcluss.engine.tensorboard import TensorBoardLogger


def test_tensorboard_logger_without_the_package_warns_once_and_does_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    logger = TensorBoardLogger(tmp_path / "tb")
    logger.log({"type": "train", "iteration": 1, "loss": 1.0})
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tensorboard package is not installed" in err
    assert not (tmp_path / "tb").exists()


def test_tensorboard_logger_skips_non_finite_and_names_classes(tmp_path):
    writer = FakeSummaryWriter("x")
    logger = TensorBoardLogger(tmp_path, class_names=["bg", "cat"], writer_factory=lambda _: writer)
    logger.log({"type": "eval", "iteration": 7, "model": "teacher", "miou": 40.0, "pixel_accuracy": None,
                "per_class_iou": [60.0, None], "class_names": ["bg", "cat"]})
    logger.log({"type": "train", "iteration": 8, "loss": float("nan"), "lr": 0.01, "flag": True})
    assert writer.scalars == [("eval/teacher/miou", 40.0, 7), ("eval/teacher/iou/bg", 60.0, 7),
                              ("train/lr", 0.01, 8)]

import json
import re
import sys

import numpy as np
import pytest
import torch

from conftest import write_tiny_checkpoint, write_tiny_dataset
from farcluss.cli import main
from farcluss.export import allowed_difference
from farcluss.inference import load_trained_model

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny checkpoint and its ONNX export through the command line (traced at 32×32)."""
    base = tmp_path_factory.mktemp("export")
    root = write_tiny_dataset(base / "tiny", n_train=4, n_val=0, n_labeled=2)
    checkpoint = write_tiny_checkpoint(base / "model.pt", root)
    onnx_path = base / "model.onnx"
    code = main(["export", "--checkpoint", str(checkpoint), "--out", str(onnx_path)])
    return checkpoint, onnx_path, code


def test_export_matches_pytorch_in_onnxruntime_at_other_sizes(exported, capsys):
    checkpoint, onnx_path, code = exported
    assert code == 0 and onnx_path.is_file()
    model, saved_cfg, classes = load_trained_model(checkpoint, "teacher")
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    for shape in [(1, 3, 32, 32), (3, 3, 48, 72), (2, 3, 37, 29)]:
        images = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = model(images)[0].numpy()
        (logits,) = session.run(["logits"], {"images": images.numpy()})
        assert logits.shape == (shape[0], 3) + shape[2:]
        assert np.abs(logits - expected).max() <= 1e-3


def test_export_declares_dynamic_axes_and_preprocessing(exported):
    _, onnx_path, _ = exported
    proto = onnx.load(str(onnx_path))
    (graph_input,) = proto.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "images"
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    assert [output.name for output in proto.graph.output] == ["logits"]  # no decoder feature
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    assert json.loads(metadata["classes"]) == ["background", "square", "disc"]
    assert json.loads(metadata["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert metadata["output_stride"] == "16"


def test_command_prints_the_difference_it_checked(tmp_path, exported, capsys):
    checkpoint = exported[0]
    code = main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.onnx"),
                 "--size", "32", "48", "--opset", "17", "--model", "student"])
    out = capsys.readouterr().out
    assert code == 0
    assert "traced on 1×3×32×48" in out
    # the check runs on another batch size and spatial size than the trace
    assert "onnxruntime check on 2×3×51×85: max abs logit difference" in out


class _OffByOneTenth:
    """An ONNX Runtime session whose logits are 0.1 off, as a broken export would be."""

    def __init__(self, session):
        self.session = session

    def run(self, names, feeds):
        return [output + 0.1 for output in self.session.run(names, feeds)]


def test_parity_above_tolerance_fails_with_one_line(tmp_path, exported, capsys, monkeypatch):
    real_session = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession",
                        lambda *args, **kwargs: _OffByOneTenth(real_session(*args, **kwargs)))
    code = main(["export", "--checkpoint", str(exported[0]), "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert re.search(r"differ from PyTorch by up to 0\.1\d*, more than the allowed 0\.00\d+ "
                     r"\(0\.001 \+ 1e-05 × max \|logit\| ", err[0]), err[0]


def test_allowed_difference_grows_only_with_large_logits():
    # 1e-3 + 1e-5 · 20 = 0.0012 for a trained model's logits; 1e-3 + 1e-5 · 1000 = 0.011
    assert allowed_difference(20.0) == pytest.approx(0.0012)
    assert allowed_difference(1000.0) == pytest.approx(0.011)
    assert allowed_difference(0.0, tolerance=1e-4) == pytest.approx(1e-4)


def test_missing_onnx_says_what_to_install(tmp_path, exported, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    code = main(["export", "--checkpoint", str(exported[0]), "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install farcluss[onnx]" in err[0]
    assert not (tmp_path / "m.onnx").exists()

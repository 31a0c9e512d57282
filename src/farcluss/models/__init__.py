"""Segmentation models: ResNet backbones, DeepLabV3+, checked pretrained-weight loading."""

from __future__ import annotations

from typing import Optional

from ..errors import ConfigError
from .deeplab import BACKBONE_DEPTHS, DeepLabV3Plus
from .pretrained import PRETRAINED_WEIGHTS, load_pretrained
from .resnet import ResNet, resnet

__all__ = ["BACKBONE_DEPTHS", "DeepLabV3Plus", "PRETRAINED_WEIGHTS", "ResNet", "build_model",
           "load_pretrained", "resnet"]

OUTPUT_STRIDES = (8, 16, 32)


def build_model(num_classes: int, backbone: str = "resnet50", output_stride: int = 16,
                deep_stem: bool = False, base_width: int = 64, projection_dim: int = 0,
                *, stem_width: Optional[int] = None,
                projection_hidden: int = 256, dropout: float = 0.1) -> DeepLabV3Plus:
    """Build a DeepLabV3+ with random weights; the trainer loads ``model.pretrained`` backbone
    weights afterwards (strictly; see :func:`load_pretrained`)."""
    if backbone not in BACKBONE_DEPTHS:
        raise ConfigError(f"model.backbone: unknown backbone {backbone!r}; choose one of "
                          f"{', '.join(BACKBONE_DEPTHS)}")
    if output_stride not in OUTPUT_STRIDES:
        raise ConfigError(f"model.output_stride: must be one of "
                          f"{', '.join(map(str, OUTPUT_STRIDES))}, got {output_stride}")
    model = DeepLabV3Plus(num_classes, backbone=backbone, output_stride=output_stride,
                          deep_stem=deep_stem, base_width=base_width, stem_width=stem_width,
                          projection_dim=projection_dim, projection_hidden=projection_hidden,
                          dropout=dropout)
    return model

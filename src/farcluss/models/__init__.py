"""Segmentation models: ResNet DeepLabV3+, DINOv2 DPT, checked pretrained-weight loading."""

from __future__ import annotations

from typing import Optional, Union

from torch import nn

from ..errors import ConfigError
from .deeplab import BACKBONE_DEPTHS, DECODER_CHANNELS, DeepLabV3Plus
from .dpt import DPT
from .pretrained import PRETRAINED_WEIGHTS, load_pretrained
from .resnet import ResNet, resnet
from .vit import VIT_SPECS, VisionTransformer

__all__ = ["BACKBONE_DEPTHS", "DPT", "DeepLabV3Plus", "PRETRAINED_WEIGHTS", "ResNet",
           "VIT_SPECS", "VisionTransformer", "build_model", "freeze_backbone", "load_pretrained",
           "resnet"]

OUTPUT_STRIDES = (8, 16, 32)
ARCHS = ("auto", "deeplabv3plus", "dpt")


def build_model(num_classes: int, backbone: str = "resnet50", output_stride: int = 16,
                deep_stem: bool = False, base_width: int = 64, projection_dim: int = 0,
                *, stem_width: Optional[int] = None, decoder_channels: int = DECODER_CHANNELS,
                projection_hidden: int = 256, dropout: float = 0.1, arch: str = "auto",
                vit_embed_dim: Optional[int] = None, vit_depth: Optional[int] = None,
                frozen_backbone: bool = False) -> Union[DeepLabV3Plus, DPT]:
    """Build a DeepLabV3+ (ResNet) or a DPT (DINOv2) with random weights; the trainer loads
    ``model.pretrained`` backbone weights afterwards (strictly; see :func:`load_pretrained`).
    ``frozen_backbone`` sets the encoder's parameters to need no gradient
    (:func:`freeze_backbone`)."""
    if backbone not in BACKBONE_DEPTHS and backbone not in VIT_SPECS:
        raise ConfigError(f"model.backbone: unknown backbone {backbone!r}; choose one of "
                          f"{', '.join(list(BACKBONE_DEPTHS) + list(VIT_SPECS))}")
    if arch not in ARCHS:
        raise ConfigError(f"model.arch: must be one of {', '.join(ARCHS)}, got {arch!r}")
    vit = backbone in VIT_SPECS
    if arch == "auto":
        arch = "dpt" if vit else "deeplabv3plus"
    if arch != ("dpt" if vit else "deeplabv3plus"):
        raise ConfigError(f"model.arch: {arch} does not take the {backbone} backbone")
    if arch == "dpt" and decoder_channels != DECODER_CHANNELS:
        raise ConfigError("model.decoder_channels sets the DeepLabV3+ head; the DPT head of a "
                          f"{backbone} backbone keeps its published width")
    if arch == "dpt":
        model: nn.Module = DPT(num_classes, backbone=backbone, embed_dim=vit_embed_dim,
                               depth=vit_depth, projection_dim=projection_dim,
                               projection_hidden=projection_hidden)
    else:
        if output_stride not in OUTPUT_STRIDES:
            raise ConfigError(f"model.output_stride: must be one of "
                              f"{', '.join(map(str, OUTPUT_STRIDES))}, got {output_stride}")
        model = DeepLabV3Plus(num_classes, backbone=backbone, output_stride=output_stride,
                              deep_stem=deep_stem, base_width=base_width, stem_width=stem_width,
                              decoder_channels=decoder_channels, projection_dim=projection_dim,
                              projection_hidden=projection_hidden, dropout=dropout)
    if frozen_backbone:
        freeze_backbone(model)
    return model


def freeze_backbone(model: nn.Module) -> None:
    """The encoder's parameters need no gradient, so the optimizer never sees them
    (`engine.optim.build_optimizer` keeps only trainable parameters) and they keep their values
    bit for bit. A ResNet's BatchNorm layers would still update their running statistics in
    train mode; `model.frozen_backbone` tells the trainer to keep them in eval mode."""
    for param in model.backbone.parameters():
        param.requires_grad_(False)
    model.frozen_backbone = True

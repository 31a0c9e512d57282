"""DeepLabV3+ (Chen et al., ECCV 2018) on a ResNet backbone, with an optional projection head.

    layer4 ─ ASPP (1x1, 3x3 at rates r1..r3, image pooling) ─ 1x1 → 256 ─ upsample ×(OS/4) ┐
    layer1 ─ 1x1 → 48 ─────────────────────────────────────────────────────────────────── concat
          → 3x3 conv 256 → 3x3 conv 256  = decoder ``feature`` (stride 4)
          → 1x1 classifier → bilinear upsample to the input size = ``logits``

Every resize takes its size from the tensor at run time and the pooling is adaptive, so the
model exports to ONNX with dynamic height and width.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import NormLayer, resnet

#: ASPP rates at output stride 16; they scale with 16 / output_stride
ASPP_RATES_OS16 = (6, 12, 18)

#: a feature perturbation: the encoder features the decoder reads → the ones it decodes
Perturb = Callable[[List[torch.Tensor]], List[torch.Tensor]]

BACKBONE_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, norm_layer: NormLayer,
                 dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                  bias=False),
        norm_layer(out_channels),
        nn.ReLU(inplace=True),
    )


#: the published DeepLabV3+ width of the ASPP output and the decoder feature
DECODER_CHANNELS = 256

class ImagePooling(nn.Module):
    """ASPP image-level branch: global average → 1x1 conv → ReLU → broadcast back.

    No normalisation here: the pooled tensor has one value per channel per image, so BatchNorm
    in train mode fails at batch size 1 (and is pure noise at 2). The conv keeps its bias
    instead; the ASPP projection's BatchNorm that follows normalises the concatenation.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.relu(self.conv(self.pool(x)))
        # bilinear from 1x1 is a broadcast; expand_as keeps the export free of resize ops
        return pooled.expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: parallel 1x1, three dilated 3x3 and image pooling,
    concatenated and projected to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int],
                 norm_layer: NormLayer, dropout: float = 0.1):
        super().__init__()
        branches: List[nn.Module] = [conv_bn_relu(in_channels, out_channels, 1, norm_layer)]
        branches += [conv_bn_relu(in_channels, out_channels, 3, norm_layer, dilation=rate)
                     for rate in rates]
        branches.append(ImagePooling(in_channels, out_channels))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(
            conv_bn_relu(out_channels * len(branches), out_channels, 1, norm_layer),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class ProjectionHead(nn.Module):
    """Pixel embeddings for the contrastive loss: z = normalize(W2 · ReLU(BN(W1 · f))), ‖z‖₂ = 1
    over channels at every pixel."""

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int,
                 norm_layer: NormLayer):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, kernel_size=1, bias=False),
            norm_layer(hidden_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, out_channels, kernel_size=1),
        )

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(feature), p=2.0, dim=1)

    def forward_pixels(self, pixel_features: torch.Tensor) -> torch.Tensor:
        """Embeddings ``N × out`` of ``N × in`` pixel features: the same layers, applied only to
        the pixels a loss uses, so memory does not grow with the image.

        A 1×1 conv of N one-pixel images is a matrix product; as ``F.linear`` on the conv's
        weights it runs ~4× faster on CPU than the conv (whose backward treats every pixel as
        its own image), with the same parameters and result.

        It runs in float32 even under autocast: N changes every step, and oneDNN builds a new
        bf16 matmul kernel for every new shape (~30 ms a step for this head on CPU, against
        ~5 ms in float32); the embeddings feed a float32 loss anyway."""
        first, norm, relu, second = self.layers
        with torch.autocast(device_type=pixel_features.device.type, enabled=False):
            hidden = F.linear(pixel_features.to(first.weight.dtype), first.weight.flatten(1),
                              first.bias)
            # the normalisation layer (BatchNorm2d, SyncBatchNorm, GroupNorm) wants N×C×H×W
            hidden = relu(norm(hidden[:, :, None, None]).flatten(1))
            embeddings = F.linear(hidden, second.weight.flatten(1), second.bias)
            return F.normalize(embeddings, p=2.0, dim=1)


def with_projections(projection: Optional["ProjectionHead"], logits: torch.Tensor,
                     feature: torch.Tensor, project: bool, project_index: Optional[torch.Tensor]):
    """The model contract's return value (docs/architecture.md, "Model"): ``(logits, feature)``,
    plus the embeddings of the decoder pixels ``project_index`` names (``N × D``) or, with
    ``project``, of the whole map (``B × D × h × w``). Shared by every segmentation model."""
    if project_index is None and not project:
        return logits, feature
    if projection is None:
        raise RuntimeError("this model has no projection head (projection_dim=0)")
    if project_index is not None:
        # gather from the B×C×(h·w) view: no copy of the whole decoder map
        pixels_per_image = feature.shape[2] * feature.shape[3]
        pixel_features = feature.flatten(2)[project_index // pixels_per_image, :,
                                            project_index % pixels_per_image]
        return logits, feature, projection.forward_pixels(pixel_features)
    return logits, feature, projection(feature)


class SegmentationModel(nn.Module):
    """What every segmentation model shares: an encoder ``backbone`` and head modules (trained
    from scratch at `train.head_lr_multiplier` × the learning rate)."""

    backbone: nn.Module

    def head_modules(self) -> List[nn.Module]:
        raise NotImplementedError

    def parameter_groups(self) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
        """``(backbone_params, head_params)``; together they are every parameter exactly once."""
        backbone_params = list(self.backbone.parameters())
        head_params = [p for module in self.head_modules() for p in module.parameters()]
        return backbone_params, head_params


class DeepLabV3Plus(SegmentationModel):
    """DeepLabV3+ returning ``(logits, feature)``, or ``(logits, feature, embedding)`` with
    ``project=True``.

    Args:
        num_classes: output channels of the classifier.
        backbone: ``resnet18`` | ``resnet34`` | ``resnet50`` | ``resnet101``.
        output_stride: 8 or 16 (32 works but is not DeepLab).
        deep_stem, base_width, stem_width: passed to :func:`models.resnet.resnet`.
        decoder_channels: channels of ASPP output and of the decoder ``feature`` (256).
        low_level_channels: channels the layer1 feature is reduced to before the concat (48).
        aspp_dilations: ASPP rates; default 6/12/18 scaled by 16 / output_stride.
        projection_dim: embedding size of the projection head; 0 builds no head.
        projection_hidden: hidden channels of the projection head.
        dropout: dropout after the ASPP projection (0.1 as the reference DeepLabV3+).
        norm_layer: normalisation constructor for backbone and head (default BatchNorm2d).
    """

    def __init__(self, num_classes: int, backbone: str = "resnet50", output_stride: int = 16,
                 deep_stem: bool = False, base_width: int = 64, stem_width: Optional[int] = None,
                 decoder_channels: int = DECODER_CHANNELS, low_level_channels: int = 48,
                 aspp_dilations: Optional[Sequence[int]] = None, projection_dim: int = 0,
                 projection_hidden: int = 256, dropout: float = 0.1,
                 norm_layer: Optional[NormLayer] = None):
        super().__init__()
        if backbone not in BACKBONE_DEPTHS:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of "
                             f"{', '.join(BACKBONE_DEPTHS)}")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.num_classes = num_classes
        self.projection_dim = projection_dim
        self.backbone = resnet(BACKBONE_DEPTHS[backbone], output_stride=output_stride,
                               deep_stem=deep_stem, base_width=base_width, stem_width=stem_width,
                               norm_layer=norm_layer)
        if aspp_dilations is None:
            aspp_dilations = tuple(rate * 16 // output_stride for rate in ASPP_RATES_OS16)
        low_level_in, high_level_in = self.backbone.out_channels[0], self.backbone.out_channels[3]

        self.aspp = ASPP(high_level_in, decoder_channels, aspp_dilations, norm_layer, dropout)
        self.reduce_low_level = conv_bn_relu(low_level_in, low_level_channels, 1, norm_layer)
        self.fuse = nn.Sequential(
            conv_bn_relu(decoder_channels + low_level_channels, decoder_channels, 3, norm_layer),
            conv_bn_relu(decoder_channels, decoder_channels, 3, norm_layer),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, kernel_size=1)
        self.projection: Optional[ProjectionHead] = None
        if projection_dim > 0:
            self.projection = ProjectionHead(decoder_channels, projection_hidden, projection_dim,
                                             norm_layer)

        for module in self.head_modules():
            for layer in module.modules():
                if isinstance(layer, nn.Conv2d):
                    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                    if layer.bias is not None:
                        nn.init.zeros_(layer.bias)
                elif isinstance(layer, (nn.BatchNorm2d, nn.GroupNorm)):
                    nn.init.ones_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def head_modules(self) -> List[nn.Module]:
        """Every module outside the backbone (trained from scratch, higher learning rate)."""
        modules = [self.aspp, self.reduce_low_level, self.fuse, self.classifier]
        if self.projection is not None:
            modules.append(self.projection)
        return modules

    def decode(self, images: torch.Tensor, perturb: Optional[Perturb] = None) -> torch.Tensor:
        """The decoder feature ``B × decoder_channels × H/4 × W/4`` (before the classifier).

        ``perturb`` maps the encoder features the decoder reads, ``[low_level, high_level]``, to
        the ones it decodes; it may change the batch (UniMatch decodes clean and dropped-out
        copies together), and the decoder feature follows its batch.
        """
        low_level, _, _, high_level = self.backbone(images)
        if perturb is not None:
            low_level, high_level = perturb([low_level, high_level])
        context = self.aspp(high_level)
        context = F.interpolate(context, size=low_level.shape[-2:], mode="bilinear",
                                align_corners=False)
        return self.fuse(torch.cat([context, self.reduce_low_level(low_level)], dim=1))

    def project(self, feature: torch.Tensor) -> torch.Tensor:
        """L2-normalised pixel embeddings ``B × projection_dim × h × w`` of a decoder feature."""
        if self.projection is None:
            raise RuntimeError("this model has no projection head (projection_dim=0)")
        return self.projection(feature)

    @staticmethod
    def feature_size(height: int, width: int) -> Tuple[int, int]:
        """Spatial size of the decoder feature for an input of ``height × width``: the stem's
        stride-2 conv and max-pool each round up."""
        return (height + 3) // 4, (width + 3) // 4

    def forward(self, images: torch.Tensor, project: bool = False,
                project_index: Optional[torch.Tensor] = None, perturb: Optional[Perturb] = None
                ) -> Union[Tuple[torch.Tensor, torch.Tensor],
                           Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``project=True`` adds embeddings of every decoder pixel (``B × D × h × w``);
        ``project_index`` (indices into the ``B·h·w`` decoder pixels, batch-major) adds
        embeddings of those pixels only (``N × D``), which is what the contrastive loss needs;
        ``perturb`` is the feature perturbation of :meth:`decode`."""
        feature = self.decode(images, perturb)
        logits = F.interpolate(self.classifier(feature), size=images.shape[-2:], mode="bilinear",
                               align_corners=False)
        return with_projections(self.projection, logits, feature, project, project_index)

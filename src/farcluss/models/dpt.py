"""DPT (Ranftl et al., ICCV 2021) on a DINOv2 encoder, the segmentation model of UniMatch V2
(its ``model/semseg/dpt.py``, adapted from Depth Anything), written here.

    images → pad to a multiple of 14 → ViT → normalised patch tokens of 4 blocks, each h×w×D
      (the feature perturbation acts here, on the four encoder → decoder features)
    reassemble:  1x1 conv → C₁..C₄ channels, then ×4 (transposed conv), ×2, ×1, ×½ (3x3 conv s2)
    fuse:        3x3 conv → F channels each; RefineNet blocks from the coarsest up, ×2 each
                 (ReLU-conv-ReLU-conv residual units, bilinear with align_corners, 1x1 conv)
    head:        3x3 conv + ReLU = ``feature`` (F channels at 8 h × 8 w, stride 1.75)
                 → 1x1 classifier → bilinear (align_corners) to the padded input → crop = ``logits``

Widths as UniMatch V2: ViT-S F = 64, C = 48/96/192/384; ViT-B 128, 96/192/384/768;
ViT-L 256, 256/512/1024/1024. No normalisation layers in the head (V2: ``use_bn=False``).
Every resize takes its size from the tensors at run time, so the model exports to ONNX with
dynamic height and width.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .deeplab import Perturb, ProjectionHead, SegmentationModel, with_projections
from .vit import PATCH_SIZE, VisionTransformer, vit_spec

#: the decoder feature is this many times finer than the patch grid
FEATURE_UPSAMPLE = 8

#: (fusion channels F, reassemble channels C₁..C₄) per encoder width, as UniMatch V2
DPT_WIDTHS = {384: (64, (48, 96, 192, 384)), 768: (128, (96, 192, 384, 768)),
              1024: (256, (256, 512, 1024, 1024))}


def dpt_widths(embed_dim: int) -> Tuple[int, Tuple[int, ...]]:
    """V2's widths for the published encoders; a narrowed (test) encoder scales like ViT-S/B:
    C = D/8, D/4, D/2, D and F = D/6 (at least 4 and 8 channels)."""
    if embed_dim in DPT_WIDTHS:
        return DPT_WIDTHS[embed_dim]
    reassemble = tuple(max(4, embed_dim * k // 8) for k in (1, 2, 4, 8))
    return max(8, embed_dim // 6), reassemble


class ResidualConvUnit(nn.Module):
    """x + conv(ReLU(conv(ReLU(x))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """RefineNet-style fusion: (coarser path + unit₁(skip)) → unit₂ → resize → 1x1 conv."""

    def __init__(self, channels: int, with_skip: bool = True):
        super().__init__()
        # the coarsest block has no skip input; V2 builds the unit anyway and leaves it unused
        # (hence its find_unused_parameters=True); here it does not exist
        self.skip_unit = ResidualConvUnit(channels) if with_skip else None
        self.unit = ResidualConvUnit(channels)
        self.out_conv = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, path: Tensor, skip: Optional[Tensor] = None,
                size: Optional[Sequence[int]] = None) -> Tensor:
        if skip is not None:
            assert self.skip_unit is not None
            path = path + self.skip_unit(skip)
        path = self.unit(path)
        if size is None:
            size = (path.shape[-2] * 2, path.shape[-1] * 2)
        path = F.interpolate(path, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(path)


class DPTDecoder(nn.Module):
    """Four token maps → the decoder feature (F channels at 8× the patch grid)."""

    def __init__(self, embed_dim: int, features: int, reassemble: Sequence[int]):
        super().__init__()
        self.projects = nn.ModuleList(nn.Conv2d(embed_dim, c, kernel_size=1) for c in reassemble)
        self.resize = nn.ModuleList([
            nn.ConvTranspose2d(reassemble[0], reassemble[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(reassemble[1], reassemble[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(reassemble[3], reassemble[3], kernel_size=3, stride=2, padding=1),
        ])
        self.layers_rn = nn.ModuleList(nn.Conv2d(c, features, kernel_size=3, padding=1,
                                                 bias=False) for c in reassemble)
        self.fusion = nn.ModuleList(FusionBlock(features, with_skip=index < 3)
                                    for index in range(4))
        self.head_conv = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, tokens: List[Tensor], grid_h, grid_w) -> Tensor:
        maps = []
        for index, x in enumerate(tokens):
            x = x.transpose(1, 2).reshape(x.shape[0], x.shape[-1], grid_h, grid_w)
            x = self.resize[index](self.projects[index](x))
            maps.append(self.layers_rn[index](x))
        layer1, layer2, layer3, layer4 = maps
        path = self.fusion[3](layer4, size=layer3.shape[-2:])
        path = self.fusion[2](path, layer3, size=layer2.shape[-2:])
        path = self.fusion[1](path, layer2, size=layer1.shape[-2:])
        path = self.fusion[0](path, layer1)
        return F.relu(self.head_conv(path))


class DPT(SegmentationModel):
    """DINOv2 + DPT returning ``(logits, feature)``, with the same options as
    `models.deeplab.DeepLabV3Plus` (``project``, ``project_index``, ``perturb``).

    Args:
        num_classes: output channels of the classifier.
        backbone: a name of ``models.vit.VIT_SPECS``.
        embed_dim, depth: a narrower or shallower encoder (tiny test models); None = the variant's.
        projection_dim, projection_hidden: the projection head (0: none).
    """

    def __init__(self, num_classes: int, backbone: str = "dinov2_vitb14",
                 embed_dim: Optional[int] = None, depth: Optional[int] = None,
                 projection_dim: int = 0, projection_hidden: int = 256):
        super().__init__()
        self.num_classes = num_classes
        self.projection_dim = projection_dim
        self.backbone = VisionTransformer(vit_spec(backbone, embed_dim, depth))
        features, reassemble = dpt_widths(self.backbone.embed_dim)
        self.decoder_channels = features
        self.decoder = DPTDecoder(self.backbone.embed_dim, features, reassemble)
        self.classifier = nn.Conv2d(features, num_classes, kernel_size=1)
        self.projection: Optional[ProjectionHead] = None
        if projection_dim > 0:
            self.projection = ProjectionHead(features, projection_hidden, projection_dim,
                                             nn.BatchNorm2d)

    def head_modules(self) -> List[nn.Module]:
        modules = [self.decoder, self.classifier]
        if self.projection is not None:
            modules.append(self.projection)
        return modules

    @staticmethod
    def feature_size(height: int, width: int) -> Tuple[int, int]:
        """The decoder feature's size for an input of ``height × width``: the part of the
        8 × (padded grid) map that covers the image, ⌈8·H/14⌉ × ⌈8·W/14⌉."""
        return (-(-FEATURE_UPSAMPLE * height // PATCH_SIZE),
                -(-FEATURE_UPSAMPLE * width // PATCH_SIZE))

    def _decode_padded(self, images: Tensor, perturb: Optional[Perturb]) -> Tensor:
        height, width = images.shape[-2:]
        padded = F.pad(images, (0, (-width) % PATCH_SIZE, 0, (-height) % PATCH_SIZE))
        grid_h, grid_w = padded.shape[-2] // PATCH_SIZE, padded.shape[-1] // PATCH_SIZE
        tokens = self.backbone(padded)
        if perturb is not None:
            tokens = perturb(tokens)
        return self.decoder(tokens, grid_h, grid_w)

    def decode(self, images: Tensor, perturb: Optional[Perturb] = None) -> Tensor:
        """The decoder feature over the image (padding cropped), ``B × F × feature_size``.

        ``perturb`` maps the four encoder features (``B × h·w × D`` token maps) to the ones
        the decoder reads; it may change the batch (UniMatch's clean + dropped-out copies)."""
        feature = self._decode_padded(images, perturb)
        rows, cols = self.feature_size(images.shape[-2], images.shape[-1])
        return feature[..., :rows, :cols]

    def project(self, feature: Tensor) -> Tensor:
        if self.projection is None:
            raise RuntimeError("this model has no projection head (projection_dim=0)")
        return self.projection(feature)

    def forward(self, images: Tensor, project: bool = False,
                project_index: Optional[Tensor] = None, perturb: Optional[Perturb] = None
                ) -> Union[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor, Tensor]]:
        """As `DeepLabV3Plus.forward`: logits at the input size, the decoder feature, and with
        ``project_index`` the embeddings of those decoder pixels (batch-major flat indices)."""
        height, width = images.shape[-2:]
        padded_feature = self._decode_padded(images, perturb)
        padded_size = (padded_feature.shape[-2] // FEATURE_UPSAMPLE * PATCH_SIZE,
                       padded_feature.shape[-1] // FEATURE_UPSAMPLE * PATCH_SIZE)
        logits = F.interpolate(self.classifier(padded_feature), size=padded_size,
                               mode="bilinear", align_corners=True)[..., :height, :width]
        rows, cols = self.feature_size(height, width)
        feature = padded_feature[..., :rows, :cols]
        return with_projections(self.projection, logits, feature, project, project_index)

"""ResNet-18/34/50/101 backbones for dense prediction.

Parameter names follow torchvision (``conv1``, ``bn1``, ``layer1``..``layer4``,
``downsample.0/1``) so ImageNet checkpoints load key for key. The deep stem (ResNet-v1c) is an
``nn.Sequential`` named ``stem`` laid out as mmsegmentation's (``stem.0`` conv, ``stem.1`` BN,
``stem.2`` ReLU, ``stem.3``/``.4``/``.5``, ``stem.6``/``.7``/``.8``), so mmseg v1c checkpoints
load unchanged; ``models.pretrained`` maps other layouts onto it.

Output stride 16 or 8 replaces the stride of layer4 (and layer3) by dilation, as DeepLab does,
so the last stages keep resolution while their receptive field still grows.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Type, Union

import torch
from torch import nn

NormLayer = Callable[[int], nn.Module]

#: blocks per stage for each supported depth
RESNET_LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}

#: dilation of (layer3, layer4) for each output stride; layer1/2 are never dilated
STAGE_DILATIONS = {32: (1, 1), 16: (1, 2), 8: (2, 4)}


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    # padding = dilation keeps the spatial size of a stride-1 3x3 conv at any dilation
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride,
                     padding=dilation, dilation=dilation, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or projected) shortcut; used by ResNet-18/34."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = conv3x3(in_channels, planes, stride, dilation)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided/dilated), 1x1 expand ×4; stride on the 3x3 (ResNet-v1.5)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = conv1x1(in_channels, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


Block = Union[Type[BasicBlock], Type[Bottleneck]]


class ResNet(nn.Module):
    """ResNet trunk returning the four stage features ``[layer1, layer2, layer3, layer4]``.

    Strides of the features are 4, 8, 16, 32 at output stride 32; at output stride 16 layer4
    keeps stride 16 (dilation 2), at 8 layer3 and layer4 keep stride 8 (dilations 2 and 4).
    The first block of a dilated stage uses the previous stage's dilation, as torchvision's
    ``replace_stride_with_dilation`` does, so pretrained weights see the receptive field grow
    gradually.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        blocks_per_stage: number of blocks in layer1..layer4.
        output_stride: 8, 16 or 32.
        deep_stem: three 3x3 convs (ResNet-v1c) instead of one 7x7 conv.
        base_width: channels of the first stage (64 for the standard networks); every stage
            scales with it, so small values give tiny models for tests.
        stem_width: channels out of the stem (default ``base_width``). The deep stem is
            3 → stem_width/2 (stride 2) → stem_width/2 → stem_width; mmseg's v1c uses 64,
            UniMatch/PSPNet "deep base" checkpoints use 128.
        norm_layer: normalisation constructor taking the channel count (default BatchNorm2d).
    """

    def __init__(self, block: Block, blocks_per_stage: Sequence[int], output_stride: int = 16,
                 deep_stem: bool = False, base_width: int = 64, stem_width: Optional[int] = None,
                 norm_layer: Optional[NormLayer] = None):
        super().__init__()
        if output_stride not in STAGE_DILATIONS:
            raise ValueError(f"output_stride must be one of {sorted(STAGE_DILATIONS)}, "
                             f"got {output_stride}")
        if len(blocks_per_stage) != 4:
            raise ValueError(f"expected 4 stages, got {len(blocks_per_stage)}")
        norm_layer = norm_layer or nn.BatchNorm2d
        stem_width = stem_width or base_width
        if deep_stem and stem_width % 2:
            raise ValueError(f"the deep stem needs an even stem_width, got {stem_width}")
        self.depth = sum(blocks_per_stage) * (3 if block is Bottleneck else 2) + 2
        self.deep_stem = deep_stem
        self.base_width = base_width
        self.stem_width = stem_width
        self.output_stride = output_stride

        if deep_stem:
            half = stem_width // 2
            self.stem = nn.Sequential(
                conv3x3(3, half, stride=2), norm_layer(half), nn.ReLU(inplace=True),
                conv3x3(half, half), norm_layer(half), nn.ReLU(inplace=True),
                conv3x3(half, stem_width), norm_layer(stem_width), nn.ReLU(inplace=True),
            )
        else:
            self.conv1 = nn.Conv2d(3, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = norm_layer(stem_width)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        dilation3, dilation4 = STAGE_DILATIONS[output_stride]
        stage_specs = [  # (planes, stride, dilation of the stage's later blocks)
            (base_width, 1, 1),
            (base_width * 2, 2, 1),
            (base_width * 4, 2, dilation3),
            (base_width * 8, 2, dilation4),
        ]
        in_channels, previous_dilation = stem_width, 1
        stages = []
        for (planes, stride, dilation), num_blocks in zip(stage_specs, blocks_per_stage):
            if dilation > 1:
                stride = 1
            stages.append(self._make_stage(block, in_channels, planes, num_blocks, stride,
                                           previous_dilation, dilation, norm_layer))
            in_channels, previous_dilation = planes * block.expansion, dilation
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels: List[int] = [planes * block.expansion for planes, _, _ in stage_specs]

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @staticmethod
    def _make_stage(block: Block, in_channels: int, planes: int, num_blocks: int, stride: int,
                    first_dilation: int, dilation: int, norm_layer: NormLayer) -> nn.Sequential:
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(conv1x1(in_channels, out_channels, stride),
                                       norm_layer(out_channels))
        blocks = [block(in_channels, planes, stride, first_dilation, downsample, norm_layer)]
        blocks += [block(out_channels, planes, 1, dilation, None, norm_layer)
                   for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        if self.deep_stem:
            x = self.stem(images)
        else:
            x = self.relu(self.bn1(self.conv1(images)))
        x = self.maxpool(x)
        features = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            features.append(x)
        return features


def resnet(depth: int, output_stride: int = 16, deep_stem: bool = False, base_width: int = 64,
           stem_width: Optional[int] = None, norm_layer: Optional[NormLayer] = None) -> ResNet:
    """Build a ResNet-``depth`` (18, 34, 50 or 101) trunk; see :class:`ResNet` for the arguments."""
    if depth not in RESNET_LAYOUTS:
        raise ValueError(f"unsupported ResNet depth {depth}; choose one of {sorted(RESNET_LAYOUTS)}")
    kind, blocks_per_stage = RESNET_LAYOUTS[depth]
    block = BasicBlock if kind == "basic" else Bottleneck
    return ResNet(block, blocks_per_stage, output_stride=output_stride, deep_stem=deep_stem,
                  base_width=base_width, stem_width=stem_width, norm_layer=norm_layer)

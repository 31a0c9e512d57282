import pytest
import torch

from farcluss.models.resnet import resnet

TINY_WIDTH = 8
# stage channels at base width 8: basic blocks keep them, bottlenecks expand by 4
TINY_CHANNELS = {18: [8, 16, 32, 64], 34: [8, 16, 32, 64],
                 50: [32, 64, 128, 256], 101: [32, 64, 128, 256]}
# feature strides of layer1..layer4 for each output stride
STAGE_STRIDES = {32: [4, 8, 16, 32], 16: [4, 8, 16, 16], 8: [4, 8, 8, 8]}


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_stage_features_have_expected_channels_and_strides(depth, output_stride):
    torch.manual_seed(0)
    backbone = resnet(depth, output_stride=output_stride, base_width=TINY_WIDTH).eval()
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 32, 32))
    assert backbone.out_channels == TINY_CHANNELS[depth]
    expected = [(2, channels, 32 // stride, 32 // stride)
                for channels, stride in zip(TINY_CHANNELS[depth], STAGE_STRIDES[output_stride])]
    assert [tuple(f.shape) for f in features] == expected


@pytest.mark.parametrize("depth,output_stride", [(18, 8), (50, 16), (101, 8)])
def test_deep_stem_keeps_feature_shapes(depth, output_stride):
    torch.manual_seed(0)
    backbone = resnet(depth, output_stride=output_stride, deep_stem=True,
                      base_width=TINY_WIDTH).eval()
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 48, 64))
    strides = STAGE_STRIDES[output_stride]
    assert [tuple(f.shape[-2:]) for f in features] == [(48 // s, 64 // s) for s in strides]
    # v1c stem: 3 -> w/2 (stride 2) -> w/2 -> w
    assert backbone.stem[0].weight.shape == (4, 3, 3, 3)
    assert backbone.stem[0].stride == (2, 2)
    assert backbone.stem[3].weight.shape == (4, 4, 3, 3)
    assert backbone.stem[6].weight.shape == (8, 4, 3, 3)
    assert not hasattr(backbone, "conv1")


def test_stem_width_sets_the_input_of_layer1():
    backbone = resnet(50, deep_stem=True, base_width=TINY_WIDTH, stem_width=16)
    assert backbone.stem[6].weight.shape == (16, 4 * 2, 3, 3)
    assert backbone.layer1[0].conv1.in_channels == 16
    assert backbone.layer1[0].downsample[0].in_channels == 16


def test_output_stride_16_dilates_layer4_after_its_first_block():
    backbone = resnet(50, output_stride=16, base_width=TINY_WIDTH)
    assert [block.conv2.dilation for block in backbone.layer3] == [(1, 1)] * 6
    assert [block.conv2.dilation for block in backbone.layer4] == [(1, 1), (2, 2), (2, 2)]
    assert backbone.layer4[0].conv2.stride == (1, 1)
    assert backbone.layer4[0].downsample[0].stride == (1, 1)


def test_output_stride_8_dilates_basic_blocks_of_layer3_and_layer4():
    backbone = resnet(18, output_stride=8, base_width=TINY_WIDTH)
    assert [block.conv1.dilation for block in backbone.layer3] == [(1, 1), (2, 2)]
    assert [block.conv2.dilation for block in backbone.layer3] == [(1, 1), (2, 2)]
    assert [block.conv1.dilation for block in backbone.layer4] == [(2, 2), (4, 4)]
    assert backbone.layer3[0].conv1.stride == (1, 1)
    # padding follows dilation so a stride-1 3x3 conv keeps the size
    assert backbone.layer4[1].conv2.padding == (4, 4)


@pytest.mark.parametrize("depth,num_tensors,num_params", [
    # torchvision's resnet18/50 minus fc (512*1000+1000 and 2048*1000+1000 parameters)
    (18, 120, 11_689_512 - 513_000),
    (50, 318, 25_557_032 - 2_049_000),
])
def test_full_width_matches_torchvision_layout(depth, num_tensors, num_params):
    backbone = resnet(depth)
    state = backbone.state_dict()
    assert len(state) == num_tensors
    assert sum(p.numel() for p in backbone.parameters()) == num_params
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight",
                "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_mean",
                "layer4.1.bn2.weight"):
        assert key in state
    assert state["conv1.weight"].shape == (64, 3, 7, 7)


@pytest.mark.parametrize("kwargs", [{"depth": 152}, {"depth": 50, "output_stride": 4}])
def test_unsupported_configurations_are_rejected(kwargs):
    with pytest.raises(ValueError):
        resnet(**kwargs)

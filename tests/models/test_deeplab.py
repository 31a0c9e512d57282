import pytest
import torch
from torch import nn

from farcluss.errors import ConfigError
from farcluss.models import build_model
from farcluss.models.deeplab import DeepLabV3Plus, ProjectionHead

NUM_CLASSES = 5


def tiny_model(**kwargs):
    torch.manual_seed(0)
    options = dict(backbone="resnet18", base_width=8)
    options.update(kwargs)
    return DeepLabV3Plus(NUM_CLASSES, **options)


@pytest.mark.parametrize("backbone,output_stride,deep_stem", [
    ("resnet18", 16, False), ("resnet34", 8, False), ("resnet50", 16, True),
    ("resnet101", 8, False),
])
def test_logits_at_input_size_and_feature_at_quarter(backbone, output_stride, deep_stem):
    model = tiny_model(backbone=backbone, output_stride=output_stride,
                       deep_stem=deep_stem).eval()
    images = torch.randn(2, 3, 50, 38)
    with torch.no_grad():
        logits, feature = model(images)
    assert logits.shape == (2, NUM_CLASSES, 50, 38)
    # stride-2 conv then stride-2 max pool, each rounding up: 50 -> 25 -> 13, 38 -> 19 -> 10
    assert feature.shape == (2, 256, 13, 10)


def test_aspp_rates_scale_with_output_stride():
    def rates(model):
        return [branch[0].dilation[0] for branch in model.aspp.branches[1:4]]

    assert rates(tiny_model(output_stride=16)) == [6, 12, 18]
    assert rates(tiny_model(output_stride=8)) == [12, 24, 36]
    assert rates(tiny_model(aspp_dilations=(2, 3, 4))) == [2, 3, 4]


def test_projection_gives_unit_norm_embeddings_of_the_feature():
    model = tiny_model(projection_dim=16, projection_hidden=32).eval()
    with torch.no_grad():
        logits, feature, embedding = model(torch.randn(2, 3, 32, 32), project=True)
        assert torch.allclose(embedding, model.project(feature))
    assert embedding.shape == (2, 16, 8, 8)
    assert torch.allclose(embedding.norm(dim=1), torch.ones(2, 8, 8), atol=1e-5)


def test_project_without_head_is_an_error():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="projection_dim"):
        model.project(torch.randn(1, 256, 4, 4))


def test_batch_of_one_trains_and_every_parameter_gets_a_gradient():
    # one forward with project=True must reach every parameter (DDP checks this)
    model = tiny_model(projection_dim=8, projection_hidden=16).train()
    logits, feature, embedding = model(torch.randn(1, 3, 32, 32), project=True)
    (logits.square().mean() + embedding.sum()).backward()
    without_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert without_grad == []


def test_parameter_groups_split_backbone_from_head():
    model = tiny_model(projection_dim=8)
    backbone_params, head_params = model.parameter_groups()
    assert {id(p) for p in backbone_params} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in backbone_params}.isdisjoint(id(p) for p in head_params)
    assert len(backbone_params) + len(head_params) == len(list(model.parameters()))
    assert any(p is model.classifier.weight for p in head_params)


def test_build_model_rejects_unknown_backbone_naming_the_key():
    with pytest.raises(ConfigError, match=r"model\.backbone.*resnet152"):
        build_model(NUM_CLASSES, backbone="resnet152")


def test_build_model_rejects_bad_output_stride_naming_the_key():
    with pytest.raises(ConfigError, match=r"model\.output_stride"):
        build_model(NUM_CLASSES, backbone="resnet18", output_stride=4)


def test_full_resnet50_forward_at_65_pixels():
    torch.manual_seed(0)
    model = build_model(21, backbone="resnet50", output_stride=16).eval()
    with torch.no_grad():
        logits, feature = model(torch.randn(1, 3, 65, 65))
    assert logits.shape == (1, 21, 65, 65)
    assert feature.shape == (1, 256, 17, 17)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (65, 64), (31, 30)])
def test_feature_size_predicts_the_decoder_resolution(size):
    model = DeepLabV3Plus(3, backbone="resnet18", base_width=8).eval()
    with torch.no_grad():
        _, feature = model(torch.randn(1, 3, *size))
    assert tuple(feature.shape[-2:]) == DeepLabV3Plus.feature_size(*size)


def test_projecting_sampled_pixels_equals_projecting_the_map_at_those_pixels():
    torch.manual_seed(0)
    model = DeepLabV3Plus(3, backbone="resnet18", base_width=8, projection_dim=16).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, feature, full = model(images, project=True)
        index = torch.tensor([0, 5, 63, 64, 127])
        _, _, sampled = model(images, project_index=index)
    flat = full.permute(0, 2, 3, 1).reshape(-1, full.shape[1])
    assert sampled.shape == (5, 16)
    assert torch.allclose(sampled, flat[index], atol=1e-6)
    assert torch.allclose(sampled.norm(dim=1), torch.ones(5), atol=1e-5)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_projecting_pixels_matches_the_conv_head_in_training_values_and_gradients(norm):
    torch.manual_seed(0)
    norm_layer = nn.BatchNorm2d if norm == "batch" else (lambda c: nn.GroupNorm(4, c))
    # float64: the two paths sum in different orders, and a 2-channel group norm amplifies that
    head = ProjectionHead(12, 8, 6, norm_layer).double().train()
    pixels = torch.randn(10, 12, dtype=torch.float64, requires_grad=True)

    by_linear = head.forward_pixels(pixels)
    by_linear.pow(3).sum().backward()
    linear_grads = [p.grad.clone() for p in head.parameters()] + [pixels.grad.clone()]
    head.zero_grad()
    pixels.grad = None

    by_conv = head(pixels[:, :, None, None]).flatten(1)
    by_conv.pow(3).sum().backward()
    conv_grads = [p.grad for p in head.parameters()] + [pixels.grad]

    assert torch.allclose(by_linear, by_conv, atol=1e-12)
    for linear_grad, conv_grad in zip(linear_grads, conv_grads):
        assert torch.allclose(linear_grad, conv_grad, atol=1e-10)


def test_projecting_pixels_under_autocast_runs_in_float32():
    torch.manual_seed(0)
    head = ProjectionHead(12, 8, 6, nn.BatchNorm2d).train()
    pixels = torch.randn(10, 12)
    expected = head.forward_pixels(pixels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # the decoder hands over bf16 features under autocast
        embeddings = head.forward_pixels(pixels.to(torch.bfloat16))
    assert embeddings.dtype == torch.float32
    # only the bf16 rounding of the input differs, not bf16 products
    assert torch.allclose(embeddings, expected, atol=2e-2)
    assert not torch.allclose(embeddings, expected, atol=1e-7)


def test_decoder_channels_from_config_set_the_head_width_every_method_builds(tmp_path):
    from conftest import tiny_overrides, write_tiny_dataset
    from farcluss.config import load_config
    from farcluss.methods import build_method

    root = write_tiny_dataset(tmp_path / "tiny")
    for method in ("supervised", "farcluss"):
        cfg = load_config(overrides=tiny_overrides(root, method) + ["model.decoder_channels=24"])
        model = build_method(cfg, 3).build_student()
        assert model.classifier.in_channels == 24
        assert model.aspp.project[0][0].out_channels == 24
        logits, feature = model(torch.randn(2, 3, 32, 32))[:2]
        assert logits.shape == (2, 3, 32, 32) and feature.shape[1] == 24
    narrow = sum(p.numel() for p in build_model(3, "resnet18", base_width=8,
                                                decoder_channels=24).parameters())
    wide = sum(p.numel() for p in build_model(3, "resnet18", base_width=8).parameters())
    assert narrow < wide


def test_decoder_channels_are_refused_for_a_dpt_head():
    with pytest.raises(ConfigError, match="model.decoder_channels"):
        build_model(3, "dinov2_vits14", vit_embed_dim=64, vit_depth=2, decoder_channels=64)

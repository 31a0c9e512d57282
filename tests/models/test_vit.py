"""The DINOv2 ViT: token shapes, the positional table resampled as the official code does
(unchanged at the native grid), register tokens, and the Hugging Face key map."""

import pytest
import torch
import torch.nn.functional as F

from farcluss.models.vit import (VIT_SPECS, VisionTransformer, bicubic_matrix,
                                 default_out_indices, hf_to_official_keys, resample_pos_embed,
                                 vit_spec)


def tiny(backbone="dinov2_vits14", depth=2, pretrain_grid=4):
    torch.manual_seed(0)
    return VisionTransformer(vit_spec(backbone, 32, depth), pretrain_grid=pretrain_grid)


def test_published_variants_have_the_official_sizes():
    assert {name: (s.embed_dim, s.depth, s.num_heads, s.out_indices)
            for name, s in VIT_SPECS.items() if not name.endswith("_reg")} == {
        "dinov2_vits14": (384, 12, 6, (2, 5, 8, 11)),
        "dinov2_vitb14": (768, 12, 12, (2, 5, 8, 11)),
        "dinov2_vitl14": (1024, 24, 16, (4, 11, 17, 23))}
    assert VIT_SPECS["dinov2_vitb14_reg"].num_register_tokens == 4
    assert default_out_indices(4) == (0, 1, 2, 3)
    assert default_out_indices(2) == (0, 0, 1, 1)


def test_official_parameter_names():
    names = set(VisionTransformer(vit_spec("dinov2_vits14", 32, 1)).state_dict())
    assert names == {
        "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
        "norm.weight", "norm.bias",
        *(f"blocks.0.{part}" for part in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
            "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
            "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma"))}
    # the full ViT-S/14: the official table of 37 × 37 + 1 positions
    assert VisionTransformer(vit_spec("dinov2_vits14", 32, 1)).pos_embed.shape == (1, 1370, 32)


@pytest.mark.parametrize("size", [(28, 42), (14, 14), (70, 28)])
def test_four_normalised_patch_token_maps(size):
    model = tiny()
    tokens = model(torch.randn(2, 3, *size))
    assert len(tokens) == 4
    for t in tokens:
        assert t.shape == (2, (size[0] // 14) * (size[1] // 14), 32)
    # blocks 0, 0, 1, 1 of a depth-2 encoder, after the final LayerNorm (zero mean per token)
    assert torch.equal(tokens[0], tokens[1]) and not torch.equal(tokens[1], tokens[2])
    assert tokens[2].mean(-1).abs().max() < 1e-4


def test_positional_table_is_unchanged_at_the_native_grid():
    table = torch.randn(1, 16, 5)
    assert torch.equal(resample_pos_embed(table, 4, 4, offset=0.1), table)
    assert torch.equal(resample_pos_embed(table, 4, 4, offset=0.0, antialias=True), table)
    # one side native, the other not: both sides resampled with the offset, as the official code
    ours = resample_pos_embed(table, 4, 6, offset=0.1)
    square = table.reshape(1, 4, 4, 5).permute(0, 3, 1, 2)
    ref = F.interpolate(square, scale_factor=(4.1 / 4, 6.1 / 4), mode="bicubic")
    assert torch.allclose(ours, ref.permute(0, 2, 3, 1).reshape(1, -1, 5), atol=1e-5)


@pytest.mark.parametrize("out,offset,antialias", [(7, 0.1, False), (2, 0.1, False),
                                                  (9, 0.0, True), (3, 0.0, True)])
def test_resampling_matrix_equals_torch_bicubic(out, offset, antialias):
    square = torch.randn(1, 1, 5, 5)
    if offset:
        ref = F.interpolate(square, scale_factor=((out + offset) / 5, 6.1 / 5), mode="bicubic",
                            antialias=antialias)
        cols = bicubic_matrix(6, 5, offset, antialias)
    else:
        ref = F.interpolate(square, size=(out, 6), mode="bicubic", antialias=antialias)
        cols = bicubic_matrix(6, 5, offset, antialias)
    ours = bicubic_matrix(out, 5, offset, antialias) @ square[0, 0] @ cols.T
    assert torch.allclose(ours, ref[0, 0], atol=1e-5)


def test_register_tokens_join_attention_and_leave_the_output():
    model = tiny("dinov2_vits14_reg")
    assert model.register_tokens.shape == (1, 4, 32)
    images = torch.randn(1, 3, 28, 28)
    before = model(images)[-1]
    assert before.shape == (1, 4, 32)
    with torch.no_grad():
        model.register_tokens.add_(1.0)
    assert not torch.allclose(model(images)[-1], before)


def test_hugging_face_keys_map_onto_the_official_names():
    model = tiny()
    official = model.state_dict()
    hf = {"embeddings.cls_token": official["cls_token"],
          "embeddings.mask_token": torch.zeros(1, 32),
          "embeddings.position_embeddings": official["pos_embed"],
          "embeddings.patch_embeddings.projection.weight": official["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.projection.bias": official["patch_embed.proj.bias"],
          "layernorm.weight": official["norm.weight"], "layernorm.bias": official["norm.bias"]}
    for i in range(2):
        b, e = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = official[b + f"attn.qkv.{kind}"].chunk(3)
            hf[e + f"attention.attention.query.{kind}"] = q
            hf[e + f"attention.attention.key.{kind}"] = k
            hf[e + f"attention.attention.value.{kind}"] = v
            hf[e + f"attention.output.dense.{kind}"] = official[b + f"attn.proj.{kind}"]
            for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                hf[e + f"{part}.{kind}"] = official[b + f"{part}.{kind}"]
        hf[e + "layer_scale1.lambda1"] = official[b + "ls1.gamma"]
        hf[e + "layer_scale2.lambda1"] = official[b + "ls2.gamma"]
    mapped = hf_to_official_keys(hf)
    assert set(mapped) == set(official) | {"mask_token"}
    assert all(torch.equal(mapped[key], official[key]) for key in official)

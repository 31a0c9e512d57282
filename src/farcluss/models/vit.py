"""DINOv2 vision transformers (Oquab et al., 2023), written here; parameter names are those of the
official checkpoints (facebookresearch/dinov2 ``dinov2_vit*14_pretrain.pth``):

    cls_token, pos_embed, [register_tokens], patch_embed.proj.{weight,bias},
    blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}, norm

(the checkpoints' ``mask_token`` is for masked-image pre-training only and is dropped on load).

A block is   x ← x + γ₁ ⊙ Attn(LN₁(x)),   x ← x + γ₂ ⊙ MLP(LN₂(x))   (LayerScale γ, GELU MLP,
``F.scaled_dot_product_attention``). The positional table was learned on a 37 × 37 grid
(518 px); other grids get it resampled bicubically exactly as the official code does
(`bicubic_matrix`), written as two small matrix products so that it exports to ONNX with
dynamic height and width. `forward` returns the layer-normalised patch tokens after the blocks
in ``out_indices`` (the official ``get_intermediate_layers(x, n, norm=True)``), what a DPT head
reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PATCH_SIZE = 14
#: the grid the official positional tables were trained on (518 / 14)
PRETRAIN_GRID = 37


@dataclass(frozen=True)
class ViTSpec:
    """One DINOv2 variant."""

    embed_dim: int
    depth: int
    num_heads: int
    #: the blocks whose outputs a DPT head reads (UniMatch V2 / Depth Anything)
    out_indices: tuple
    num_register_tokens: int = 0
    #: the official interpolation: scale factor (n + offset) / 37, antialias for registers
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False


VIT_SPECS = {
    "dinov2_vits14": ViTSpec(384, 12, 6, (2, 5, 8, 11)),
    "dinov2_vitb14": ViTSpec(768, 12, 12, (2, 5, 8, 11)),
    "dinov2_vitl14": ViTSpec(1024, 24, 16, (4, 11, 17, 23)),
    # with 4 register tokens (Darcet et al., 2024); the official code resamples their
    # positional table with antialiasing and no offset
    "dinov2_vits14_reg": ViTSpec(384, 12, 6, (2, 5, 8, 11), 4, 0.0, True),
    "dinov2_vitb14_reg": ViTSpec(768, 12, 12, (2, 5, 8, 11), 4, 0.0, True),
    "dinov2_vitl14_reg": ViTSpec(1024, 24, 16, (4, 11, 17, 23), 4, 0.0, True),
}


def default_out_indices(depth: int) -> tuple:
    """The four blocks a DPT head reads: the published ones for depth 12 and 24, else the last
    block of each quarter (repeated when depth < 4)."""
    if depth == 12:
        return (2, 5, 8, 11)
    if depth == 24:
        return (4, 11, 17, 23)
    return tuple(max(0, -(-(k + 1) * depth // 4) - 1) for k in range(4))


def vit_spec(backbone: str, embed_dim: Optional[int] = None, depth: Optional[int] = None) -> ViTSpec:
    """The spec of a named variant, optionally narrowed or shortened (tiny test models): the
    heads follow the width (64 channels a head, at least one), the read blocks the depth."""
    spec = VIT_SPECS[backbone]
    if embed_dim is None and depth is None:
        return spec
    embed_dim = embed_dim or spec.embed_dim
    depth = depth or spec.depth
    heads = spec.num_heads if embed_dim == spec.embed_dim else max(1, embed_dim // 64)
    if embed_dim % heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by {heads} heads")
    return ViTSpec(embed_dim, depth, heads, default_out_indices(depth), spec.num_register_tokens,
                   spec.interpolate_offset, spec.interpolate_antialias)


# ---- positional-embedding resampling ----------------------------------------------------------
def _cubic(x: Tensor, a: float) -> Tensor:
    """Keys' cubic convolution kernel W(x) (a = −0.75 as PyTorch's bicubic, −0.5 antialiased):
    (a+2)|x|³ − (a+3)|x|² + 1 for |x| ≤ 1, a|x|³ − 5a|x|² + 8a|x| − 4a for 1 < |x| < 2, else 0."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def bicubic_matrix(out_size, in_size: int, offset: float = 0.0, antialias: bool = False,
                   device=None) -> Tensor:
    """The ``out × in`` matrix R with R @ v = F.interpolate(v, mode="bicubic") along one axis,
    for the official call: scale factor (out + offset) / in (``size=out`` when offset is 0),
    align_corners False.

    Without antialias (PyTorch's upsample_bicubic2d) output i samples at
    s = (i + ½)·in/(out + offset) − ½ with the 4 taps ⌊s⌋−1 … ⌊s⌋+2, clamped to the border,
    weighted W(s − tap), a = −0.75. With antialias (PIL's filter, a = −0.5) the kernel widens
    by σ = max(in/(out + offset), 1): weight_j ∝ W((j + ½ − (i + ½)·in/(out + offset)) / σ),
    normalised to sum 1 over the taps inside the image.

    ``out_size`` may be a traced size, so the matrix (and a model using it) exports to ONNX
    with dynamic height and width.
    """
    index = torch.arange(out_size, device=device, dtype=torch.float32)
    taps = torch.arange(in_size, device=device, dtype=torch.float32)
    out_float = torch.ones_like(index).sum()
    scale = in_size / (out_float + offset)
    if antialias:
        support = torch.clamp(scale, min=1.0)
        center = (index + 0.5) * scale
        weights = _cubic((taps[None, :] + 0.5 - center[:, None]) / support, -0.5)
        return weights / weights.sum(dim=1, keepdim=True)
    source = (index + 0.5) * scale - 0.5
    floor = torch.floor(source)
    fraction = source - floor
    matrix = torch.zeros(index.shape[0], in_size, device=device, dtype=torch.float32)
    for k in (-1, 0, 1, 2):
        tap = torch.clamp(floor + k, 0, in_size - 1)
        weight = _cubic(fraction - k, -0.75)
        matrix = matrix + (taps[None, :] == tap[:, None]).to(torch.float32) * weight[:, None]
    return matrix


def resample_pos_embed(table: Tensor, grid_h, grid_w, offset: float = 0.1,
                       antialias: bool = False, grid: Optional[int] = None) -> Tensor:
    """A ``1 × M² × D`` patch positional table resampled to ``1 × (h·w) × D``, as the official
    ``interpolate_pos_encoding``: the table itself at the native M × M grid, else bicubic with
    scale factor (n + offset)/M on each axis."""
    if grid is None:  # the table's side; a model passes it (a constant, also when traced)
        grid = math.isqrt(int(table.shape[1]))
    dim = table.shape[-1]
    # the official code returns the table unchanged at the native grid (both sides); with an
    # offset of 0 the matrices are then the identity, so the shortcut is an offset of 0
    native = ((torch.as_tensor(grid_h, device=table.device) == grid)
              & (torch.as_tensor(grid_w, device=table.device) == grid))
    rows = bicubic_matrix(grid_h, grid, offset, antialias, table.device)
    cols = bicubic_matrix(grid_w, grid, offset, antialias, table.device)
    if offset:
        rows_native = bicubic_matrix(grid_h, grid, 0.0, antialias, table.device)
        cols_native = bicubic_matrix(grid_w, grid, 0.0, antialias, table.device)
        rows = torch.where(native, rows_native, rows)
        cols = torch.where(native, cols_native, cols)
    square = table.float().reshape(grid, grid, dim).permute(2, 0, 1)  # D × M × M
    resampled = rows @ square @ cols.transpose(0, 1)                  # D × h × w
    return resampled.flatten(1).transpose(0, 1).unsqueeze(0)


# ---- the transformer --------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Non-overlapping 14 × 14 patches → ``B × (h·w) × D`` tokens (a stride-14 convolution)."""

    def __init__(self, embed_dim: int, patch_size: int = PATCH_SIZE, in_channels: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B × heads × N × head_dim
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class LayerScale(nn.Module):
    """Per-channel residual scale γ (DINOv2 initialises it to 1 and trains it)."""

    def __init__(self, dim: int, init_value: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """A DINOv2 ViT/14 encoder: images (sides multiples of 14) → the layer-normalised patch
    tokens ``B × (h·w) × D`` after each block of ``out_indices``.

    Args:
        spec: width, depth, heads, read blocks, registers and interpolation of the variant.
        pretrain_grid: side of the positional table's grid (37 for the official 518 px).
    """

    patch_size = PATCH_SIZE

    def __init__(self, spec: ViTSpec, pretrain_grid: int = PRETRAIN_GRID):
        super().__init__()
        self.spec = spec
        self.embed_dim = spec.embed_dim
        self.out_indices = tuple(spec.out_indices)
        self.pretrain_grid = pretrain_grid
        if max(self.out_indices) >= spec.depth:
            raise ValueError(f"out_indices {self.out_indices} exceed depth {spec.depth}")
        self.patch_embed = PatchEmbed(spec.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, pretrain_grid ** 2 + 1, spec.embed_dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, spec.num_register_tokens,
                                                         spec.embed_dim))
                                if spec.num_register_tokens else None)
        self.blocks = nn.ModuleList(Block(spec.embed_dim, spec.num_heads)
                                    for _ in range(spec.depth))
        self.norm = nn.LayerNorm(spec.embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        # the official random init (timm's): truncated normal 0.02 for linears and the table
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def pos_embed_for(self, grid_h, grid_w) -> Tensor:
        """``1 × (1 + h·w) × D``: the class token's entry and the patch table resampled."""
        patches = resample_pos_embed(self.pos_embed[:, 1:], grid_h, grid_w,
                                     self.spec.interpolate_offset,
                                     self.spec.interpolate_antialias, self.pretrain_grid)
        return torch.cat([self.pos_embed[:, :1].float(), patches], dim=1)

    def tokens(self, images: Tensor) -> Tensor:
        """``B × (1 + R + h·w) × D``: class token, registers, patch tokens, with positions."""
        grid_h, grid_w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed_for(grid_h, grid_w).to(x.dtype)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(x.shape[0], -1, -1).to(x.dtype)
            x = torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)
        return x

    def forward(self, images: Tensor) -> List[Tensor]:
        x = self.tokens(images)
        skip = 1 + self.spec.num_register_tokens
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            outputs.extend(self.norm(x)[:, skip:] for _ in range(self.out_indices.count(index)))
        return outputs


def vision_transformer(backbone: str, embed_dim: Optional[int] = None,
                       depth: Optional[int] = None) -> VisionTransformer:
    return VisionTransformer(vit_spec(backbone, embed_dim, depth))


def hf_to_official_keys(state: dict) -> dict:
    """Rename a Hugging Face ``Dinov2Model`` state dict (``facebook/dinov2-*``) to the official
    layout: fused qkv from query/key/value, LayerScale ``lambda1`` → ``gamma``, …"""
    renames = (("embeddings.cls_token", "cls_token"), ("embeddings.mask_token", "mask_token"),
               ("embeddings.position_embeddings", "pos_embed"),
               ("embeddings.register_tokens", "register_tokens"),
               ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
               ("layernorm.", "norm."))
    layer_renames = (("attention.output.dense.", "attn.proj."), ("layer_scale1.lambda1", "ls1.gamma"),
                     ("layer_scale2.lambda1", "ls2.gamma"))
    out, qkv = {}, {}
    for key, tensor in state.items():
        if key.startswith("encoder.layer."):
            index, rest = key[len("encoder.layer."):].split(".", 1)
            prefix = f"blocks.{index}."
            for part in ("query", "key", "value"):
                head = f"attention.attention.{part}."
                if rest.startswith(head):
                    qkv.setdefault((index, rest[len(head):]), {})[part] = tensor
                    break
            else:
                for old, new in layer_renames:
                    if rest.startswith(old):
                        rest = new + rest[len(old):]
                        break
                out[prefix + rest] = tensor
            continue
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = tensor
    for (index, kind), parts in qkv.items():
        name = f"blocks.{index}.attn.qkv.{kind}"
        if set(parts) != {"query", "key", "value"}:
            # an incomplete triple is reported under its own names by the key check
            for part, tensor in parts.items():
                out[f"encoder.layer.{index}.attention.attention.{part}.{kind}"] = tensor
            continue
        out[name] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def is_hf_layout(keys: Sequence[str]) -> bool:
    return any(key.startswith(("embeddings.", "encoder.layer.")) for key in keys)

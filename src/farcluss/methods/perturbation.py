"""Feature perturbations of the encoder→decoder features (UniMatch V1 and V2), seeded per image.

A perturbation is a callable the model applies to the list of features its decoder reads
(`models.deeplab.Perturb`). Channel masks are drawn from each image's own sampler seed
(`augment.per_sample_uniform`, after the columns the strong views use), so an image's mask does not
depend on the rank, the batch split or its neighbours, and a resumed run redraws it.

- ``dropout`` (UniMatch V1): the decoder reads the clean features and a copy with channel
  dropout, ``Dropout2d(p)``: each channel of each image is zeroed with probability p and the kept
  ones scaled by 1/(1−p). The batch doubles: rows ``[clean; dropped]``.
- ``complementary`` (UniMatch V2): two strong views of the same images share one forward; for a
  pair that is perturbed, view 1 keeps the channels of a Bernoulli(½) mask m (scaled by 2) and
  view 2 the others, m₁ + m₂ = 2; a pair is left unperturbed (both masks 1) with probability
  ``keep_prob`` (V2 leaves half the pairs alone).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from farcluss.augment import per_sample_uniform


def channel_dropout_masks(uniform: Tensor, channels: Sequence[int], drop_prob: float
                          ) -> List[Tensor]:
    """Per-image channel masks ``B × C_f`` for each feature f: 0 where u < p, else 1/(1−p).

    ``uniform`` is ``B × ΣC_f`` of U[0, 1) numbers; feature f reads the next C_f columns.
    """
    masks = []
    for block in uniform.split(list(channels), dim=1):
        masks.append((block >= drop_prob).to(torch.float32) / (1.0 - drop_prob))
    return masks


def complementary_channel_masks(uniform: Tensor, channels: Sequence[int], keep_prob: float
                                ) -> tuple[List[Tensor], List[Tensor]]:
    """Complementary masks ``(m₁, m₂)`` per feature, each ``B × C_f``: m₁ ∈ {0, 2}, m₂ = 2 − m₁.

    ``uniform`` is ``B × (1 + ΣC_f)``: column 0 decides whether the pair is left unperturbed
    (u < keep_prob → both masks 1), channel c of feature f is kept by view 1 when u ≥ ½.
    """
    unperturbed = (uniform[:, :1] < keep_prob)
    first, second = [], []
    for block in uniform[:, 1:].split(list(channels), dim=1):
        mask = (block >= 0.5).to(torch.float32) * 2.0
        ones = torch.ones_like(mask)
        first.append(torch.where(unperturbed, ones, mask))
        second.append(torch.where(unperturbed, ones, 2.0 - mask))
    return first, second


def _scale_channels(feature: Tensor, mask: Tensor) -> Tensor:
    """``feature`` × a per-image channel mask: B×C×H×W maps or B×N×C token sequences."""
    mask = mask.to(device=feature.device, dtype=feature.dtype)
    if feature.dim() == 4:
        return feature * mask[:, :, None, None]
    if feature.dim() == 3:
        return feature * mask[:, None, :]
    raise ValueError(f"feature perturbation: expected a B×C×H×W or B×N×C feature, "
                     f"got shape {tuple(feature.shape)}")


def _channels(features: Sequence[Tensor]) -> List[int]:
    return [f.shape[1] if f.dim() == 4 else f.shape[-1] for f in features]


class DropoutCopy:
    """UniMatch V1's perturbation: decode ``[clean; channel-dropped]`` (the batch doubles).

    ``seeds`` are the images' sampler seeds, ``offset`` the columns of their streams already
    used by the strong views.
    """

    def __init__(self, seeds: Tensor, offset: int, drop_prob: float):
        self.seeds, self.offset, self.drop_prob = seeds, offset, drop_prob

    def __call__(self, features: List[Tensor]) -> List[Tensor]:
        channels = _channels(features)
        uniform = per_sample_uniform(self.seeds, self.offset + sum(channels))[:, self.offset:]
        masks = channel_dropout_masks(uniform, channels, self.drop_prob)
        return [torch.cat([f, _scale_channels(f, m)]) for f, m in zip(features, masks)]


class ComplementaryDropout:
    """UniMatch V2's perturbation of a batch ``[plain rows; view 1; view 2]``.

    The first ``plain_rows`` (the labeled images) are left as they are; views 1 and 2 of image i
    get the complementary masks of that image's seed.
    """

    def __init__(self, seeds: Tensor, offset: int, plain_rows: int, keep_prob: float):
        self.seeds, self.offset = seeds, offset
        self.plain_rows, self.keep_prob = plain_rows, keep_prob

    def __call__(self, features: List[Tensor]) -> List[Tensor]:
        channels = _channels(features)
        n = self.seeds.numel()
        expected = self.plain_rows + 2 * n
        if features[0].shape[0] != expected:
            raise ValueError(f"complementary dropout: expected {expected} rows "
                             f"({self.plain_rows} plain + 2 × {n}), got {features[0].shape[0]}")
        uniform = per_sample_uniform(self.seeds, self.offset + 1 + sum(channels))[:, self.offset:]
        first, second = complementary_channel_masks(uniform, channels, self.keep_prob)
        out = []
        for f, m1, m2 in zip(features, first, second):
            plain = torch.ones(self.plain_rows, m1.shape[1])
            out.append(_scale_channels(f, torch.cat([plain, m1, m2])))
        return out

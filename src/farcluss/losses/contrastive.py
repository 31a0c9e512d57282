"""Prototype (class-centroid) contrastive regularisation (docs/method.md §4).

Memory is O(C·D): one prototype per class from the current batch, plus an EMA bank of C
prototypes that stands in for classes absent from the batch. No pixel memory bank.

Typical use in a method, with `embeddings` the B×D×h×w output of the projection head:

    labels = downsample_labels(contrastive_labels(gt, pseudo, weights), embeddings.shape[-2:])
    z, y = embeddings.permute(0, 2, 3, 1).reshape(-1, D), labels.reshape(-1)
    picked = sample_pixels_per_class(y, C, 256, generator)
    sums, counts = prototype_sums(z[picked], y[picked], C)
    prototypes, present = global_prototypes(sums, counts, reduce)
    loss, stats = prototype_contrastive_loss(z[picked], y[picked], prototypes, present,
                                             bank, bank_initialized, temperature)
    bank, bank_initialized = update_prototype_bank(bank, bank_initialized, prototypes, present)
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _no_autocast(like: torch.Tensor):
    """Keep the products below in float32 under `torch.autocast` (which would run them in bf16/fp16)."""
    return torch.autocast(device_type=like.device.type, enabled=False)


def contrastive_labels(
    gt_labels: torch.Tensor | None,
    pseudo_labels: torch.Tensor,
    pixel_weights: torch.Tensor,
    weight_threshold: float = 0.5,
    ignore_index: int = 255,
    valid_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Labels of the pixels that take part in the contrastive loss.

        y(x) = ground truth                  on labeled images
        y(x) = argmax q(x)   if u(x) > θ     on unlabeled images, ignore_index elsewhere

    Args:
        gt_labels: B_l×H×W labels of the labeled images (with ignore_index), or None.
        pseudo_labels: B_u×H×W hard pseudo-labels of the unlabeled images.
        pixel_weights: B_u×H×W uncertainty weights u(x).
        weight_threshold: θ; only pixels with u(x) > θ are used.
        valid_mask: optional B_u×H×W bool, False on padding.

    Returns:
        (B_l + B_u)×H×W int64 labels: the labeled images first, then the unlabeled ones.
    """
    keep = pixel_weights > weight_threshold
    if valid_mask is not None:
        keep &= valid_mask
    selected = torch.where(keep, pseudo_labels, torch.full_like(pseudo_labels, ignore_index))
    if gt_labels is None:
        return selected
    return torch.cat([gt_labels.to(selected.dtype), selected], dim=0)


def downsample_labels(labels: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Nearest-neighbour resize of B×H×W integer labels to `size` (the feature resolution).

    Nearest, never bilinear: an interpolated label would be a class that nobody assigned.
    """
    resized = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")
    return resized[:, 0].to(labels.dtype)


def sample_pixels_per_class(
    labels: torch.Tensor,
    num_classes: int,
    max_per_class: int | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices of at most `max_per_class` uniformly random pixels of each class.

    Vectorised: a random permutation, then a stable sort by class, so pixels of one class
    are contiguous in random order; a pixel's rank inside its class run decides whether it is
    kept. Labels outside [0, C) (the ignore label) are never picked.

    Args:
        labels: N (or any shape, flattened) int64 labels.
        num_classes: C.
        max_per_class: cap per class; None keeps every labeled pixel.
        generator: optional torch.Generator (on any device) for reproducible draws.

    Returns:
        1-D int64 indices into the flattened labels, grouped by class.
    """
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be at least 1 or None, got {max_per_class}")
    labels = labels.reshape(-1)
    num_pixels = labels.numel()
    random_device = generator.device if generator is not None else labels.device
    order = torch.randperm(num_pixels, generator=generator, device=random_device).to(labels.device)
    shuffled = labels[order]
    labeled = (shuffled >= 0) & (shuffled < num_classes)
    # Unlabeled pixels sort into an extra bucket C that is dropped below.
    class_of = torch.where(labeled, shuffled, torch.full_like(shuffled, num_classes))
    sorted_classes, by_class = torch.sort(class_of, stable=True)
    candidates = order[by_class]
    run_lengths = torch.bincount(sorted_classes, minlength=num_classes + 1)
    run_starts = torch.cumsum(run_lengths, dim=0) - run_lengths
    rank_in_class = torch.arange(num_pixels, device=labels.device) - run_starts[sorted_classes]
    keep = sorted_classes < num_classes
    if max_per_class is not None:
        keep &= rank_in_class < max_per_class
    return candidates[keep]


def prototype_sums(
    embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums and counts of pixel embeddings.

        S_c = Σ_{x : y(x) = c} z(x),   n_c = |{x : y(x) = c}|

    A one-hot matrix product rather than `index_add_`, so the result is deterministic on GPU.
    Labels outside [0, C) are ignored.

    Args:
        embeddings: N×D embeddings z (computed in float32; gradients flow into S).
        labels: N int64 labels.
        num_classes: C.

    Returns:
        (C×D float32 sums, length-C float32 counts).
    """
    labeled = (labels >= 0) & (labels < num_classes)
    class_of = torch.where(labeled, labels, torch.full_like(labels, num_classes))
    one_hot = F.one_hot(class_of, num_classes + 1)[:, :num_classes].float()
    with _no_autocast(embeddings):
        sums = one_hot.t() @ embeddings.float()
    return sums, one_hot.sum(dim=0)


def global_prototypes(
    batch_sums: torch.Tensor,
    batch_counts: torch.Tensor,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch prototypes over all ranks: μ_c = normalise(Σ_ranks S_c) for classes with n_c > 0.

    Normalising the sum equals normalising the mean. The gradient flows through `reduce`: with
    `engine.distributed.all_reduce_sum` every rank's pixels receive the gradient of every
    rank's loss, which under DDP's gradient average is the single-process gradient.

    Args:
        batch_sums: C×D sums from `prototype_sums`.
        batch_counts: length-C counts from `prototype_sums`.
        reduce: cross-rank sum; identity if None.

    Returns:
        (C×D float32 prototypes, unit rows for present classes and zero rows otherwise;
         length-C bool mask of the classes present in the global batch).
    """
    sums = batch_sums.float()
    counts = batch_counts.detach().float()
    if reduce is not None:
        sums = reduce(sums)
        counts = reduce(counts.clone())
    # An absent class has a zero sum, which F.normalize keeps as a zero row.
    return F.normalize(sums, dim=1), counts > 0


def update_prototype_bank(
    bank: torch.Tensor,
    bank_initialized: torch.Tensor,
    batch_prototypes: torch.Tensor,
    present: torch.Tensor,
    momentum: float = 0.99,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EMA update of the prototype bank with the classes present in this batch.

        μ̄_c ← normalise(m · μ̄_c + (1 − m) · μ_c)   if c is present and μ̄_c initialised
        μ̄_c ← μ_c                                  if c is present for the first time
        μ̄_c unchanged                              if c is absent

    Out of place and without gradient; the caller copies the result into its buffers.

    Args:
        bank: C×D bank prototypes μ̄.
        bank_initialized: length-C bool, True once a class has been seen.
        batch_prototypes: C×D global batch prototypes μ (from `global_prototypes`).
        present: length-C bool mask of the classes in the batch.
        momentum: m in [0, 1).

    Returns:
        (new C×D bank, new length-C initialised mask).
    """
    batch_prototypes = batch_prototypes.detach().to(bank.dtype)
    blended = F.normalize(momentum * bank + (1.0 - momentum) * batch_prototypes, dim=1)
    updated = torch.where(bank_initialized[:, None], blended, batch_prototypes)
    new_bank = torch.where(present[:, None], updated, bank)
    return new_bank.detach(), bank_initialized | present


def prototype_contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    batch_prototypes: torch.Tensor,
    present: torch.Tensor,
    bank: torch.Tensor,
    bank_initialized: torch.Tensor,
    temperature: float = 0.1,
    pixel_count: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pull pixels to their class prototype, push prototypes apart.

    The prototype of class c is the batch prototype μ_c when c is present in the (global)
    batch, else the bank prototype μ̄_c if the bank has one; classes with neither are left
    out of the softmax and of the push term. With A the available classes:

        L_pull = mean_x − log( exp(z(x)·μ_y(x) / τ) / Σ_{c∈A} exp(z(x)·μ_c / τ) )
        L_push = mean_{c≠c' ∈ A} max(0, μ_c·μ_c')       (over ordered pairs)
        L_con  = L_pull + L_push

    Gradients flow into the embeddings and, through the batch prototypes, into the pixels that
    formed them, so the push term moves this batch's features apart; the bank is a detached
    buffer. Pixels labeled outside [0, C) or with an unavailable class do not count.

    Args:
        embeddings: N×D L2-normalised pixel embeddings z (computed in float32).
        labels: N int64 labels y.
        batch_prototypes, present: from `global_prototypes`.
        bank, bank_initialized: the EMA prototype bank and its mask.
        temperature: τ > 0.
        pixel_count: maps the number of usable pixels here to the divisor of L_pull; identity
            if None. Under DDP pass the global count / world size
            (`MeanTeacherMethod.global_count`) so the ranks' losses average to the global mean.

    Returns:
        (scalar L_con, stats {"pull", "push", "num_prototypes"} as detached 0-d tensors).
        With no usable pixel and fewer than two prototypes the loss is 0 with a gradient path.
    """
    num_classes = batch_prototypes.shape[0]
    embeddings = embeddings.float()
    available = present | bank_initialized
    prototypes = torch.where(
        present[:, None], batch_prototypes.float(), bank.detach().float()
    )

    with _no_autocast(embeddings):
        similarities = embeddings @ prototypes.t() / temperature
    similarities = similarities.masked_fill(~available[None, :], float("-inf"))
    labeled = (labels >= 0) & (labels < num_classes)
    safe_labels = torch.where(labeled, labels, torch.zeros_like(labels))
    usable = labeled & available[safe_labels]
    usable_similarities = similarities[usable]
    num_usable = usable.sum()
    divisor = pixel_count(num_usable) if pixel_count is not None else num_usable
    if usable_similarities.shape[0] > 0:
        pull = F.cross_entropy(usable_similarities, safe_labels[usable], reduction="sum")
        pull = pull / divisor.float().clamp_min(1.0)
    else:
        pull = embeddings.sum() * 0.0

    pair_mask = available[:, None] & available[None, :]
    pair_mask &= ~torch.eye(num_classes, dtype=torch.bool, device=pair_mask.device)
    with _no_autocast(prototypes):
        overlaps = (prototypes @ prototypes.t()).clamp_min(0.0)
    overlaps = torch.where(pair_mask, overlaps, torch.zeros_like(overlaps))
    push = overlaps.sum() / pair_mask.sum().clamp_min(1)

    loss = pull + push
    stats = {
        "pull": pull.detach(),
        "push": push.detach(),
        "num_prototypes": available.sum().detach().float(),
    }
    return loss, stats

"""Masking: text for MLM (BERT, ALBEF Sec. 3.1; MaskVLM [MASK]-only) and image regions for MIM (MaskVLM, SimMIM)."""
from __future__ import annotations

import torch

IGNORE = -100


def mask_tokens(ids: torch.Tensor, probability: float, mask_id: int, vocab_size: int, special_ids: list[int],
                generator: torch.Generator | None = None, mask_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick `probability` of non-special tokens; of those 80 % -> [MASK], 10 % random, 10 % kept.
    With `mask_only` every picked token becomes [MASK] (MaskVLM Sec. 3.1, after Wettig et al. 2022).

    Returns (masked ids, labels) with labels = IGNORE where nothing is predicted.
    """
    pick = torch.rand(ids.shape, generator=generator) < probability
    pick &= ~torch.isin(ids, torch.tensor(special_ids, dtype=ids.dtype))
    labels = torch.where(pick, ids, IGNORE)
    if mask_only:
        return torch.where(pick, mask_id, ids), labels
    roll = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, dtype=ids.dtype)
    masked = torch.where(pick & (roll < 0.8), mask_id, ids)
    masked = torch.where(pick & (roll >= 0.8) & (roll < 0.9), random_ids, masked)
    return masked, labels


def masked_positions(labels: torch.Tensor) -> torch.Tensor:
    """Indices (M,) of the masked tokens (labels != IGNORE) in the flattened (B*L) text."""
    return (labels.flatten() != IGNORE).nonzero().squeeze(1)


def mask_image_regions(batch: int, grid: tuple[int, int], region: int, ratio: float,
                       generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """MaskVLM / SimMIM image masking: the patch grid (gh, gw) is tiled by square regions of `region` x `region`
    patches, and exactly round(ratio * regions) regions per image are masked, drawn uniformly without replacement.

    Returns a (batch, gh * gw) bool mask in the ViT's row-major patch order; True = masked.
    """
    gh, gw = grid
    if gh % region or gw % region:
        raise ValueError(f"a {gh} x {gw} patch grid is not tiled by {region} x {region}-patch regions")
    rh, rw = gh // region, gw // region
    count = int(round(ratio * rh * rw))
    noise = torch.rand(batch, rh * rw, generator=generator,
                       device=generator.device if generator is not None else device)
    rank = noise.argsort(1).argsort(1)              # each region's rank in a random order: exactly `count` < count
    regions = (rank < count).view(batch, rh, rw)
    mask = regions.repeat_interleave(region, 1).repeat_interleave(region, 2)
    return mask.reshape(batch, gh * gw).to(device) if device is not None else mask.reshape(batch, gh * gw)

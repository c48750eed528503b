"""Masking: text for MLM (BERT, ALBEF Sec. 3.1; MaskVLM [MASK]-only) and image regions for MIM (MaskVLM, SimMIM)."""
from __future__ import annotations

import math

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


def mask_image_blocks(batch: int, grid: tuple[int, int], ratio: float, generator: torch.Generator | None = None,
                      min_block: int = 16, max_aspect: float = 1 / 0.3, attempts: int = 10,
                      device=None) -> torch.Tensor:
    """BEiT's blockwise masking (Bao et al. 2022, Alg. 1; SIMLA Sec. 2.3): rectangles of at least `min_block` patches
    (BEiT: 16) and aspect ratio in [1/max_aspect, max_aspect] (log-uniform; BEiT: 0.3 to 1/0.3), each fitting strictly
    inside the grid, are added until round(ratio * N) patches are masked; a rectangle is kept only when it masks at
    least one new patch and no more than are still wanted (so an image ends at or just below the target). Vectorised
    over the batch: each round proposes `attempts` rectangles per image and keeps the first that fits (BEiT: up to 10
    tries per block), for a fixed number of rounds with no host synchronisation.

    Returns a (batch, gh * gw) bool mask in the ViT's row-major patch order; True = masked.
    """
    gh, gw = grid
    device = generator.device if generator is not None else device
    target = int(round(ratio * gh * gw))
    mask = torch.zeros(batch, gh, gw, dtype=torch.bool, device=device)
    if target == 0:
        return mask.flatten(1)
    rows = torch.arange(gh, device=device)[None, None, :, None]
    cols = torch.arange(gw, device=device)[None, None, None, :]
    low, high = -math.log(max_aspect), math.log(max_aspect)
    for _ in range(max(8, 4 * math.ceil(target / max(1, min_block)))):
        remaining = (target - mask.flatten(1).sum(1)).float()[:, None]             # (B,1)
        u = torch.rand(batch, attempts, 4, generator=generator, device=device)
        area = min_block + u[..., 0] * (remaining - min_block)                      # uniform(min_block, remaining)
        aspect = torch.exp(low + u[..., 1] * (high - low))
        h = torch.sqrt(area * aspect).round().long()
        w = torch.sqrt(area / aspect).round().long()
        fits = (h >= 1) & (w >= 1) & (h < gh) & (w < gw)
        top = (u[..., 2] * (gh - h + 1).clamp(min=1)).long()[..., None, None]
        left = (u[..., 3] * (gw - w + 1).clamp(min=1)).long()[..., None, None]
        rect = ((rows >= top) & (rows < top + h[..., None, None]) & (cols >= left)
                & (cols < left + w[..., None, None]))                               # (B,A,gh,gw)
        new = (rect & ~mask[:, None]).flatten(2).sum(2)
        ok = fits & (new > 0) & (new <= remaining)
        first = ok.float().argmax(1)
        chosen = rect[torch.arange(batch, device=device), first] & ok.any(1)[:, None, None]
        mask |= chosen
    return mask.flatten(1)


def sample_patches(logits: torch.Tensor, ratio: float, generator: torch.Generator | None = None,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """Exactly round(ratio * N) patches per image drawn without replacement with probabilities softmax(logits)
    (SemMIM Sec. 3.2.2, text-guided masking): the top k of logits + Gumbel noise (the Gumbel-top-k trick), on the
    logits' device; all-equal logits draw uniformly (random masking). `noise` (B,N) uniform in (0,1), else drawn
    from `generator`. Returns a (B,N) bool mask, True = masked."""
    b, n = logits.shape
    count = int(round(ratio * n))
    if noise is None:
        noise = torch.rand(b, n, generator=generator, device=logits.device)
    gumbel = -torch.log(-torch.log(noise.clamp(1e-12, 1 - 1e-7)))
    keys = logits.float().log_softmax(-1) + gumbel
    mask = torch.zeros(b, n, dtype=torch.bool, device=logits.device)
    return mask.scatter_(1, keys.topk(count, dim=1).indices, True) if count else mask

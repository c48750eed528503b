"""Image-text matching with hard negatives sampled from contrastive similarity (ALBEF Sec. 3.1, Eq. 4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_hard_negatives(sim: torch.Tensor, positives: torch.Tensor, uniform: torch.Tensor,
                          random_share: float = 0.0) -> torch.Tensor:
    """One negative per query, drawn with probability softmax(sim) over the non-positive candidates (ALBEF Sec. 3.1);
    with `random_share` r, from (1 - r) softmax(sim) + r / C: r = 1 draws uniformly at random (easy negatives).

    sim (B,C) query-candidate similarities; positives (B,C) bool; uniform (B,C) noise in (0,1) for a Gumbel-max
    draw, vectorised, with no host synchronisation. Returns candidate indices (B,).
    """
    probs = F.softmax(sim.float(), dim=1)
    if random_share > 0:
        probs = (1 - random_share) * probs + random_share / sim.shape[1]
    weights = (probs + 1e-5).masked_fill(positives, 0)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-12, 1 - 1e-7)))
    return (weights.log() + gumbel).argmax(dim=1)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """ALBEF Eq. 4: cross entropy of the 2-way match prediction over positive and hard-negative pairs; with
    `weights` (one per row, 0 or 1), the mean over the rows weighing 1."""
    if weights is None:
        return F.cross_entropy(logits.float(), labels)
    return (F.cross_entropy(logits.float(), labels, reduction="none") * weights).sum() / weights.sum()

"""Pseudo-label keyword supervision (SIMLA Sec. 2.4, Eq. 8-9, appendix 3): the caption tokens the multimodal [CLS]
attends to most are the image's pseudo-labels, which a concept head on the unimodal image predicts over the vocabulary."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def keyword_positions(attention: torch.Tensor, mask: torch.Tensor, k: int,
                      heads: Literal["mean", "vote"] = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """SIMLA appendix 3: the top-k positions of the [CLS] row of a self-attention map over the caption.

    attention (B,H,L,L) probabilities (queries x keys); mask (B,L) 1 = real token. [CLS] (position 0), [SEP] (the last
    real token) and padding are never chosen. `heads`: `mean` ranks positions by the heads' mean attention; `vote`
    (the authors' code) takes each head's top k and ranks positions by how many heads chose them, ties broken by the
    mean attention. Returns positions (B,k) long and valid (B,k) bool (False where the caption has fewer than k
    words)."""
    row = attention[:, :, 0].float()                                               # (B,H,L)
    length = mask.sum(1, keepdim=True)
    position = torch.arange(mask.shape[1], device=mask.device)[None]
    allowed = (mask != 0) & (position > 0) & (position < length - 1)               # (B,L)
    mean = row.mean(1)
    if heads == "mean":
        score = mean
    else:
        per_head = row.masked_fill(~allowed[:, None], float("-inf"))
        top = per_head.topk(min(k, row.shape[-1]), dim=-1)
        votes = torch.zeros_like(mean).scatter_add_(1, top.indices.flatten(1), top.values.isfinite().flatten(1).float())
        score = votes + mean / 2  # mean < 1: orders positions with equal votes only
    score = score.masked_fill(~allowed, float("-inf"))
    top = score.topk(min(k, score.shape[-1]), dim=-1)
    return top.indices, top.values.isfinite()


def keyword_targets(ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """y^PSL (B,V): 1 for every vocabulary entry that a valid chosen position holds, 0 elsewhere."""
    tokens = ids.gather(1, positions)
    target = torch.zeros(len(ids), vocab_size, device=ids.device)
    return target.scatter_(1, tokens, valid.float()).clamp_(max=1)


def psl_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None,
             alpha: float = 0.0) -> torch.Tensor:
    """SIMLA Eq. 8-9: (1 - alpha) BCE(sigma(p), y^PSL) + alpha BCE(sigma(p), sigma(p_m)), each averaged over the V
    vocabulary entries (and the batch); p are the concept head's logits (B,V), p_m the momentum concept head's."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float())
    if alpha > 0 and teacher_logits is not None:
        soft = torch.sigmoid(teacher_logits.float())
        loss = (1 - alpha) * loss + alpha * F.binary_cross_entropy_with_logits(logits.float(), soft)
    return loss

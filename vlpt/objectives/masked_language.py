"""Masked language modeling conditioned on the image (ALBEF Eq. 5, with momentum distillation Eq. 7)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlpt.data.masking import IGNORE


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
             alpha: float = 0.0, normalizer: torch.Tensor | None = None) -> torch.Tensor:
    """ALBEF Eq. 5 (+7): cross entropy at masked positions, targets mixed with the teacher's softmax by `alpha`.

    logits (...,V), e.g. (B,L,V), or (M,V) at the masked tokens only; labels (...) with IGNORE where nothing is
    predicted; the sum is divided by `normalizer` (default: the number of masked tokens; under DDP the mean count
    over ranks, so the gradient average is the global mean). Ignored rows are multiplied by zero, not selected:
    selecting by a mask would wait for the device to learn how many rows there are.
    """
    picked = labels != IGNORE
    log_probs = F.log_softmax(logits.float(), dim=-1).flatten(0, -2)
    loss = F.nll_loss(log_probs, labels.flatten(), ignore_index=IGNORE, reduction="none")
    if alpha > 0 and teacher_logits is not None:
        soft = F.softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
        loss = (1 - alpha) * loss - alpha * (soft * log_probs).sum(-1) * picked.flatten()
    count = picked.sum() if normalizer is None else normalizer
    return loss.sum() / count.clamp(min=1)

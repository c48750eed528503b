"""A downstream classifier's loss with momentum distillation (ALBEF Sec. 3.3, as its VE and NLVR2 heads train)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def distilled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                            alpha: float = 0.0) -> torch.Tensor:
    """(1 - alpha) CE(logits, labels) + alpha CE(logits, softmax(teacher_logits)), averaged over rows (B,C)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    loss = F.nll_loss(log_probs, labels)
    if alpha > 0 and teacher_logits is not None:
        soft = F.softmax(teacher_logits.float(), dim=-1)
        loss = (1 - alpha) * loss - alpha * (soft * log_probs).sum(-1).mean()
    return loss

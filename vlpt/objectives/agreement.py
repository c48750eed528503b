"""SemMIM's self-distillation objectives on encoding-head logits (DINO-style): agreement on [CLS] across two views
(Eq. 2) and patch MIM with soft labels (Eq. 3), both cross entropies from a centred, sharpened teacher distribution;
and the teacher's centre (DINO Sec. 3.1: an EMA of the teacher's batch mean)."""
from __future__ import annotations

import torch
from torch import nn

from vlpt.engine import distributed


def teacher_targets(teacher_logits: torch.Tensor, center: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """softmax((t - c) / tau_t): the teacher's categorical distribution, centred (`center` None: not) and sharpened."""
    t = teacher_logits.float()
    return ((t if center is None else t - center) / temperature).softmax(-1)


def soft_cross_entropy(student_logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """CE(d, d^) = -sum_k d^_k log softmax(s / tau_s)_k per row: (...,K), (...,K) -> (...)."""
    return -(targets * (student_logits.float() / temperature).log_softmax(-1)).sum(-1)


def cls_agreement_loss(student_logits, teacher_logits, center, student_temperature: float,
                       teacher_temperature: float) -> torch.Tensor:
    """SemMIM Eq. 2: L_cls = E[CE(d^cls, d^_cls)], the student's [CLS] distribution of one view against the
    momentum head's of the other; (B,K) each, mean over the rows."""
    targets = teacher_targets(teacher_logits, center, teacher_temperature)
    return soft_cross_entropy(student_logits, targets, student_temperature).mean()


def patch_mim_loss(student_logits, teacher_logits, patch_mask, center, student_temperature: float,
                   teacher_temperature: float, normalizer: torch.Tensor | None = None) -> torch.Tensor:
    """SemMIM Eq. 3: L_patch = E[1/M sum_i CE(d_2,i^patch, d^_2,i^patch)] over the M masked patches; logits (B,N,K),
    patch_mask (B,N) bool. Summed over masked patches and divided by their count (or `normalizer`, under DDP the mean
    count over ranks), so images weigh by their masked patches (all equal: the ratio is exact)."""
    targets = teacher_targets(teacher_logits, center, teacher_temperature)
    losses = soft_cross_entropy(student_logits, targets, student_temperature)
    count = patch_mask.sum() if normalizer is None else normalizer
    return (losses * patch_mask.float()).sum() / count.clamp(min=1)


class TeacherCenter(nn.Module):
    """DINO's centre c of the teacher logits, c <- m c + (1 - m) mean(teacher logits of the global batch); a buffer
    (saved, resumed). `propose` computes the next value from a step's logits; `apply` sets it (after an applied
    optimiser step only, so a skipped step leaves it as it was)."""

    def __init__(self, codes: int, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("value", torch.zeros(1, codes))
        self._next: torch.Tensor | None = None

    @torch.no_grad()
    def propose(self, teacher_logits: torch.Tensor) -> None:
        flat = teacher_logits.detach().float().flatten(0, -2)
        total = distributed.all_sum(torch.cat([flat.sum(0), flat.new_tensor([len(flat)])]))
        mean = total[:-1] / total[-1].clamp(min=1)
        self._next = self.value * self.momentum + mean[None] * (1 - self.momentum)

    @torch.no_grad()
    def apply(self) -> None:
        if self._next is not None:
            self.value.copy_(self._next)
            self._next = None

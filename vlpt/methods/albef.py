"""ALBEF (Li et al., NeurIPS 2021): ITC with momentum queues and distillation, ITM with hard negatives, MLM."""
from __future__ import annotations

import torch

from vlpt.methods.base import Method, register


@register("albef")
class ALBEF(Method):
    def forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        f = self.features(batch)
        out = self.standard_losses(f, batch, step)
        self.push_queues(f)
        return out

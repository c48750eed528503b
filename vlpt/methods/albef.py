"""ALBEF (Li et al., NeurIPS 2021): ITC with momentum queues and distillation, ITM with hard negatives, MLM."""
from __future__ import annotations

import torch

from vlpt.config import MethodConfig
from vlpt.methods import steps
from vlpt.methods.base import Method, register


@register("albef", MethodConfig)
class ALBEF(Method):
    def forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        f = steps.features(self, batch)
        out = steps.standard_losses(self, f, batch, step, self.cfg.method.losses)
        steps.push_queues(self, f)
        return out

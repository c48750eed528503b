"""Heads shared by methods that need them; today SemMIM's encoding head (DINO's projection head)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EncodingHead(nn.Module):
    """SemMIM's encoding head H (Sec. 3.2.1): features (..., width) -> logits (..., K) of a categorical distribution,
    shared by [CLS] and patch tokens. DINO's head (Caron et al. 2021): `layers` - 1 linear + GELU layers to `hidden`,
    a linear map to `bottleneck`, L2 normalisation, then a weight-normalised linear map to K without bias (DINO's
    `norm_last_layer`: the norm of each of its rows fixed to 1, i.e. cosine logits in [-1, 1]); temperatures are the
    objective's (`objectives.agreement`)."""

    def __init__(self, width: int, codes: int, hidden: int, bottleneck: int, layers: int = 3):
        super().__init__()
        sizes = [width, *[hidden] * (layers - 1), bottleneck]
        mlp = []
        for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
            mlp.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                mlp.append(nn.GELU())
        self.mlp = nn.Sequential(*mlp)
        self.last = nn.Parameter(torch.empty(codes, bottleneck))
        for m in self.mlp:  # DINO: truncated normal(0.02) weights, zero biases
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.last, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        return z @ F.normalize(self.last, dim=-1).t().to(z.dtype)

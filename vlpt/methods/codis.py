"""CODIS (Duan et al., CVPR 2022): ALBEF + intra-modal alignment + a multimodal codebook solved by IPOT.

L = L_mlm + L_itm + L_ica + L_code (Eq. 9). L_ica is `itc` with `method.intra` (Eq. 4-5); L_code is `codebook`
(Eq. 1-3). Table 4's ablations are configs: losses without `codebook`, `intra` off, or
`codebook.plan_features: student`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from vlpt.config import ABOVE_ZERO, POSITIVE, MethodConfig, opt
from vlpt.engine import distributed
from vlpt.methods import steps
from vlpt.methods.base import Method, register
from vlpt.objectives.codebook import PrototypeCodebook


@dataclass
class CodebookConfig:
    size: int = opt(4000, "codewords K (CODIS: 4,000)", POSITIVE)
    epsilon: float = opt(0.1, "IPOT proximal (entropic) weight epsilon", ABOVE_ZERO)
    outer_iters: int = opt(20, "IPOT outer (proximal point) iterations", POSITIVE)
    inner_iters: int = opt(1, "IPOT inner (Sinkhorn) iterations per outer one", POSITIVE)
    swapped: bool = opt(True, "supervise each modality's prediction with the other modality's plan (CODIS text, "
                        "Fig. 3); false: same modality (Alg. 1)")
    plan_features: Literal["teacher", "student"] = opt("teacher", "features the transport plans are solved from: "
                                                       "teacher (CODIS) or student (Table 4 ablation)")


@dataclass
class CODISConfig(MethodConfig):
    intra: bool = opt(True, "add intra-modal i2i and t2t alignment to ITC (CODIS Eq. 4-5)")
    codebook: CodebookConfig = field(default_factory=CodebookConfig)


@register("codis", CODISConfig)
class CODIS(Method):
    loss_names = ("itc", "itm", "mlm", "codebook")

    def __init__(self, cfg, vocab_size: int):
        super().__init__(cfg, vocab_size)
        c = cfg.method.codebook
        self.codebook = PrototypeCodebook(c.size, cfg.method.embed_dim, c.epsilon, c.outer_iters, c.inner_iters)

    def forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        m = self.cfg.method
        f = steps.features(self, batch)
        out = steps.standard_losses(self, f, batch, step, m.losses, intra=m.intra)
        if "codebook" in m.losses:
            c = m.codebook
            image, text = (f.teacher_image, f.teacher_text) if c.plan_features == "teacher" else (f.image_feat, f.text_feat)
            out.update(self.codebook.loss(f.image_feat, f.text_feat, distributed.gather(image.detach()),
                                          distributed.gather(text.detach()), self.temperature(), c.swapped,
                                          distributed.local_rows(len(image))))
        steps.push_queues(self, f)
        return out

"""CODIS (Duan et al., CVPR 2022): ALBEF + intra-modal alignment + a multimodal codebook solved by IPOT.

L = L_mlm + L_itm + L_ica + L_code (Eq. 9). L_ica is `itc` with `method.intra` (Eq. 4-5); L_code is `codebook`
(Eq. 1-3). Table 4's ablations are configs: losses without `codebook`, `intra` off, or
`codebook.plan_features: student`.
"""
from __future__ import annotations

import torch

from vlpt.engine import distributed
from vlpt.methods.base import Method, register
from vlpt.objectives.codebook import PrototypeCodebook


@register("codis")
class CODIS(Method):
    loss_names = ("itc", "itm", "mlm", "codebook")

    def __init__(self, cfg, vocab_size: int):
        super().__init__(cfg, vocab_size)
        c = cfg.method.codebook
        self.codebook = PrototypeCodebook(c.size, cfg.method.embed_dim, c.epsilon, c.outer_iters, c.inner_iters)

    def forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        f = self.features(batch)
        out = self.standard_losses(f, batch, step)
        if "codebook" in self.cfg.method.losses:
            c = self.cfg.method.codebook
            image, text = (f.teacher_image, f.teacher_text) if c.plan_features == "teacher" else (f.image_feat, f.text_feat)
            out.update(self.codebook.loss(f.image_feat, f.text_feat, distributed.gather(image.detach()),
                                          distributed.gather(text.detach()), self.temperature(), c.swapped,
                                          distributed.local_rows(len(image))))
        self.push_queues(f)
        return out

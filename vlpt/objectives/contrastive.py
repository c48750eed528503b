"""Image-text contrastive learning with momentum queues and momentum distillation (ALBEF Eq. 1-3, 6)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.engine import distributed


def info_nce(query: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, temperature: torch.Tensor,
             alpha: float = 0.0, teacher_query: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction of ALBEF Eq. 2-3 with Eq. 6: H((1-a) y + a softmax(s'(q', K) / tau), softmax(s(q, K) / tau)).

    query (B,D) and keys (K,D) are L2-normalised; positives (B,K) bool marks every key that matches its query
    (its multi-hot row normalised is the hard target y); teacher_query (B,D) gives the soft targets.
    Returns the loss averaged over queries and the logits s(q, K) / tau.
    """
    logits = query @ keys.t() / temperature
    targets = positives.float() / positives.sum(1, keepdim=True).clamp(min=1)
    if alpha > 0 and teacher_query is not None:
        with torch.no_grad():
            soft = F.softmax(teacher_query @ keys.t() / temperature, dim=1)
        targets = alpha * soft + (1 - alpha) * targets
    loss = -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()
    return loss, logits


def itc_loss(image_feat, text_feat, image_keys, text_keys, positives, temperature,
             alpha: float = 0.0, teacher_image=None, teacher_text=None):
    """ALBEF Eq. 1-3 (+6): (L_i2t + L_t2i) / 2, images queried against text keys and texts against image keys.

    Keys are the momentum features of the (global) batch followed by the queue. Returns loss, i2t and t2i logits.
    """
    loss_i2t, sim_i2t = info_nce(image_feat, text_keys, positives, temperature, alpha, teacher_image)
    loss_t2i, sim_t2i = info_nce(text_feat, image_keys, positives, temperature, alpha, teacher_text)
    return (loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i


def alignment_loss(image_feat, text_feat, image_keys, text_keys, positives, temperature, alpha: float = 0.0,
                   teacher_image=None, teacher_text=None, intra: bool = False) -> torch.Tensor:
    """CODIS Eq. 4-5: cross-modal i2t + t2i and, with `intra`, intra-modal i2i + t2t, each an `info_nce` against the
    other (cross) or the own (intra) modality's keys with teacher soft targets; divided by 2 so that with `intra`
    off it is exactly ALBEF's ITC (Eq. 1-3)."""
    loss, _, _ = itc_loss(image_feat, text_feat, image_keys, text_keys, positives, temperature, alpha,
                          teacher_image, teacher_text)
    if intra:
        loss = loss + info_nce(image_feat, image_keys, positives, temperature, alpha, teacher_image)[0] / 2
        loss = loss + info_nce(text_feat, text_keys, positives, temperature, alpha, teacher_text)[0] / 2
    return loss


class FeatureQueues(nn.Module):
    """FIFO queues of momentum features (MoCo; ALBEF Sec. 3.2), one per name, gathered from every rank on push.

    Buffers, so they are saved and restored with the checkpoint. Rows are features; `ids` holds the image id
    of each queued pair, so queued captions of the same image are not treated as negatives.
    """

    def __init__(self, dim: int, size: int, names: tuple[str, ...] = ("image", "text")):
        super().__init__()
        self.names, self.size = names, size
        for name in names:
            self.register_buffer(name, F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def get(self, name: str) -> torch.Tensor:
        return getattr(self, name)

    @torch.no_grad()
    def push(self, ids: torch.Tensor, **features: torch.Tensor) -> None:
        """Enqueue this step's features (local on each rank; gathered here), overwriting the oldest."""
        ids = distributed.gather(ids)[-self.size:]
        index = (self.ptr + torch.arange(len(ids), device=ids.device)) % self.size
        self.ids[index] = ids
        for name, feat in features.items():
            self.get(name)[index] = distributed.gather(feat.detach())[-self.size:].to(self.get(name).dtype)
        self.ptr.copy_((self.ptr + len(ids)) % self.size)

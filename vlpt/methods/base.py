"""The shared dual-stream backbone every method builds on (ALBEF Sec. 3.1): ViT, text encoder, fusion encoder,
projections, ITM and MLM heads, a momentum teacher and feature queues.

A method subclasses `Method` and writes `forward(batch, step) -> {loss name: scalar}`; downstream tasks use
`encode_image`, `encode_text`, `fuse` and `itm_logits`, which every method provides.
"""
from __future__ import annotations

import difflib

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.config import Config
from vlpt.models.momentum import MomentumTeacher
from vlpt.models.text import FusionEncoder, MLMHead, TextEncoder, init_bert_, load_bert_weights
from vlpt.models.vision import build_vit
from vlpt.objectives.contrastive import FeatureQueues

_REGISTRY: dict[str, type["Method"]] = {}


def register(name: str):
    def wrap(cls):
        _REGISTRY[name] = cls
        cls.name = name
        return cls
    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


def build(cfg: Config, vocab_size: int) -> "Method":
    name = cfg.method.name
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, _REGISTRY, n=1)
        raise ValueError(f"unknown method '{name}'" + (f"; did you mean '{near[0]}'?" if near else "")
                         + f" (available: {', '.join(available())})")
    return _REGISTRY[name](cfg, vocab_size)


class Method(nn.Module):
    """ALBEF's components. Subclasses choose which to use in `forward` and may add their own."""

    name = "base"
    teacher_modules = ("vision", "vision_proj", "text", "text_proj", "fusion", "mlm_head")

    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        m, v, t = cfg.method, cfg.model.vision, cfg.model.text
        self.vision = build_vit(v)
        self.text = TextEncoder(vocab_size, t)
        self.fusion = FusionEncoder(t, context_width=v.width)
        if t.pretrained:
            load_bert_weights(t.pretrained, self.text, self.fusion)
        self.vision_proj = nn.Linear(v.width, m.embed_dim)
        self.text_proj = nn.Linear(t.width, m.embed_dim)
        self.itm_head = nn.Linear(t.width, 2)
        self.mlm_head = MLMHead(t.width, vocab_size)
        for head in (self.vision_proj, self.text_proj, self.itm_head):
            init_bert_(head)
        self.temp = nn.Parameter(torch.tensor(m.temperature))
        self.teacher = MomentumTeacher({name: getattr(self, name) for name in self.teacher_modules}, m.momentum)
        self.queues = FeatureQueues(m.embed_dim, m.queue_size)

    # --- encoders shared with downstream tasks; `teacher=True` runs the momentum copies -------------------------
    def _part(self, name: str, teacher: bool) -> nn.Module:
        return self.teacher[name] if teacher else getattr(self, name)

    def encode_image(self, image: torch.Tensor, teacher: bool = False):
        """image (B,3,H,W) -> tokens (B,1+N,Wv), normalised projected [CLS] feature (B,D)."""
        tokens = self._part("vision", teacher).forward_features(image)
        return tokens, F.normalize(self._part("vision_proj", teacher)(tokens[:, 0]).float(), dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor, teacher: bool = False):
        """ids, mask (B,L) -> hidden states (B,L,Wt), normalised projected [CLS] feature (B,D)."""
        hidden = self._part("text", teacher)(ids, mask)
        return hidden, F.normalize(self._part("text_proj", teacher)(hidden[:, 0]).float(), dim=-1)

    def fuse(self, image_tokens, text_hidden, text_mask, teacher: bool = False):
        """Text states attend to image tokens: (B,L,Wt)."""
        return self._part("fusion", teacher)(text_hidden, text_mask, image_tokens)

    def itm_logits(self, image_tokens, text_hidden, text_mask):
        """Match / no-match logits (B,2) from the fused [CLS]."""
        return self.itm_head(self.fuse(image_tokens, text_hidden, text_mask)[:, 0])

    def mlm_logits(self, image_tokens, ids, mask, teacher: bool = False):
        """Vocabulary logits (B,L,V) for (masked) text ids conditioned on the image."""
        hidden = self._part("text", teacher)(ids, mask)
        fused = self.fuse(image_tokens, hidden, mask, teacher)
        words = self._part("text", teacher).embeddings.word.weight
        return self._part("mlm_head", teacher)(fused, words)

    # --- training hooks used by the trainer ----------------------------------------------------------------------
    def temperature(self) -> torch.Tensor:
        return self.temp.clamp(0.001, 0.5)

    def alpha(self, step: int) -> float:
        """Distillation weight, ramped linearly over `alpha_warmup_steps` (ALBEF: the first epoch)."""
        warm = self.cfg.method.alpha_warmup_steps
        return self.cfg.method.alpha * (min(1.0, step / warm) if warm > 0 else 1.0)

    def after_step(self, step: int) -> None:
        """Called by the trainer after each optimiser step."""
        self.teacher.update()

    def forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

"""Backbones: the encoders of a method and how they connect. Every backbone answers the same protocol:

- `encode_image(image, patch_mask=None) -> tokens (B,1+N,Wv)` ([CLS] first; masked patches become the mask token)
- `encode_text(ids, mask) -> hidden (B,L,Wt)`: the unimodal text states
- `fuse(image_tokens, text_hidden, text_mask) -> (B,L,Wt)`: text states after attending to the image
- `joint_feature(image_tokens, text_hidden, text_mask, **kv) -> (B,Wt)`: the vector an ITM-style head (and a VE or
  NLVR2 classifier) reads
- `context_kv(image_tokens, text_hidden) -> {name: per-layer (K, V)}`: the cross-attention keys and values of each
  context the fusion attends to, projected once per image (`image_kv`, and per text `text_kv` where the text is a
  context too), for `joint_feature(..., **kv)` to reuse over many pairs (reranking); either argument may be None
- `pool(hidden, mask) -> (B,W)`: text states to one vector (`model.text.pool`)
- `blocks()`: its repeated transformer blocks, which FSDP, compile and gradient checkpointing act on

`DualStream` is ALBEF's (CODIS, CB-ViLA); `CrossPair` adds MaskVLM's image cross-modality encoder; `SingleStream` is
SIMLA's one BERT stack serving as text encoder (cross-attention skipped) and as multimodal encoder.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vlpt.config import ModelConfig
from vlpt.models.text import FusionEncoder, TextEncoder, init_bert_
from vlpt.models.vision import build_vit


class DualStream(nn.Module):
    """ALBEF Sec. 3.1: a ViT, a BERT text encoder (the first `text_layers`) and a fusion encoder (the next
    `fusion_layers`, with cross-attention to the image tokens)."""

    reads_image_tokens_with_kv = False  # whether joint_feature reads the image tokens even when given image_kv

    def __init__(self, cfg: ModelConfig, vocab_size: int, mask_token: bool = False):
        super().__init__()
        self.cfg = cfg
        self.vision = build_vit(cfg.vision, mask_token=mask_token)
        self.text = TextEncoder(vocab_size, cfg.text)
        self.fusion = FusionEncoder(cfg.text, context_width=cfg.vision.width)

    def encode_image(self, image: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.vision.forward_features(image, patch_mask)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text(ids, mask)

    def fuse(self, image_tokens, text_hidden, text_mask, image_kv=None, self_attended: bool = False) -> torch.Tensor:
        """Text states attend to themselves and to the image tokens: (B,L,Wt). `image_kv`: `image_kv(image_tokens)`
        in their place (its rows one per text, or one per group of consecutive texts: `text.Attention.forward`).
        `self_attended`: `text_hidden` is `self_attend(text_hidden, text_mask)` already."""
        return self.fusion(text_hidden, text_mask, image_tokens, context_kv=image_kv, self_attended=self_attended)

    def self_attend(self, text_hidden, text_mask) -> torch.Tensor:
        """The fusion's first self-attention of text states: it reads no image, so reranking computes it once per
        text for all its pairs and passes `self_attended=True` to `fuse` / `joint_feature`."""
        return self.fusion.self_attend(text_hidden, text_mask)

    def image_kv(self, image_tokens) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each fusion layer's cross-attention keys and values of the image tokens (B,1+N,Wv): (B,heads,1+N,d)."""
        return self.fusion.context_kv(image_tokens)

    def context_kv(self, image_tokens=None, text_hidden=None) -> dict[str, list]:
        return {} if image_tokens is None else {"image_kv": self.image_kv(image_tokens)}

    def joint_feature(self, image_tokens, text_hidden, text_mask, image_kv=None,
                      self_attended: bool = False) -> torch.Tensor:
        """The pooled fused states ([CLS] in ALBEF); with `image_kv` the image tokens are not read (may be None).
        [CLS] pooling computes the last fusion layer for [CLS] alone (`FusionEncoder.forward(first=1)`).
        `self_attended`: as `fuse`'s."""
        if self.cfg.text.pool == "cls":
            return self.fusion(text_hidden, text_mask, image_tokens, context_kv=image_kv, first=1,
                               self_attended=self_attended)[:, 0]
        return self.pool(self.fuse(image_tokens, text_hidden, text_mask, image_kv, self_attended), text_mask)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,L,W) -> (B,W): the [CLS] state, or the mean over unpadded tokens (`model.text.pool`)."""
        if self.cfg.text.pool == "cls":
            return hidden[:, 0]
        mask = mask[..., None].to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)

    def encoders(self) -> list[nn.Module]:
        """The modules made of blocks, in order."""
        return [self.vision, self.text, self.fusion]

    def blocks(self) -> list[nn.Module]:
        return [*self.vision.blocks, *self.text.layers, *self.fusion.layers]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for module in self.encoders():
            module.set_grad_checkpointing(enable)


class CrossPair(DualStream):
    """MaskVLM Sec. 3: the dual stream's text cross-modality encoder (`fusion`, g_txt) and its mirror, the image
    cross-modality encoder `image_fusion` (g_im: image tokens attending to themselves and to the text), as
    `image_layers` post-norm BERT layers at the ViT's width; the ViT owns a mask token for masked images."""

    reads_image_tokens_with_kv = True  # they are the image cross-encoder's queries

    def __init__(self, cfg: ModelConfig, vocab_size: int, image_layers: int):
        super().__init__(cfg, vocab_size, mask_token=True)
        v, t = cfg.vision, cfg.text
        self.image_fusion = FusionEncoder(image_side(cfg, image_layers), context_width=t.width)
        # The element-wise product of Eq. 3 needs equal widths: project the image [CLS] when they differ.
        self.itm_image_proj = nn.Linear(v.width, t.width) if v.width != t.width else nn.Identity()
        init_bert_(self.itm_image_proj)

    def fuse_image(self, image_tokens, text_hidden, text_mask, text_kv=None) -> torch.Tensor:
        """g_im: (B,1+N,Wv). `text_kv`: `text_kv(text_hidden)` in place of the text states (rows as `fuse`'s
        `image_kv`); `text_mask` stays the texts' mask."""
        return self.image_fusion(image_tokens, None, text_hidden, text_mask, context_kv=text_kv)

    def text_kv(self, text_hidden) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each image cross-encoder layer's cross-attention keys and values of text states (B,L,Wt): (B,heads,L,d)."""
        return self.image_fusion.context_kv(text_hidden)

    def context_kv(self, image_tokens=None, text_hidden=None) -> dict[str, list]:
        return {**super().context_kv(image_tokens),
                **({} if text_hidden is None else {"text_kv": self.text_kv(text_hidden)})}

    def joint_feature(self, image_tokens, text_hidden, text_mask, image_kv=None, text_kv=None,
                      self_attended: bool = False) -> torch.Tensor:
        """MaskVLM Eq. 3: z_im^cross * z_txt^cross, the image cross-encoder's [CLS] times the pooled text
        cross-encoder output. The image tokens are the image cross-encoder's queries: read even with `image_kv`.
        `self_attended` (`text_hidden` is the text fusion's first self-attention of the text states) needs `text_kv`:
        the image cross-encoder attends to the text states themselves."""
        if self_attended and text_kv is None:
            raise ValueError("self_attended text states need text_kv (the image cross-encoder reads the text states)")
        image_cls = self.image_fusion(image_tokens, None, text_hidden, text_mask, context_kv=text_kv, first=1)[:, 0]
        text = super().joint_feature(image_tokens, text_hidden, text_mask, image_kv, self_attended)
        return self.itm_image_proj(image_cls) * text

    def encoders(self) -> list[nn.Module]:
        return [*super().encoders(), self.image_fusion]

    def blocks(self) -> list[nn.Module]:
        return [*super().blocks(), *self.image_fusion.layers]


def image_side(cfg: ModelConfig, layers: int):
    """The text config of BERT layers at the ViT's width (MaskVLM's image-side encoder and decoder blocks)."""
    v = cfg.vision
    return dataclasses.replace(cfg.text, width=v.width, heads=v.heads, intermediate=int(v.width * v.mlp_ratio),
                               fusion_layers=layers)


class SingleStream(DualStream):
    """SIMLA Sec. 2.1: a ViT and one BERT stack with cross-attention in every layer (`fusion`, model.text.text_layers +
    model.text.fusion_layers deep: BERT's 12 in base), run without a context as the unimodal text encoder E_l and
    with the image tokens as E_mm. `text` holds the embeddings only (no layers of its own).

    The protocol's `text_hidden` is what `fuse` reads: here the token embeddings, the stack's input, so every caller
    that encodes a text once and fuses it with many images (ITM, reranking, VE, NLVR2, VQA, grounding) runs the whole
    stack per pair as SIMLA does; `unimodal(text_hidden, mask)` runs the stack without cross-attention (the ITC
    features). The ViT owns a mask token (MIM of block-masked images)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        nn.Module.__init__(self)
        self.cfg = cfg
        t = cfg.text
        self.vision = build_vit(cfg.vision, mask_token=True)
        self.text = TextEncoder(vocab_size, t, layers=0)
        self.fusion = FusionEncoder(dataclasses.replace(t, fusion_layers=t.text_layers + t.fusion_layers),
                                    context_width=cfg.vision.width)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The token embeddings (B,L,Wt) that `fuse` and `unimodal` run the stack over."""
        return self.text(ids, mask)

    def unimodal(self, text_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """E_l: the stack over the embeddings with every cross-attention skipped (its weights never read): (B,L,Wt)."""
        return self.fusion(text_hidden, mask)

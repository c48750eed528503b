"""SIMLA (Khan et al., ECCV 2022): a single stream, symmetric cross-modality reconstruction and pseudo-label keywords.

L = L_itc^mod + L_xmm^mod + L_itm + L_PSL^mod (Eq. 10). Backbone `SingleStream` (vlpt/models/backbone.py): a ViT and
one BERT stack with cross-attention in every layer, run without it as the text encoder E_l and with the image tokens
as the multimodal encoder E_mm; a pretrained BERT loads all its layers into the stack, MLM head included.

- `itc` (Eq. 1-4), `itm` (Eq. 5, in-batch hard negatives), `mlm` (Eq. 6-7, MLM half): ALBEF's shared steps; ITC
  reads the stack's text-only pass, ITM and MLM the multimodal pass, MLM distilled from the momentum model.
- `mim` (Eq. 6-7, MIM half): `method.simla.mim_ratio` of the patches (BEiT's 40 %) block-masked as BEiT does; the
  masked image's tokens are the *queries* of the same stack, the caption its keys and values (`mim_context`:
  `embeddings`, the caption's token embeddings as the authors' code passes them, or `encoded`, E_l's states); a
  linear head predicts each masked patch's visual token from a frozen tokenizer (`method.simla.tokens`,
  vlpt/models/visual_tokens.py), distilled from the momentum model's softmax (Eq. 7: MLM's formula, one function).
- `psl` (Eq. 8-9, appendix 3): from the last layer's self-attention of the multimodal pass over the unmasked caption
  (`psl.attention`: the momentum model's, as the authors' code, or the student's), the top `psl.k` = 4 positions of
  the [CLS] row ([CLS], [SEP], padding excluded; `psl.heads`: mean over heads or per-head votes as the authors' code)
  are the pseudo-labels; `concept_head` on the unimodal image [CLS] predicts them over the vocabulary with BCE, mixed
  with the momentum concept head's sigmoid outputs by alpha.

Where the paper is silent ALBEF is followed: the MIM and PSL teachers are the same EMA copy as ITC's; alpha ramps as
ALBEF's; losses sum with weight 1. Table 1's rows are `method.losses`: [itm] | [itm,itc] | +mlm | +mim | +psl; the
appendix's scratch-vs-pretrained row is `model.text.pretrained` / `model.vision.pretrained`.
Grounding reads the 8th of 12 layers' cross-attention (Sec. 3.5): `grounding_layer()`, the same depth share in a
smaller stack (configs/finetune/grounding_simla_*.yaml set task.layer to it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.config import POSITIVE, UNIT, MethodConfig, opt
from vlpt.data.masking import IGNORE, mask_image_blocks
from vlpt.engine import distributed, rng
from vlpt.methods import steps
from vlpt.methods.base import Method, register
from vlpt.models.backbone import SingleStream
from vlpt.models.momentum import MomentumTeacher
from vlpt.models.text import capture_attention, init_bert_
from vlpt.models.visual_tokens import VisualTokens
from vlpt.objectives.masked_language import mlm_loss
from vlpt.objectives.pseudo_label import keyword_positions, keyword_targets, psl_loss


@dataclass
class VisualTokensConfig:
    source: Literal["kmeans", "dvae", "cbvila"] = opt(
        "kmeans", "frozen tokenizer of MIM's targets: kmeans (a patch k-means codebook from `vlpt tokenizer "
        "train-image`, or fitted on the first batch), dvae (DALL-E's dVAE encoder file: SIMLA, BEiT) or cbvila (a "
        "CB-ViLA checkpoint's codebook)")
    path: str = opt("", "the tokenizer's file (dvae: encoder.pkl or its state dict; cbvila: a checkpoint or run "
                    "folder; kmeans: optional, else fitted on the first training batch)")
    codes: int = opt(8192, "the tokenizer's vocabulary, MIM's classes (DALL-E's dVAE: 8,192)", POSITIVE)


@dataclass
class PSLConfig:
    k: int = opt(4, "pseudo-label keywords per caption (SIMLA appendix 3: k = 4)", POSITIVE)
    attention: Literal["teacher", "student"] = opt(
        "teacher", "whose last-layer self-attention selects the keywords: the momentum model's (the authors' code) "
        "or the student's (the paper does not say)")
    heads: Literal["mean", "vote"] = opt(
        "vote", "how heads combine: vote (each head's top k, positions ranked by votes: the authors' code) or mean "
        "(top k of the heads' mean attention)")
    concept_input: Literal["cls", "feature"] = opt(
        "cls", "what the concept head reads: the unimodal image [CLS] (the paper, Eq. 8) or its normalised ITC "
        "projection (the authors' code)")


@dataclass
class SIMLAOptions:
    mim_ratio: float = opt(0.4, "fraction of patches block-masked for MIM (BEiT: 40 %)", UNIT)
    mim_min_block: int = opt(16, "fewest patches of one masked block (BEiT: 16)", POSITIVE)
    mim_context: Literal["embeddings", "encoded"] = opt(
        "embeddings", "the caption as MIM's keys and values: its token embeddings (the authors' code) or the text "
        "encoder's states")
    tokens: VisualTokensConfig = field(default_factory=VisualTokensConfig)
    psl: PSLConfig = field(default_factory=PSLConfig)


@dataclass
class SIMLAConfig(MethodConfig):
    losses: list[str] = opt(["itc", "itm", "mlm", "mim", "psl"], "losses to train (SIMLA Table 1's rows are subsets)")
    simla: SIMLAOptions = field(default_factory=SIMLAOptions)


@register("simla", SIMLAConfig)
class SIMLA(Method):
    loss_names = ("itc", "itm", "mlm", "mim", "psl")
    capabilities = frozenset({"pseudo_labels"})

    def __init__(self, cfg, vocab_size: int):
        super().__init__(cfg, vocab_size, SingleStream(cfg.model, vocab_size))
        m, s, v, t = cfg.method, cfg.method.simla, cfg.model.vision, cfg.model.text
        self.vocab_size = vocab_size
        # MIM: image tokens are the stack's queries and text its cross-attention context (keys/values of ViT width)
        self.mim_query = nn.Linear(v.width, t.width) if v.width != t.width else nn.Identity()
        self.mim_context = nn.Linear(t.width, v.width) if v.width != t.width else nn.Identity()
        self.mim_head = nn.Linear(t.width, s.tokens.codes)
        self.concept_head = nn.Linear(v.width if s.psl.concept_input == "cls" else m.embed_dim, vocab_size)
        for head in (self.mim_query, self.mim_context, self.mim_head, self.concept_head):
            init_bert_(head)
        parts = {name: getattr(self, name) for name in ("backbone", "vision_proj", "text_proj", "mlm_head",
                                                          "mim_query", "mim_context", "mim_head", "concept_head")}
        self.teacher = MomentumTeacher(parts, m.momentum)  # the base's, with SIMLA's heads too
        self.visual_tokens = VisualTokens(s.tokens.source, s.tokens.path, s.tokens.codes, self.backbone.vision.grid,
                                          v.patch_size, cfg.train.seed)

    def grounding_layer(self) -> int:
        """The stack layer whose cross-attention grounding reads (Python index): `grounding_layer_of` its depth."""
        return grounding_layer_of(len(self.backbone.fusion.layers))

    # --- encoders ------------------------------------------------------------------------------------------------
    def text_feature(self, hidden: torch.Tensor, mask: torch.Tensor, teacher: bool = False) -> torch.Tensor:
        """The token embeddings `fuse` reads (B,L,Wt; `encode_text` returns them) -> the normalised projected pooled
        feature of the text-only pass E_l (B,D)."""
        backbone = self.part("backbone", teacher)
        states = backbone.unimodal(hidden, mask)
        return F.normalize(self.part("text_proj", teacher)(backbone.pool(states, mask)).float(), dim=-1)

    def mim_logits(self, image, patch_mask, text_hidden, text_mask, teacher: bool = False) -> torch.Tensor:
        """Visual-token logits (B,N,K) of the block-masked image: its ViT tokens as the stack's queries, the caption
        (`text_hidden`: its embeddings) as keys and values."""
        backbone = self.part("backbone", teacher)
        tokens = backbone.encode_image(image, patch_mask)
        context = text_hidden if self.cfg.method.simla.mim_context == "embeddings" else \
            backbone.unimodal(text_hidden, text_mask)
        fused = backbone.fusion(self.part("mim_query", teacher)(tokens), None,
                                self.part("mim_context", teacher)(context), text_mask)
        return self.part("mim_head", teacher)(fused[:, 1:])

    def concept_logits(self, image_tokens, image_feat, teacher: bool = False) -> torch.Tensor:
        """The concept head over the vocabulary (B,V) from the unimodal image ([CLS] or its ITC feature)."""
        x = image_tokens[:, 0] if self.cfg.method.simla.psl.concept_input == "cls" else image_feat
        return self.part("concept_head", teacher)(x.to(self.concept_head.weight.dtype))

    @torch.no_grad()
    def pseudo_labels(self, image_tokens, ids, mask, teacher: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Appendix 3: keyword positions (B,k) and their validity from the last layer's self-attention of the
        multimodal pass of (image, caption)."""
        p = self.cfg.method.simla.psl
        backbone = self.part("backbone", teacher)
        attention = backbone.fusion.layers[-1].attention
        with capture_attention(attention):
            backbone.fuse(image_tokens, backbone.encode_text(ids, mask), mask)
            probs = attention.probs
        return keyword_positions(probs, mask, p.k, p.heads)

    # --- losses --------------------------------------------------------------------------------------------------
    def block_mask(self, n_local: int, step: int, device) -> torch.Tensor:
        """BEiT block masks over the global batch from a (seed, step) generator, this rank's rows (N ranks mask what
        one process would)."""
        s = self.cfg.method.simla
        gen = rng.generator("image_mask", self.cfg.train.seed, step, device=device)
        mask = mask_image_blocks(n_local * distributed.world_size(), self.backbone.vision.grid, s.mim_ratio, gen,
                                 s.mim_min_block)
        return mask[distributed.local_rows(n_local)]

    def mim(self, f: steps.Features, batch: dict, step: int) -> torch.Tensor:
        """Eq. 6-7, MIM: cross entropy of each masked patch's visual token, targets mixed with the teacher's softmax."""
        image = batch["image"]
        patch_mask = self.block_mask(len(image), step, image.device)
        labels = self.visual_tokens(image).masked_fill(~patch_mask, IGNORE)
        logits = self.mim_logits(image, patch_mask, f.text_hidden, f.text_mask)
        with torch.no_grad():
            teacher_logits = self.mim_logits(image, patch_mask, f.teacher_hidden, f.text_mask, teacher=True)
        return mlm_loss(logits, labels, teacher_logits, self.alpha(step), distributed.mean_count(patch_mask.sum()))

    def psl(self, f: steps.Features, batch: dict, step: int) -> torch.Tensor:
        """Eq. 8-9 on the unmasked caption."""
        ids, mask = batch["text_ids"], f.text_mask
        teacher = self.cfg.method.simla.psl.attention == "teacher"
        positions, valid = self.pseudo_labels(f.teacher_tokens if teacher else f.image_tokens.detach(), ids, mask,
                                              teacher)
        targets = keyword_targets(ids, positions, valid, self.vocab_size)
        with torch.no_grad():
            teacher_logits = self.concept_logits(f.teacher_tokens, f.teacher_image, teacher=True)
        return psl_loss(self.concept_logits(f.image_tokens, f.image_feat), targets, teacher_logits, self.alpha(step))

    def forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        losses = self.cfg.method.losses
        f = steps.features(self, batch)
        out = steps.standard_losses(self, f, batch, step, losses)
        if "mim" in losses:
            out["mim"] = self.mim(f, batch, step)
        if "psl" in losses:
            out["psl"] = self.psl(f, batch, step)
        steps.push_queues(self, f)
        return out


def grounding_layer_of(depth: int) -> int:
    """SIMLA's grounding layer, the 8th of 12 (Sec. 3.5), at the same share of a `depth`-layer stack: a Python index
    (12 -> 7, 4 -> 2, 2 -> 0)."""
    return max(0, round(8 * depth / 12) - 1)

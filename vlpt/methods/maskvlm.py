"""MaskVLM (Kwon et al., ICLR 2023): joint masked vision and language modeling + ITC + ITM.

L = L_MVLM + L_ITC + L_ITM (Sec. 3). Backbone `CrossPair` (vlpt/models/backbone.py): the ViT (f_im, with the
mask token) and text encoder (f_txt); the text cross-modality encoder `fusion` (g_txt, text queries attending to image
tokens; model.text.fusion_layers blocks); the image cross-modality encoder `image_fusion` (g_im, the mirror: image
tokens attending to text, method.maskvlm.image_cross_layers post-norm blocks at the ViT's width). The method adds the
image cross-modality decoder `decoder` (g_im^de, decoder_layers cross-attention blocks) + `to_pixels` (FC to
patch*patch*3 per patch).

- MVLM (Eq. 1): MLM of [MASK]-only text (method.mlm_probability) from the unmasked image, and MIM, an L1 on masked pixels of
  the (normalised) image masked in square regions (image_ratio) and fed to the ViT with a learnable mask token
  (SimMIM), from the unmasked text. `masking: one` (default, A.3 "one modality at a time") computes both
  reconstructions for every sample, each with the other modality unmasked, exactly as Eq. 1 writes phi_txt(I, T_m)
  and phi_im(I_m, T); `both` conditions both on (I_m, T_m).
- ITC (Eq. 2): in-batch (global batch under DDP), learnable temperature, no queue, no momentum distillation.
- ITM (Eq. 3): a FC on z_im^cross * z_txt^cross (image cross-encoder [CLS] times the pooled text cross-encoder
  output), ALBEF hard negatives from the ITC similarities (the base `itm`).

Text masks come from the data pipeline (`method.mlm_probability: 0.3`, `method.mlm_mask_only: true`), seeded per
sample; image masks are drawn in `forward` from a generator seeded with (train.seed, step) over the global batch
and sliced by rank, so runs are deterministic and independent of the number of ranks.
Ablations (Table 5) are `method.losses` subsets of [itc, itm, mlm, mim]; masking ratios (Table 7) are config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from vlpt.config import MLM_PROBABILITY, POSITIVE, UNIT, MethodConfig, fail, opt
from vlpt.engine import distributed
from vlpt.methods import steps
from vlpt.methods.base import Method, register
from vlpt.models.backbone import CrossPair, image_side
from vlpt.models.text import FusionEncoder, init_bert_, load_bert_weights
from vlpt.objectives.masked_language import mlm_loss
from vlpt.objectives.masked_image import mim_loss, patchify


@dataclass
class MaskVLMOptions:
    image_cross_layers: int = opt(3, "blocks of the image cross-modality encoder (image self-attention + "
                                  "cross-attention to text; MaskVLM: 3)", POSITIVE)
    decoder_layers: int = opt(3, "cross-attention blocks of the image cross-modality decoder before its linear map "
                              "to pixels (MaskVLM: 3)", POSITIVE)
    image_ratio: float = opt(0.6, "fraction of image regions masked for MIM (MaskVLM: 0.6, Table 7)", UNIT)
    region: int = opt(32, "side in pixels of a square masked image region, a multiple of the patch size that divides "
                         "the image size (MaskVLM: 32)", POSITIVE)
    masking: Literal["one", "both"] = opt("one", "one: MLM from (image, masked text) and MIM from (masked image, text) "
                                          "(Eq. 1, A.3); both: both from (masked image, masked text)")
    fusion_init: Literal["bert", "fresh"] = opt("bert", "with model.text.pretrained: the text cross-modality blocks "
                                                "start from the BERT layers after the text encoder's (bert) or fresh "
                                                "(fresh: MaskVLM Sec. 4.2 initialises its new blocks)")


@dataclass
class MaskVLMConfig(MethodConfig):
    mlm_probability: float = opt(0.3, "fraction of text tokens masked for MLM (MaskVLM: 0.3, Table 7)", MLM_PROBABILITY)
    mlm_mask_only: bool = opt(True, "every masked token becomes [MASK] (MaskVLM Sec. 3.1)")
    maskvlm: MaskVLMOptions = field(default_factory=MaskVLMOptions)

    def validate(self, prefix: str, root) -> None:
        super().validate(prefix, root)
        v, region = root.model.vision, self.maskvlm.region  # the regions tile the patch grid
        if region % v.patch_size or v.image_size % region:
            fail(f"{prefix}maskvlm.region", f"a multiple of model.vision.patch_size ({v.patch_size}) that divides "
                 f"model.vision.image_size ({v.image_size})", region)


@register("maskvlm", MaskVLMConfig)
class MaskVLM(Method):
    loss_names = ("itc", "itm", "mlm", "mim")
    momentum_teacher = False  # in-batch ITC (Eq. 2): no queues, no momentum distillation
    capabilities = frozenset({"reconstruction"})
    legacy_keys = {**Method.legacy_keys, "image_fusion.": "backbone.image_fusion.",
                   "itm_image_proj.": "backbone.itm_image_proj.", "mask_token": "backbone.vision.mask_token"}

    def __init__(self, cfg, vocab_size: int):
        v, mv = cfg.model.vision, cfg.method.maskvlm  # method.maskvlm.region is checked by MaskVLMConfig.validate
        super().__init__(cfg, vocab_size, CrossPair(cfg.model, vocab_size, mv.image_cross_layers))
        self.decoder = FusionEncoder(image_side(cfg.model, mv.decoder_layers), context_width=cfg.model.text.width)
        self.to_pixels = nn.Linear(v.width, v.patch_size * v.patch_size * 3)
        init_bert_(self.to_pixels)

    @classmethod
    def batch_needs(cls, m) -> set[str]:
        return super().batch_needs(m) | ({"mlm"} if m.maskvlm.masking == "both" else set())

    def load_pretrained_text(self, folder: str) -> None:
        fusion = self.backbone.fusion if self.cfg.method.maskvlm.fusion_init == "bert" else None
        load_bert_weights(folder, self.backbone.text, fusion, mlm_head=self.mlm_head)

    def block_owners(self) -> list[nn.Module]:
        return [*super().block_owners(), self.decoder]

    def reconstruct(self, masked_tokens, text_hidden, text_mask):
        """phi_im: (masked) image tokens and text states -> predicted pixels per patch (B,N,patch*patch*3)."""
        cross = self.backbone.fuse_image(masked_tokens, text_hidden, text_mask)
        return self.to_pixels(self.decoder(cross, None, text_hidden, text_mask)[:, 1:])

    def image_mask(self, n_local: int, step: int, device) -> torch.Tensor:
        """The MIM mask: `method.maskvlm.image_ratio` of the square regions of `method.maskvlm.region` pixels."""
        mv = self.cfg.method.maskvlm
        return self.draw_image_mask(n_local, step, device, mv.region // self.cfg.model.vision.patch_size, mv.image_ratio)

    def forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        losses, mv = self.cfg.method.losses, self.cfg.method.maskvlm
        f = steps.features(self, batch)  # in-batch keys: Eq. 2's symmetric InfoNCE, learnable temperature
        out = steps.standard_losses(self, f, batch, step, [n for n in losses if n in ("itc", "itm", "nlvr_ta")])
        if "mlm" not in losses and "mim" not in losses:
            return out
        patch_mask = self.image_mask(len(batch["image"]), step, batch["image"].device)
        masked_ids, labels = batch.get("mlm_ids"), batch.get("mlm_labels")
        masked_tokens = self.encode_image(batch["image"], patch_mask=patch_mask)[0] if "mim" in losses \
            or mv.masking == "both" else None
        # `both`: the masked text's states (from the caption's text-encoder call) serve MLM and MIM
        masked_hidden = f.mlm_hidden if mv.masking == "both" else None
        if "mlm" in losses:
            context = masked_tokens if mv.masking == "both" else f.image_tokens
            positions = steps.mlm_positions(batch)
            logits = self.mlm_logits(context, masked_ids, f.text_mask, positions=positions, hidden=f.mlm_hidden)
            out["mlm"] = mlm_loss(logits, labels.flatten()[positions],
                                  normalizer=distributed.mean_count((labels >= 0).sum()))
        if "mim" in losses:
            text_hidden = f.text_hidden if masked_hidden is None else masked_hidden
            pred = self.reconstruct(masked_tokens, text_hidden, f.text_mask)
            target = patchify(batch["image"], self.cfg.model.vision.patch_size)
            out["mim"] = mim_loss(pred, target, patch_mask, distributed.mean_count(patch_mask.sum()))
        return out

"""MaskVLM (Kwon et al., ICLR 2023): joint masked vision and language modeling + ITC + ITM.

L = L_MVLM + L_ITC + L_ITM (Sec. 3). Backbone on the shared Method: the ViT `vision` (f_im) and text encoder `text`
(f_txt); the text cross-modality encoder `fusion` (g_txt, text queries attending to image tokens; model.text.
fusion_layers blocks); the image cross-modality encoder `image_fusion` (g_im, the mirror: image tokens attending to
text, method.maskvlm.image_cross_layers post-norm blocks of vlpt.models.text.Layer at the ViT's width, so no
projection is needed); the image cross-modality decoder `decoder` (g_im^de, decoder_layers cross-attention blocks)
+ `to_pixels` (FC to patch*patch*3 per patch).

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

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.engine import distributed
from vlpt.methods.base import Features, Method, mlm_positions, register
from vlpt.models.text import FusionEncoder, init_bert_
from vlpt.objectives.contrastive import itc_loss
from vlpt.objectives.masked_language import mlm_loss
from vlpt.objectives.masked_image import mim_loss, patchify


@register("maskvlm")
class MaskVLM(Method):
    loss_names = ("itc", "itm", "mlm", "mim")
    teacher_modules = ()  # no momentum teacher in MaskVLM

    def __init__(self, cfg, vocab_size: int):
        super().__init__(cfg, vocab_size)
        del self.queues  # in-batch ITC (Eq. 2): no queues
        v, t, mv = cfg.model.vision, cfg.model.text, cfg.method.maskvlm
        if mv.region % v.patch_size or v.image_size % mv.region:
            raise ValueError(f"method.maskvlm.region={mv.region} must be a multiple of the patch size {v.patch_size} "
                             f"and divide the image size {v.image_size}")
        # Image-side blocks at the ViT's width (BERT post-norm layers), cross-attending to text of width t.width.
        image_layer = dataclasses.replace(t, width=v.width, heads=v.heads, intermediate=int(v.width * v.mlp_ratio))
        self.image_fusion = FusionEncoder(dataclasses.replace(image_layer, fusion_layers=mv.image_cross_layers),
                                          context_width=t.width)
        self.decoder = FusionEncoder(dataclasses.replace(image_layer, fusion_layers=mv.decoder_layers),
                                     context_width=t.width)
        self.to_pixels = nn.Linear(v.width, v.patch_size * v.patch_size * 3)
        # The element-wise product of Eq. 3 needs equal widths: project the image [CLS] when the ViT is wider/narrower.
        self.itm_image_proj = nn.Linear(v.width, t.width) if v.width != t.width else nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, v.width))
        init_bert_(self.to_pixels)
        init_bert_(self.itm_image_proj)
        nn.init.normal_(self.mask_token, std=0.02)

    # --- encoders ------------------------------------------------------------------------------------------------
    def encode_image(self, image: torch.Tensor, teacher: bool = False, patch_mask: torch.Tensor | None = None):
        """image (B,3,H,W) -> tokens (B,1+N,Wv), normalised projected [CLS] (B,D). With `patch_mask` (B,N) bool,
        masked patch embeddings are replaced by the mask token before position embeddings and the blocks (SimMIM)."""
        vit = self.vision
        x = vit.patch_embed(image)
        if patch_mask is not None:
            w = patch_mask[..., None].to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        tokens = vit.norm(vit.blocks(x))
        return tokens, F.normalize(self.vision_proj(tokens[:, 0]).float(), dim=-1)

    def fuse_image(self, image_tokens, text_hidden, text_mask):
        """g_im: image tokens attend to themselves and to the text: (B,1+N,Wv)."""
        return self.image_fusion(image_tokens, None, text_hidden, text_mask)

    def itm_logits(self, image_tokens, text_hidden, text_mask):
        """Eq. 3: g_itm(z_im^cross * z_txt^cross), from unimodal image tokens and text states."""
        image_cls = self.fuse_image(image_tokens, text_hidden, text_mask)[:, 0]
        text_cls = self.pool(self.fuse(image_tokens, text_hidden, text_mask), text_mask)
        return self.itm_head(self.itm_image_proj(image_cls) * text_cls)

    def reconstruct(self, masked_tokens, text_hidden, text_mask):
        """phi_im: (masked) image tokens and text states -> predicted pixels per patch (B,N,patch*patch*3)."""
        cross = self.fuse_image(masked_tokens, text_hidden, text_mask)
        return self.to_pixels(self.decoder(cross, None, text_hidden, text_mask)[:, 1:])

    # --- masks ---------------------------------------------------------------------------------------------------
    def image_mask(self, n_local: int, step: int, device) -> torch.Tensor:
        """The MIM mask: `method.maskvlm.image_ratio` of the square regions of `method.maskvlm.region` pixels."""
        mv = self.cfg.method.maskvlm
        return self.draw_image_mask(n_local, step, device, mv.region // self.cfg.model.vision.patch_size, mv.image_ratio)

    # --- losses --------------------------------------------------------------------------------------------------
    def features(self, batch: dict) -> Features:
        """Unmasked student features; ITC keys are the in-batch (global) features, with gradient."""
        image_tokens, image_feat = self.encode_image(batch["image"])
        text_hidden, text_feat = self.encode_text(batch["text_ids"], batch["text_mask"])
        ids = batch["image_id"]
        batch_ids = distributed.gather(ids)
        positives = ids[:, None] == batch_ids[None]
        image_keys = distributed.gather(image_feat, grad=True)
        text_keys = distributed.gather(text_feat, grad=True)
        return Features(image_tokens, image_feat, text_hidden, text_feat, batch["text_mask"], image_tokens.detach(),
                        image_feat.detach(), text_feat.detach(), ids, image_keys, text_keys, positives, len(batch_ids))

    def itc(self, f: Features, step: int) -> torch.Tensor:
        """Eq. 2: in-batch symmetric InfoNCE with the learnable temperature (halved sum, as ALBEF's ITC)."""
        return itc_loss(f.image_feat, f.text_feat, f.image_keys, f.text_keys, f.positives, self.temperature())[0]

    def forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        losses, mv = self.cfg.method.losses, self.cfg.method.maskvlm
        f = self.features(batch)
        out = {}
        if "itc" in losses:
            out["itc"] = self.itc(f, step)
        if "itm" in losses:
            out["itm"] = self.itm(f, step)
        if "mlm" not in losses and "mim" not in losses:
            return out
        patch_mask = self.image_mask(len(batch["image"]), step, batch["image"].device)
        masked_ids, labels = batch.get("mlm_ids"), batch.get("mlm_labels")
        masked_tokens = self.encode_image(batch["image"], patch_mask=patch_mask)[0] if "mim" in losses \
            or mv.masking == "both" else None
        # `both`: one text-encoder pass over the masked text serves MLM and MIM
        masked_hidden = self.text(masked_ids, f.text_mask) if mv.masking == "both" else None
        if "mlm" in losses:
            context = masked_tokens if mv.masking == "both" else f.image_tokens
            positions = mlm_positions(batch)
            logits = self.mlm_logits(context, masked_ids, f.text_mask, positions=positions, hidden=masked_hidden)
            out["mlm"] = mlm_loss(logits, labels.flatten()[positions],
                                  normalizer=distributed.mean_count((labels >= 0).sum()))
        if "mim" in losses:
            text_hidden = f.text_hidden if masked_hidden is None else masked_hidden
            pred = self.reconstruct(masked_tokens, text_hidden, f.text_mask)
            target = patchify(batch["image"], self.cfg.model.vision.patch_size)
            out["mim"] = mim_loss(pred, target, patch_mask, distributed.mean_count(patch_mask.sum()))
        return out

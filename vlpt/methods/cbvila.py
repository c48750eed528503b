"""CB-ViLA (Guo, Duan et al. 2022): ALBEF + a visual codebook learned as a text-conditioned VQ-VAE + MIM on codeword
indices.

L = L_codebook + L_mim + L_itm + L_mlm (Eq. 7), Eq. 3's L_codebook being two named losses here:
- `pixel` (Eq. 3, first term): the quantised patch tokens z_q (plus learned positions) are the queries of the *same*
  fusion encoder that ITM and MLM run with text as queries; here the text states are its keys and values (the
  reversed direction: one parameter set, the fusion doubling as the VQ-VAE decoder, Sec. I); `to_pixels` maps each
  token to its patch, trained by a Gaussian likelihood, i.e. MSE on normalised pixels.
- `codebook` (Eq. 3, second and third terms): ||sg[v] - c||^2 + beta ||v - sg[c]||^2 (`method.cbvila.beta`).
- `mim` (Eq. 4): `method.cbvila.image_ratio` (75 %) of the patch tokens are replaced by a mask token, the others
  quantised against sg[C] (the codebook gets no gradient from MIM; the encoders do), decoded by the reversed fusion,
  and `mim_head` predicts each masked token's codeword index; the targets are the full image's indices.
- `itm`, `mlm`: ALBEF's, text queries attending to the continuous ViT tokens, MLM with momentum distillation.
- `itc`: ALBEF's, on by default although Eq. 7 omits it: ITM draws its hard negatives from contrastive similarities
  (Sec. III-C), which something must train. Drop it from `method.losses` to follow Eq. 7 to the letter.

v is the ViT's patch outputs (projected to the text width where the widths differ; the presets' are equal); z_q is
the nearest codeword (Eq. 1), with gradients from the gumbel-softmax or straight-through (`method.cbvila.estimator`).

Schedule (Sec. IV-C): the first `method.cbvila.warmup_steps` steps train ITM (+ ITC) and the pixel and codebook terms
only (codebook warm-up); then MIM and MLM join. Codebook health (usage, perplexity) is logged every step; codewords
unused for `method.cbvila.dead_after` steps are re-initialised from this step's encoder outputs, drawn by a
(seed, step) generator over the global batch, so every rank replaces them alike.
Table IV's ablations are `method.losses`: [itc, itm, mlm]; [itc, itm, mlm, pixel, codebook]; all six.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from vlpt.config import ABOVE_ZERO, NON_NEGATIVE, POSITIVE, UNIT, MethodConfig, opt
from vlpt.engine import distributed, rng
from vlpt.methods import steps
from vlpt.methods.base import Method, register
from vlpt.models.text import init_bert_
from vlpt.objectives.codebook import Quantized, VectorQuantizer, assignment_counts, codebook_health
from vlpt.objectives.masked_image import codeword_mim_loss, patchify, pixel_mse


@dataclass
class VQCodebookConfig:
    size: int = opt(3000, "codewords K (CB-ViLA: 3,000)", POSITIVE)


@dataclass
class CBViLAOptions:
    estimator: Literal["gumbel", "straight_through"] = opt(
        "gumbel", "gradient of the nearest-codeword look-up: gumbel (softmax over -distance, CB-ViLA Sec. III-A) or "
        "straight_through (VQ-VAE)")
    gumbel_temperature: float = opt(1.0, "temperature of the gumbel-softmax over negative mean squared distances",
                                    ABOVE_ZERO)
    beta: float = opt(0.25, "commitment weight beta of Eq. 3 (VQ-VAE: 0.25)", NON_NEGATIVE)
    image_ratio: float = opt(0.75, "fraction of visual tokens masked for MIM (CB-ViLA, after MAE: 0.75)", UNIT)
    warmup_steps: int = opt(1000, "codebook warm-up: steps that train only ITM (+ITC) and the pixel/codebook terms "
                            "before MIM and MLM join (Sec. IV-C); only when a codebook term is trained", NON_NEGATIVE)
    dead_after: int = opt(100, "steps a codeword may go unused before it is re-initialised from encoder outputs; "
                          "0 disables", NON_NEGATIVE)


@dataclass
class CBViLAConfig(MethodConfig):
    codebook: VQCodebookConfig = field(default_factory=VQCodebookConfig)
    cbvila: CBViLAOptions = field(default_factory=CBViLAOptions)


CODEBOOK_TERMS = ("pixel", "codebook", "mim")


@register("cbvila", CBViLAConfig)
class CBViLA(Method):
    loss_names = ("itc", "itm", "mlm", *CODEBOOK_TERMS)
    capabilities = frozenset({"codebook"})

    def __init__(self, cfg, vocab_size: int):
        super().__init__(cfg, vocab_size)
        v, t, cb = cfg.model.vision, cfg.model.text, cfg.method.cbvila
        patches = (v.image_size // v.patch_size) ** 2
        self.to_code = nn.Linear(v.width, t.width) if v.width != t.width else nn.Identity()
        self.text_to_context = nn.Linear(t.width, v.width) if v.width != t.width else nn.Identity()
        self.quantizer = VectorQuantizer(cfg.method.codebook.size, t.width, cb.estimator, cb.gumbel_temperature)
        self.code_position = nn.Parameter(torch.randn(1, patches, t.width) * 0.02)
        self.mask_token = nn.Parameter(torch.randn(1, 1, t.width) * 0.02)
        self.to_pixels = nn.Linear(t.width, v.patch_size * v.patch_size * 3)
        self.mim_head = nn.Linear(t.width, cfg.method.codebook.size)
        for head in (self.to_code, self.text_to_context, self.to_pixels, self.mim_head):
            init_bert_(head)
        self._restart: tuple[torch.Tensor, torch.Tensor] | None = None

    def active_losses(self, step: int) -> list[str]:
        """`method.losses`, without MIM and MLM during the codebook warm-up (Sec. IV-C): the warm-up is for the
        codebook, so a row without codebook terms (Table IV row 1, ALBEF) trains MLM from step 0."""
        losses, cb = self.cfg.method.losses, self.cfg.method.cbvila
        if step < cb.warmup_steps and set(CODEBOOK_TERMS) & set(losses):
            return [name for name in losses if name not in ("mim", "mlm")]
        return list(losses)

    def may_leave_parameters_unused(self) -> bool:
        return super().may_leave_parameters_unused() or self.active_losses(0) != list(self.cfg.method.losses)

    def quantize(self, image_tokens: torch.Tensor, frozen: bool = False) -> tuple[torch.Tensor, Quantized]:
        """ViT tokens (B,1+N,Wv) -> encoder outputs v (B,N,Wt) and their quantisation (Eq. 1); `frozen`: with the
        tokens MIM reads (sg[C])."""
        v = self.to_code(image_tokens[:, 1:])
        return v, self.quantizer(v, frozen)

    def decode(self, queries: torch.Tensor, text_hidden: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The reversed fusion: image tokens (B,N,Wt), plus positions, attend to each other and to the text with the
        fusion encoder's own weights: (B,N,Wt)."""
        return self.backbone.fusion(queries + self.code_position.to(queries.dtype), None,
                                    self.text_to_context(text_hidden), text_mask)

    def forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        cb, losses = self.cfg.method.cbvila, self.active_losses(step)
        f = steps.features(self, batch)
        out = steps.standard_losses(self, f, batch, step, losses)
        if {"pixel", "codebook", "mim"} & set(losses):
            v, q = self.quantize(f.image_tokens, frozen="mim" in losses)
            if "codebook" in losses:
                out["codebook"] = q.codebook + cb.beta * q.commitment
            if "pixel" in losses:
                pred = self.to_pixels(self.decode(q.tokens, f.text_hidden, f.text_mask))
                out["pixel"] = pixel_mse(pred, patchify(batch["image"], self.cfg.model.vision.patch_size))
            if "mim" in losses:
                mask = self.draw_image_mask(len(v), step, v.device, 1, cb.image_ratio)
                queries = torch.where(mask[..., None], self.mask_token.to(q.frozen_tokens.dtype), q.frozen_tokens)
                logits = self.mim_head(self.decode(queries, f.text_hidden, f.text_mask))
                out["mim"] = codeword_mim_loss(logits, q.indices, mask, distributed.mean_count(mask.sum()))
            if self.training:
                out.update(self.track_codebook(v, q, step))
        steps.push_queues(self, f)
        return out

    @torch.no_grad()
    def track_codebook(self, v: torch.Tensor, q: Quantized, step: int) -> dict[str, torch.Tensor]:
        """Usage and perplexity over the global batch; keeps this step's counts and K candidate encoder outputs
        (distinct global token positions from a (seed, step) generator, each rank filling its own) for
        `after_step`."""
        size = len(self.quantizer.codewords)
        counts = distributed.all_sum(assignment_counts(q.indices, size))
        if self.cfg.method.cbvila.dead_after > 0:
            flat = v.detach().flatten(0, 1)
            n = len(flat)
            gen = rng.generator("codebook_restart", self.cfg.train.seed, step, device=flat.device)
            total = n * distributed.world_size()  # distinct tokens where there are enough: no twin codewords
            pick = torch.randperm(total, generator=gen, device=flat.device)[:size] if total >= size else \
                torch.randint(total, (size,), generator=gen, device=flat.device)
            pick = pick - distributed.rank() * n
            inside = (pick >= 0) & (pick < n)
            candidates = torch.where(inside[:, None], flat[pick.clamp(0, n - 1)].float(), 0.0)
            self._restart = counts, distributed.all_sum(candidates)
        return codebook_health(counts, counts)

    def after_step(self, step: int) -> None:
        super().after_step(step)
        if self._restart is not None:
            self.quantizer.restart_dead(*self._restart, step, self.cfg.method.cbvila.dead_after)
            self._restart = None

"""SemMIM (Liu, Shi et al., LREC-COLING 2024): semantics-enhanced cross-modal MIM, with a prefix-LM decoder.

L = L_cls + L_patch + L_itc + L_itm + L_mlm + L_plm (Eq. 4), each a name in `method.losses`. Backbone `DualStream`
(ALBEF's ViT, text encoder, fusion encoder), its ViT owning the learnable [MASK] token; the shared momentum teacher
(Eq. 1, read as the EMA it means: theta^ <- m theta^ + (1 - m) theta) holds the encoders, projections, MLM head and
the encoding head H^ (`models/heads.EncodingHead`, DINO's, into K = 1,024 codes).

- `cls` (Eq. 2): the student head's [CLS] distribution of one view against the momentum head's of the other
  (`objectives.agreement`), the teacher's logits centred (an EMA of its batch mean) and sharpened.
- `patch` (Eq. 3): the second view, `mask_ratio` of its patches replaced by [MASK] (text-guided: drawn without
  replacement with probabilities softmax(patch-text similarity / tau), Gumbel top-k on the device; or uniformly),
  through the ViT with the caption's text-encoder states appended in the last `text_layers` blocks (a key-padding
  mask keeps padded text out); soft-label cross entropy of the student head's patch distributions against the
  momentum head's of the unmasked view with text, at the masked patches. The momentum ViT runs its last blocks twice
  over one trunk: text-free (its [CLS] targets and the masking's patch features) and with text (patch targets).
- `itc`, `itm`, `mlm`: ALBEF's shared steps on the first view, unmasked and text-free.
- `plm` (Sec. 3.2.3): the caption split (`plm.split`) into a prefix, read by the text and fusion encoders with the
  image, and a suffix that the causal `Decoder` (models/decoder.py) predicts cross-attending to the fused prefix.

Paper: /work/shared/papers/004_036e46ff49f3985b.txt ("l.N" below are its lines). Ablations (Tables 4-7) are keys:
`mim_target` own / pixels / tokens (w/o MIM: `patch` and `cls` left out of `method.losses`), `masking`, `mask_ratio`,
`text_layers`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.config import ABOVE_ZERO, NON_NEGATIVE, POSITIVE, UNIT, MethodConfig, fail, opt, within
from vlpt.data.masking import sample_patches
from vlpt.engine import distributed, rng
from vlpt.methods import steps
from vlpt.methods.base import Method, register
from vlpt.methods.simla import VisualTokensConfig
from vlpt.models.backbone import DualStream
from vlpt.models.decoder import Decoder
from vlpt.models.heads import EncodingHead
from vlpt.models.momentum import MomentumTeacher
from vlpt.models.text import init_bert_
from vlpt.models.visual_tokens import VisualTokens
from vlpt.objectives.agreement import TeacherCenter, cls_agreement_loss, patch_mim_loss
from vlpt.objectives.masked_image import codeword_mim_loss, mim_loss, patchify
from vlpt.objectives.prefix_lm import plm_loss, split_caption, split_points


@dataclass
class EncodingHeadConfig:
    codes: int = opt(1024, "K, the categories of the encoding space (l.187: 1,024)", POSITIVE)
    hidden: int = opt(1536, "hidden width of the head's MLP (DINO's 2,048 with 3 layers is 6.6M at ViT-B; l.285: "
                      "'less than 6M')", POSITIVE)
    bottleneck: int = opt(256, "width before the weight-normalised last layer (DINO: 256)", POSITIVE)
    layers: int = opt(3, "linear layers before the last (DINO: 3)", POSITIVE)
    student_temperature: float = opt(0.1, "student softmax temperature (the paper is silent; DINO: 0.1)", ABOVE_ZERO)
    teacher_temperature: float = opt(0.04, "teacher softmax temperature (the paper is silent; DINO: 0.04)", ABOVE_ZERO)
    center_momentum: float = opt(0.9, "EMA of the teacher's centre (the paper is silent; DINO: 0.9)", UNIT)
    centering: Literal["separate", "shared", "none"] = opt(
        "separate", "teacher centring: separate centres for [CLS] and patches (iBOT), one shared (the shared encoding "
        "space, l.101), or none")


@dataclass
class PLMConfig:
    split: Literal["random", "ratio"] = opt("random", "prefix length: random (floor(u k) of k words, u uniform; "
                                            "PALM / mPLUG) or ratio (floor(prefix_ratio k)); the suffix keeps >= 1")
    prefix_ratio: float = opt(0.5, "share of the words in the prefix with split: ratio (0: captioning)", within(0, 1, "[)"))
    decoder_layers: int = opt(0, "decoder depth, its first layers copied from the fusion layers (l.135: 12); 0: as "
                              "many as the fusion encoder", NON_NEGATIVE)


@dataclass
class SemMIMOptions:
    head: EncodingHeadConfig = field(default_factory=EncodingHeadConfig)
    mim_target: Literal["own", "pixels", "tokens"] = opt(
        "own", "Table 4: MIM targets from the momentum encoding head (own), normalised pixels (L1), or a frozen "
        "tokenizer's visual tokens (`tokens`, SIMLA's; dVAE in the paper)")
    tokens: VisualTokensConfig = field(default_factory=VisualTokensConfig)
    masking: Literal["text", "random"] = opt("text", "Table 5: text-guided or uniformly random patch masks")
    mask_ratio: float = opt(0.3, "Table 6: fraction of patches masked, exactly (0.15 / 0.30 / 0.45)", UNIT)
    guide_temperature: float = opt(0.0, "temperature of the softmax over patch-text similarities (l.105 says "
                                   "softmax only); 0: the ITC temperature", NON_NEGATIVE)
    text_layers: int = opt(1, "Table 7: text appended in the last N ViT blocks (start layer i of 12: N = 13 - i; "
                           "0: no text in MIM)", NON_NEGATIVE)
    views: Literal["eq2", "prose"] = opt(
        "eq2", "which view each encoder's [CLS] reads: eq2 (Eq. 2 and l.41: student view 1, teacher view 2, the "
        "masked view's own momentum pass giving [CLS] and patch targets, l.111) or prose (l.95, l.113: teacher "
        "view 1, student the masked view 2 run text-free in its last blocks)")
    plm: PLMConfig = field(default_factory=PLMConfig)


@dataclass
class SemMIMConfig(MethodConfig):
    losses: list[str] = opt(["itc", "itm", "mlm", "cls", "patch", "plm"], "losses to train (Eq. 4)")
    semmim: SemMIMOptions = field(default_factory=SemMIMOptions)

    def validate(self, prefix: str, root) -> None:
        super().validate(prefix, root)
        if self.semmim.text_layers > root.model.vision.depth:
            fail(f"{prefix}semmim.text_layers", f"at most model.vision.depth ({root.model.vision.depth})",
                 self.semmim.text_layers)


@register("semmim", SemMIMConfig)
class SemMIM(Method):
    loss_names = ("itc", "itm", "mlm", "cls", "patch", "plm")
    capabilities = frozenset({"masking"})

    def __init__(self, cfg, vocab_size: int):
        super().__init__(cfg, vocab_size, DualStream(cfg.model, vocab_size, mask_token=True))
        m, s, v, t = cfg.method, cfg.method.semmim, cfg.model.vision, cfg.model.text
        h = s.head
        self.encoding_head = EncodingHead(v.width, h.codes, h.hidden, h.bottleneck, h.layers)
        self.text_to_vision = nn.Linear(t.width, v.width) if t.width != v.width else nn.Identity()
        init_bert_(self.text_to_vision)
        kinds = {"separate": ("cls", "patch"), "shared": ("all",), "none": ()}[h.centering]
        self.centers = nn.ModuleDict({k: TeacherCenter(h.codes, h.center_momentum) for k in kinds})
        if s.mim_target == "pixels":
            self.to_pixels = nn.Linear(v.width, v.patch_size * v.patch_size * 3)
            init_bert_(self.to_pixels)
        if s.mim_target == "tokens":
            self.token_head = nn.Linear(v.width, s.tokens.codes)
            init_bert_(self.token_head)
            self.visual_tokens = VisualTokens(s.tokens.source, s.tokens.path, s.tokens.codes,
                                              self.backbone.vision.grid, v.patch_size, cfg.train.seed)
        self.decoder = Decoder.from_method(self, t.width, s.plm.decoder_layers) if "plm" in m.losses else None
        parts = {name: getattr(self, name) for name in ("backbone", "vision_proj", "text_proj", "mlm_head",
                                                          "encoding_head", "text_to_vision")}
        self.teacher = MomentumTeacher(parts, m.momentum)  # the base's, with H^ too (l.85)

    @classmethod
    def batch_needs(cls, m) -> set[str]:
        return super().batch_needs(m) | ({"image_view2"} if {"cls", "patch"} & set(m.losses) else set())

    def pretrained_decoder(self) -> nn.Module | None:
        return self.decoder  # None when pretraining left PLM out

    def block_owners(self) -> list[nn.Module]:
        return [*super().block_owners(), *([self.decoder] if self.decoder is not None else [])]

    def center(self, kind: str) -> torch.Tensor | None:
        c = self.centers[kind] if kind in self.centers else self.centers["all"] if "all" in self.centers else None
        return None if c is None else c.value

    # --- the ViT with text in its last blocks ---------------------------------------------------------------------
    def encode_image_text(self, image, patch_mask, text_hidden, text_mask, teacher: bool = False, free: bool = True,
                          with_text: bool = True):
        """The ViT over `image` (masked where `patch_mask`), its first depth - N blocks once, then the last N
        (`semmim.text_layers`) text-free (`free`) and with the text states appended (`with_text`; `text_mask`: their
        key-padding mask): (free tokens or None, text tokens or None), each (B,1+N,Wv) after the final norm."""
        vit = self.part("backbone", teacher).vision
        start = len(vit.blocks) - self.cfg.method.semmim.text_layers
        x = vit.run_blocks(vit.embed(image, patch_mask), 0, start)
        plain = vit.norm(vit.run_blocks(x, start)) if free or start == len(vit.blocks) else None
        if not with_text or start == len(vit.blocks):
            return plain, plain if with_text else None
        extra = self.part("text_to_vision", teacher)(text_hidden).to(x.dtype)
        fused, _ = vit.run_blocks(x, start, extra=extra, extra_mask=text_mask)
        return plain, vit.norm(fused)

    @torch.no_grad()
    def draw_patch_mask(self, patch_tokens, text_feat, step: int, masking: str | None = None) -> torch.Tensor:
        """(B,N) bool: `mask_ratio` of the patches, drawn with probabilities softmax(s_i / tau), s_i the cosine of
        patch i's projected feature (`patch_tokens`, (B,N,Wv), the momentum ViT's text-free outputs) and the text's
        ITC feature (l.105), or uniformly (`masking: random`); noise from a (seed, step) generator over the global
        batch, this rank's rows."""
        s = self.cfg.method.semmim
        b, n = patch_tokens.shape[:2]
        gen = rng.generator("image_mask", self.cfg.train.seed, step, device=patch_tokens.device)
        noise = torch.rand(b * distributed.world_size(), n, generator=gen, device=patch_tokens.device)
        noise = noise[distributed.local_rows(b)]
        if (masking or s.masking) == "random":
            logits = torch.zeros(b, n, device=patch_tokens.device)
        else:
            patches = F.normalize(self.teacher["vision_proj"](patch_tokens).float(), dim=-1)
            tau = s.guide_temperature if s.guide_temperature > 0 else self.temperature().detach()
            logits = torch.einsum("bnd,bd->bn", patches, text_feat.float()) / tau
        return sample_patches(logits, s.mask_ratio, noise=noise)

    # --- losses ----------------------------------------------------------------------------------------------------
    def semantic_mim(self, f: steps.Features, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """Eq. 2 and Eq. 3 (with Table 4's other targets)."""
        s, losses, out = self.cfg.method.semmim, self.cfg.method.losses, {}
        h, head = s.head, self.encoding_head
        view2, text_mask = batch["image_view2"], f.text_mask
        own = "patch" in losses and s.mim_target == "own"
        with torch.no_grad():  # the momentum ViT over view 2: text-free [CLS] and patches, then patches with text
            teacher_hidden = f.teacher_hidden if own else None
            t_free, t_text = self.encode_image_text(view2, None, teacher_hidden, text_mask, teacher=True,
                                                    with_text=own)
            mask = self.draw_patch_mask(t_free[:, 1:], f.teacher_text, step)
        prose = s.views == "prose" and "cls" in losses
        s_free = s_text = None
        if prose or "patch" in losses:  # the student over the masked view 2
            s_free, s_text = self.encode_image_text(view2, mask, f.text_hidden, text_mask, free=prose,
                                                    with_text="patch" in losses)
        if "cls" in losses:  # Eq. 2; which view each side reads: `views`
            student = head(s_free[:, 0] if prose else f.image_tokens[:, 0])
            with torch.no_grad():
                teacher = self.teacher["encoding_head"](f.teacher_tokens[:, 0] if prose else t_free[:, 0])
            out["cls"] = cls_agreement_loss(student, teacher, self.center("cls"), h.student_temperature,
                                            h.teacher_temperature)
            self.propose_center("cls", teacher)
        if "patch" in losses:
            count = distributed.mean_count(mask.sum())
            patches = s_text[:, 1:]
            if s.mim_target == "own":  # Eq. 3
                with torch.no_grad():
                    teacher = self.teacher["encoding_head"](t_text[:, 1:])
                out["patch"] = patch_mim_loss(head(patches), teacher, mask, self.center("patch"),
                                              h.student_temperature, h.teacher_temperature, count)
                self.propose_center("patch", teacher)
            elif s.mim_target == "pixels":  # Table 4 "raw pixels": L1 on the masked patches' normalised pixels
                target = patchify(view2, self.cfg.model.vision.patch_size)
                out["patch"] = mim_loss(self.to_pixels(patches), target, mask, count)
            else:  # Table 4 "dVAE": cross entropy of a frozen tokenizer's visual token
                out["patch"] = codeword_mim_loss(self.token_head(patches), self.visual_tokens(view2), mask, count)
        out["mask_similarity"] = self.mask_similarity(t_free[:, 1:], f.teacher_text, mask).detach()
        return out

    @torch.no_grad()
    def mask_similarity(self, patch_tokens, text_feat, mask) -> torch.Tensor:
        """Logged: mean patch-text cosine of the masked patches minus that of all patches (> 0: text-guided)."""
        sim = torch.einsum("bnd,bd->bn", F.normalize(self.teacher["vision_proj"](patch_tokens).float(), dim=-1),
                           text_feat.float())
        return (sim * mask).sum() / mask.sum().clamp(min=1) - sim.mean()

    def propose_center(self, kind: str, teacher_logits: torch.Tensor) -> None:
        if self.training:
            key = kind if kind in self.centers else "all"
            if key in self.centers:
                self.centers[key].propose(teacher_logits)

    def plm(self, f: steps.Features, batch: dict, step: int) -> torch.Tensor:
        """Sec. 3.2.3: the decoder predicts the suffix from the fusion encoder's states of (image, prefix)."""
        p = self.cfg.method.semmim.plm
        ids, mask = batch["text_ids"], f.text_mask
        b = len(ids)
        gen = rng.generator("plm_split", self.cfg.train.seed, step, device=ids.device)
        noise = torch.rand(b * distributed.world_size(), generator=gen, device=ids.device)[distributed.local_rows(b)]
        prefix, prefix_mask, suffix, suffix_mask = split_caption(ids, mask, split_points(mask, p.split, p.prefix_ratio,
                                                                                          noise))
        context = self.fuse(f.image_tokens, self.backbone.encode_text(prefix, prefix_mask), prefix_mask)
        sums, _ = self.decoder.token_losses(suffix, suffix_mask, context, prefix_mask, ignore_first=1)
        return plm_loss(sums, distributed.mean_count(suffix_mask[:, 1:].sum()))

    def forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        losses = self.cfg.method.losses
        f = steps.features(self, batch)
        out = steps.standard_losses(self, f, batch, step, losses)
        if {"cls", "patch"} & set(losses):
            out.update(self.semantic_mim(f, batch, step))
        if "plm" in losses:
            out["plm"] = self.plm(f, batch, step)
        steps.push_queues(self, f)
        return out

    def after_step(self, step: int) -> None:
        super().after_step(step)
        for center in self.centers.values():
            center.apply()

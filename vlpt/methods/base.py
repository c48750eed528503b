"""The shared dual-stream backbone every method builds on (ALBEF Sec. 3.1): ViT, text encoder, fusion encoder,
projections, ITM and MLM heads, a momentum teacher and feature queues.

A method subclasses `Method` and writes `forward(batch, step) -> {loss name: scalar}`; downstream tasks use
`encode_image`, `encode_text`, `fuse` and `itm_logits`, which every method provides.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.config import Config, ConfigError
from vlpt.data.masking import mask_image_regions, masked_positions
from vlpt.engine import distributed
from vlpt.models.momentum import MomentumTeacher
from vlpt.models.text import FusionEncoder, MLMHead, TextEncoder, init_bert_, load_bert_weights
from vlpt.models.vision import build_vit
from vlpt.objectives.contrastive import FeatureQueues, alignment_loss
from vlpt.objectives.masked_language import mlm_loss
from vlpt.objectives.matching import itm_loss, sample_hard_negatives

_REGISTRY: dict[str, type["Method"]] = {}


def register(name: str):
    def wrap(cls):
        _REGISTRY[name] = cls
        cls.name = name
        return cls
    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


def check(cfg: Config) -> type["Method"]:
    """The method class `cfg.method.name` names, once its losses are known to it; ConfigError otherwise."""
    name = cfg.method.name
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, _REGISTRY, n=1)
        raise ConfigError(f"unknown method '{name}'" + (f"; did you mean '{near[0]}'?" if near else "")
                          + f" (available: {', '.join(available())})")
    cls = _REGISTRY[name]
    for loss in [*cfg.method.losses, *cfg.method.loss_weights]:
        if loss not in cls.loss_names:
            near = difflib.get_close_matches(loss, cls.loss_names, n=1)
            raise ConfigError(f"method '{name}' has no loss '{loss}'" + (f"; did you mean '{near[0]}'?" if near else "")
                              + f" (its losses: {', '.join(cls.loss_names)})")
    return cls


def build(cfg: Config, vocab_size: int) -> "Method":
    return check(cfg)(cfg, vocab_size)


class Method(nn.Module):
    """ALBEF's components. Subclasses choose which to use in `forward` and may add their own."""

    name = "base"
    loss_names: tuple[str, ...] = ("itc", "itm", "mlm")  # what `method.losses` may list
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
        self.temp = nn.Parameter(torch.tensor([m.temperature]))  # 1-D: FSDP shards no 0-d parameter
        self.register_load_state_dict_pre_hook(_temp_as_vector)
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
        """ids, mask (B,L) -> hidden states (B,L,Wt), normalised projected pooled feature (B,D)."""
        hidden = self._part("text", teacher)(ids, mask)
        return hidden, F.normalize(self._part("text_proj", teacher)(self.pool(hidden, mask)).float(), dim=-1)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,L,W) -> (B,W): the [CLS] state, or the mean over unpadded tokens (`model.text.pool`)."""
        if self.cfg.model.text.pool == "cls":
            return hidden[:, 0]
        mask = mask[..., None].to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)

    def fuse(self, image_tokens, text_hidden, text_mask, teacher: bool = False):
        """Text states attend to image tokens: (B,L,Wt)."""
        return self._part("fusion", teacher)(text_hidden, text_mask, image_tokens)

    def itm_logits(self, image_tokens, text_hidden, text_mask):
        """Match / no-match logits (B,2) from the pooled fused states ([CLS] in ALBEF)."""
        return self.itm_head(self.pool(self.fuse(image_tokens, text_hidden, text_mask), text_mask))

    def mlm_logits(self, image_tokens, ids, mask, teacher: bool = False, positions: torch.Tensor | None = None,
                   hidden: torch.Tensor | None = None):
        """Vocabulary logits (B,L,V) for (masked) text ids conditioned on the image; with `positions` (M,), indices
        into the flattened (B*L) tokens, only those tokens' logits (M,V): the head need not run on every token.
        `hidden`: the text encoder's states of `ids` when already computed."""
        hidden = self._part("text", teacher)(ids, mask) if hidden is None else hidden
        fused = self.fuse(image_tokens, hidden, mask, teacher)
        if positions is not None:
            fused = fused.flatten(0, 1).index_select(0, positions)  # backward: index_add, ordered on CPU
        words = self._part("text", teacher).embeddings.word.weight
        return self._part("mlm_head", teacher)(fused, words)

    # --- the shared pretraining computations ------------------------------------------------------------------------
    def features(self, batch: dict) -> "Features":
        """Student and teacher unimodal features, computed once per step and reused by every loss."""
        image_tokens, image_feat = self.encode_image(batch["image"])
        text_hidden, text_feat = self.encode_text(batch["text_ids"], batch["text_mask"])
        with torch.no_grad():
            teacher_tokens, teacher_image = self.encode_image(batch["image"], teacher=True)
            _, teacher_text = self.encode_text(batch["text_ids"], batch["text_mask"], teacher=True)
            ids = batch["image_id"]
            batch_ids = distributed.gather(ids)
            positives = ids[:, None] == torch.cat([batch_ids, self.queues.ids])[None]
            image_keys = torch.cat([distributed.gather(teacher_image), self.queues.image])  # cat copies: the
            text_keys = torch.cat([distributed.gather(teacher_text), self.queues.text])     # queue push is safe
        return Features(image_tokens, image_feat, text_hidden, text_feat, batch["text_mask"], teacher_tokens,
                        teacher_image, teacher_text, ids, image_keys, text_keys, positives, len(batch_ids))

    def itc(self, f: "Features", step: int) -> torch.Tensor:
        """ALBEF Eq. 1-3, 6 against the queues; with `method.intra`, CODIS Eq. 4-5 adds i2i and t2t."""
        return alignment_loss(f.image_feat, f.text_feat, f.image_keys, f.text_keys, f.positives, self.temperature(),
                              self.alpha(step), f.teacher_image, f.teacher_text, intra=self.cfg.method.intra)

    def itm(self, f: "Features", step: int) -> torch.Tensor:
        """ALBEF Eq. 4: one hard negative text per image and one hard negative image per text, drawn from the whole
        (global) batch by contrastive similarity; the noise comes from a (seed, step) generator sliced by rank, so
        N ranks draw what one process with the global batch would."""
        n_local, n_all = f.image_feat.shape[0], f.batch_size
        temp = self.temperature()
        with torch.no_grad():
            sim_i2t = f.image_feat @ f.text_keys[:n_all].t() / temp
            sim_t2i = f.text_feat @ f.image_keys[:n_all].t() / temp
            gen = torch.Generator(sim_i2t.device).manual_seed(self.cfg.train.seed * 7919 + step)
            noise = torch.rand(2, n_all, n_all, generator=gen, device=sim_i2t.device)[:, distributed.local_rows(n_local)]
            positives = f.positives[:, :n_all]
            neg_image = sample_hard_negatives(sim_t2i, positives, noise[0])
            neg_text = sample_hard_negatives(sim_i2t, positives, noise[1])
        all_tokens = distributed.gather(f.image_tokens, grad=True)
        all_hidden = distributed.gather(f.text_hidden, grad=True)
        all_mask = distributed.gather(f.text_mask)
        # index_select: its backward adds in a fixed order on the CPU; indexing's accumulates with atomics
        images = torch.cat([f.image_tokens, all_tokens.index_select(0, neg_image), f.image_tokens])
        texts = torch.cat([f.text_hidden, f.text_hidden, all_hidden.index_select(0, neg_text)])
        masks = torch.cat([f.text_mask, f.text_mask, all_mask[neg_text]])
        labels = (torch.arange(3 * n_local, device=images.device) < n_local).long()  # made on the device: no copy
        return itm_loss(self.itm_logits(images, texts, masks), labels)

    def mlm(self, f: "Features", batch: dict, step: int) -> torch.Tensor:
        """ALBEF Eq. 5 + 7: masked tokens predicted from text and image, distilled from the teacher."""
        positions, labels = mlm_positions(batch), batch["mlm_labels"]
        logits = self.mlm_logits(f.image_tokens, batch["mlm_ids"], f.text_mask, positions=positions)
        with torch.no_grad():
            teacher_logits = self.mlm_logits(f.teacher_tokens, batch["mlm_ids"], f.text_mask, teacher=True,
                                             positions=positions)
        return mlm_loss(logits, labels.flatten()[positions], teacher_logits, self.alpha(step),
                        distributed.mean_count((labels >= 0).sum()))

    def standard_losses(self, f: "Features", batch: dict, step: int, losses=None) -> dict[str, torch.Tensor]:
        """ITC, ITM and MLM, those of them listed in `losses` (default `method.losses`)."""
        losses, out = self.cfg.method.losses if losses is None else losses, {}
        if "itc" in losses:
            out["itc"] = self.itc(f, step)
        if "itm" in losses:
            out["itm"] = self.itm(f, step)
        if "mlm" in losses:
            out["mlm"] = self.mlm(f, batch, step)
        return out

    def draw_image_mask(self, n_local: int, step: int, device, region: int, ratio: float) -> torch.Tensor:
        """Patch mask (n_local, N) bool, True = masked: `ratio` of the square regions of `region` x `region` patches
        of each image, from a (seed, step) generator over the global batch, this rank's rows taken (so N ranks
        mask what one process would)."""
        gen = torch.Generator(device).manual_seed(self.cfg.train.seed * 1_000_003 + step)  # drawn on the device:
        grid = tuple(self.vision.patch_embed.grid_size)                                  # no copy, no sync
        mask = mask_image_regions(n_local * distributed.world_size(), grid, region, ratio, gen)
        return mask[distributed.local_rows(n_local)]

    def push_queues(self, f: "Features") -> None:
        self.queues.push(f.image_id, image=f.teacher_image, text=f.teacher_text)

    # --- training hooks used by the trainer ----------------------------------------------------------------------
    def temperature(self) -> torch.Tensor:
        """The ITC temperature, a 0-d tensor."""
        return self.temp.clamp(0.001, 0.5).squeeze(0)

    def alpha(self, step: int) -> float:
        """Distillation weight, ramped linearly over `alpha_warmup_steps` (ALBEF: the first epoch)."""
        warm = self.cfg.method.alpha_warmup_steps
        return self.cfg.method.alpha * (min(1.0, step / warm) if warm > 0 else 1.0)

    def after_step(self, step: int) -> None:
        """Called by the trainer after each optimiser step."""
        self.teacher.update()

    def forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """Named losses (summed by the trainer when listed in `method.losses`) and metrics (logged only)."""
        raise NotImplementedError


def mlm_positions(batch: dict) -> torch.Tensor:
    """Indices of the masked tokens in the flattened (B*L) text: `mlm_positions` from the data pipeline, found on the
    host, else from `mlm_labels` here (which waits for the device: the count sets the shape)."""
    if "mlm_positions" in batch:
        return batch["mlm_positions"]
    return masked_positions(batch["mlm_labels"])


def _temp_as_vector(module, state_dict, prefix, *args) -> None:
    """Load checkpoints written when the temperature was a 0-d parameter."""
    key = prefix + "temp"
    if key in state_dict and state_dict[key].ndim == 0:
        state_dict[key] = state_dict[key].reshape(1)


@dataclass
class Features:
    """One step's features: student tokens and normalised projections, the teacher's, and the ITC keys
    (gathered teacher features of the global batch, then the queue) with the positives of each local row."""
    image_tokens: torch.Tensor
    image_feat: torch.Tensor
    text_hidden: torch.Tensor
    text_feat: torch.Tensor
    text_mask: torch.Tensor
    teacher_tokens: torch.Tensor
    teacher_image: torch.Tensor
    teacher_text: torch.Tensor
    image_id: torch.Tensor
    image_keys: torch.Tensor
    text_keys: torch.Tensor
    positives: torch.Tensor
    batch_size: int

"""`Method`: a backbone, the shared heads (contrastive projections, ITM, MLM), ITC keys from a momentum teacher and
queues or from the batch, and the registry that names every method.

A method is a subclass in a file of its own that registers itself with its config dataclass
(`@register("name", NameConfig)`) and writes `forward(batch, step) -> {name: scalar}`; the shared ITC / ITM / MLM
computations are in `steps.py`. Downstream tasks use `encode_image`, `encode_text`, `fuse`, `joint_feature` and
`itm_logits`, which every method provides.
"""
from __future__ import annotations

import difflib

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.config import Config, ConfigError, MethodConfig
from vlpt.data.masking import mask_image_regions
from vlpt.engine import distributed, rng
from vlpt.models.backbone import DualStream
from vlpt.models.momentum import MomentumTeacher
from vlpt.models.paired import PairedFusion, pair_from_fusion
from vlpt.models.text import MLMHead, init_bert_, load_bert_weights
from vlpt.objectives.contrastive import FeatureQueues
from vlpt.registry import Registry


registry = Registry("method", package="vlpt.methods")
register = registry.register

# Losses every method may add to its own: text assignment, ALBEF's pretraining step before NLVR2 (Sec. 5).
SHARED_LOSSES = ("nlvr_ta",)


def available() -> list[str]:
    return registry.names()


def check(cfg: Config) -> type["Method"]:
    """The method class `cfg.method.name` names, once its losses are known to it; ConfigError otherwise."""
    cls = registry.get(cfg.method.name)
    names = (*cls.loss_names, *SHARED_LOSSES)
    for loss in [*cfg.method.losses, *cfg.method.loss_weights]:
        if loss not in names:
            near = difflib.get_close_matches(loss, names, n=1)
            raise ConfigError(f"method '{cls.name}' has no loss '{loss}'" + (f"; did you mean '{near[0]}'?" if near else "")
                              + f" (its losses: {', '.join(names)})")
    return cls


def build(cfg: Config, vocab_size: int) -> "Method":
    return check(cfg)(cfg, vocab_size)


class Method(nn.Module):
    """ALBEF's heads on a backbone, with a momentum teacher and ITC queues when `momentum_teacher` (else in-batch
    ITC keys and no teacher). Subclasses choose what `forward` computes and may add modules of their own."""

    name = "base"
    config = MethodConfig
    loss_names: tuple[str, ...] = ("itc", "itm", "mlm")  # what `method.losses` may list, besides SHARED_LOSSES
    momentum_teacher = True
    capabilities: frozenset[str] = frozenset()  # what visualisations and evaluations may ask of it
    # Checkpoints written before the backbone existed (format 1): old key prefix -> new.
    legacy_keys = {"vision.": "backbone.vision.", "text.": "backbone.text.", "fusion.": "backbone.fusion.",
                   "teacher.copies.vision.": "teacher.copies.backbone.vision.",
                   "teacher.copies.text.": "teacher.copies.backbone.text.",
                   "teacher.copies.fusion.": "teacher.copies.backbone.fusion."}

    def __init__(self, cfg: Config, vocab_size: int, backbone: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        m, v, t = cfg.method, cfg.model.vision, cfg.model.text
        self.backbone = DualStream(cfg.model, vocab_size) if backbone is None else backbone
        self.vision_proj = nn.Linear(v.width, m.embed_dim)
        self.text_proj = nn.Linear(t.width, m.embed_dim)
        self.itm_head = nn.Linear(t.width, 2)
        self.mlm_head = MLMHead(t.width, vocab_size)
        if t.pretrained:
            self.load_pretrained_text(t.pretrained)
        for head in (self.vision_proj, self.text_proj, self.itm_head):
            init_bert_(head)
        if "nlvr_ta" in m.losses:  # text assignment: the 3-way head on the paired fusion's pooled output
            self.add_pair_fusion()
            self.ta_head = nn.Linear(t.width, 3)
            init_bert_(self.ta_head)
        self.temp = nn.Parameter(torch.tensor([m.temperature]))  # 1-D: FSDP shards no 0-d parameter
        self.register_load_state_dict_pre_hook(_temp_as_vector)
        self.teacher = self.queues = None
        if self.momentum_teacher:
            parts = {"backbone": self.backbone, "vision_proj": self.vision_proj, "text_proj": self.text_proj,
                     "mlm_head": self.mlm_head}
            self.teacher = MomentumTeacher(parts, m.momentum)
            self.queues = FeatureQueues(m.embed_dim, m.queue_size)

    def load_pretrained_text(self, folder: str) -> None:
        """BERT weights into the text encoder, the fusion encoder's self-attention and MLP, and the MLM head."""
        load_bert_weights(folder, self.backbone.text, self.backbone.fusion, mlm_head=self.mlm_head)

    def add_pair_fusion(self) -> PairedFusion:
        """`pair_fusion`, ALBEF's fusion encoder for two images (Sec. 5; `models/paired.py`), made once as a copy of
        the fusion encoder as it is now; a checkpoint without it, loaded later, gives it the fusion's weights."""
        if getattr(self, "pair_fusion", None) is None:
            self.pair_fusion = PairedFusion(self.backbone.fusion)
            self.register_load_state_dict_pre_hook(
                lambda module, state, prefix, *args: pair_from_fusion(state, prefix + "pair_fusion.",
                                                                      prefix + "backbone.fusion."))
        return self.pair_fusion

    # --- what the pipeline and the engine ask of a method ------------------------------------------------------------
    @property
    def losses(self) -> list[str]:
        """The outputs the engine sums into the training loss."""
        return self.cfg.method.losses

    @property
    def loss_weights(self) -> dict[str, float]:
        return self.cfg.method.loss_weights

    @classmethod
    def batch_needs(cls, m: MethodConfig) -> set[str]:
        """Batch contents beyond image, text and image_id: `mlm` (masked ids, labels, positions), `swap`
        (attribute-swapped captions, for ITM with `method.itm_swap_words`)."""
        needs = {"mlm"} if "mlm" in m.losses else set()
        return needs | {"swap"} if "itm" in m.losses and m.itm_swap_words else needs

    def may_leave_parameters_unused(self) -> bool:
        """Whether some step may leave trainable parameters without gradient (an ablation drops a loss): DDP must
        then look for them (`find_unused_parameters`), which costs a graph traversal per step."""
        return bool(set(self.loss_names) - set(self.cfg.method.losses))

    def block_owners(self) -> list[nn.Module]:
        """Student modules made of blocks beyond the backbone's (a method's decoder, the paired fusion)."""
        return [self.pair_fusion] if getattr(self, "pair_fusion", None) is not None else []

    def pretrained_decoder(self) -> nn.Module | None:
        """The text decoder pretraining trains (SemMIM's prefix LM, over the fusion encoder's states of an image and a
        text prefix), which captioning and VQA then finetune (`TaskModel.add_decoder`); None where pretraining trains
        none (ALBEF and the others): those tasks make one from the fusion layers (`Decoder.from_method`)."""
        return None

    def blocks(self) -> list[nn.Module]:
        """Every repeated transformer block, student and teacher: FSDP units, compile regions."""
        found = [*self.backbone.blocks(), *(b for m in self.block_owners() for b in m.layers)]
        if self.teacher is not None:
            found += self.teacher["backbone"].blocks()
        return found

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the student's block activations in backward (the teacher runs without gradient)."""
        self.backbone.set_grad_checkpointing(enable)
        for module in self.block_owners():
            module.set_grad_checkpointing(enable)

    # --- encoders shared with downstream tasks; `teacher=True` runs the momentum copies --------------------------
    def part(self, name: str, teacher: bool = False) -> nn.Module:
        return self.teacher[name] if teacher else getattr(self, name)

    def encode_image(self, image: torch.Tensor, teacher: bool = False, patch_mask: torch.Tensor | None = None):
        """image (B,3,H,W) -> tokens (B,1+N,Wv), normalised projected [CLS] feature (B,D)."""
        tokens = self.part("backbone", teacher).encode_image(image, patch_mask)
        return tokens, F.normalize(self.part("vision_proj", teacher)(tokens[:, 0]).float(), dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor, teacher: bool = False):
        """ids, mask (B,L) -> hidden states (B,L,Wt), normalised projected pooled feature (B,D)."""
        hidden = self.part("backbone", teacher).encode_text(ids, mask)
        return hidden, self.text_feature(hidden, mask, teacher)

    def text_feature(self, hidden: torch.Tensor, mask: torch.Tensor, teacher: bool = False) -> torch.Tensor:
        """The text encoder's states (B,L,Wt) -> the normalised projected pooled feature ITC compares (B,D)."""
        pooled = self.part("backbone", teacher).pool(hidden, mask)
        return F.normalize(self.part("text_proj", teacher)(pooled).float(), dim=-1)

    def fuse(self, image_tokens, text_hidden, text_mask, teacher: bool = False):
        """Text states attend to image tokens: (B,L,Wt)."""
        return self.part("backbone", teacher).fuse(image_tokens, text_hidden, text_mask)

    def joint_feature(self, image_tokens, text_hidden, text_mask, **kv):
        """`kv`: the backbone's `context_kv`, rows selected per pair (reranking), in place of projecting them."""
        return self.backbone.joint_feature(image_tokens, text_hidden, text_mask, **kv)

    def itm_logits(self, image_tokens, text_hidden, text_mask, **kv):
        """Match / no-match logits (B,2) from the backbone's joint feature (`kv`: as `joint_feature`'s)."""
        return self.itm_head(self.joint_feature(image_tokens, text_hidden, text_mask, **kv))

    def mlm_logits(self, image_tokens, ids, mask, teacher: bool = False, positions: torch.Tensor | None = None,
                   hidden: torch.Tensor | None = None):
        """Vocabulary logits (B,L,V) for (masked) text ids conditioned on the image; with `positions` (M,), indices
        into the flattened (B*L) tokens, only those tokens' logits (M,V): the head need not run on every token.
        `hidden`: the text encoder's states of `ids` when already computed."""
        backbone = self.part("backbone", teacher)
        hidden = backbone.encode_text(ids, mask) if hidden is None else hidden
        fused = backbone.fuse(image_tokens, hidden, mask)
        if positions is not None:
            fused = fused.flatten(0, 1).index_select(0, positions)  # backward: index_add, ordered on CPU
        return self.part("mlm_head", teacher)(fused, backbone.text.embeddings.word.weight)

    # --- pretraining helpers ----------------------------------------------------------------------------------
    def temperature(self) -> torch.Tensor:
        """The ITC temperature, a 0-d tensor."""
        return self.temp.clamp(0.001, 0.5).squeeze(0)

    def alpha(self, step: int) -> float:
        """Distillation weight, ramped linearly over `alpha_warmup_steps` (ALBEF: the first epoch)."""
        warm = self.cfg.method.alpha_warmup_steps
        return self.cfg.method.alpha * (min(1.0, step / warm) if warm > 0 else 1.0)

    def draw_image_mask(self, n_local: int, step: int, device, region: int, ratio: float) -> torch.Tensor:
        """Patch mask (n_local, N) bool, True = masked: `ratio` of the square regions of `region` x `region` patches
        of each image, from a (seed, step) generator over the global batch, this rank's rows taken (so N ranks
        mask what one process would)."""
        gen = rng.generator("image_mask", self.cfg.train.seed, step, device=device)  # drawn on the device:
        mask = mask_image_regions(n_local * distributed.world_size(), self.backbone.vision.grid, region, ratio, gen)
        return mask[distributed.local_rows(n_local)]                                  # no copy, no sync

    def after_step(self, step: int) -> None:
        """Called by the engine after each applied optimiser step."""
        if self.teacher is not None:
            self.teacher.update()

    def forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """Named losses (summed by the engine when listed in `method.losses`) and metrics (logged only)."""
        raise NotImplementedError


def _temp_as_vector(module, state_dict, prefix, *args) -> None:
    """Load checkpoints written when the temperature was a 0-d parameter."""
    key = prefix + "temp"
    if key in state_dict and state_dict[key].ndim == 0:
        state_dict[key] = state_dict[key].reshape(1)

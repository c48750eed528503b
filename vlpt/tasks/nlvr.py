"""NLVR2 (Suhr et al. 2019): is a sentence true of a pair of images? Finetuned on any method's checkpoint, one of the
papers' two ways (`task.fusion`):

- `paired`, ALBEF Sec. 5 (which CODIS and CB-ViLA follow): the fusion encoder for two images (`models/paired.py`:
  each fusion layer as two blocks, one per image, sharing key and value projections, copies of the pretrained
  layer), its pooled ([CLS]) output into an MLP; preceded by text assignment, `vlpt pretrain --config
  finetune/nlvr_ta_tiny.yaml train.init=CHECKPOINT` (the `nlvr_ta` loss, `objectives/assignment.py`).
- `separate`, MaskVLM Sec. 4.3 / Fig. 6b: each image fused with the sentence on its own through the method's
  joint feature (MaskVLM's element-wise product, ALBEF's fused [CLS]), the two concatenated into a 2-layer classifier.

With `task.distill` and a method that has a momentum teacher (ALBEF, CODIS, CB-ViLA), the head is distilled from a
momentum teacher of the encoders and the head (ALBEF NLVR.py: alpha 0.4, ramped over the first epoch), made after the
pretrained weights are loaded. Metrics are named after NLVR2's splits: dev (the validation split) and test_p (test-P,
ALBEF's nlvr_test.json).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from vlpt.config import opt
from vlpt.data.annotations import AnnotationError, load_annotations
from vlpt.data.collate import Collate
from vlpt.data.loader import eval_loader, pair_loader
from vlpt.engine import distributed
from vlpt.models.paired import PairedFusion
from vlpt.models.text import init_bert_
from vlpt.objectives.classification import distilled_cross_entropy
from vlpt.tasks.base import SplitsConfig, Task, TaskModel, register

LABELS = {"true": 1, "false": 0}  # ALBEF's files spell them "True" / "False" (nlvr_dataset.py: label == 'True')


@dataclass
class NLVRConfig(SplitsConfig):
    files: str = opt("nlvr_{split}.json", "annotation files under data.root, '{split}' standing for train, the "
                     "validation split and test (ALBEF's: nlvr_train.json, nlvr_dev.json, nlvr_test.json = test-P)")
    val_split: str = opt("dev", "the split that selects the best checkpoint (NLVR2's dev; the embedded data: val)")
    fusion: Literal["paired", "separate"] = opt(
        "paired", "paired: ALBEF's fusion for two images (every fusion layer as two blocks, one per image; after text "
        "assignment); separate: MaskVLM's, each image's joint feature with the text, the two concatenated")
    distill: bool = opt(True, "distil the head from a momentum teacher started from the loaded weights (ALBEF "
                        "NLVR.py; method.alpha, method.alpha_warmup_steps, method.momentum), on methods that have one")


def read_split(path: str | Path) -> list[dict]:
    """ALBEF's NLVR2 records {images: [left, right], sentence, label} as PairDataset records {images, caption,
    image_id, label 1 (true) or 0}; a label is a JSON boolean or the text "True" / "False" (any case). AnnotationError
    naming the file, the record and the field otherwise."""
    records = load_annotations(path, "nlvr")
    out = []
    for i, r in enumerate(records):
        images, label = r["images"], r["label"]
        if not (isinstance(images, list) and len(images) == 2 and all(isinstance(p, str) for p in images)):
            raise AnnotationError(f"{path}: record {i} has images {images!r}; NLVR2's is a list of two image paths")
        if not isinstance(r["sentence"], str):
            raise AnnotationError(f"{path}: record {i} has sentence {r['sentence']!r}; it is a string")
        value = str(label).lower() if isinstance(label, (bool, str)) else None
        if value not in LABELS:
            raise AnnotationError(f"{path}: record {i} has label {label!r}; an NLVR2 label is true or false (ALBEF's "
                                  f"files: \"True\" / \"False\")")
        out.append({"images": images, "caption": r["sentence"], "image_id": i, "label": LABELS[value]})
    return out


def at_chance(accuracy: float, majority: float, n: int) -> bool:
    """Whether an accuracy (fractions) is within two standard errors of always answering the majority class."""
    return accuracy <= majority + 2 * math.sqrt(majority * (1 - majority) / max(n, 1))


class NLVRModel(TaskModel):
    """The method's encoders, the paired fusion (`paired`) and the classifier; the teacher's copies of them."""

    losses = ["nlvr"]

    def __init__(self, method, fusion: str, distill: bool):
        super().__init__(method)
        self.fusion, width = fusion, method.cfg.model.text.width
        # ALBEF model_nlvr.py's cls_head: Linear(W, W), ReLU, Linear(W, 2); `separate` reads two features
        self.head = nn.Sequential(nn.Linear(width * (1 if fusion == "paired" else 2), width), nn.ReLU(),
                                  nn.Linear(width, 2))
        init_bert_(self.head)
        parts = {"backbone": method.backbone, "head": self.head}
        if fusion == "paired":  # the method's, trained by text assignment; else the task's copy of the fusion
            pair = getattr(method, "pair_fusion", None)
            if pair is None:
                pair = self.pair_fusion = PairedFusion(method.backbone.fusion)
            parts["pair_fusion"] = pair
        self.parts = parts  # a plain dict: each module is registered where it lives
        self.replace_teacher(parts if distill and method.momentum_teacher else None)

    def own_pair(self) -> list[PairedFusion]:
        return [self.pair_fusion] if getattr(self, "pair_fusion", None) is not None else []

    def blocks(self) -> list[nn.Module]:
        return [*super().blocks(), *(layer for pair in self.own_pair() for layer in pair.layers)]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        for pair in self.own_pair():
            pair.set_grad_checkpointing(enable)

    def logits(self, batch: dict, parts) -> torch.Tensor:
        """(B,2) false / true logits from `parts` (the student's modules or the teacher's copies)."""
        backbone, mask, n = parts["backbone"], batch["text_mask"], batch["image"].shape[0]
        tokens = backbone.encode_image(batch["image"].flatten(0, 1))  # (2B,1+N,Wv): left, right of each pair
        hidden = backbone.encode_text(batch["text_ids"], mask)
        if self.fusion == "paired":
            left, right = tokens.unflatten(0, (n, 2)).unbind(1)
            feature = backbone.pool(parts["pair_fusion"](hidden, mask, left, right), mask)
        else:  # each image with the sentence: (2B,W) joint features, left and right side by side
            feature = backbone.joint_feature(tokens, hidden.repeat_interleave(2, 0),
                                             mask.repeat_interleave(2, 0)).reshape(n, -1)
        return parts["head"](feature)

    def forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """ALBEF NLVR.py: (1 - alpha) CE + alpha CE against the teacher's softmax (Eq. 7's form) on the 2-way logits."""
        logits, labels = self.logits(batch, self.parts), batch["label"]
        teacher = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.logits(batch, self.teacher.copies)
        return {"nlvr": distilled_cross_entropy(logits, labels, teacher, self.method.alpha(step)),
                "accuracy": (logits.argmax(1) == labels).float().mean()}


@register("nlvr", NLVRConfig)
class NLVR2(Task):
    """NLVR2: is a sentence true of two images (ALBEF's paired fusion or MaskVLM's separate one)"""

    trains = True
    select = "dev_accuracy"
    options = ("eval.batch_size",)

    def __init__(self, cfg, tokenizer, device):
        super().__init__(cfg, tokenizer, device)
        self.val_evaluations = 0  # for the warning when the dev accuracy stays at chance
        self.text_assigned = False

    def build(self, method) -> NLVRModel:
        self.text_assigned = "nlvr_ta" in method.cfg.method.losses  # the checkpoint comes from text assignment
        return NLVRModel(method, self.cfg.task.fusion, self.cfg.task.distill)

    def batches(self, start: int):
        cfg, d = self.cfg, self.cfg.data
        collate = Collate(self.tokenizer, cfg.model.text.max_len, (), cfg.train.seed, distributed.world_size() > 1)
        return pair_loader(read_split(cfg.task.split_file(self.data, "train")), self.data, collate,
                           image_size=cfg.model.vision.image_size, batch_size=d.batch_size, seed=cfg.train.seed,
                           rank=distributed.rank(), world=distributed.world_size(), start=start,
                           num_workers=d.num_workers, augment=d.augment)

    def split_name(self, split: str) -> str:
        """The metrics' prefix: NLVR2's names, dev for the validation split and test_p (test-P) for test."""
        return "dev" if split == self.cfg.task.val_split else "test_p" if split == "test" else split

    def evaluate(self, model, split: str) -> dict:
        records = read_split(self.cfg.task.split_file(self.data, split))
        correct = 0
        with torch.no_grad():
            for batch in eval_loader(self.cfg, records, self.tokenizer):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                correct += int((model.logits(batch, model.parts).argmax(1) == batch["label"]).sum())
        n = len(records)
        accuracy, true = correct / n, sum(r["label"] for r in records) / n
        majority = max(true, 1 - true)
        name = self.split_name(split)
        if name == "dev":
            self.val_evaluations += 1
            if self.val_evaluations > 1 and at_chance(accuracy, majority, n):
                hint = ("run text assignment first (task.fusion=paired, ALBEF Sec. 5); "
                        if self.cfg.task.fusion == "paired" and not self.text_assigned else "")
                warnings.warn(f"NLVR2 {name} accuracy {100 * accuracy:.1f} % is still at chance (majority class "
                              f"{100 * majority:.1f} %, {n} pairs) after {self.val_evaluations} evaluations: {hint}is "
                              f"the learning rate right, does the checkpoint's fusion match images and text (ITM)?",
                              stacklevel=2)
        return {f"{name}_accuracy": round(100 * accuracy, 2), f"{name}_majority": round(100 * majority, 2),
                f"{name}_pairs": n}

    label = "NLVR2 (test-P)"

    @staticmethod
    def headline(m: dict):
        return "accuracy", m["test_p_accuracy"], "majority class", m["test_p_majority"]

    def table(self, m: dict) -> str:
        return "\n".join(f"NLVR2 {name:7s} accuracy {m[f'{name}_accuracy']:6.2f} %   majority class "
                         f"{m[f'{name}_majority']:6.2f} %   {m[f'{name}_pairs']} pairs"
                         for name in (k.removesuffix("_pairs") for k in m if k.endswith("_pairs")))

"""SNLI-VE (ALBEF Sec. 6.3): does the image entail, contradict or leave open a sentence? A 3-way MLP on the method's
joint feature (ALBEF: the fused [CLS]; MaskVLM: its Eq. 3 product), trained with cross entropy distilled from a
momentum copy of encoders and head where the method has a teacher (ALBEF `model_ve.py`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlpt.config import opt
from vlpt.data.annotations import AnnotationError, load_annotations
from vlpt.data.loader import eval_loader, train_loader
from vlpt.engine import distributed
from vlpt.models.text import init_bert_
from vlpt.objectives.classification import distilled_cross_entropy
from vlpt.tasks.base import SplitsConfig, Task, TaskModel, register

LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}  # ALBEF's ve_dataset.py numbering


@dataclass
class VEConfig(SplitsConfig):
    files: str = opt("ve_{split}.json", "annotation files under data.root, '{split}' standing for train, val and "
                     "test: records {image, sentence, label} (entailment / neutral / contradiction, or 0-2)")


class JointClassifier(TaskModel):
    """An MLP (ALBEF's cls_head: Linear, ReLU, Linear) on the joint feature of (image, text). A method with a teacher
    gets a task teacher instead, a momentum copy of backbone and head made from the loaded weights, and targets
    mixed with its softmax by `method.alpha`."""

    losses = ["ce"]

    def __init__(self, method: nn.Module, classes: int):
        super().__init__(method)
        width = method.itm_head.in_features  # the joint feature's width, which the ITM head reads
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))
        init_bert_(self.head)
        distill = method.teacher is not None
        self.replace_teacher({"backbone": method.backbone, "head": self.head} if distill else None)

    def logits(self, batch: dict, teacher: bool = False) -> torch.Tensor:
        parts = self.teacher if teacher else {"backbone": self.method.backbone, "head": self.head}
        backbone, mask = parts["backbone"], batch["text_mask"]
        tokens = backbone.encode_image(batch["image"])
        feature = backbone.joint_feature(tokens, backbone.encode_text(batch["text_ids"], mask), mask)
        return parts["head"](feature)

    def forward(self, batch: dict, step: int) -> dict:
        teacher = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.logits(batch, teacher=True)
        logits = self.logits(batch)
        return {"ce": distilled_cross_entropy(logits, batch["label"], teacher, self.method.alpha(step)),
                "accuracy": (logits.argmax(1) == batch["label"]).float().mean().detach()}


def read_ve(path) -> list[dict]:
    """VE records as pairs {image, caption, label index}; a label of neither spelling names the file and record."""
    records = load_annotations(path, "ve")
    out = []
    for i, r in enumerate(records):
        label = LABELS.get(r["label"], r["label"])
        if label not in LABELS.values() or isinstance(label, bool):
            raise AnnotationError(f"{path}: record {i} has label {r['label']!r}; a VE label is one of "
                                  f"{', '.join(LABELS)} or its index 0-2")
        out.append({"image": r["image"], "caption": r["sentence"], "label": label})
    return out


@register("ve", VEConfig)
class VisualEntailment(Task):
    """visual entailment (SNLI-VE): image + sentence -> entailment / neutral / contradiction"""

    trains, select = True, "accuracy"
    options = ("eval.batch_size",)

    def build(self, method) -> JointClassifier:
        return JointClassifier(method, len(LABELS))

    def batches(self, start: int):
        records = read_ve(self.cfg.task.split_file(self.data, "train"))
        return train_loader(self.cfg, records, self.tokenizer, (), distributed.rank(), distributed.world_size(),
                            start)

    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict:
        records = read_ve(self.cfg.task.split_file(self.data, split))
        counts = torch.zeros(len(LABELS), dtype=torch.long)
        correct = torch.zeros(len(LABELS), dtype=torch.long)
        for batch in eval_loader(self.cfg, records, self.tokenizer):
            labels = batch["label"]
            predicted = model.logits({k: v.to(self.device) for k, v in batch.items()}).argmax(1).cpu()
            counts = counts + torch.bincount(labels, minlength=len(LABELS))
            correct = correct + torch.bincount(labels[predicted == labels], minlength=len(LABELS))
        majority = counts.max().item() / max(counts.sum().item(), 1)
        metrics = {"accuracy": round(100 * correct.sum().item() / max(counts.sum().item(), 1), 2),
                   "majority_baseline": round(100 * majority, 2), "examples": counts.sum().item()}
        for name, index in LABELS.items():
            metrics[f"accuracy_{name}"] = round(100 * correct[index].item() / max(counts[index].item(), 1), 2)
        return metrics

    label = "SNLI-VE"

    @staticmethod
    def headline(m: dict):
        return "accuracy", m["accuracy"], "majority class", m["majority_baseline"]

    def table(self, m: dict) -> str:
        per_class = ", ".join(f"{name} {m[f'accuracy_{name}']:.2f}" for name in LABELS)
        return (f"SNLI-VE accuracy {m['accuracy']:.2f} % on {m['examples']} examples (majority class "
                f"{m['majority_baseline']:.2f} %); per class: {per_class}")

"""Zero-shot image classification (MaskVLM appendix A.5, Table 8) as a task: image-to-text retrieval over the class
names, bare and through prompt templates ensembled as CLIP does, ranked by ITC and by ITM reranking of each image's
top-k classes; top-1 / top-5 accuracy and per-class confusion matrices. Any method's checkpoint, nothing trained.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlpt.config import Rule, fail, opt
from vlpt.data.annotations import AnnotationError, load_annotations
from vlpt.errors import MissingFileError
from vlpt.tasks.base import SplitsConfig, Task, register
from vlpt.tasks.retrieval import encode_split, itc_logits, rerank

TEMPLATE = Rule("a template containing '{}' (where the class name goes)", lambda v: "{}" in v)
# (metric prefix, row of the printed table): Table 8's four ways of scoring an image against the classes
PROTOCOLS = {"itc": "ITC, class names", "itc_prompts": "ITC, prompts", "itm": "ITM, class names",
             "itm_prompts": "ITM, prompts"}


@dataclass
class ClassificationConfig(SplitsConfig):
    classes: str = opt("classes.json", "JSON list of class names, relative to data.root unless absolute")
    files: str = opt("classification_{split}.json", "JSON list of {image, label} records (label: an index into "
                     "the class list), relative to data.root unless absolute; {split} is the split evaluated")
    prompts: list[str] = opt(["a picture of a {}", "an image of a {}", "a drawing of a {}"],
                             "prompt templates ('{}': the class name) whose text features are averaged per class "
                             "(CLIP's prompt ensembling)", check=TEMPLATE)

    def validate(self, prefix: str, root) -> None:
        if not self.prompts:
            fail(prefix + "prompts", "a list of at least one template", self.prompts)


def read_classes(path: str | Path) -> list[str]:
    """A JSON list of distinct class names; MissingFileError or AnnotationError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"class file not found: {path}")
    try:
        classes = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise AnnotationError(f"{path}: expected a non-empty JSON list of class names (strings)")
    seen: dict[str, int] = {}
    for i, name in enumerate(classes):
        if name in seen:
            raise AnnotationError(f"{path}: class {i} '{name}' repeats class {seen[name]}")
        seen[name] = i
    return classes


def read_labels(path: str | Path, classes: int, classes_path: str | Path) -> tuple[list[str], list[int]]:
    """Image paths and labels of a classification file; AnnotationError for a label that is not an index into the
    `classes` names of `classes_path`."""
    records = load_annotations(path, "classification")
    for i, r in enumerate(records):
        label = r["label"]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < classes:
            raise AnnotationError(f"{path}: record {i} has label {label!r}; a label indexes the {classes} classes of "
                                  f"{classes_path} (0 to {classes - 1})")
    return [r["image"] for r in records], [r["label"] for r in records]


def ensemble(text_feat: torch.Tensor, prompts: int) -> torch.Tensor:
    """(P*C,D) normalised features of P prompts x C classes (prompt-major) -> (C,D): per class the mean over its
    prompts, normalised again (CLIP, Radford et al. 2021, Sec. 3.1.4)."""
    return F.normalize(text_feat.view(prompts, -1, text_feat.shape[-1]).mean(0), dim=-1)


def rerank_order(scores: torch.Tensor, sim: torch.Tensor, k: int) -> torch.Tensor:
    """(I,C) class indices, best first: each image's top-k classes by ITC `sim` ordered by their reranked `scores`
    (`rerank`'s, the same top-k), then the other classes in ITC order."""
    top = sim.topk(min(k, sim.shape[1]), dim=1).indices
    key = torch.full_like(sim, -torch.inf).scatter(1, top, scores.gather(1, top))
    by_itc = sim.argsort(dim=1, descending=True, stable=True)
    return by_itc.gather(1, key.gather(1, by_itc).argsort(dim=1, descending=True, stable=True))


def accuracy(order: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent: how often the label is among an image's first k classes of `order` (I,C)."""
    return {f"top{k}": round(100 * float((order[:, :k] == labels[:, None]).any(1).float().mean()), 2) for k in ks}


def confusion_matrix(labels, predicted, classes: int) -> np.ndarray:
    """(C,C) counts: row the true class, column the predicted one."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    return np.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes)


@torch.no_grad()
def rank_classes(model, enc: dict, classes: int, prompts: int, *, k: int, batch_size: int, itc_weight: float = 0.0,
                 progress: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per protocol of `PROTOCOLS`, (I,C) scores and class order (best first), from `encode_split`'s `enc` of the
    bare class names followed by `prompts` groups of prompted ones. ITC scores are logits (similarity / temperature);
    ITM's are `rerank`'s (for each image's top-k ITC classes: ITM match logit + itc_weight x ITC logit; -100
    elsewhere), with prompts the mean over the prompts of the same top-k."""
    groups = [{**enc, **{key: enc[key][g * classes:(g + 1) * classes] for key in ("text_hidden", "text_feat",
                                                                                   "text_mask")}}
              for g in range(1 + prompts)]  # one view of `enc` per group of texts
    itc = itc_logits(model, groups[0])
    itc_prompts = itc_logits(model, {**enc, "text_feat": ensemble(enc["text_feat"][classes:], prompts)})
    itm = rerank(model, groups[0], itc, k, batch_size, progress, itc_weight)[0]
    itm_prompts = torch.stack([rerank(model, g, itc_prompts, k, batch_size, progress, itc_weight)[0]
                               for g in groups[1:]]).mean(0)
    return {"itc": (itc, itc.argsort(dim=1, descending=True, stable=True)),
            "itc_prompts": (itc_prompts, itc_prompts.argsort(dim=1, descending=True, stable=True)),
            "itm": (itm, rerank_order(itm, itc, k)),
            "itm_prompts": (itm_prompts, rerank_order(itm_prompts, itc_prompts, k))}


@torch.no_grad()
def evaluate(model, annotation: str | Path, classes_path: str | Path, root: str | Path, tokenizer, *,
             prompts: list[str], image_size: int, max_len: int, k: int = 16, batch_size: int = 256,
             itc_weight: float = 0.0, device="cpu", num_workers: int = 0, progress: bool = True) -> dict:
    """Top-1 / top-5 accuracy of each of `PROTOCOLS` by `rank_classes` (metrics `<protocol>_top1`, ...), chance,
    and under `confusion` each protocol's confusion matrix of top-1 predictions (nested lists)."""
    model.eval()
    classes = read_classes(classes_path)
    images, labels = read_labels(annotation, len(classes), classes_path)
    c, p = len(classes), len(prompts)
    texts = [*classes, *(template.replace("{}", name) for template in prompts for name in classes)]
    enc = encode_split(model, [Path(root) / i for i in images], texts, tokenizer, image_size, max_len, batch_size,
                       device, num_workers, progress)
    order = {name: o for name, (_, o) in rank_classes(model, enc, c, p, k=k, batch_size=batch_size,
                                                        itc_weight=itc_weight, progress=progress).items()}
    truth = torch.tensor(labels, device=enc["image_feat"].device)
    metrics = {f"{name}_{key}": value for name in PROTOCOLS for key, value in accuracy(order[name], truth).items()}
    metrics.update({"chance_top1": round(100 / c, 2), "chance_top5": round(100 * min(5, c) / c, 2),
                    "images": len(images), "classes": c, "prompts": p, "k": k, "itc_weight": itc_weight,
                    "confusion": {name: confusion_matrix(labels, order[name][:, 0].cpu().numpy(), c).tolist()
                                  for name in PROTOCOLS}})
    return metrics


def save_confusion(confusion: dict[str, list[list[int]]], classes: list[str], path: str | Path,
                   titles: dict[str, str]) -> Path:
    """A 2x2 grid of confusion matrices (e.g. `evaluate`'s, titled by `titles`), each cell the share of its true class's
    (row) images predicted as the column's class; a PNG drawn on matplotlib's Agg canvas (no pyplot, no display)."""
    from matplotlib.figure import Figure

    side = max(4.0, 0.16 * len(classes) + 2.5)
    fig = Figure(figsize=(2 * side, 2 * side), layout="constrained")
    grid = fig.subplots(2, 2, sharex=True, sharey=True)
    for ax, (name, counts) in zip(grid.flat, confusion.items()):
        counts = np.asarray(counts, dtype=float)
        image = ax.imshow(counts / np.maximum(counts.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(titles[name])
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=6)
        ax.set_yticks(range(len(classes)), classes, fontsize=6)
        ax.set(xlabel="predicted class", ylabel="true class")
        ax.label_outer()
    fig.colorbar(image, ax=grid, shrink=0.6, label="share of the true class's images")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


@register("classification", ClassificationConfig)
class ZeroShotClassification(Task):
    """`vlpt evaluate classification`: reads task.files and task.classes under the data folder; --out also
    writes the confusion matrices next to the metrics, as <name>_confusion.png."""

    options = ("eval.k", "eval.batch_size", "eval.itc_weight", "task.prompts", "task.classes", "task.files")

    def evaluate(self, model, split: str) -> dict:
        t, cfg = self.cfg.task, self.cfg
        return {"protocol": "zero-shot", **evaluate(
            model, t.split_file(self.data, split), self.data / t.classes, self.data,
            self.tokenizer, prompts=t.prompts, image_size=cfg.model.vision.image_size, max_len=cfg.model.text.max_len,
            k=cfg.eval.k, batch_size=cfg.eval.batch_size, itc_weight=cfg.eval.itc_weight, device=self.device,
            num_workers=cfg.data.num_workers)}

    def save(self, metrics: dict, out: Path) -> None:
        """The confusion matrices as `<out stem>_confusion.png` (its path added to `metrics`), the rest as JSON."""
        png = out.with_name(out.stem + "_confusion.png")
        titles = {name: f"{row}: top-1 {metrics[name + '_top1']:.1f} %" for name, row in PROTOCOLS.items()}
        classes = read_classes(self.data / self.cfg.task.classes)
        metrics["confusion_png"] = str(save_confusion(metrics["confusion"], classes, png, titles))
        super().save({key: value for key, value in metrics.items() if key != "confusion"}, out)

    def table(self, m: dict) -> str:
        lines = [f"zero-shot classification: {m['images']} images, {m['classes']} classes, {m['prompts']} prompts, "
                 f"ITM reranks the top {m['k']} (+ {m['itc_weight']} x ITC)",
                 f"{'':20s}{'top-1':>9s}{'top-5':>9s}"]
        lines += [f"{row:20s}{m[name + '_top1']:9.2f}{m[name + '_top5']:9.2f}" for name, row in PROTOCOLS.items()]
        lines.append(f"{'chance':20s}{m['chance_top1']:9.2f}{m['chance_top5']:9.2f}")
        lines.append(f"confusion matrices: {m['confusion_png']}" if "confusion_png" in m else
                     "confusion matrices: drawn next to the metrics when they are written (--out)")
        return "\n".join(lines)

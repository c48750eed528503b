"""Weakly supervised visual grounding (ALBEF Sec. 6.4, RefCOCO+): trained with ITC and ITM on (image, expression)
pairs only, no boxes; at test time the Grad-CAM map of the expression (`viz/gradcam.py`) scores each proposal box by
the map's sum inside it over the square root of its area, and the top proposal counts when its IoU with the referred
box is at least 0.5.

Proposals (`task.proposals`): a JSON object {image path: [[x, y, w, h], ...]} in the image's pixels (the boxes a
detector found; ALBEF's `dets.json` holds them for RefCOCO+). Left empty, every box the split's records give for
that image (on the embedded data: every shape referred to in it).
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vlpt.config import opt
from vlpt.data.annotations import AnnotationError, load_annotations
from vlpt.data.loader import eval_loader, train_loader
from vlpt.engine import distributed
from vlpt.errors import MissingFileError
from vlpt.tasks.base import SplitsConfig, Task, TaskModel, register
from vlpt.tasks.retrieval import RetrievalModel
from vlpt.viz.gradcam import caption_map, gradcam, upsample

FORMAT = "a JSON object {image path: [[x, y, w, h], ...]} of proposal boxes in the image's pixels"


@dataclass
class GroundingConfig(SplitsConfig):
    files: str = opt("grounding_{split}.json", "annotation files under data.root, '{split}' standing for train, val "
                     "and test: records {image, text, bbox: [x, y, w, h]} (ALBEF's refcoco+ files)")
    proposals: str = opt("", "proposal boxes under data.root: " + FORMAT + "; empty: the boxes of the split's records "
                         "of each image")
    layer: int = opt(-1, "fusion layer whose cross-attention Grad-CAM reads (Python indexing; ALBEF: 2, the 3rd of 6)")


def read_grounding(path: Path) -> list[dict]:
    out = []
    for i, r in enumerate(load_annotations(path, "grounding")):
        box = r.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and box[2] > 0 and box[3] > 0):
            raise AnnotationError(f"{path}: record {i} needs 'bbox' as [x, y, w, h] with w, h > 0, got {box!r}")
        out.append({"image": r["image"], "caption": r["text"], "bbox": [float(v) for v in box]})
    return out


def iou(a, b) -> float:
    """Intersection over union of two [x, y, w, h] boxes."""
    w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def box_score(heat: torch.Tensor, box) -> float:
    """ALBEF's proposal score: the map's sum inside the box over sqrt(its area) (heat in the box's pixels)."""
    x, y, w, h = (int(round(v)) for v in box)
    return float(heat[max(y, 0):y + h, max(x, 0):x + w].sum()) / max(w * h, 1) ** 0.5


@register("grounding", GroundingConfig)
class Grounding(Task):
    """weakly supervised grounding: expression -> the proposal box its Grad-CAM map covers best"""

    trains, zero_shot, select = True, True, "accuracy"
    options = ("eval.batch_size", "task.layer", "task.proposals")

    def build(self, method) -> RetrievalModel:
        if method.queues is not None:  # pretraining's image ids name other images
            method.queues.ids.fill_(-1)
        return RetrievalModel(method)

    def batches(self, start: int):
        records = read_grounding(self.cfg.task.split_file(self.data, "train"))
        return train_loader(self.cfg, records, self.tokenizer, set(), distributed.rank(), distributed.world_size(),
                            start)

    def proposals(self, records: list[dict]) -> dict[str, list[list[float]]]:
        name = self.cfg.task.proposals
        if not name:
            found = defaultdict(list)
            for r in records:
                if r["bbox"] not in found[r["image"]]:
                    found[r["image"]].append(r["bbox"])
            return found
        path = self.data / name
        if not path.is_file():
            raise MissingFileError(f"proposals file not found: {path} (task.proposals: {FORMAT})")
        boxes = json.loads(path.read_text())
        if not isinstance(boxes, dict):
            raise AnnotationError(f"{path}: expected {FORMAT}")
        lacking = [r["image"] for r in records if not boxes.get(r["image"])]
        if lacking:
            raise AnnotationError(f"{path} has no proposals for {len(lacking)} images (first: {lacking[0]}); "
                                  f"expected {FORMAT}")
        return boxes

    def heat_maps(self, model, records: list[dict]) -> list[torch.Tensor]:
        """Each record's averaged Grad-CAM map at the model's input size (image_size x image_size)."""
        method = model.method if isinstance(model, TaskModel) else model
        size = self.cfg.model.vision.image_size
        maps = []
        for batch in eval_loader(self.cfg, records, self.tokenizer):
            image, ids, mask = (batch[k].to(self.device) for k in ("image", "text_ids", "text_mask"))
            with torch.no_grad():
                tokens, hidden = method.backbone.encode_image(image), method.backbone.encode_text(ids, mask)
            maps += list(upsample(caption_map(gradcam(method, tokens, hidden, mask, self.cfg.task.layer), mask),
                                  size, size).cpu())
        return maps

    def evaluate(self, model, split: str) -> dict:
        records = read_grounding(self.cfg.task.split_file(self.data, split))
        proposals = self.proposals(records)
        size = self.cfg.model.vision.image_size
        hits = bound = chance = 0.0
        for r, heat in zip(records, self.heat_maps(model, records)):
            with Image.open(self.data / r["image"]) as img:  # boxes are in the image's pixels; the map in the model's
                sx, sy = size / img.size[0], size / img.size[1]
            boxes = proposals[r["image"]]
            scaled = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in boxes]
            good = [iou(b, r["bbox"]) >= 0.5 for b in boxes]
            best = max(range(len(boxes)), key=lambda i: box_score(heat, scaled[i]))
            hits += good[best]
            bound += any(good)
            chance += sum(good) / len(good)
        n = max(len(records), 1)
        return {"accuracy": round(100 * hits / n, 2), "upper_bound": round(100 * bound / n, 2),
                "random_baseline": round(100 * chance / n, 2), "records": len(records),
                "layer": self.cfg.task.layer}

    label = "grounding"

    @staticmethod
    def headline(m: dict):
        return "accuracy", m["accuracy"], "random proposal", m["random_baseline"]

    def table(self, m: dict) -> str:
        return (f"grounding accuracy {m['accuracy']:.2f} % on {m['records']} expressions (a random proposal: "
                f"{m['random_baseline']:.2f} %; the proposals' upper bound {m['upper_bound']:.2f} %; layer {m['layer']})")

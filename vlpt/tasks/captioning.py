"""Image captioning (SemMIM Sec. 4.3, BLIP's recipe): a decoder writes the caption after the prompt "a picture of"
(its tokens not in the loss), trained with label-smoothed (0.1) cross entropy; beam search with length limits. The
decoder cross-attends to the image tokens (one made from the fusion layers), or, where pretraining trained one
(SemMIM's prefix LM), it is that decoder over what it was pretrained on: the fusion encoder's states of the image and
a text prefix, here the empty one (`CaptionModel.context`). Scored offline with pycocoevalcap (BLEU-1..4, METEOR,
ROUGE-L, CIDEr; not SPICE, which downloads models at run time) against the split's captions; the best checkpoint
by CIDEr + BLEU-4 (BLIP's rule).
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
from dataclasses import dataclass

import torch

from vlpt.config import NON_NEGATIVE, POSITIVE, UNIT, opt
from vlpt.data.annotations import load_annotations
from vlpt.data.loader import eval_loader, train_loader
from vlpt.engine import distributed
from vlpt.errors import VlptError
from vlpt.tasks.base import SplitsConfig, Task, TaskModel, register


@dataclass
class CaptionConfig(SplitsConfig):
    files: str = opt("retrieval_{split}.json", "annotation files under data.root, '{split}' standing for train, val "
                     "and test, in ALBEF/BLIP's COCO Karpathy format: train {image, caption}, val and test {image, "
                     "caption list}")
    prompt: str = opt("a picture of ", "text every caption starts from, not in the loss (BLIP)")
    label_smoothing: float = opt(0.1, "label smoothing of the caption loss (BLIP: 0.1)", UNIT)
    beams: int = opt(3, "beam width of caption generation", POSITIVE)
    min_len: int = opt(5, "fewest caption tokens written after the prompt", NON_NEGATIVE)
    max_len: int = opt(20, "most caption tokens written after the prompt, the stop token included", POSITIVE)
    decoder_layers: int = opt(0, "layers of the caption decoder, initialised from the fusion layers in order; 0: as "
                              "many as the fusion encoder has (a method's pretrained decoder keeps its own)",
                              NON_NEGATIVE)
    baseline_images: int = opt(2000, "training images searched by the nearest-caption baseline (the first ones of the "
                               "train file); 0: no baseline", NON_NEGATIVE)


def references(path) -> tuple[list[str], list[list[str]]]:
    """Image paths and each one's reference captions (a string or a list per record), the COCO-format ground truth
    pycocoevalcap scores against."""
    images, refs = [], []
    for r in load_annotations(path, "retrieval"):
        images.append(r["image"])
        refs.append(r["caption"] if isinstance(r["caption"], list) else [r["caption"]])
    return images, refs


@functools.cache
def meteor():
    """One METEOR scorer per process: each new one starts a Java process that loads its paraphrase tables (about
    11 s on 2 cores), then scores a split in milliseconds."""
    from pycocoevalcap.meteor.meteor import Meteor
    return Meteor()


def caption_scores(predictions: list[str], refs: list[list[str]]) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr in percent (pycocoevalcap, its PTB tokenizer first), and CIDEr + BLEU-4."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as err:
        raise VlptError("captioning metrics need pycocoevalcap (and Java): pip install 'vlpt[caption]'") from err

    out = {}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their counts
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({i: [{"caption": c} for c in r] for i, r in enumerate(refs)})
        res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
        bleu, _ = Bleu(4).compute_score(gts, res)
        out.update({f"bleu{n + 1}": b for n, b in enumerate(bleu)})
        out["meteor"], _ = meteor().compute_score(gts, res)
        out["rouge_l"], _ = Rouge().compute_score(gts, res)
        out["cider"], _ = Cider().compute_score(gts, res)
    out = {k: round(100 * float(v), 2) for k, v in out.items()}
    out["cider_bleu4"] = round(out["cider"] + out["bleu4"], 2)
    return out


class CaptionModel(TaskModel):
    """The method's image encoder and a decoder: the method's pretrained one over the fused image and empty prefix
    (`empty_prefix`: its ids, [CLS] [SEP]), or one from the fusion layers over the image tokens."""

    losses = ["caption"]

    def __init__(self, method, layers: int, prompt_tokens: int, label_smoothing: float,
                 empty_prefix: torch.Tensor | None = None):
        super().__init__(method)
        pretrained = self.add_decoder(method.cfg.model.vision.width, layers)  # fresh: over the image tokens
        if pretrained and empty_prefix is None:
            raise ValueError("a pretrained decoder reads a fused text prefix: give empty_prefix, [CLS] [SEP]")
        self.register_buffer("empty_prefix", empty_prefix if pretrained else None, persistent=False)
        self.prompt_tokens, self.label_smoothing = prompt_tokens, label_smoothing
        self.replace_teacher(None)  # BLIP's captioner has no momentum distillation

    def context(self, image: torch.Tensor) -> torch.Tensor:
        """What the decoder cross-attends to (B,M,W), every position real (no mask). A decoder from the fusion layers:
        the image tokens (BLIP). The pretrained prefix-LM decoder: the fusion encoder's states of the image and an
        empty prefix, the context PLM gives it for a caption split before its first word (SemMIM l.73: the decoder
        reads the fused cross-modal states; the paper does not say which text its captioner fuses, so none: the
        prompt stays in the decoder's input, as BLIP's and as the fresh decoder's)."""
        backbone = self.method.backbone
        tokens = backbone.encode_image(image)
        if self.empty_prefix is None:
            return tokens
        ids = self.empty_prefix.expand(len(image), -1)
        mask = torch.ones_like(ids)
        return backbone.fuse(tokens, backbone.encode_text(ids, mask), mask)

    def forward(self, batch: dict, step: int) -> dict:
        ids, mask = batch["text_ids"], batch["text_mask"]
        losses, _ = self.decoder.token_losses(ids, mask, self.context(batch["image"]), None,
                                              label_smoothing=self.label_smoothing, ignore_first=self.prompt_tokens)
        counted = mask[:, self.prompt_tokens:].sum().clamp(min=1)  # the caption's tokens, [SEP] included
        return {"caption": losses.sum() / counted}


@register("caption", CaptionConfig)
class Captioning(Task):
    """image captioning: image -> a sentence after the prompt, beam search; BLEU, METEOR, ROUGE-L, CIDEr"""

    trains, select = True, "cider_bleu4"
    options = ("eval.batch_size", "task.beams", "task.min_len", "task.max_len")

    def prompt_ids(self) -> torch.Tensor:
        """The prompt's tokens: [CLS] and its words, without the closing [SEP]."""
        ids, _ = self.tokenizer([self.cfg.task.prompt], self.cfg.model.text.max_len)
        return ids[0, : int((ids[0] != self.tokenizer.pad_id).sum()) - 1]

    def build(self, method) -> CaptionModel:
        empty = torch.tensor([self.tokenizer.cls_id, self.tokenizer.sep_id])
        return CaptionModel(method, self.cfg.task.decoder_layers, len(self.prompt_ids()), self.cfg.task.label_smoothing,
                            empty)

    def batches(self, start: int):
        prompt = self.cfg.task.prompt
        records = [{**r, "caption": prompt + (r["caption"] if isinstance(r["caption"], str) else r["caption"][0])}
                   for r in load_annotations(self.cfg.task.split_file(self.data, "train"), "retrieval")]
        return train_loader(self.cfg, records, self.tokenizer, (), distributed.rank(), distributed.world_size(),
                            start)

    @torch.no_grad()
    def generate(self, model: CaptionModel, images: list[str]) -> list[str]:
        t, tok = self.cfg.task, self.tokenizer
        prefix = self.prompt_ids().to(self.device)
        captions = []
        for batch in eval_loader(self.cfg, [{"image": p, "caption": ""} for p in images], tok):
            context = model.context(batch["image"].to(self.device))
            ids, _ = model.decoder.generate(context, None, prefix.expand(len(context), -1), tok.sep_id, t.max_len,
                                            beams=t.beams, min_new=t.min_len, pad_id=tok.pad_id)
            captions += [tok.decode([i for i in seq if i not in tok.special_ids]) for seq in ids.tolist()]
        return captions

    @torch.no_grad()
    def features(self, method, images: list[str]) -> torch.Tensor:
        """The method's normalised ITC image features (I,D)."""
        feats = [method.encode_image(batch["image"].to(self.device))[1]
                 for batch in eval_loader(self.cfg, [{"image": p, "caption": ""} for p in images], self.tokenizer)]
        return torch.cat(feats)

    def nearest_captions(self, method, images: list[str]) -> list[str]:
        """The trivial baseline (Devlin et al. 2015's nearest neighbour): each image gets the first caption of the
        training image most similar to it by the method's ITC image features, among `task.baseline_images`."""
        train: dict[str, str] = {}
        for r in load_annotations(self.cfg.task.split_file(self.data, "train"), "retrieval"):
            if len(train) >= self.cfg.task.baseline_images:
                break
            train.setdefault(r["image"], r["caption"] if isinstance(r["caption"], str) else r["caption"][0])
        nearest = (self.features(method, images) @ self.features(method, list(train)).t()).argmax(1)
        captions = list(train.values())
        return [captions[i] for i in nearest.tolist()]

    def evaluate(self, model, split: str) -> dict:
        images, refs = references(self.cfg.task.split_file(self.data, split))
        self.captions = dict(zip(images, self.generate(model, images)))
        metrics = {**caption_scores(list(self.captions.values()), refs), "images": len(images)}
        if self.cfg.task.baseline_images:
            baseline = caption_scores(self.nearest_captions(model.method, images), refs)
            metrics.update({f"nearest_{k}": v for k, v in baseline.items()})
        return metrics

    def save(self, metrics: dict, out) -> None:
        """The metrics, and beside them `captions.json`: {image: generated caption}."""
        super().save(metrics, out)
        (out.parent / "captions.json").write_text(json.dumps(self.captions, indent=1) + "\n")

    label = "captioning"

    @staticmethod
    def headline(m: dict):
        return "CIDEr", m["cider"], "nearest train caption", m.get("nearest_cider")

    def table(self, m: dict) -> str:
        line = (f"captioning on {m['images']} images: BLEU-4 {m['bleu4']:.2f}, METEOR {m['meteor']:.2f}, "
                f"ROUGE-L {m['rouge_l']:.2f}, CIDEr {m['cider']:.2f} (BLEU-1 {m['bleu1']:.2f})")
        if "nearest_cider" in m:
            line += (f"\nnearest training caption: BLEU-4 {m['nearest_bleu4']:.2f}, CIDEr {m['nearest_cider']:.2f}")
        return line

"""What `vlpt serve` computes, without the web page: one `Demo` holds a checkpoint's method (and any task heads it
was given), an indexed image folder and its captions, and has one method per tab that takes plain values (text,
numbers, a PIL image or an image file) and returns plain values (rows of dicts, PIL images). `app.py` puts them
on a Gradio page; the tests call them directly.

Bad input (an empty or over-long text, something that is not an image, a missing folder, a class list without
classes) raises `InputError` (a `VlptError`) with the one line the page shows; nothing here writes outside the
cache folder.
"""
from __future__ import annotations

import json
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlpt.errors import VlptError
from vlpt.serve.index import ImageIndex, checkpoint_key, file_key, index_folder, index_texts

MAX_CHARS = 1000          # longest text accepted from the page, before tokenising
MAX_TOP = 50              # most results a search shows
MAX_CLASSES = 100


class InputError(VlptError, ValueError):
    """Input from the page that cannot be used: the message is shown in the page."""


def default_cache() -> Path:
    """$VLPT_CACHE, else $XDG_CACHE_HOME/vlpt/serve, else ~/.cache/vlpt/serve."""
    import os
    if os.environ.get("VLPT_CACHE"):
        return Path(os.environ["VLPT_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vlpt" / "serve"


def as_image(value, what: str = "image") -> Image.Image:
    """A PIL RGB image from a PIL image, an (H,W[,C]) uint8 array or an image file path; InputError otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError(f"no {what}: upload an image (PNG, JPEG, ...)")
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, np.ndarray):
        if value.ndim not in (2, 3) or value.size == 0:
            raise InputError(f"the {what} is not an image (an array of shape {value.shape})")
        return Image.fromarray(value.astype(np.uint8)).convert("RGB")
    if isinstance(value, dict) and "path" in value:  # a file description as Gradio's API sends it
        value = value["path"]
    if isinstance(value, (str, Path)):
        path = Path(value)
        try:
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB")
        except FileNotFoundError:
            raise InputError(f"the {what} file is not there: {path.name}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise InputError(f"the {what} '{path.name}' is not an image this demo can read (upload a PNG, JPEG, "
                             f"GIF, BMP or WebP file)") from None
    raise InputError(f"the {what} is not an image (got {type(value).__name__})")


def as_int(value, what: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a whole number, got {value!r}") from None
    if not low <= number <= high:
        raise InputError(f"{what} must be between {low} and {high}, got {number}")
    return number


def as_float(value, what: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {value!r}") from None
    if not (low <= number <= high):
        raise InputError(f"{what} must be between {low} and {high}, got {number}")
    return number


def find_captions(folder: Path) -> Path | None:
    """A retrieval annotation file (ALBEF's format: {image, caption or caption list}) in `folder` or up to three
    folders above it whose records name images inside `folder`: the caption file of an embedded data set's split
    folder (`data/shapes/images/test` -> `data/shapes/retrieval_test.json`). The one naming the most of them."""
    folder = folder.resolve()
    best, best_count = None, 0
    for root in [folder, *list(folder.parents)[:3]]:
        for path in sorted(root.glob("retrieval_*.json")):
            if path.stem.endswith("_hard"):
                continue
            try:
                records = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(records, list):
                continue
            count = sum(1 for r in records if isinstance(r, dict) and isinstance(r.get("image"), str)
                        and (root / r["image"]).resolve().is_relative_to(folder))
            if count > best_count:
                best, best_count = path, count
    return best


def read_captions(path: Path, folder: Path) -> dict[str, list[str]]:
    """{image path relative to `folder`: its captions} from a retrieval annotation file whose image paths are
    relative to the file's folder (or to `folder`)."""
    from vlpt.data.annotations import load_annotations
    folder = folder.resolve()
    out: dict[str, list[str]] = {}
    for r in load_annotations(path, "retrieval"):
        captions = r["caption"] if isinstance(r["caption"], list) else [r["caption"]]
        for root in (path.parent, folder):
            image = (root / r["image"]).resolve()
            if image.is_relative_to(folder):
                out.setdefault(image.relative_to(folder).as_posix(), []).extend(captions)
                break
    return out


@dataclass
class Heads:
    """The task heads the demo was given: the loaded (task, model) of each, by task name."""
    models: dict = field(default_factory=dict)

    def has(self, name: str) -> bool:
        return name in self.models


class Demo:
    """A checkpoint's method on an indexed folder. `heads`: task checkpoints (VQA, captioning) finetuned from any
    checkpoint; each adds its tab."""

    def __init__(self, checkpoint: str | Path, images: str | Path, cache: str | Path | None = None,
                 heads: list[str | Path] = (), captions: str | Path | None = None, device="cpu",
                 progress=True):
        from vlpt.engine import checkpoint as ckpt
        from vlpt.tasks.base import TaskModel, load, registry

        self.device = torch.device(device)
        self.cache = Path(cache) if cache else default_cache()
        self.path = ckpt.resolve(checkpoint)
        self.key = checkpoint_key(self.path)
        task, model = load(registry.get("retrieval"), self.path, self.device)
        self.method = model.method if isinstance(model, TaskModel) else model
        self.method.eval()
        self.cfg, self.tokenizer = task.cfg, task.tokenizer
        self.meta = ckpt.read_meta(self.path)
        self.lock = threading.Lock()  # one model call at a time: Gradio runs handlers in threads
        self.heads = Heads()
        for source in [self.path, *heads]:
            for name in ckpt.read_meta(ckpt.resolve(source)).get("heads", []):
                if name in ("vqa", "caption") and name not in self.heads.models:
                    self.heads.models[name] = load(registry.get(name), source, self.device)
        self.captions_path: Path | None = None
        self.index: ImageIndex | None = None
        self.captions: dict[str, list[str]] = {}
        self.caption_texts: list[str] = []
        self.caption_owner: list[str] = []
        self.caption_features: torch.Tensor | None = None
        self.set_folder(images, progress, captions)

    # --- what the page shows -------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.method.name

    @property
    def capabilities(self) -> set[str]:
        return set(getattr(self.method, "capabilities", ()))

    @property
    def fusion_layers(self) -> int:
        fusion = getattr(self.method.backbone, "fusion", None)
        return len(fusion.layers) if fusion is not None and hasattr(fusion, "layers") else 0

    def summary(self) -> str:
        heads = ", ".join(self.heads.models) or "none"
        cap = (f"{len(self.caption_texts)} captions from {self.captions_path}" if self.captions_path
               else "no caption file")
        return (f"{self.name} checkpoint {self.path} (step {self.meta.get('step', '?')}); "
                f"{len(self.index.paths)} images in {self.index.folder} "
                f"({'index reused from' if self.index.reused else 'indexed into'} {self.cache}); {cap}; "
                f"task heads: {heads}")

    # --- the folder --------------------------------------------------------------------------------------------
    def set_folder(self, folder, progress=True, captions: str | Path | None = None) -> str:
        """Index `folder` (from the cache when it was indexed before) and read its captions; InputError for a
        folder that is not there or has no images."""
        from vlpt.errors import MissingFileError
        if not isinstance(folder, (str, Path)) or not str(folder).strip():
            raise InputError("no image folder: type the path of a folder of images")
        folder = Path(str(folder).strip()).expanduser()
        try:
            with self.lock:
                index = index_folder(self.method, folder, self.cache, self.key,
                                     image_size=self.cfg.model.vision.image_size,
                                     batch_size=self.cfg.eval.batch_size, device=self.device, progress=progress)
        except MissingFileError as err:
            raise InputError(str(err)) from None
        self.index = index
        path = Path(captions) if captions else find_captions(index.folder)
        if path is not None and not path.is_file():
            raise InputError(f"caption file not found: {path}")
        self.captions, self.caption_texts, self.caption_owner, self.caption_features = {}, [], [], None
        self.captions_path = path
        if path is not None:
            self.captions = read_captions(path, index.folder)
            for image, texts in self.captions.items():
                self.caption_texts += texts
                self.caption_owner += [image] * len(texts)
            with self.lock:
                self.caption_features, _ = index_texts(
                    self.method, self.tokenizer, self.caption_texts, file_key(path) + index.folder.as_posix(),
                    self.cache, self.key, max_len=self.cfg.model.text.max_len,
                    batch_size=self.cfg.eval.batch_size, device=self.device, progress=progress)
        return self.summary()

    # --- input checks --------------------------------------------------------------------------------------------
    def check_text(self, text, what: str = "query") -> str:
        if not isinstance(text, str):
            raise InputError(f"the {what} must be text, got {type(text).__name__}")
        text = " ".join(text.split())
        if not text:
            raise InputError(f"the {what} is empty: type some words")
        if len(text) > MAX_CHARS:
            raise InputError(f"the {what} is {len(text)} characters long; at most {MAX_CHARS}")
        limit = self.cfg.model.text.max_len
        tokens = int(self.tokenizer([text], 4 * MAX_CHARS)[1].sum())
        if tokens > limit:
            raise InputError(f"the {what} is {tokens} tokens long; this model reads at most {limit} "
                             f"(model.text.max_len, [CLS] and [SEP] included): shorten it")
        return text

    def pixels(self, image) -> torch.Tensor:
        from vlpt.data.transforms import image_transform
        return image_transform(self.cfg.model.vision.image_size)(image)[None].to(self.device)

    def encode_texts(self, texts: list[str]):
        ids, mask = self.tokenizer(texts, self.cfg.model.text.max_len)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden, feat = self.method.encode_text(ids, mask)
        return ids, mask, hidden, feat

    def caption_of(self, rel: str) -> str:
        return self.captions.get(rel, [""])[0]

    # --- Search: text -> images --------------------------------------------------------------------------------
    @torch.no_grad()
    def search(self, query, top=8, rerank: bool = True) -> list[dict]:
        """The `top` images most similar to `query` by ITC (cosine of the normalised features); with `rerank`, the
        checkpoint's `eval.k` best by ITC (at least `top`) are reordered by ITM (the match logit plus `eval.itc_weight`
        times the ITC logit, as `vlpt evaluate retrieval` ranks). Rows: rank, path, file (relative), caption (the
        caption file's first for that image, or ""), itc, itm (match probability, None without rerank)."""
        query = self.check_text(query)
        top = as_int(top, "the number of results", 1, MAX_TOP)
        with self.lock:
            _, mask, hidden, feat = self.encode_texts([query])
            sim = (self.index.features @ feat[0].float())                     # (N,) cosine
            top = min(top, len(sim))
            k = min(len(sim), max(top, self.cfg.eval.k)) if rerank else top
            itc, order = sim.topk(k)
            itm = None
            if rerank:
                from vlpt.data.annotations import load_image
                images = torch.cat([self.pixels(load_image(self.index.paths[i])) for i in order.tolist()])
                tokens = self.method.backbone.encode_image(images)
                logits = self.method.itm_logits(tokens, hidden.expand(k, -1, -1), mask.expand(k, -1)).float()
                itm = logits.softmax(-1)[:, 1]
                temp = float(self.method.temperature())
                score = logits[:, 1] + self.cfg.eval.itc_weight * itc / temp
                resort = score.argsort(descending=True)
                itc, order, itm = itc[resort], order[resort], itm[resort]
        rows = []
        for rank, i in enumerate(order[:top].tolist()):
            rel = self.index.paths[i].relative_to(self.index.folder).as_posix()
            rows.append({"rank": rank + 1, "path": str(self.index.paths[i]), "file": rel,
                         "caption": self.caption_of(rel), "itc": round(float(itc[rank]), 4),
                         "itm": None if itm is None else round(float(itm[rank]), 4)})
        return rows

    # --- Search: image -> captions ------------------------------------------------------------------------------
    @torch.no_grad()
    def captions_for(self, image, top=5, rerank: bool = True) -> list[dict]:
        """The captions of the caption file most similar to `image` by ITC, reranked by ITM as `search`."""
        image = as_image(image)
        top = as_int(top, "the number of captions", 1, MAX_TOP)
        if not self.caption_texts:
            raise InputError("no caption file for this folder: start vlpt serve with --captions FILE (a JSON list "
                             "of {image, caption})")
        with self.lock:
            tokens, feat = self.method.encode_image(self.pixels(image))
            sim = self.caption_features @ feat[0].float()
            top = min(top, len(sim))
            k = min(len(sim), max(top, self.cfg.eval.k)) if rerank else top
            itc, order = sim.topk(k)
            itm = None
            if rerank:
                _, mask, hidden, _ = self.encode_texts([self.caption_texts[i] for i in order.tolist()])
                logits = self.method.itm_logits(tokens.expand(k, -1, -1), hidden, mask).float()
                itm = logits.softmax(-1)[:, 1]
                score = logits[:, 1] + self.cfg.eval.itc_weight * itc / float(self.method.temperature())
                resort = score.argsort(descending=True)
                itc, order, itm = itc[resort], order[resort], itm[resort]
        return [{"rank": r + 1, "caption": self.caption_texts[i], "image": self.caption_owner[i],
                 "itc": round(float(itc[r]), 4), "itm": None if itm is None else round(float(itm[r]), 4)}
                for r, i in enumerate(order[:top].tolist())]

    # --- Look: ITM and Grad-CAM ------------------------------------------------------------------------------------
    def look(self, image, text, layer=-1) -> dict:
        """ITM match probability of (image, text) and the Grad-CAM of the chosen fusion layer's cross-attention, per
        word and averaged (`vlpt.viz.gradcam`): {"match", "words", "picture" (PIL), "layer"}."""
        from vlpt.viz.gradcam import caption_map, gradcam, save_gradcam
        picture = as_image(image)
        text = self.check_text(text, "text")
        if not self.fusion_layers:
            raise InputError(f"method '{self.name}' has no fusion encoder with cross-attention to draw Grad-CAM from")
        layer = as_int(layer, "the fusion layer", -self.fusion_layers, self.fusion_layers - 1)
        with self.lock:
            ids, mask = self.tokenizer([text], self.cfg.model.text.max_len)
            ids, mask = ids.to(self.device), mask.to(self.device)
            with torch.no_grad():
                tokens = self.method.backbone.encode_image(self.pixels(picture))
                hidden = self.method.backbone.encode_text(ids, mask)
                match = self.method.itm_logits(tokens, hidden, mask).float().softmax(-1)[0, 1].item()
            cams = gradcam(self.method, tokens, hidden, mask, layer)
        n = int(mask.sum())
        words = [self.tokenizer.decode([i]) for i in ids[0, 1:n - 1].tolist()]
        shown = picture.resize((max(256, picture.width), max(256, picture.height)), Image.NEAREST)
        out = self.draw(lambda path: save_gradcam(
            shown, words, cams[0, 1:n - 1], caption_map(cams, mask)[0], path,
            title=f'"{text}"  ITM match {match:.3f}  (fusion layer {layer})'))
        return {"match": round(match, 4), "words": words, "picture": out, "layer": layer}

    def draw(self, write) -> Image.Image:
        """The picture `write(path)` saves, read back; the file lives in the cache folder only for that moment."""
        tmp = self.cache / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=tmp) as folder:
            path = Path(folder) / "picture.png"
            write(path)
            with Image.open(path) as img:
                return img.convert("RGB")

    # --- Ask: VQA -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def ask(self, image, question, top=5) -> dict:
        """{"ranked": [(answer, probability)] (the answer list's `top`, ALBEF's rank inference, probabilities
        renormalised over its k), "generated": the decoder's own answer (greedy)}."""
        if not self.heads.has("vqa"):
            raise InputError("this demo has no VQA head: start it with --heads <a vlpt finetune vqa run>")
        from vlpt.tasks.vqa import rank_answers
        task, model = self.heads.models["vqa"]
        picture = as_image(image)
        question = self.check_text(question, "question")
        top = as_int(top, "the number of answers", 1, 20)
        tok, t = task.tokenizer, task.cfg.task
        with self.lock:
            ids, mask = tok([question], task.cfg.model.text.max_len)
            batch = {"image": self.pixels(picture), "text_ids": ids.to(self.device), "text_mask": mask.to(self.device)}
            context = model.question(batch)
            ranked = []
            try:
                answers = task.answer_list()
            except VlptError:
                answers = []
            if answers:
                a_ids, a_mask = (x.to(self.device) for x in tok(answers, task.cfg.model.text.max_len))
                best, probs = rank_answers(model.decoder, context, batch["text_mask"], a_ids, a_mask,
                                           max(t.k, top), tok.cls_id)
                ranked = [(answers[i], round(float(p), 4)) for i, p in zip(best[0, :top].tolist(),
                                                                           probs[0, :top].tolist())]
            start = torch.full((1, 1), tok.cls_id, dtype=torch.long, device=self.device)
            seq, _ = model.decoder.generate(context, batch["text_mask"], start, tok.sep_id, t.max_answer_len,
                                            pad_id=tok.pad_id)
        generated = tok.decode([i for i in seq[0].tolist() if i not in tok.special_ids])
        return {"ranked": ranked, "generated": generated}

    # --- Describe: captioning -----------------------------------------------------------------------------------
    @torch.no_grad()
    def describe(self, image, beams=3, max_len=20, min_len=5, sample: bool = False, temperature=1.0, top_k=0,
                 seed=0) -> str:
        """A caption of `image` after the captioner's prompt: beam search (`beams`), or with `sample` drawn token by
        token from the softmax at `temperature` (over the `top_k` most probable tokens; 0: all), seeded."""
        if not self.heads.has("caption"):
            raise InputError("this demo has no caption head: start it with --heads <a vlpt finetune caption run>")
        task, model = self.heads.models["caption"]
        picture = as_image(image)
        beams = as_int(beams, "the beam width", 1, 10)
        max_len = as_int(max_len, "the longest caption", 1, 60)
        min_len = as_int(min_len, "the shortest caption", 0, max_len)
        temperature = as_float(temperature, "the temperature", 0.05, 5.0)
        top_k = as_int(top_k, "top-k", 0, 10000)
        seed = as_int(seed, "the seed", 0, 2**31 - 1)
        tok = task.tokenizer
        with self.lock:
            context = model.context(self.pixels(picture))
            prefix = task.prompt_ids().to(self.device)[None]
            if sample:
                ids = sample_tokens(model.decoder, context, prefix, tok.sep_id, max_len, min_len, temperature, top_k,
                                    seed)
            else:
                ids, _ = model.decoder.generate(context, None, prefix, tok.sep_id, max_len, beams=beams,
                                                min_new=min_len, pad_id=tok.pad_id)
                ids = ids[0].tolist()
        return tok.decode([i for i in ids if i not in tok.special_ids])

    # --- Classify -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def classify(self, image, classes, prompts="") -> dict:
        """Zero-shot classification of one image over `classes` (text: one per line or comma-separated) through
        `prompts` (one template per line, '{}' for the class; none: the bare names): per class the ITC probability
        (softmax over the classes of the prompt-ensembled ITC logits, CLIP's ensembling) and the ITM match
        probability (averaged over the prompts). {"rows": [{class, itc, itm}] best ITC first, "chart": PIL}."""
        from vlpt.tasks.classification import ensemble
        picture = as_image(image)
        names = parse_list(classes)
        if not names:
            raise InputError("the class list is empty: type class names, one per line or separated by commas")
        if len(names) > MAX_CLASSES:
            raise InputError(f"{len(names)} classes; at most {MAX_CLASSES}")
        if len(set(names)) != len(names):
            raise InputError("a class is listed twice")
        templates = [p for p in (line.strip() for line in (prompts or "").splitlines()) if p] or ["{}"]
        bad = [p for p in templates if "{}" not in p]
        if bad:
            raise InputError(f"a prompt needs '{{}}' where the class name goes: {bad[0]!r}")
        texts = [template.replace("{}", name) for template in templates for name in names]
        for text in texts:
            self.check_text(text, "class prompt")
        with self.lock:
            tokens, feat = self.method.encode_image(self.pixels(picture))
            _, mask, hidden, text_feat = self.encode_texts(texts)
            class_feat = ensemble(text_feat.float(), len(templates))
            itc = (class_feat @ feat[0].float() / float(self.method.temperature())).softmax(0)
            logits = self.method.itm_logits(tokens.expand(len(texts), -1, -1), hidden, mask).float()
            itm = logits.softmax(-1)[:, 1].view(len(templates), len(names)).mean(0)
        rows = sorted(({"class": n, "itc": round(float(a), 4), "itm": round(float(b), 4)}
                       for n, a, b in zip(names, itc.tolist(), itm.tolist())), key=lambda r: -r["itc"])
        return {"rows": rows, "chart": bar_chart(rows)}

    # --- method panels --------------------------------------------------------------------------------------------
    def codebook(self, codewords=8, patches=10, images=300) -> tuple[Image.Image, str]:
        """CB-ViLA: patches of the indexed folder's first `images` images quantised to `codewords` codewords drawn
        at random among those in use (`vlpt.viz.codebook`)."""
        from vlpt.viz.codebook import save_codebook_grid
        self.require("codebook")
        codewords = as_int(codewords, "codewords", 1, 32)
        patches = as_int(patches, "patches per codeword", 1, 32)
        paths = self.index.paths[:as_int(images, "images", 1, 5000)]
        found = {}

        def write(path):
            found["out"] = save_codebook_grid(self.method, paths, path, image_size=self.cfg.model.vision.image_size,
                                              codewords=codewords, patches=patches,
                                              batch_size=self.cfg.eval.batch_size, device=self.device)
        with self.lock:
            picture = self.draw(write)
        _, rows, used = found["out"]
        return picture, (f"rows: codewords {', '.join(map(str, rows))} (top to bottom); {used['codebook_used']} of "
                         f"{len(self.method.quantizer.codewords)} codewords used by the patches of {len(paths)} "
                         f"images, perplexity {used['codebook_perplexity']:.1f}")

    @torch.no_grad()
    def reconstruct(self, image, caption, seed=0) -> list[tuple[Image.Image, str]]:
        """MaskVLM: the image with the training rule's patch mask (`seed` as the step), and its reconstruction
        conditioned on `caption` (`vlpt.viz.reconstruction`): [(picture, label)] original, masked, reconstructed."""
        from vlpt.data.transforms import denormalize
        from vlpt.viz.reconstruction import reconstruct_pairs
        self.require("reconstruction")
        picture = as_image(image)
        caption = self.check_text(caption, "caption")
        seed = as_int(seed, "the seed", 0, 2**31 - 1)
        with self.lock:
            ids, mask = self.tokenizer([caption], self.cfg.model.text.max_len)
            original, masked, recon, hidden = reconstruct_pairs(self.method, self.pixels(picture),
                                                                ids.to(self.device), mask.to(self.device), seed)
        share = float(hidden.float().mean())
        labels = ["original", f"masked ({100 * share:.0f} % of patches)", f'reconstructed from "{caption}"']
        return [(to_picture(denormalize(x[0].cpu())), label) for x, label in zip((original, masked, recon), labels)]

    @torch.no_grad()
    def pseudo_labels(self, image, caption, top=5) -> dict:
        """SIMLA: the caption's keywords its multimodal [CLS] attends to most (PSL targets) and the momentum concept
        head's `top` words from the image alone (`vlpt.viz.pseudo_labels`)."""
        self.require("pseudo_labels")
        from vlpt.viz.pseudo_labels import pseudo_label_rows
        picture = as_image(image)
        caption = self.check_text(caption, "caption")
        top = as_int(top, "concept words", 1, 20)
        with self.lock:
            row = pseudo_label_rows(self.method, self.tokenizer, self.pixels(picture), [caption],
                                    self.cfg.model.text.max_len, top)[0]
        return {"keywords": row["keywords"], "predicted": [(w, round(p, 4)) for w, p in row["predicted"]]}

    def require(self, capability: str) -> None:
        if capability not in self.capabilities:
            raise InputError(f"method '{self.name}' has no {capability} panel")


def parse_list(text) -> list[str]:
    """Class names from text: one per line, or separated by commas."""
    if text is None:
        return []
    if not isinstance(text, str):
        raise InputError(f"the class list must be text, got {type(text).__name__}")
    parts = text.splitlines() if "\n" in text.strip() else text.split(",")
    return [" ".join(p.split()) for p in parts if p.strip()]


def to_picture(x: torch.Tensor, scale: int = 4) -> Image.Image:
    """(3,H,W) in [0, 1] -> a PIL image enlarged `scale` times without smoothing."""
    array = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(array)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


@torch.no_grad()
def sample_tokens(decoder, context, prefix, stop_id: int, max_new: int, min_new: int, temperature: float, top_k: int,
                  seed: int) -> list[int]:
    """One sequence drawn token by token after `prefix` (1,P) from softmax(logits / temperature), over the `top_k`
    most probable tokens (0: all), with a generator seeded by `seed`; ends at `stop_id` (not before `min_new`
    tokens) or after `max_new`. Returns the new tokens (the stop token kept). Runs on the decoder's key/value cache
    (`Decoder.extend`)."""
    gen = torch.Generator(device=context.device).manual_seed(seed)
    cross_kv = [layer.cross.project_kv(context) for layer in decoder.layers]
    logits, cache = decoder.extend(prefix, None, cross_kv, None)
    out = []
    for t in range(max_new):
        logp = logits[0, -1].float() / temperature
        if t < min_new:
            logp[stop_id] = float("-inf")
        if top_k:
            kth = logp.topk(min(top_k, len(logp))).values[-1]
            logp = logp.masked_fill(logp < kth, float("-inf"))
        token = int(torch.multinomial(logp.softmax(-1), 1, generator=gen))
        out.append(token)
        if token == stop_id:
            break
        logits, cache = decoder.extend(torch.tensor([[token]], device=context.device), cache, cross_kv, None)
    return out


def bar_chart(rows: list[dict], most: int = 15) -> Image.Image:
    """Horizontal bars of the ITC and ITM probability of the first `most` classes (best ITC on top)."""
    import io

    from matplotlib.figure import Figure
    rows = rows[:most]
    fig = Figure(figsize=(6.4, 0.45 * len(rows) + 1.2), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r["itc"] for r in rows], 0.4, label="ITC (softmax over the classes)", color="#4c72b0")
    ax.barh(y + 0.2, [r["itm"] for r in rows], 0.4, label="ITM match probability", color="#dd8452")
    ax.set_yticks(y, [r["class"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    ax.legend(loc="lower right", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def default_prompts() -> list[str]:
    """The classification task's default prompt templates."""
    from vlpt.tasks.classification import ClassificationConfig
    return list(ClassificationConfig().prompts)


def default_classes(demo: Demo, most: int = 40) -> list[str]:
    """The class list of the checkpoint's data folder (`classes.json`, as `vlpt evaluate classification` reads it),
    else of the indexed folder or the folders above it, else a few shapes."""
    from vlpt.tasks.classification import read_classes
    roots = [Path(demo.cfg.data.root), demo.index.folder, *list(demo.index.folder.parents)[:3]]
    for root in roots:
        path = root / "classes.json"
        if path.is_file():
            try:
                return read_classes(path)[:most]
            except VlptError:
                continue
    return ["circle", "square", "triangle", "star", "diamond"]

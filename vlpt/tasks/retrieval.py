"""Image-text retrieval (ALBEF Sec. 5), zero-shot or finetuned: ITC similarities for all pairs, then the top-k
candidates reranked by ITM; on a method with a visual codebook, also the codewords the split's patches use.
Finetuning trains the method's own ITC (image-id positives in batch and queue, distilled) and ITM, as ALBEF's
`Retrieval.py`.

Reranking runs many (image, text) pairs per fusion forward pass; `rerank_loop` is the per-query loop of the
reference implementation, kept for the benchmark that compares the two. By default (`cached_match_scores`) the
fusion's cross-attention keys and values of each context are projected once, not once per pair: a query's own
(an image's for its k candidate texts; for MaskVLM's image cross-encoder also a text's for its k images) in each
pass, the candidates' from a cache of every image (and text) made once, and each pass computes no padding beyond
its longest text. `cache=False` is the plain path: every pair's fusion pass from the tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from vlpt import methods
from vlpt.config import opt
from vlpt.data.annotations import AnnotationError, load_annotations
from vlpt.data.loader import ImageFiles, train_loader
from vlpt.data.transforms import image_transform
from vlpt.engine import distributed
from vlpt.methods import steps
from vlpt.tasks.base import SplitsConfig, Task, TaskModel, register


def read_split(path: str | Path) -> tuple[list[str], list[str], list[list[int]], np.ndarray]:
    """ALBEF's test format -> image paths, texts, texts of each image, image of each text."""
    records = load_annotations(path, "retrieval")
    images, texts, img2txt, txt2img = [], [], [], []
    for i, r in enumerate(records):
        captions = r["caption"] if isinstance(r["caption"], list) else [r["caption"]]
        images.append(r["image"])
        img2txt.append(list(range(len(texts), len(texts) + len(captions))))
        texts += captions
        txt2img += [i] * len(captions)
    return images, texts, img2txt, np.array(txt2img)


@torch.no_grad()
def encode_split(model, images: list[Path], texts: list[str], tokenizer, image_size: int, max_len: int,
                 batch_size: int, device, num_workers: int = 0, progress: bool = True) -> dict:
    """Every image's tokens and feature, every text's hidden states, mask and feature."""
    loader = DataLoader(ImageFiles(images, image_transform(image_size)), batch_size=batch_size,
                        num_workers=num_workers)
    image_tokens, image_feat = [], []
    for pixels in tqdm(loader, desc="images", disable=None if progress else True, leave=False):
        tokens, feat = model.encode_image(pixels.to(device))
        image_tokens.append(tokens)
        image_feat.append(feat)
    text_hidden, text_feat, text_mask = [], [], []
    for start in tqdm(range(0, len(texts), batch_size), desc="texts", disable=None if progress else True,
                      leave=False):
        ids, mask = tokenizer(texts[start:start + batch_size], max_len, True)  # one width: batches concatenate
        hidden, feat = model.encode_text(ids.to(device), mask.to(device))
        text_hidden.append(hidden)
        text_feat.append(feat)
        text_mask.append(mask.to(device))
    return {"image_tokens": torch.cat(image_tokens), "image_feat": torch.cat(image_feat),
            "text_hidden": torch.cat(text_hidden), "text_feat": torch.cat(text_feat),
            "text_mask": torch.cat(text_mask)}


def itc_logits(model, enc: dict) -> torch.Tensor:
    """(I,T) image-text similarity / temperature, in fp32 even under autocast (no bf16 ties)."""
    with torch.autocast(enc["image_feat"].device.type, enabled=False):
        return enc["image_feat"].float() @ enc["text_feat"].float().t() / model.temperature().float()


def _match_scores(model, enc: dict, image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
    logits = model.itm_logits(enc["image_tokens"][image_idx], enc["text_hidden"][text_idx], enc["text_mask"][text_idx])
    return logits[:, 1].float()


def cache_fits(model) -> bool:
    """Whether `cached_match_scores` serves this model: its ITM logits are the base `Method`'s (the ITM head on the
    backbone's joint feature, which takes precomputed keys and values) and its backbone gives `context_kv`. Every
    method in vlpt fits (ALBEF, CODIS, CB-ViLA on `DualStream`, MaskVLM on `CrossPair`); one that overrides
    `itm_logits` or `joint_feature` takes the plain path."""
    from vlpt.methods.base import Method
    return (isinstance(model, Method) and type(model).itm_logits is Method.itm_logits
            and type(model).joint_feature is Method.joint_feature and hasattr(model.backbone, "context_kv"))


CACHE_BYTES = 1 << 30
SELF_ATTEND_CHUNK = 1024  # texts per pass of the fusion's first self-attention (computed once per text)
"""Most bytes of candidates' keys and values `cached_match_scores` holds at once; beyond it, chunks of candidates."""


def text_lengths(mask: torch.Tensor) -> torch.Tensor:
    """(T,L) mask -> (T,) one past each text's last real token (padding is on the right)."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask.ne(0) * positions).amax(1)


def _row_bytes(kv: dict) -> int:
    """Bytes of one row of each layer's (K, V)."""
    return sum(t.shape[1:].numel() * t.element_size() for layers in kv.values() for pair in layers for t in pair)


def _take(kv: dict, rows: torch.Tensor, length: int | None = None) -> dict:
    """The given rows of each layer's (K, V); text keys and values cut to `length` tokens first (a view)."""
    out = {}
    for name, layers in kv.items():
        cut = length if name == "text_kv" else None
        out[name] = [(k[:, :, :cut].index_select(0, rows), v[:, :, :cut].index_select(0, rows)) for k, v in layers]
    return out


def whole_groups(query: torch.Tensor, batch_size: int) -> list[tuple[int, int]]:
    """Passes (start, end) over rows whose equal `query` values are consecutive: whole groups, as many as fit in
    `batch_size` rows (one group alone where it is larger), so that no query's keys and values are projected twice."""
    n = len(query)
    ends = (torch.nonzero(query[1:] != query[:-1]).flatten() + 1).tolist() + [n]
    passes, start, last = [], 0, 0
    for end in ends:
        if end - start > batch_size and last > start:
            passes.append((start, last))
            start = last
        last = end
    return passes + ([(start, n)] if n > start else [])


@torch.no_grad()
def cached_match_scores(model, enc: dict, image_idx: torch.Tensor, text_idx: torch.Tensor, batch_size: int,
                        query: str = "image", progress: bool = False, cache_bytes: int = CACHE_BYTES) -> torch.Tensor:
    """The ITM match logits of pairs (image_idx[i], text_idx[i]), as `_match_scores` computes them, in their order,
    with each context's cross-attention keys and values projected once (`model.backbone.context_kv`).

    The pairs come grouped by `query` ("image" or "text"): each query's pairs consecutive. Per pass of about
    `batch_size` pairs (whole queries where they fit) the queries' own keys and values are projected once and
    serve all their candidates (one per query, its candidates' queries folded together: `text.Attention.forward`);
    the candidates' (the other modality) come from a cache of every candidate projected once, gathered per pair,
    in chunks of at most `cache_bytes` (pairs regrouped by chunk). Queries go in order of their longest text so
    that a pass holds texts of similar length, and each pass's texts are cut to its longest real one. The fusion's
    first self-attention, which reads no image, runs once per text (`backbone.self_attend`), and with [CLS] pooling
    the last fusion layer runs for [CLS] alone (`FusionEncoder.forward(first=1)`).
    """
    if query not in ("image", "text"):
        raise ValueError(f"query must be 'image' or 'text', got {query!r}")
    backbone, n = model.backbone, len(image_idx)
    device = enc["text_hidden"].device
    if n == 0:
        return torch.zeros(0, device=device)
    lengths = text_lengths(enc["text_mask"])
    q_idx, c_idx = (image_idx, text_idx) if query == "image" else (text_idx, image_idx)
    starts = torch.ones(n, dtype=torch.bool, device=device)
    starts[1:] = q_idx[1:] != q_idx[:-1]
    group = starts.cumsum(0) - 1                                         # the query group of each pair
    longest = torch.zeros(int(group[-1]) + 1, dtype=lengths.dtype, device=device)
    longest.scatter_reduce_(0, group, lengths[text_idx], "amax", include_self=False)

    def candidate_kv(rows: torch.Tensor) -> dict:
        if query == "image":
            return backbone.context_kv(text_hidden=enc["text_hidden"][rows])
        return backbone.context_kv(image_tokens=enc["image_tokens"][rows])

    # The fusion's first self-attention reads the text alone: once per text, for all of its pairs.
    fusion_text, extra = enc["text_hidden"], {}
    if hasattr(backbone, "self_attend"):
        n_texts = len(enc["text_hidden"])
        fusion_text = torch.cat([backbone.self_attend(enc["text_hidden"][s:s + SELF_ATTEND_CHUNK],
                                                      enc["text_mask"][s:s + SELF_ATTEND_CHUNK])
                                 for s in range(0, n_texts, SELF_ATTEND_CHUNK)]) if n_texts else fusion_text
        extra = {"self_attended": True}
    n_candidates = len(enc["text_hidden"] if query == "image" else enc["image_tokens"])
    one = _row_bytes(candidate_kv(c_idx[:0]))                          # sized on no candidate: nothing projected
    chunk = n_candidates if one == 0 else max(1, min(n_candidates, cache_bytes // one))
    # Passes: by chunk of candidates, then queries by their longest text (stable: a query's pairs stay together).
    order = torch.argsort(longest[group], stable=True)
    order = order[torch.argsort(c_idx[order] // chunk, stable=True)]
    scores = torch.empty(n, device=device)
    for first in tqdm(range(0, n_candidates, chunk), desc="rerank", disable=None if progress else True, leave=False):
        in_chunk = order[(c_idx[order] >= first) & (c_idx[order] < first + chunk)]
        if not len(in_chunk):
            continue
        cache = candidate_kv(torch.arange(first, min(first + chunk, n_candidates), device=device)) if one else {}
        for s, e in whole_groups(q_idx[in_chunk], batch_size):
            rows = in_chunk[s:e]
            img, txt = image_idx[rows], text_idx[rows]
            length = int(lengths[txt].max())
            hidden, mask = fusion_text[txt, :length], enc["text_mask"][txt, :length]
            queries, counts = torch.unique_consecutive(q_idx[rows], return_counts=True)
            if query == "image":
                kv = backbone.context_kv(image_tokens=enc["image_tokens"][queries])
            else:
                kv = backbone.context_kv(text_hidden=enc["text_hidden"][queries, :length])
            if not bool((counts == counts[0]).all()):                    # groups split by a chunk: one row per pair
                kv = _take(kv, torch.repeat_interleave(torch.arange(len(queries), device=device), counts))
            kv.update(_take(cache, c_idx[rows] - first, length))
            tokens = enc["image_tokens"][img] if getattr(backbone, "reads_image_tokens_with_kv", True) else None
            scores[rows] = model.itm_logits(tokens, hidden, mask, **kv, **extra)[:, 1].float()
        del cache
    return scores


def pair_index(image_idx: torch.Tensor, text_idx: torch.Tensor, n_texts: int) -> torch.Tensor:
    """One integer per (image, text) pair."""
    return image_idx * n_texts + text_idx


def find_pairs(keys: torch.Tensor, values: torch.Tensor, image_idx: torch.Tensor, text_idx: torch.Tensor,
               n_texts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the pairs (image_idx[i], text_idx[i]) are among `keys` (`pair_index` of pairs scored before), and
    those pairs' `values`: (found (N,) bool, values[found])."""
    order = torch.argsort(keys)
    sorted_keys, wanted = keys[order], pair_index(image_idx, text_idx, n_texts)
    at = torch.searchsorted(sorted_keys, wanted).clamp(max=max(len(keys) - 1, 0))
    found = sorted_keys[at] == wanted if len(keys) else torch.zeros_like(wanted, dtype=torch.bool)
    return found, values[order[at[found]]]


@torch.no_grad()
def rerank(model, enc: dict, sim: torch.Tensor, k: int, batch_size: int, progress: bool = True,
           itc_weight: float = 0.0, cache: bool | None = None):
    """ITM scores of each image's top-k texts and each text's top-k images, `batch_size` pairs per forward pass.

    `sim` (I,T) are ITC logits (similarity / temperature). Returns score matrices (I,T) and (T,I): for reranked
    candidates the ITM match logit (ALBEF) plus `itc_weight` times the ITC logit, -100 elsewhere. `cache`:
    `cached_match_scores` (default where `cache_fits`), which also scores a pair that is among both an image's and a
    text's candidates once; or False for the plain path (every pair's fusion from the tokens, at the full text width,
    in each direction).
    """
    if cache is None:
        cache = cache_fits(model)
    elif cache and not cache_fits(model):
        raise ValueError(f"{type(model).__name__}'s ITM does not take cached keys and values (see cache_fits)")
    out, scored = [], None
    for scores, queries_are_images in ((sim, True), (sim.t(), False)):
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices           # (Q,k)
        query = torch.arange(len(scores), device=sim.device)[:, None].expand_as(top).reshape(-1)
        cand = top.reshape(-1)
        image_idx, text_idx = (query, cand) if queries_are_images else (cand, query)
        if cache and scored is None:
            itm = cached_match_scores(model, enc, image_idx, text_idx, batch_size, "image", progress)
            scored = pair_index(image_idx, text_idx, sim.shape[1]), itm
        elif cache:  # a text's candidate images already scored as that image's candidates reuse the score
            itm = torch.empty(len(cand), device=sim.device)
            found, at = find_pairs(*scored, image_idx, text_idx, sim.shape[1])
            itm[found] = at
            rest = ~found
            itm[rest] = cached_match_scores(model, enc, image_idx[rest], text_idx[rest], batch_size, "text", progress)
        else:
            itm = torch.cat([_match_scores(model, enc, image_idx[s:s + batch_size], text_idx[s:s + batch_size])
                             for s in tqdm(range(0, len(cand), batch_size), desc="rerank",
                                           disable=None if progress else True, leave=False)])
        full = torch.full(scores.shape, -100.0, device=scores.device)
        full.scatter_(1, top, itm.view_as(top) + itc_weight * scores.gather(1, top))
        out.append(full)
    return out


@torch.no_grad()
def rerank_loop(model, enc: dict, sim: torch.Tensor, k: int, itc_weight: float = 0.0):
    """The reference implementation's per-query loop: one fusion pass of k pairs per query (for benchmarks)."""
    out = []
    for scores, queries_are_images in ((sim, True), (sim.t(), False)):
        full = torch.full(scores.shape, -100.0, device=scores.device)
        for q in range(len(scores)):
            top = scores[q].topk(min(k, scores.shape[1])).indices
            query = torch.full_like(top, q)
            image_idx, text_idx = (query, top) if queries_are_images else (top, query)
            full[q, top] = _match_scores(model, enc, image_idx, text_idx) + itc_weight * scores[q, top]
        out.append(full)
    return out


def recall_metrics(i2t: np.ndarray, t2i: np.ndarray, img2txt: list[list[int]], txt2img: np.ndarray) -> dict:
    """ALBEF's `itm_eval`: recall@1/5/10 in percent; txt = an image query retrieves its texts."""
    ranks = np.array([np.where(np.isin(np.argsort(-row, kind="stable"), img2txt[i]))[0].min()
                      for i, row in enumerate(i2t)])
    txt = [100.0 * np.mean(ranks < r) for r in (1, 5, 10)]
    ranks = np.array([np.where(np.argsort(-row, kind="stable") == txt2img[i])[0][0] for i, row in enumerate(t2i)])
    img = [100.0 * np.mean(ranks < r) for r in (1, 5, 10)]
    m = {"txt_r1": txt[0], "txt_r5": txt[1], "txt_r10": txt[2], "txt_r_mean": sum(txt) / 3,
         "img_r1": img[0], "img_r5": img[1], "img_r10": img[2], "img_r_mean": sum(img) / 3}
    m["r_mean"] = (m["txt_r_mean"] + m["img_r_mean"]) / 2
    return {k: round(float(v), 2) for k, v in m.items()}


@torch.no_grad()
def evaluate(model, annotation: str | Path, root: str | Path, tokenizer, *, image_size: int, max_len: int, k: int = 16,
             batch_size: int = 256, itc_weight: float = 0.0, device="cpu", num_workers: int = 0,
             progress: bool = True) -> dict:
    """Zero-shot or finetuned retrieval on one split: ITM-reranked metrics, and ITC-only ones prefixed `itc_`."""
    model.eval()
    images, texts, img2txt, txt2img = read_split(annotation)
    enc = encode_split(model, [Path(root) / p for p in images], texts, tokenizer, image_size, max_len, batch_size,
                       device, num_workers, progress)
    sim = itc_logits(model, enc)
    i2t, t2i = rerank(model, enc, sim, k, batch_size, progress, itc_weight)
    itc = recall_metrics(sim.cpu().numpy(), sim.t().cpu().numpy(), img2txt, txt2img)
    metrics = recall_metrics(i2t.cpu().numpy(), t2i.cpu().numpy(), img2txt, txt2img)
    metrics.update({f"itc_{key}": value for key, value in itc.items()})
    metrics.update({"images": len(images), "texts": len(texts), "k": k, "itc_weight": itc_weight})
    return metrics


def binding_metrics(groups: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Attribute binding: per record, the scores (by ITC, by ITM) of its true caption first and its negatives after;
    a record counts when its true caption scores strictly above every negative. Accuracies in percent, and chance
    (the mean of 1 / (1 + negatives))."""
    itc = [bool((s[0] > s[1:]).all()) for s, _ in groups]
    itm = [bool((s[0] > s[1:]).all()) for _, s in groups]
    chance = [1 / len(s) for s, _ in groups]
    n = max(len(groups), 1)
    return {"binding_itc": round(100 * sum(itc) / n, 2), "binding_itm": round(100 * sum(itm) / n, 2),
            "binding_chance": round(100 * sum(chance) / n, 2), "binding_records": len(groups)}


def binding(model, annotation: str | Path, root: str | Path, tokenizer, **kwargs) -> dict:
    """`binding_metrics` of `binding_scores`."""
    return binding_metrics(binding_scores(model, annotation, root, tokenizer, **kwargs))


@torch.no_grad()
def binding_scores(model, annotation: str | Path, root: str | Path, tokenizer, *, image_size: int, max_len: int,
                   batch_size: int = 256, device="cpu", num_workers: int = 0,
                   progress: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per record of a file of {image, caption, negatives} (`retrieval_test_hard.json`: captions with two attributes
    swapped between objects), the image's ITC similarity and ITM match logit with its caption, then its negatives."""
    records = load_annotations(annotation, "retrieval")
    texts, owner = [], []
    for i, r in enumerate(records):
        if not r.get("negatives"):
            raise AnnotationError(f"{annotation}: record {i} has no 'negatives' (a list of wrong captions)")
        group = [r["caption"] if isinstance(r["caption"], str) else r["caption"][0], *r["negatives"]]
        texts += group
        owner += [i] * len(group)
    enc = encode_split(model, [Path(root) / r["image"] for r in records], texts, tokenizer, image_size, max_len,
                       batch_size, device, num_workers, progress)
    image_idx = torch.tensor(owner, device=enc["image_feat"].device)
    text_idx = torch.arange(len(texts), device=image_idx.device)
    itc = (enc["image_feat"][image_idx].float() * enc["text_feat"].float()).sum(1)
    itm = torch.cat([_match_scores(model, enc, image_idx[s:s + batch_size], text_idx[s:s + batch_size])
                     for s in range(0, len(texts), batch_size)])
    sizes = [1 + len(r["negatives"]) for r in records]
    return list(zip(itc.cpu().split(sizes), itm.cpu().split(sizes)))


@dataclass
class RetrievalConfig(SplitsConfig):
    files: str = opt("retrieval_{split}.json", "annotation files under data.root, '{split}' standing for train, val "
                     "and test: train as pairs {image, caption, image_id}, val and test in ALBEF's format {image, "
                     "caption list}; <file>_hard.json beside them adds attribute binding (true caption vs swapped)")


class RetrievalModel(TaskModel):
    """The method's ITC (ALBEF Eq. 1-3, 6; captions of one image positives of each other) and ITM (Eq. 4)."""

    losses = ["itc", "itm"]

    def forward(self, batch: dict, step: int) -> dict:
        f = steps.features(self.method, batch)
        out = {"itc": steps.itc(self.method, f, step), "itm": steps.itm(self.method, f, step, batch)}
        if self.method.queues is not None:
            steps.push_queues(self.method, f)
        return out


@register("retrieval", RetrievalConfig)
class Retrieval(Task):
    """image-text retrieval: `vlpt evaluate retrieval` on any checkpoint (zero-shot), `vlpt finetune retrieval`"""

    trains, zero_shot, select = True, True, "r_mean"
    options = ("eval.k", "eval.batch_size", "eval.itc_weight")

    def build(self, method) -> RetrievalModel:
        if method.queues is not None:  # the pretraining queue's image ids name other images: none is a positive
            method.queues.ids.fill_(-1)
        return RetrievalModel(method)

    def batches(self, start: int):
        records = load_annotations(self.cfg.task.split_file(self.data, "train"), "pretrain")
        needs = methods.registry.get(self.cfg.method.name).batch_needs(self.cfg.method) - {"mlm"}  # ITC, ITM only
        return train_loader(self.cfg, records, self.tokenizer, needs, distributed.rank(), distributed.world_size(),
                            start)

    def protocol(self, model) -> str:
        """'zero-shot' for a pretraining checkpoint, 'finetuned' on the data it was finetuned on, else a transfer."""
        if not isinstance(model, TaskModel):
            return "zero-shot"
        trained_on = Path(self.meta.get("data", self.cfg.data.root))
        if trained_on.resolve() == self.data.resolve():
            return "finetuned"
        return f"{trained_on.name}-finetuned transfer to {self.data.name}"

    def evaluate(self, model, split: str) -> dict:
        e, cfg = self.cfg.eval, self.cfg
        protocol = self.protocol(model)
        model = model.method if isinstance(model, TaskModel) else model
        annotation = cfg.task.split_file(self.data, split)
        metrics = {"protocol": protocol, **evaluate(
            model, annotation, self.data, self.tokenizer,
            image_size=cfg.model.vision.image_size, max_len=cfg.model.text.max_len, k=e.k, batch_size=e.batch_size,
            itc_weight=e.itc_weight, device=self.device, num_workers=cfg.data.num_workers)}
        hard = annotation.with_name(annotation.stem + "_hard.json")
        if hard.is_file():  # attribute binding: the true caption against captions with attributes swapped
            metrics.update(binding(model, hard, self.data, self.tokenizer, image_size=cfg.model.vision.image_size,
                                   max_len=cfg.model.text.max_len, batch_size=e.batch_size, device=self.device,
                                   num_workers=cfg.data.num_workers))
        if "codebook" in model.capabilities:  # how much of the visual codebook the split's patches use
            from vlpt.viz.codebook import assign_codewords, usage
            images = [self.data / p for p in read_split(annotation)[0]]
            indices = assign_codewords(model, images, image_size=cfg.model.vision.image_size,
                                       batch_size=e.batch_size, device=self.device, num_workers=cfg.data.num_workers)
            metrics.update(usage(indices, len(model.quantizer.codewords)))
        return metrics

    label = "retrieval, finetuned"

    @staticmethod
    def headline(m: dict):
        return "img_r1", m["img_r1"], "", None  # its baseline is the same checkpoint zero-shot (`vlpt demo`)

    def table(self, m: dict) -> str:
        cols = ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"]
        lines = [f"{'':18s}" + "".join(f"{c:>9s}" for c in cols),
                 f"{'retrieval (itm)':18s}" + "".join(f"{m[c]:9.2f}" for c in cols),
                 f"{'retrieval (itc)':18s}" + "".join(f"{m['itc_' + c]:9.2f}" for c in cols)]
        if "binding_itm" in m:
            lines.append(f"binding (true caption above attribute-swapped ones, {m['binding_records']} images): "
                         f"ITC {m['binding_itc']:.2f} %, ITM {m['binding_itm']:.2f} %, chance {m['binding_chance']:.2f} %")
        if "codebook_used" in m:
            lines.append(f"codebook: {m['codebook_used']} codewords used by the patches "
                         f"({100 * m['codebook_used_fraction']:.1f} %), perplexity {m['codebook_perplexity']:.1f}")
            if m["codebook_used_fraction"] < 0.05:
                lines.append("warning: under 5 % of the codebook is in use: it has collapsed (are restarts off? "
                             "method.cbvila.dead_after)")
        return "\n".join(lines)

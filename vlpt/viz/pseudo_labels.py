"""SIMLA's pseudo-label keywords as a picture (the paper's Fig. 5): each image with its caption, the keywords its
multimodal [CLS] attends to most (the PSL targets, appendix 3) and the momentum concept head's top predictions from the
image alone; `vlpt visualize pseudo-labels`."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import torch

from vlpt.data.annotations import load_annotations, load_image
from vlpt.data.transforms import image_transform
from vlpt.viz.registry import Visualization, register, require


@torch.no_grad()
def pseudo_label_rows(model, tokenizer, images: torch.Tensor, captions: list[str], max_len: int,
                      top: int = 5) -> list[dict]:
    """Per pair: its keywords (the words at the selected positions, in rank order) and the momentum concept head's
    `top` words with their probabilities; special tokens are never among the head's words shown."""
    require(model, "pseudo_labels")
    ids, mask = tokenizer(captions, max_len)
    ids, mask = ids.to(images.device), mask.to(images.device)
    teacher = model.cfg.method.simla.psl.attention == "teacher"
    tokens, feat = model.encode_image(images, teacher=teacher)
    positions, valid = model.pseudo_labels(tokens, ids, mask, teacher)
    t_tokens, t_feat = (tokens, feat) if teacher else model.encode_image(images, teacher=True)
    probs = torch.sigmoid(model.concept_logits(t_tokens, t_feat, teacher=True).float())
    probs[:, tokenizer.special_ids] = 0
    best = probs.topk(top, dim=-1)
    rows = []
    for b, caption in enumerate(captions):
        keywords = [tokenizer.decode([int(ids[b, p])]) for p, ok in zip(positions[b].tolist(), valid[b].tolist()) if ok]
        predicted = [(tokenizer.decode([int(i)]), float(p)) for i, p in zip(best.indices[b], best.values[b])]
        rows.append({"caption": caption, "keywords": keywords, "predicted": predicted})
    return rows


def save_pseudo_labels(pictures, rows: list[dict], out: str | Path, title: str = "") -> Path:
    """One PNG: a panel per pair, the image above its caption, keywords and the concept head's top words."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(rows), 4)
    n_rows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.6 * cols, 5.0 * n_rows), squeeze=False)
    for ax, picture, row in zip(axes.flat, pictures, rows):
        ax.imshow(picture)
        predicted = ", ".join(f"{w} {p:.2f}" for w, p in row["predicted"])
        ax.set_title(textwrap.fill(f'"{row["caption"]}"', 40), fontsize=8)
        ax.set_xlabel(textwrap.fill(f'keywords: {", ".join(row["keywords"]) or "-"}', 44) + "\n"
                      + textwrap.fill(f"concept head: {predicted}", 44), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


@register("pseudo-labels")
class PseudoLabels(Visualization):
    capability = "pseudo_labels"
    help = "SIMLA pseudo-label keywords: caption, attention-selected keywords, the momentum concept head's top words"
    out = "pseudo_labels.png"

    def arguments(self, p) -> None:
        p.add_argument("--annotation", default="retrieval_test.json",
                       help="annotation file in the data folder whose first pairs are drawn")
        p.add_argument("--n", type=int, default=8, help="image-caption pairs")
        p.add_argument("--top", type=int, default=5, help="concept-head words shown per image")

    def draw(self, model, cfg, tokenizer, args, device) -> str:
        data = Path(args.data or cfg.data.root)
        records = load_annotations(data / args.annotation, "pretrain")[:args.n]
        transform = image_transform(cfg.model.vision.image_size)
        pictures = [load_image(data / r["image"]) for r in records]
        images = torch.stack([transform(p) for p in pictures]).to(device)
        captions = [r["caption"][0] if isinstance(r["caption"], list) else r["caption"] for r in records]
        rows = pseudo_label_rows(model, tokenizer, images, captions, cfg.model.text.max_len, args.top)
        p = cfg.method.simla.psl
        out = save_pseudo_labels(pictures, rows, args.out,
                                 title=f"PSL keywords (k={p.k}, {p.attention} attention, heads {p.heads})")
        lines = [f"wrote {out}"] + [f'  "{r["caption"]}": keywords {", ".join(r["keywords"])}; concept head '
                                    + ", ".join(w for w, _ in r["predicted"]) for r in rows]
        return "\n".join(lines)

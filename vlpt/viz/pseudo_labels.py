"""SIMLA's pseudo-label keywords as a picture (the paper's Fig. 5): each image with its caption, the keywords its
multimodal [CLS] attends to most (the PSL targets, appendix 3) and the momentum concept head's top predictions from the
image alone; `vlpt visualize pseudo-labels`."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import torch

from vlpt.viz.registry import Visualization, add_pair_arguments, first_pairs, register, require
from vlpt.viz.figures import quoted, save_figure, show


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
        rows.append({"caption": caption, "keywords": keywords, "predicted": predicted,
                     "predicted_ids": best.indices[b].tolist()})
    return rows


def concept_gradcam(model, images: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """SIMLA appendix Fig. 2: Grad-CAM of the image encoder through the concept head, for vocabulary entry
    `token_ids[b]` of image b: the last ViT block's input patch tokens times the positive part of their gradient of
    that concept logit averaged over patches (Grad-CAM's channel weights), summed over channels: (B,g,g). The head
    reads the [CLS] output, so the map is taken before the last block, where the patches still reach it."""
    require(model, "pseudo_labels")
    vit = model.backbone.vision
    with torch.enable_grad():
        acts = vit.run_blocks(vit.embed(images), 0, len(vit.blocks) - 1).detach().requires_grad_()
        tokens = vit.norm(vit.run_blocks(acts, len(vit.blocks) - 1))
        feat = torch.nn.functional.normalize(model.vision_proj(tokens[:, 0]).float(), dim=-1)
        logits = model.concept_logits(tokens, feat)
        (grad,) = torch.autograd.grad(logits.gather(1, token_ids[:, None]).sum(), acts)
    weights = grad[:, 1:].mean(1, keepdim=True)                                     # (B,1,W)
    cam = (acts[:, 1:] * weights).sum(-1).clamp(min=0).detach()                     # (B,N)
    cam = cam / cam.amax(1, keepdim=True).clamp(min=1e-12)
    return cam.view(len(images), *vit.grid)


def save_pseudo_labels(pictures, rows: list[dict], out: str | Path, title: str = "",
                       cams: torch.Tensor | None = None) -> Path:
    """One PNG: a panel per pair, the image above its caption, keywords and the concept head's top words; with `cams`
    (B,g,g) each image overlaid with its map (the Grad-CAM of its top concept)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(rows), 4)
    n_rows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.6 * cols, 5.0 * n_rows), squeeze=False)
    for i, (ax, picture, row) in enumerate(zip(axes.flat, pictures, rows)):
        predicted = ", ".join(f"{w} {p:.2f}" for w, p in row["predicted"])
        shown = "" if cams is None else f'\nmap: Grad-CAM of "{row["predicted"][0][0]}"'
        show(ax, picture, quoted(row["caption"]), textwrap.fill(f'keywords: {", ".join(row["keywords"]) or "-"}', 44)
             + "\n" + textwrap.fill(f"concept head: {predicted}", 44) + shown)
        if cams is not None:
            from vlpt.viz.gradcam import upsample
            width, height = picture.size
            ax.imshow(upsample(cams[i:i + 1].cpu(), height, width)[0].numpy(), cmap="jet", alpha=0.45)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    return save_figure(fig, out, title)


@register("pseudo-labels")
class PseudoLabels(Visualization):
    capability = "pseudo_labels"
    help = "SIMLA pseudo-label keywords: caption, attention-selected keywords, the momentum concept head's top words"
    out = "pseudo_labels.png"

    def arguments(self, p) -> None:
        add_pair_arguments(p, n=8)
        p.add_argument("--top", type=int, default=5, help="concept-head words shown per image")
        p.add_argument("--gradcam", action="store_true",
                       help="overlay the Grad-CAM of each image's top concept through the student's concept head "
                            "(the appendix's Fig. 2)")

    def draw(self, model, cfg, tokenizer, args, device) -> str:
        pictures, images, captions = first_pairs(cfg, args, device)
        rows = pseudo_label_rows(model, tokenizer, images, captions, cfg.model.text.max_len, args.top)
        p = cfg.method.simla.psl
        cams = None
        if args.gradcam:
            top = torch.tensor([r["predicted_ids"][0] for r in rows], device=device)
            cams = concept_gradcam(model, images, top)
        out = save_pseudo_labels(pictures, rows, args.out, cams=cams,
                                 title=f"PSL keywords (k={p.k}, {p.attention} attention, heads {p.heads})"
                                 + ("; Grad-CAM of the top concept" if cams is not None else ""))
        lines = [f"wrote {out}"] + [f'  "{r["caption"]}": keywords {", ".join(r["keywords"])}; concept head '
                                    + ", ".join(w for w, _ in r["predicted"]) for r in rows]
        return "\n".join(lines)

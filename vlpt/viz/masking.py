"""SemMIM's text-guided masking as a picture (Sec. 3.2.2): per image-caption pair the image, its caption, the
text-guided mask (patches drawn with probabilities softmax(patch-text similarity / tau)) over the similarity map, and
a random mask of the same ratio; `vlpt visualize masking`."""
from __future__ import annotations

from pathlib import Path

import torch

from vlpt.viz.registry import Visualization, add_pair_arguments, first_pairs, register, require
from vlpt.viz.figures import quoted, save_figure, show


@torch.no_grad()
def masking_rows(model, tokenizer, images: torch.Tensor, captions: list[str], max_len: int, step: int = 0) -> dict:
    """Similarity (B,g,g) of each patch to its caption (the momentum model's, as the method masks), the text-guided
    and the random masks (B,g,g) bool, and the mean similarity of the patches each masks."""
    require(model, "masking")
    ids, mask = tokenizer(captions, max_len)
    ids, mask = ids.to(images.device), mask.to(images.device)
    tokens, _ = model.encode_image(images, teacher=True)
    _, text = model.encode_text(ids, mask, teacher=True)
    patches = torch.nn.functional.normalize(model.teacher["vision_proj"](tokens[:, 1:]).float(), dim=-1)
    sim = torch.einsum("bnd,bd->bn", patches, text.float())
    guided = model.draw_patch_mask(tokens[:, 1:], text, step, masking="text")
    random = model.draw_patch_mask(tokens[:, 1:], text, step, masking="random")
    grid = model.backbone.vision.grid
    mean = lambda m: float((sim * m).sum() / m.sum().clamp(min=1))  # noqa: E731
    return {"similarity": sim.view(-1, *grid).cpu(), "guided": guided.view(-1, *grid).cpu(),
            "random": random.view(-1, *grid).cpu(), "guided_sim": mean(guided), "random_sim": mean(random),
            "all_sim": float(sim.mean())}


def save_masking(pictures, captions: list[str], rows: dict, out: str | Path, title: str = "") -> Path:
    """One PNG: a row per pair, columns image (caption below), patch-text similarity with the text-guided mask
    hatched, and the random mask of the same ratio."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(captions)
    fig, axes = plt.subplots(n, 3, figsize=(9.0, 3.5 * n), squeeze=False)
    for i, (picture, caption) in enumerate(zip(pictures, captions)):
        width, height = picture.size
        image = np.asarray(picture.convert("RGB"))
        extent = (-0.5, width - 0.5, height - 0.5, -0.5)  # the image's own pixel edges
        for j, (name, mask) in enumerate((("", None), ("text-guided", rows["guided"][i]),
                                          ("random", rows["random"][i]))):
            ax = axes[i, j]
            show(ax, image, quoted(caption, 36) if mask is None else "")
            if mask is not None:
                gh, gw = mask.shape
                label = f"{name} mask: {int(mask.sum())} of {gh * gw} patches (dark)"
                if j == 1:  # the similarity map under the text-guided mask
                    ax.imshow(rows["similarity"][i].numpy(), cmap="viridis", alpha=0.45, extent=extent,
                              interpolation="nearest")
                    label += "\nover the patch-text similarity (yellow: high)"
                shade = np.zeros((gh, gw, 4))
                shade[mask.numpy()] = (0.0, 0.0, 0.0, 0.75)
                ax.imshow(shade, extent=extent, interpolation="nearest")
                ax.set_title(label, fontsize=8)
    return save_figure(fig, out, title, dpi=110, title_size=9)


@register("masking")
class Masking(Visualization):
    capability = "masking"
    help = "SemMIM masking: image, caption, text-guided mask over the patch-text similarity, random mask of the same ratio"
    out = "masking.png"

    def arguments(self, p) -> None:
        add_pair_arguments(p, n=4)
        p.add_argument("--seed", type=int, default=0, help="step index of the masks' noise")

    def draw(self, model, cfg, tokenizer, args, device) -> str:
        pictures, images, captions = first_pairs(cfg, args, device)
        rows = masking_rows(model, tokenizer, images, captions, cfg.model.text.max_len, args.seed)
        s = cfg.method.semmim
        out = save_masking(pictures, captions, rows, args.out,
                           title=f"SemMIM masking, ratio {s.mask_ratio:g}: text-guided vs random")
        return (f"wrote {out}; mean patch-text similarity of masked patches: text-guided {rows['guided_sim']:.3f}, "
                f"random {rows['random_sim']:.3f} (all patches {rows['all_sim']:.3f})")

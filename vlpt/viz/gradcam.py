"""Grad-CAM on a fusion layer's cross-attention (ALBEF Sec. 6.4, its Grounding.py): the attention probabilities of
the text tokens over the image patches, times the positive part of their gradient of the ITM match logit, averaged
over heads; per text token, or averaged over the caption's tokens (padding excluded). Any method with a fusion
encoder whose ITM logit reads it (ALBEF, CODIS, CB-ViLA, MaskVLM)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from vlpt.errors import VlptError
from vlpt.models.text import capture_attention
from vlpt.viz.figures import save_figure, show


def gradcam(method, image_tokens: torch.Tensor, text_hidden: torch.Tensor, text_mask: torch.Tensor,
            layer: int = -1) -> torch.Tensor:
    """(B,L,g,g) maps over the g x g patch grid for every text token (0 at padding), from the cross-attention of
    fusion layer `layer` (Python indexing: -1 the last; ALBEF's 3rd of 6 is 2)."""
    layers = len(method.backbone.fusion.layers)
    if not -layers <= layer < layers:
        raise VlptError(f"fusion layer {layer} (task.layer, --layer): the fusion encoder has {layers} layers "
                        f"(0..{layers - 1}, or -1 for the last)")
    attention = method.backbone.fusion.layers[layer].cross
    with torch.enable_grad(), capture_attention(attention):
        logit = method.itm_logits(image_tokens, text_hidden, text_mask)[:, 1]
        probs = attention.probs
        (grad,) = torch.autograd.grad(logit.sum(), probs)
    cam = (probs.detach() * grad.clamp(min=0)).mean(1)[..., 1:]  # heads averaged; image [CLS] dropped: (B,L,N)
    cam = cam * text_mask[..., None].to(cam.dtype)
    grid = math.isqrt(cam.shape[-1])
    return cam.view(*cam.shape[:2], grid, grid)


def caption_map(cams: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """(B,g,g): the per-token maps averaged over each caption's real tokens."""
    return cams.sum(1) / text_mask.sum(1).clamp(min=1)[:, None, None].to(cams.dtype)


def upsample(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B,g,g) -> (B,height,width), bicubic as ALBEF's Grounding.py, negatives from the interpolation clipped."""
    return torch.nn.functional.interpolate(maps[:, None].float(), size=(height, width), mode="bicubic",
                                           align_corners=False)[:, 0].clamp(min=0)


def save_gradcam(picture, words: list[str], cams: torch.Tensor, average: torch.Tensor, out: str | Path,
                 title: str = "") -> Path:
    """One PNG: the image (a PIL image), then the averaged map (g,g) and one map per word (L,g,g), each over it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("image", None), ("average", average), *zip(words, cams)]
    cols = min(len(panels), 6)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.6 * rows + 0.3), squeeze=False)
    width, height = picture.size
    picture = np.asarray(picture)
    for ax, (name, cam) in zip(axes.flat, panels):
        show(ax, picture, name, size=9)
        if cam is not None:
            ax.imshow(upsample(cam[None].detach().cpu(), height, width)[0].numpy(), cmap="jet", alpha=0.5)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return save_figure(fig, out, title)

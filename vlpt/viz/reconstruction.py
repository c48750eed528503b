"""MaskVLM masked image reconstruction as a picture: original | masked | reconstructed, one row per image-text pair,
the conditioning caption under it.

The reconstruction is conditioned on the unmasked caption (MaskVLM Eq. 1, phi_im(I_m, T)); masked patches show the
prediction and visible ones the original (SimMIM's convention).
"""
from __future__ import annotations

from pathlib import Path

import torch

from vlpt.data.annotations import load_annotations, load_image
from vlpt.data.transforms import denormalize, image_transform
from vlpt.objectives.masked_image import patchify, unpatchify
from vlpt.viz.figures import quoted, save_figure, show
from vlpt.viz.registry import require


@torch.no_grad()
def reconstruct_pairs(model, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, seed: int = 0):
    """(original, masked, reconstructed) normalised images (B,3,H,W) and the patch mask (B,N) from a MaskVLM model
    in eval mode."""
    v = model.cfg.model.vision
    grid = model.backbone.vision.grid
    patch_mask = model.image_mask(len(images), seed, images.device)  # the training masks' rule, `seed` as the step
    tokens = model.encode_image(images, patch_mask=patch_mask)[0]
    hidden = model.encode_text(ids, mask)[0]
    pred = model.reconstruct(tokens, hidden, mask).float()
    target = patchify(images, v.patch_size)
    keep = patch_mask[..., None]
    masked = unpatchify(torch.where(keep, torch.zeros_like(target), target), v.patch_size, grid)
    recon = unpatchify(torch.where(keep, pred, target), v.patch_size, grid)
    return images, masked, recon, patch_mask


def masked_error(pred: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """(B,) sums of |pred - target| over each image's masked pixels, from patchified (B,N,P,3) images and the patch
    mask (B,N)."""
    return ((pred - target).abs() * hidden[..., None, None].float()).sum((1, 2, 3))


def save_reconstructions(model, tokenizer, annotation: str | Path, root: str | Path, out: str | Path, *,
                         image_size: int, max_len: int, n: int = 8, seed: int = 0, device="cpu"
                         ) -> tuple[Path, list[dict]]:
    """Reconstruct the first `n` pairs of a pretraining annotation file and save a PNG at `out`: a row per pair,
    columns original, masked and reconstructed (headed, with the masked patches and the masked-pixel L1), the
    caption that conditioned the reconstruction under the row. Returns the path and each row's caption, masked
    patches and L1."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    require(model, "reconstruction")
    records = load_annotations(annotation, "pretrain")[:n]
    transform = image_transform(image_size)
    images = torch.stack([transform(load_image(Path(root) / r["image"])) for r in records]).to(device)
    captions = [r["caption"][0] if isinstance(r["caption"], list) else r["caption"] for r in records]
    ids, mask = tokenizer(captions, max_len)
    original, masked, recon, hidden = reconstruct_pairs(model, images, ids.to(device), mask.to(device), seed)
    patch = model.cfg.model.vision.patch_size
    l1 = masked_error(patchify(recon, patch).unflatten(-1, (-1, 3)), patchify(original, patch).unflatten(-1, (-1, 3)),
                      hidden) / (hidden.sum(1) * patch * patch * 3).clamp(min=1)
    rows = [{"caption": c, "masked": int(h.sum()), "patches": h.numel(), "l1": float(e)}
            for c, h, e in zip(captions, hidden, l1)]
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 3.2 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        titles = ["original", f"masked ({row['masked']} of {row['patches']} patches)",
                  f"reconstructed (masked-pixel L1 {row['l1']:.3f})"]
        for j, (picture, title) in enumerate(zip((original, masked, recon), titles)):
            show(axes[i, j], denormalize(picture[i].cpu()), title,
                 below="conditioned on " + quoted(row["caption"], 60) if j == 1 else "")
    out = save_figure(fig, out, "MaskVLM reconstruction: masked patches predicted from the visible ones and the "
                      "caption,\nvisible patches shown as they are (L1 in normalised pixel space)", dpi=110)
    return out, rows


@torch.no_grad()
def masked_l1(model, tokenizer, annotation: str | Path, root: str | Path, *, image_size: int, max_len: int,
              batch_size: int = 64, seed: int = 0, device="cpu") -> dict[str, float]:
    """Mean L1 over masked pixels (normalised space) of every image of a split: the model's reconstruction from the
    masked image and its first caption, against predicting each image's mean visible colour."""
    records = load_annotations(annotation, "pretrain")
    transform = image_transform(image_size)
    patch = model.cfg.model.vision.patch_size
    errors, count = {"model": 0.0, "mean_colour": 0.0}, 0
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        images = torch.stack([transform(load_image(Path(root) / r["image"])) for r in chunk]).to(device)
        ids, mask = tokenizer([r["caption"][0] if isinstance(r["caption"], list) else r["caption"] for r in chunk],
                              max_len)
        original, _, recon, hidden = reconstruct_pairs(model, images, ids.to(device), mask.to(device), seed + start)
        b, n = hidden.shape
        target = patchify(original, patch).view(b, n, patch * patch, 3)
        pred = patchify(recon, patch).view(b, n, patch * patch, 3)
        visible = (~hidden)[..., None, None].float()
        colour = (target * visible).sum((1, 2), keepdim=True) / (visible.sum((1, 2), keepdim=True) * patch * patch)
        errors["model"] += masked_error(pred, target, hidden).sum().item()
        errors["mean_colour"] += masked_error(colour.expand_as(target), target, hidden).sum().item()
        count += int(hidden.sum()) * patch * patch * 3
    return {name: total / max(count, 1) for name, total in errors.items()}

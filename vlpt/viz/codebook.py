"""A visual codebook (CB-ViLA) on a split's images: how many codewords its patches use, and Fig. 3's picture of the
patches that a sample of codewords stand for."""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from vlpt.data.annotations import load_image
from vlpt.data.transforms import denormalize, image_transform
from vlpt.objectives.masked_image import patchify
from vlpt.viz.figures import save_figure, show
from vlpt.viz.registry import require
from vlpt.data.loader import ImageFiles


@torch.no_grad()
def assign_codewords(model, paths: list[Path], *, image_size: int, batch_size: int = 256, device="cpu",
                     num_workers: int = 0) -> torch.Tensor:
    """The nearest codeword of every patch of every image (M,N), on the CPU."""
    require(model, "codebook")
    loader = DataLoader(ImageFiles(paths, image_transform(image_size)), batch_size=batch_size, num_workers=num_workers)
    indices = []
    for pixels in tqdm(loader, desc="codewords", disable=None, leave=False):
        indices.append(model.quantize(model.encode_image(pixels.to(device))[0])[1].indices.cpu())
    return torch.cat(indices)


def usage(indices: torch.Tensor, size: int) -> dict[str, float]:
    """Codewords used by any patch, that number as a fraction of the codebook, and the assignment perplexity."""
    counts = torch.bincount(indices.flatten(), minlength=size).double()
    p = counts / counts.sum()
    perplexity = torch.exp(-(p * p.clamp_min(1e-12).log()).sum())
    used = int((counts > 0).sum())
    return {"codebook_used": used, "codebook_used_fraction": used / size, "codebook_perplexity": float(perplexity)}


def save_codebook_grid(model, paths: list[Path], out: str | Path, *, image_size: int, codewords: int = 8,
                       patches: int = 10, seed: int = 0, batch_size: int = 256, device="cpu",
                       num_workers: int = 0) -> tuple[Path, list[int], dict[str, float]]:
    """CB-ViLA Fig. 3: `codewords` codewords drawn at random among those in use, one row each (labelled with its
    id and how many of the patches it stands for), showing up to `patches` randomly drawn image patches quantised to
    it, each headed by its image's file. Returns the PNG path, the codewords (rows, top to bottom) and the usage
    over `paths`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    indices = assign_codewords(model, paths, image_size=image_size, batch_size=batch_size, device=device,
                               num_workers=num_workers)
    size = len(model.quantizer.codewords)
    gen = torch.Generator().manual_seed(seed)
    in_use = torch.unique(indices)
    rows = in_use[torch.randperm(len(in_use), generator=gen)[:codewords]].sort().values.tolist()
    p = model.cfg.model.vision.patch_size
    transform = image_transform(image_size)

    @functools.cache
    def image_patches(image: int) -> torch.Tensor:  # an image is read once however many of its patches are shown
        return patchify(denormalize(transform(load_image(paths[image])))[None], p)[0]

    fig, axes = plt.subplots(len(rows), patches, figsize=(1.0 * patches + 1.2, 1.15 * len(rows) + 0.8),
                             squeeze=False)
    for row, code in enumerate(rows):
        where = (indices == code).nonzero()
        for col, (image, patch) in enumerate(where[torch.randperm(len(where), generator=gen)[:patches]].tolist()):
            show(axes[row, col], image_patches(image)[patch].view(p, p, 3).permute(2, 0, 1), Path(paths[image]).stem, size=6)
        for ax in axes[row, len(where):]:
            ax.axis("off")
        axes[row, 0].set_ylabel(f"codeword {code}\n{len(where)} patch{'' if len(where) == 1 else 'es'}",
                                fontsize=8, rotation=0, ha="right", va="center")
    used = usage(indices, size)
    out = save_figure(fig, out, f"CB-ViLA codebook: patches of {len(paths)} images quantised to {len(rows)} "
                      f"codewords drawn at random (row: codeword id, patches it stands for; tile: its image)\n"
                      f"{used['codebook_used']} of {size} codewords in use, perplexity "
                      f"{used['codebook_perplexity']:.1f}", dpi=110, title_size=9)
    return out, rows, used

"""A visual codebook (CB-ViLA) on a split's images: how many codewords its patches use, and Fig. 3's picture of the
patches that a sample of codewords stand for."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from vlpt.data.annotations import load_image
from vlpt.data.transforms import denormalize, image_transform
from vlpt.objectives.masked_image import patchify
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
    """CB-ViLA Fig. 3: `codewords` codewords drawn at random among those in use, one row each, showing up to `patches`
    randomly drawn image patches quantised to it. Returns the PNG path, the codewords (rows, top to bottom) and the
    usage over `paths`."""
    from torchvision.utils import save_image

    indices = assign_codewords(model, paths, image_size=image_size, batch_size=batch_size, device=device,
                               num_workers=num_workers)
    size = len(model.quantizer.codewords)
    gen = torch.Generator().manual_seed(seed)
    in_use = torch.unique(indices)
    rows = in_use[torch.randperm(len(in_use), generator=gen)[:codewords]].sort().values.tolist()
    picks = []  # (row, image, patch)
    for row, code in enumerate(rows):
        where = (indices == code).nonzero()
        for image, patch in where[torch.randperm(len(where), generator=gen)[:patches]].tolist():
            picks.append((row, image, patch))
    p = model.cfg.model.vision.patch_size
    scale = max(1, 48 // p)  # small patches are enlarged (nearest neighbour) so they can be seen
    tiles = torch.ones(len(rows) * patches, 3, p * scale, p * scale)
    column = [0] * len(rows)
    transform = image_transform(image_size)
    for image in sorted({i for _, i, _ in picks}):
        pixels = patchify(denormalize(transform(load_image(paths[image])))[None], p)[0]
        for row, _, patch in (pick for pick in picks if pick[1] == image):
            tile = pixels[patch].view(p, p, 3).permute(2, 0, 1)[None]
            tiles[row * patches + column[row]] = F.interpolate(tile, scale_factor=scale, mode="nearest")[0]
            column[row] += 1
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(tiles, out, nrow=patches, padding=2, pad_value=1.0)
    return out, rows, usage(indices, size)

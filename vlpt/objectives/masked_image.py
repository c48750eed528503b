"""Image reconstruction objectives: masked pixels (MaskVLM Eq. 1, MIM term; SimMIM's L1 on masked patches), all
pixels (CB-ViLA Eq. 3, pixel term) and masked codeword indices (CB-ViLA Eq. 4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def patchify(image: torch.Tensor, patch: int) -> torch.Tensor:
    """(B,3,H,W) -> (B,N,patch*patch*3), patches in the ViT's row-major order, each flattened (row, column, channel)."""
    b, c, h, w = image.shape
    x = image.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`: (B,N,patch*patch*C) -> (B,C,H,W)."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * patch, gw * patch)


def mim_loss(pred: torch.Tensor, target: torch.Tensor, patch_mask: torch.Tensor,
             normalizer: torch.Tensor | None = None) -> torch.Tensor:
    """MaskVLM Eq. 1 (MIM): ||I^M - phi_im^M(I_m, T)||_1 / Omega(I^M), summed over masked pixel values only and divided
    by their number (masked patches x patch*patch*3).

    pred, target (B,N,P) in the target's (normalised) pixel space; patch_mask (B,N) bool, True = masked.
    `normalizer` replaces the masked patch count (under DDP the mean count over ranks).
    """
    mask = patch_mask[..., None].to(pred.dtype)
    error = ((pred.float() - target.float()).abs() * mask.float()).sum()
    count = patch_mask.sum() if normalizer is None else normalizer
    return error / (count.clamp(min=1) * pred.shape[-1])


def pixel_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CB-ViLA Eq. 3, first term: -log p(x | z_q(x), l) for a unit-variance Gaussian decoder, up to constants: the
    mean squared error over every patch pixel. pred, target (B,N,P) in the target's (normalised) pixel space."""
    return F.mse_loss(pred.float(), target.float())


def codeword_mim_loss(logits: torch.Tensor, targets: torch.Tensor, patch_mask: torch.Tensor,
                      normalizer: torch.Tensor | None = None) -> torch.Tensor:
    """CB-ViLA Eq. 4: -log p(q(V) | l(T), z_q(V^)), the cross-entropy of each masked token's codeword index q(V).

    logits (B,N,K); targets (B,N) long, the full image's nearest-codeword indices; patch_mask (B,N) bool, True = masked.
    The sum over masked tokens is divided by their count, or by `normalizer` (under DDP the mean count over ranks).
    """
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    count = patch_mask.sum() if normalizer is None else normalizer
    return (losses * patch_mask.flatten().float()).sum() / count.clamp(min=1)

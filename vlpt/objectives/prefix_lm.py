"""Prefix language modeling (SemMIM Sec. 3.2.3, L_plm; PALM / mPLUG): a caption split into a prefix T^p, read by the
text and fusion encoders with the image, and a suffix T^s that a causal decoder predicts from their states."""
from __future__ import annotations

import torch


def split_points(mask: torch.Tensor, rule: str, ratio: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Words (B,) of each caption that go to the prefix. A caption is [CLS] w_1..w_k [SEP] (mask's sum k + 2);
    `random`: floor(u k), u uniform in [0, 1) from `noise` (B,); `ratio`: floor(ratio k). Capped at k - 1, so the
    suffix keeps at least one word (0 for an empty caption)."""
    words = (mask.sum(1) - 2).clamp(min=0)
    share = noise if rule == "random" else torch.full(words.shape, ratio, device=mask.device)
    return torch.minimum((share * words).floor().long(), (words - 1).clamp(min=0))


def split_caption(ids: torch.Tensor, mask: torch.Tensor, prefix_words: torch.Tensor):
    """(prefix ids, prefix mask, suffix ids, suffix mask), each (B,L) like `ids`: the prefix [CLS] w_1..w_p [SEP] and
    the suffix [CLS] w_p+1..w_k [SEP] (the [CLS] as the decoder's start token, never predicted), padded with 0."""
    b, length = ids.shape
    pos = torch.arange(length, device=ids.device)[None].expand(b, -1)
    n = mask.sum(1, keepdim=True)
    p = prefix_words[:, None]
    sep = ids.gather(1, (n - 1).clamp(min=0))
    prefix = torch.where(pos <= p, ids, torch.where(pos == p + 1, sep, 0))
    prefix_mask = (pos <= p + 1).long()
    source = (pos + p).clamp(max=length - 1)  # suffix position j >= 1 reads caption position p + j
    suffix = torch.where(pos == 0, ids[:, :1], ids.gather(1, source))
    suffix_mask = (pos < n - p).long()
    return prefix * prefix_mask, prefix_mask, suffix * suffix_mask, suffix_mask


def plm_loss(sequence_losses: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """L_plm: the decoder's summed cross entropy of the suffix tokens (`Decoder.token_losses(ignore_first=1)`, the
    start token not predicted) over their number (under DDP the mean count over ranks)."""
    return sequence_losses.sum() / count.clamp(min=1)

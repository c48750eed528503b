"""Text masking for MLM (BERT, ALBEF Sec. 3.1)."""
from __future__ import annotations

import torch

IGNORE = -100


def mask_tokens(ids: torch.Tensor, probability: float, mask_id: int, vocab_size: int, special_ids: list[int],
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick `probability` of non-special tokens; of those 80 % -> [MASK], 10 % random, 10 % kept.

    Returns (masked ids, labels) with labels = IGNORE where nothing is predicted.
    """
    pick = torch.rand(ids.shape, generator=generator) < probability
    pick &= ~torch.isin(ids, torch.tensor(special_ids, dtype=ids.dtype))
    labels = torch.where(pick, ids, IGNORE)
    roll = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, dtype=ids.dtype)
    masked = torch.where(pick & (roll < 0.8), mask_id, ids)
    masked = torch.where(pick & (roll >= 0.8) & (roll < 0.9), random_ids, masked)
    return masked, labels

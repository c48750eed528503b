"""Attribute-swapped captions: ITM negatives that differ from their caption only in which object carries which
attribute (NegCLIP, Yuksekgonul et al. 2023, Sec. 4, swapped-attribute negatives; issue 13: ALBEF's hard negatives
on the embedded data never differ from the positive that way, so its fusion encoder never learned binding)."""
from __future__ import annotations

import re

import torch

WORD = re.compile(r"[A-Za-z]+")


def check_groups(groups) -> list[frozenset[str]]:
    """Word groups as lower-case sets; a group of fewer than two distinct words can swap nothing."""
    out = [frozenset(w.lower() for w in g) for g in groups]
    for g, raw in zip(out, groups):
        if len(g) < 2:
            raise ValueError(f"a swap group needs at least two distinct words, got {list(raw)}")
    return out


def swap_attributes(caption: str, groups: list[frozenset[str]], gen: torch.Generator) -> str | None:
    """`caption` with two distinct words of one group exchanged everywhere they occur ("a red star and a blue
    circle" -> "a blue star and a red circle"), the group and the pair drawn from `gen` among those the caption
    has; None when no group has two distinct words in it."""
    words = [m.group().lower() for m in WORD.finditer(caption)]
    present = [sorted({w for w in words if w in g}, key=words.index) for g in groups]
    present = [p for p in present if len(p) >= 2]
    if not present:
        return None
    group = present[int(torch.randint(len(present), (1,), generator=gen))]
    a, b = (group[i] for i in torch.randperm(len(group), generator=gen)[:2].tolist())
    swap = {a: b, b: a}
    return WORD.sub(lambda m: _cased(swap[m.group().lower()], m.group()) if m.group().lower() in swap else m.group(),
                    caption)


def _cased(word: str, like: str) -> str:
    return word.capitalize() if like[:1].isupper() else word

"""Batches: the one module that knows the batch keys. `Collate` turns samples into a batch with what the method
declared it needs (`Method.batch_needs`), `merge` joins collated parts of one batch (shard lanes) by the same pad
rules, and `synthetic_batches` makes batches of the same layout without data (benchmarks).

Keys: image (B,3,H,W), text_ids / text_mask (B,L), image_id (B,), skipped (a count), label (B,) when the samples
have one (a task's class index); with `mlm`: mlm_ids,
mlm_labels (B,L; IGNORE where nothing is predicted) and mlm_positions (M,: the masked tokens' indices in the
flattened text, found on the host so the step need not wait for the device); with `swap`: swap_ids / swap_mask
(B,L: each caption with two attribute words exchanged, `data/swaps.py`, padded with the text to one width) and
swap_valid (B,: False where the caption had nothing to swap; its swap_ids repeat the caption); with `image_view2`:
image_view2 (B,3,H,W), a second augmented view of each image (the dataset draws it: `loader.PairDataset(view2=...)`).
With answers in the samples (VQA): answer_ids / answer_mask (A,L: every sample's answers in turn), answer_weight
(A,: each answer's share of its question's annotators) and answer_owner (A,: the row of its question).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlpt.data.masking import IGNORE, mask_tokens, masked_positions
from vlpt.data.swaps import check_groups, swap_attributes
from vlpt.data.tokenizer import SPECIALS, Tokenizer
from vlpt.engine import rng

NEEDS = frozenset({"mlm", "swap", "image_view2"})  # what a method may ask for beyond image, text and image_id


def pad_values(pad_id: int) -> dict[str, int]:
    """The value each text-shaped key is padded with."""
    return {"text_ids": pad_id, "text_mask": 0, "mlm_ids": pad_id, "mlm_labels": IGNORE, "swap_ids": pad_id,
            "swap_mask": 0, "answer_ids": pad_id, "answer_mask": 0}


def check_needs(needs) -> set[str]:
    unknown = set(needs) - NEEDS
    if unknown:
        raise ValueError(f"the data pipeline cannot provide {sorted(unknown)} (it knows {sorted(NEEDS)})")
    return set(needs)


class Collate:
    """Stack images, tokenise texts, and (with `mlm` in `needs`) add masked ids and labels seeded per sample, (with
`swap`) attribute-swapped captions from the word groups `swap_words`, drawn per sample.

    Texts are padded to the batch's longest (a multiple of 8), or to `max_len` with `fixed` (under DDP, where ranks
    gather each other's texts). Masks are drawn over each text's own tokens, so padding never changes them.
    """

    def __init__(self, tokenizer: Tokenizer, max_len: int, needs=(), seed: int = 0, fixed: bool = False,
                 mlm_probability: float = 0.15, mask_only: bool = False, swap_words=()):
        self.tokenizer, self.max_len, self.needs, self.seed = tokenizer, max_len, check_needs(needs), seed
        self.fixed, self.mlm_probability, self.mask_only = fixed, mlm_probability, mask_only
        self.swap_words = check_groups(swap_words)
        if "swap" in self.needs and not self.swap_words:
            raise ValueError("swapped captions need word groups to swap (swap_words)")

    def __call__(self, samples: list[dict]) -> dict:
        texts = [s["text"] for s in samples]
        if "swap" in self.needs:
            swaps = [swap_attributes(s["text"], self.swap_words, rng.generator("itm_swap", self.seed, s["draw"]))
                     for s in samples]
            both, both_mask = self.tokenizer(texts + [w or t for w, t in zip(swaps, texts)], self.max_len, self.fixed)
            (ids, swap_ids), (mask, swap_mask) = both.chunk(2), both_mask.chunk(2)
        else:
            ids, mask = self.tokenizer(texts, self.max_len, self.fixed)
        batch = {"image": torch.stack([s["image"] for s in samples]), "text_ids": ids, "text_mask": mask,
                 "image_id": torch.tensor([s["image_id"] for s in samples]),
                 "skipped": torch.tensor(sum(s["skipped"] for s in samples))}
        if "image_view2" in self.needs:
            batch["image_view2"] = torch.stack([s["image_view2"] for s in samples])
        if "label" in samples[0]:
            batch["label"] = torch.tensor([s["label"] for s in samples])
        if "answers" in samples[0]:
            answers = [a for s in samples for a in s["answers"]]
            batch["answer_ids"], batch["answer_mask"] = self.tokenizer(answers, self.max_len, False)
            batch["answer_weight"] = torch.tensor([w for s in samples for w in s["weights"]], dtype=torch.float)
            batch["answer_owner"] = torch.tensor([row for row, s in enumerate(samples) for _ in s["answers"]])
        if "swap" in self.needs:
            batch.update(swap_ids=swap_ids, swap_mask=swap_mask, swap_valid=torch.tensor([w is not None for w in swaps]))
        if "mlm" in self.needs:
            batch["mlm_ids"], batch["mlm_labels"] = ids.clone(), torch.full_like(ids, IGNORE)
            t = self.tokenizer
            for row, (n, s) in enumerate(zip(mask.sum(1).tolist(), samples)):
                gen = rng.generator("mlm_mask", self.seed, s["draw"])
                batch["mlm_ids"][row, :n], batch["mlm_labels"][row, :n] = mask_tokens(
                    ids[row, :n], self.mlm_probability, t.mask_id, t.vocab_size, t.special_ids, gen, self.mask_only)
            batch["mlm_positions"] = masked_positions(batch["mlm_labels"])
        return batch


def merge(pieces: list[dict], pad_id: int, pin: bool = False) -> dict:
    """Join collated parts of one batch in order, texts padded to the longest: equal to collating the whole batch
    at once (tested). Per-sample tensors are joined along rows, counters summed, and `mlm_positions` recomputed; any
    other key is an error, to be taught here."""
    if len(pieces) == 1:
        return pieces[0]
    rows = [p["image"].shape[0] for p in pieces]
    width = max(p["text_ids"].shape[1] for p in pieces)
    pad = pad_values(pad_id)
    batch = {}
    for key, first in pieces[0].items():
        if key == "skipped":
            batch[key] = sum(p[key] for p in pieces)
        elif key == "mlm_positions":
            continue
        elif key.startswith("answer_"):  # one row per answer, not per sample: owners move by the rows before
            offsets = [sum(rows[:i]) for i in range(len(pieces))]
            longest = max(p["answer_ids"].shape[1] for p in pieces)
            batch[key] = torch.cat([p[key] + o if key == "answer_owner" else
                                    F.pad(p[key], (0, longest - p[key].shape[1]), value=pad[key]) if key in pad
                                    else p[key] for p, o in zip(pieces, offsets)])
        elif first.ndim >= 1 and all(p[key].shape[0] == n for p, n in zip(pieces, rows)):
            parts = [F.pad(p[key], (0, width - p[key].shape[1]), value=pad[key]) if key in pad else p[key]
                     for p in pieces]
            out = None
            if pin:  # one copy, into pinned memory
                out = torch.empty((sum(rows), *parts[0].shape[1:]), dtype=first.dtype, pin_memory=True)
            batch[key] = torch.cat(parts, out=out)
        else:
            raise ValueError(f"collate.merge does not know how to join the batch key {key!r}")
    if "mlm_positions" in pieces[0]:
        batch["mlm_positions"] = masked_positions(batch["mlm_labels"])
    return batch


def synthetic_batches(image_size: int, max_len: int, batch_size: int, vocab_size: int, n: int, needs=(),
                      mlm_probability: float = 0.15, pin: bool = False, seed: int = 0):
    """Endless batches of the pipeline's layout cycling over `n` pre-made ones of random pixels and token ids, for
    benchmarks; image ids are fresh every batch (distinct, as in a large data set, so the ITC queue holds no false
    positives). Captions are 25 %..100 % of max_len long."""
    gen = torch.Generator().manual_seed(seed)
    special = {name: i for i, name in enumerate(SPECIALS)}  # a vlpt vocab file begins with the special tokens
    specials = sorted(special.values())
    made = []
    for _ in range(n):
        lengths = torch.randint(max(3, max_len // 4), max_len + 1, (batch_size,), generator=gen)
        positions = torch.arange(max_len)[None]
        mask = (positions < lengths[:, None]).long()
        ids = torch.randint(len(specials), vocab_size, (batch_size, max_len), generator=gen)
        ids[:, 0] = special["[CLS]"]
        ids[positions.expand(batch_size, -1) == (lengths - 1)[:, None]] = special["[SEP]"]
        ids[mask == 0] = special["[PAD]"]
        batch = {"image": torch.randn(batch_size, 3, image_size, image_size, generator=gen), "text_ids": ids,
                 "text_mask": mask, "skipped": torch.tensor(0)}
        if "mlm" in check_needs(needs):
            batch["mlm_ids"], batch["mlm_labels"] = mask_tokens(ids, mlm_probability, special["[MASK]"], vocab_size,
                                                                specials, gen)
            batch["mlm_positions"] = masked_positions(batch["mlm_labels"])
        if "image_view2" in needs:
            batch["image_view2"] = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
        if pin:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        made.append(batch)
    i = 0
    while True:
        yield {**made[i % n], "image_id": torch.arange(i * batch_size, (i + 1) * batch_size)}
        i += 1

"""Image-text pairs for pretraining: a dataset that tokenises and masks in workers, and a resumable sampler."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from vlpt.data.annotations import ImageError, load_annotations, load_image
from vlpt.data.masking import IGNORE, mask_tokens, masked_positions
from vlpt.data.tokenizer import Tokenizer
from vlpt.data.transforms import image_transform


class PairDataset(Dataset):
    """Records {image, caption[, image_id]} -> {image, text, image_id}; keys are (index, draw) from the sampler.

    `draw` (the sample's position in the whole run) seeds its MLM mask, so masks are the same whatever the
    number of ranks or workers, and after a resume. With `skip_bad`, an unreadable image is replaced by the
    next record's and counted in `skipped`; otherwise it raises ImageError naming the file.
    """

    def __init__(self, records: list[dict], root: str | Path, transform, skip_bad: bool = False):
        self.records, self.root, self.transform, self.skip_bad = records, Path(root), transform, skip_bad
        ids = {path: i for i, path in enumerate(dict.fromkeys(r["image"] for r in records))}
        self.image_ids = [int(r.get("image_id", ids[r["image"]])) for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key):
        index, draw = key if isinstance(key, tuple) else (key, key)
        for skipped in range(len(self.records)):
            i = (index + skipped) % len(self.records)
            record = self.records[i]
            try:
                image = load_image(self.root / record["image"])
            except ImageError:
                if not self.skip_bad:
                    raise
                continue
            caption = record["caption"]
            if isinstance(caption, list):
                caption = caption[draw % len(caption)]
            return {"image": self.transform(image), "text": caption, "image_id": self.image_ids[i],
                    "draw": draw, "skipped": skipped}
        raise ImageError(f"no readable image among the {len(self.records)} records under {self.root}")


class Collate:
    """Stack images, tokenise texts, and (with `mlm_probability`) add masked ids and labels seeded per sample.

    Texts are padded to the batch's longest (a multiple of 8), or to `max_len` with `fixed` (under DDP, where ranks
    gather each other's texts). Masks are drawn over each text's own tokens, so padding never changes them.
    """

    def __init__(self, tokenizer: Tokenizer, max_len: int, mlm_probability: float = 0.0, seed: int = 0,
                 fixed: bool = False, mask_only: bool = False):
        self.tokenizer, self.max_len, self.mlm_probability, self.seed = tokenizer, max_len, mlm_probability, seed
        self.fixed, self.mask_only = fixed, mask_only

    def __call__(self, samples: list[dict]) -> dict:
        ids, mask = self.tokenizer([s["text"] for s in samples], self.max_len, self.fixed)
        batch = {"image": torch.stack([s["image"] for s in samples]), "text_ids": ids, "text_mask": mask,
                 "image_id": torch.tensor([s["image_id"] for s in samples]),
                 "skipped": torch.tensor(sum(s["skipped"] for s in samples))}
        if self.mlm_probability > 0:
            batch["mlm_ids"], batch["mlm_labels"] = ids.clone(), torch.full_like(ids, IGNORE)
            for row, (n, s) in enumerate(zip(mask.sum(1).tolist(), samples)):
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + s["draw"])
                t = self.tokenizer
                batch["mlm_ids"][row, :n], batch["mlm_labels"][row, :n] = mask_tokens(
                    ids[row, :n], self.mlm_probability, t.mask_id, t.vocab_size, t.special_ids, gen, self.mask_only)
            # the masked tokens' indices in the flattened text, found here so the step need not wait for the device
            batch["mlm_positions"] = masked_positions(batch["mlm_labels"])
        return batch


class ResumableSampler:
    """Endless global batches from a seeded permutation per epoch; each rank takes its contiguous slice.

    `start` counts global batches already consumed, so a resumed run continues the exact sequence.
    Yields lists of (index, draw) keys, draw being the sample's position in the run.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        self.global_batch = batch_size * world
        if n < self.global_batch:
            raise ValueError(f"{n} records are fewer than one global batch of {self.global_batch}")
        self.n, self.batch_size, self.seed, self.rank, self.start = n, batch_size, seed, rank, start
        self.per_epoch = n // self.global_batch

    def __iter__(self):
        step = self.start
        while True:
            epoch, pos = divmod(step, self.per_epoch)
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            lo = pos * self.global_batch + self.rank * self.batch_size
            draws = range(step * self.global_batch + self.rank * self.batch_size,
                          step * self.global_batch + (self.rank + 1) * self.batch_size)
            yield list(zip(order[lo:lo + self.batch_size].tolist(), draws))
            step += 1


def pair_loader(records: list[dict], root, tokenizer: Tokenizer, *, image_size: int, batch_size: int, max_len: int,
                mlm_probability: float, seed: int, rank: int = 0, world: int = 1, start: int = 0,
                num_workers: int = 0, augment: bool = False, skip_bad: bool = False,
                mlm_mask_only: bool = False) -> DataLoader:
    dataset = PairDataset(records, root, image_transform(image_size, augment), skip_bad)
    sampler = ResumableSampler(len(dataset), batch_size, seed, rank, world, start)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      collate_fn=Collate(tokenizer, max_len, mlm_probability, seed, world > 1, mlm_mask_only),
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None)


def load_pairs(path: str | Path) -> list[dict]:
    return load_annotations(path, "pretrain")


def training_set(cfg):
    """`data.train` as JSON records, or as a ShardSet (WebDataset shards, every one found and counted): a missing
    file or shard, or a bad pattern, fails here, before any work."""
    from vlpt.data.shards import ShardSet, is_sharded
    if is_sharded(cfg.data.train):
        return ShardSet.open(cfg.data.train, cfg.data.root, cfg.data.weights)
    if cfg.data.weights:
        from vlpt.config import ConfigError
        raise ConfigError("data.weights weighs the '::' sources of sharded data.train; a .json file has one")
    return load_pairs(Path(cfg.data.root) / cfg.data.train)


def captions(data):
    """The captions of a training set (JSON records or shards), for a vocab trained on them."""
    return (r["caption"] for r in data) if isinstance(data, list) else data.captions()


def train_loader(cfg, data, tokenizer: Tokenizer, rank: int = 0, world: int = 1, start: int = 0):
    """Endless batches of `rank` of `world` from global batch `start` on, from JSON records or shards alike."""
    d, kwargs = cfg.data, dict(image_size=cfg.model.vision.image_size, batch_size=cfg.data.batch_size,
                               max_len=cfg.model.text.max_len, mlm_probability=cfg.method.mlm_probability,
                               seed=cfg.train.seed, rank=rank, world=world, start=start,
                               num_workers=cfg.data.num_workers, augment=cfg.data.augment,
                               mlm_mask_only=cfg.method.mlm_mask_only)
    if isinstance(data, list):
        return pair_loader(data, d.root, tokenizer, skip_bad=d.skip_bad, **kwargs)
    from vlpt.data.shards import shard_loader
    return shard_loader(data, tokenizer, streams=d.streams, shuffle_block=d.shuffle_block, **kwargs)

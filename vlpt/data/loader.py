"""Image-text pairs for pretraining: a dataset that tokenises and masks in workers, and a resumable sampler."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from vlpt.data.annotations import ImageError, image_ids, load_annotations, load_image
from vlpt.data.collate import Collate
from vlpt.data.tokenizer import Tokenizer
from vlpt.data.transforms import image_transform, second_view, transform_seeded
from vlpt.engine import rng


class PairDataset(Dataset):
    """Records {image, caption[, image_id][, label][, answers, weights]} -> {image, text, image_id[, label][, answers,
    weights]}; keys are (index, draw) from
    the sampler. A task gives its records in this shape (VE: sentence as caption, its class index as label); a
    record with `images` (a list, NLVR2's pair, and an image_id) instead gives `image` (K,3,H,W), its images stacked.

    `draw` (the sample's position in the whole run) seeds its MLM mask, so masks are the same whatever the
    number of ranks or workers, and after a resume. With `skip_bad`, an unreadable image is replaced by the
    next record's and counted in `skipped`; otherwise it raises ImageError naming the file.
    """

    def __init__(self, records: list[dict], root: str | Path, transform, skip_bad: bool = False,
                 augment_seed: int | None = None, view2=None, view2_seed: int = 0):
        self.records, self.root, self.transform, self.skip_bad = records, Path(root), transform, skip_bad
        self.augment_seed = augment_seed  # with augmentation: each draw's crop and ops seeded by (seed, draw)
        self.view2, self.view2_seed = view2, view2_seed  # a transform: `image_view2`, seeded by (seed, draw)
        self.image_ids = image_ids(records)  # string ids ("coco_391895") mapped per file, as `vlpt data shard` does

    def __len__(self) -> int:
        return len(self.records)

    def _transform_all(self, images: list) -> list[torch.Tensor]:
        return [self.transform(image) for image in images]

    def __getitem__(self, key):
        index, draw = key if isinstance(key, tuple) else (key, key)
        for skipped in range(len(self.records)):
            i = (index + skipped) % len(self.records)
            record = self.records[i]
            try:
                images = [load_image(self.root / p) for p in record.get("images", [record.get("image")])]
            except ImageError:
                if not self.skip_bad:
                    raise
                continue
            caption = record["caption"]
            if isinstance(caption, list):
                caption = caption[draw % len(caption)]
            if self.augment_seed is not None:  # one seed per draw; a record's images draw from it in turn
                pixels = transform_seeded(self._transform_all, images, rng.seed_of("augment", self.augment_seed, draw))
            else:
                pixels = self._transform_all(images)
            sample = {"image": torch.stack(pixels) if "images" in record else pixels[0], "text": caption,
                      "image_id": self.image_ids[i], "draw": draw, "skipped": skipped}
            if self.view2 is not None:
                sample["image_view2"] = second_view(self.view2, images[0], self.view2_seed, draw)
            if "label" in record:
                sample["label"] = record["label"]
            if "answers" in record:  # VQA: the question's distinct answers and their shares of annotators
                sample["answers"], sample["weights"] = record["answers"], record["weights"]
            return sample
        raise ImageError(f"no readable image among the {len(self.records)} records under {self.root}")


class ImageFiles(Dataset):
    """Image files as normalised tensors (evaluation)."""

    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[i]))


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


def pair_loader(records: list[dict], root, collate: Collate, *, image_size: int, batch_size: int, seed: int,
                rank: int = 0, world: int = 1, start: int = 0, num_workers: int = 0, augment: bool = False,
                skip_bad: bool = False, view2: bool = False) -> DataLoader:
    """`view2`: each sample also has `image_view2`, drawn by the pretraining augmentation (whatever `augment`)."""
    dataset = PairDataset(records, root, image_transform(image_size, augment), skip_bad, seed if augment else None,
                          image_transform(image_size, True) if view2 else None, seed)
    sampler = ResumableSampler(len(dataset), batch_size, seed, rank, world, start)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None)


def eval_loader(cfg, records: list[dict], tokenizer: Tokenizer) -> DataLoader:
    """A task's records in order, once, without augmentation, `eval.batch_size` at a time; a missing or corrupt image
    is an error naming it."""
    collate = Collate(tokenizer, cfg.model.text.max_len)
    dataset = PairDataset(records, cfg.data.root, image_transform(cfg.model.vision.image_size))
    return DataLoader(dataset, batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers, collate_fn=collate)


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


def train_loader(cfg, data, tokenizer: Tokenizer, needs=(), rank: int = 0, world: int = 1, start: int = 0):
    """Endless batches of `rank` of `world` from global batch `start` on, from JSON records or shards alike, with
    what the method `needs` (`Method.batch_needs`)."""
    d, m = cfg.data, cfg.method
    collate = Collate(tokenizer, cfg.model.text.max_len, needs, cfg.train.seed, world > 1, m.mlm_probability,
                      m.mlm_mask_only, m.itm_swap_words)
    kwargs = dict(image_size=cfg.model.vision.image_size, batch_size=d.batch_size, seed=cfg.train.seed, rank=rank,
                  world=world, start=start, num_workers=d.num_workers, augment=d.augment,
                  view2="image_view2" in needs)
    if isinstance(data, list):
        return pair_loader(data, d.root, collate, skip_bad=d.skip_bad, **kwargs)
    from vlpt.data.shards import shard_loader
    return shard_loader(data, collate, streams=d.streams, shuffle_block=d.shuffle_block, **kwargs)

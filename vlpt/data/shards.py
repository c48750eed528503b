"""WebDataset tar shards for pretraining at scale: `write_shards` writes them (`vlpt data shard`), `shard_loader`
reads them for training (`data.train` given as brace patterns of `.tar` files instead of a `.json` file).

A sample is `{key}.json` (the annotation record: caption, image_id, the image's original path) and `{key}.jpg`,
`{key}.png`, ... (the image file's bytes as they were, never re-encoded, so both paths decode the same pixels; other
formats are stored as png). Each shard folder has an `index.json` with every shard's sample count; shards without
one (written by other tools) are counted from their tar headers at start. A json without a caption takes `{key}.txt`.
The writer maps image ids as the JSON path does (`annotations.image_ids`: a string id such as "coco_391895" becomes
an integer of its own in the file, kept as written under `image_id_original`), so both paths give the same ids.

Why streams: tar shards are read front to back, so the run cannot draw samples at random from the whole set as the
JSON path does and still have each rank read only what it uses. Instead the order is a seeded function of
(train.seed, stream, position) over (shard, sample in shard), defined without reference to ranks or workers:

- The global batch (data.batch_size x world, G) is made of `data.streams` (S) independent streams, c = G / S
  consecutive samples of each per step: positions [j*c, (j+1)*c) of the global batch come from stream j. S is fixed by
  the config (0: the largest divisor of G up to 64), never by the world size, so a 1-process run with the same S
  and the same global batch sees the same batches.
- Stream j draws shards with replacement (seeded by train.seed and j): source s by its share `data.weights[s]`
  (empty: by sample counts), then uniformly among its shards, so each source gives its share of samples and the
  samples of a source are equally likely. The shards are read in order, cut into blocks of `data.shuffle_block`
  samples, and each block is emitted in a seeded order (seed, j, block). There are no epochs: the stream is endless.
  A run holds S blocks of raw (undecoded) samples in memory, divided among its ranks and workers. Image ids of
  source s > 0 are offset by s x 2^40, so that ITC never takes images of two sources for the same one.
- A sample's draw, its position in the run (step x G + position in the global batch), seeds its MLM mask (the
  JSON path's Collate), its caption among several, and its augmentation, whoever decodes it.

Ranks and workers: rank r takes the contiguous slice [r*B, (r+1)*B) of every global batch, like the JSON path. When
S is a multiple of the world size a rank reads only its own S / world streams, so no shard stream is read twice;
otherwise the streams that straddle two ranks are read by both, each decoding only its part. Within a rank the
streams are split among DataLoader workers (at most one worker per stream; more workers than streams go unused):
each worker decodes, augments and collates its part of every step, and the parts are joined in order and padded
to the longest text in the main process, which equals collating the whole batch at once.

Resume: `start` global batches consumed puts stream j at position start * c; its reader replays the shard draws
from their sample counts, reads the one shard the block begins in from the block's start, and emits from there
(no more than a shard and a block are read to resume).

Bad data never stops a run (whatever data.skip_bad says): a sample whose image does not decode or whose json is
unreadable, or one missing from a truncated shard, is counted once in `skipped` (logged as `skipped_images`) and
replaced by the next readable sample in its block's order (a wholly unreadable block: by a sample of another shard
drawn for it, seeded). A missing shard or a bad pattern is an error naming it before any work.

The vocab: with shards, a missing `data.vocab` is trained on the captions of the shards' json members (tar headers
and json only are read); point `data.vocab` at a vocab file for large sets.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import braceexpand
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm
from webdataset import TarWriter
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from vlpt.config import ConfigError
from vlpt.data.annotations import AnnotationError, ImageError, image_ids, integer_id, load_annotations, load_image
from vlpt.data.collate import Collate, merge
from vlpt.data.transforms import image_transform, second_view, transform_seeded
from vlpt.engine import rng
from vlpt.errors import VlptError

INDEX = "index.json"
IMAGE_EXTENSIONS = ("jpg", "png", "webp", "jpeg")  # stored as found; other formats are re-encoded as png
MAX_AUTO_STREAMS = 64
SOURCE_ID_STRIDE = 1 << 40  # image ids of source s > 0 are offset by s * this, so sources never share an image id
ID_SPACE = 1 << 63  # image ids are int64 tensors; hashed ids lie in [0, ID_SPACE)


class ShardNotFoundError(VlptError, FileNotFoundError):
    """A shard that data.train names does not exist (one line on the command line, before any work)."""


# --- writing ------------------------------------------------------------------------------------------------------

def write_shards(annotations: str | Path, images: str | Path | None = None, out: str | Path = "shards",
                 shard_size: int = 1000, *, shuffle: bool = True, seed: int = 0, skip_bad: bool = False,
                 progress: bool = True) -> dict:
    """A pretraining annotation file -> `out/000000.tar`, `out/000001.tar`, ... of `shard_size` samples each, and
    `out/index.json`. Keys are the records' indices in the file; image paths are relative to `images` (default:
    the file's folder). With `shuffle` the records are written in a seeded random order (files list an image's
    captions together; shards should mix them). An unreadable image fails naming the file, or with `skip_bad` its
    records are left out and listed in the index. Returns the index."""
    annotations = Path(annotations)
    images, out = Path(images) if images else annotations.parent, Path(out)
    if shard_size < 1:
        raise ConfigError(f"shard size must be at least 1; got {shard_size}")
    records = load_annotations(annotations, "pretrain")
    if out.is_dir() and (any(out.glob("*.tar")) or (out / INDEX).exists()):
        raise FileExistsError(f"{out} already holds shards; remove them or choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    ids = image_ids(records)  # as the JSON path: string ids mapped per file, records without one per image path
    order = list(range(len(records)))
    if shuffle:
        random.Random(f"vlpt-shard-writer:{seed}").shuffle(order)

    readable: dict[Path, bool] = {}  # each image decoded once to check it, however many records name it
    skipped: list[str] = []
    counts: dict[str, int] = {}
    writer, name = None, ""
    width = len(str(len(records) - 1))
    try:
        for index in tqdm(order, desc=f"shards -> {out}", unit="sample", disable=not progress, dynamic_ncols=True):
            record = records[index]
            path = images / record["image"]
            if path not in readable:
                try:
                    load_image(path)
                    readable[path] = True
                except ImageError:
                    if not skip_bad:
                        raise
                    readable[path] = False
                    skipped.append(str(path))
            if not readable[path]:
                continue
            if writer is None or counts[name] == shard_size:
                if writer is not None:
                    writer.close()
                    (out / (name + ".tmp")).replace(out / name)
                name = f"{len(counts):06d}.tar"
                counts[name] = 0
                writer = TarWriter(str(out / (name + ".tmp")), encoder=False, mtime=0.0)
            ext = {"jpeg": "jpg"}.get(path.suffix.lower().lstrip("."), path.suffix.lower().lstrip("."))
            if ext in IMAGE_EXTENSIONS:
                data = path.read_bytes()
            else:
                buffer = io.BytesIO()
                load_image(path).save(buffer, format="PNG")
                data, ext = buffer.getvalue(), "png"
            meta = {**record, "image_id": ids[index]}
            if record.get("image_id") is not None and integer_id(record["image_id"]) is None:
                meta["image_id_original"] = record["image_id"]
            writer.write({"__key__": f"{index:0{width}d}", ext: data, "json": json.dumps(meta).encode()})
            counts[name] += 1
    finally:
        if writer is not None:
            writer.close()
    if not counts:
        raise ImageError(f"no readable image among the {len(records)} records of {annotations} (images under {images})")
    (out / (name + ".tmp")).replace(out / name)
    index = {"format": "vlpt-shards/1", "annotations": str(annotations), "images": str(images),
             "samples": sum(counts.values()), "shards": counts, "skipped_images": skipped}
    (out / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return index


# --- the shard set --------------------------------------------------------------------------------------------------

def is_sharded(train: str) -> bool:
    """`data.train` names shards unless it is a `.json` annotation file."""
    return not train.endswith(".json")


def expand(train: str, root: str | Path) -> list[list[Path]]:
    """`data.train` -> each '::' source's shard paths (brace patterns; relative to `root` unless absolute)."""
    sources = []
    for part in train.split("::"):
        part = part.strip()
        if not part:
            raise ConfigError(f"data.train {train!r}: an empty source between '::'")
        try:
            names = list(braceexpand.braceexpand(part))
        except braceexpand.UnbalancedBracesError as err:
            raise ConfigError(f"data.train: bad shard pattern {part!r}: {err}") from None
        wrong = [n for n in names if not n.endswith(".tar") or any(c in n for c in "{}")]
        if wrong:
            raise ConfigError(f"data.train: {wrong[0]!r} is neither a .json annotation file nor a .tar shard "
                              f"(expected e.g. shards/{{000000..000099}}.tar, sources joined by '::')")
        sources.append([Path(root) / n for n in names])
    return sources


def _folder_index(folder: Path) -> dict[str, int]:
    path = folder / INDEX
    if not path.is_file():
        return {}
    try:
        return {str(k): int(v) for k, v in json.loads(path.read_text())["shards"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise AnnotationError(f"{path}: malformed shard index ({err}); remove it to count the shards instead")


def count_samples(path: str | Path) -> int:
    """Samples (consecutive members sharing a key) in a tar file, from its headers; a damaged tail ends the count."""
    n, last = 0, None
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                key, _ = base_plus_ext(member.name)
                if member.isreg() and key is not None and key != last:
                    n, last = n + 1, key
    except (tarfile.TarError, EOFError, OSError):
        pass
    return n


@dataclass
class ShardSet:
    """The shards of a sharded `data.train`: path, sample count and source of each, and each source's share."""
    paths: list[Path]
    counts: list[int]
    sources: list[int]
    shares: list[float]

    @classmethod
    def open(cls, train: str, root: str | Path, weights: list | None = None) -> "ShardSet":
        """Expand the patterns and count every shard; a missing shard, bad pattern or bad weights fail here."""
        groups = expand(train, root)
        weights = list(weights or [])
        if weights and len(weights) != len(groups):
            raise ConfigError(f"data.weights has {len(weights)} values for {len(groups)} sources in data.train "
                              f"(sources are joined by '::')")
        if any(not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0 for w in weights) or \
                (weights and sum(weights) <= 0):
            raise ConfigError(f"data.weights must be numbers >= 0, not all 0; got {weights}")
        paths = [p for group in groups for p in group]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ShardNotFoundError(f"shard not found: {missing[0]}{more}")
        indexes: dict[Path, dict[str, int]] = {}
        counts = []
        for p in paths:
            if p.parent not in indexes:
                indexes[p.parent] = _folder_index(p.parent)
            counts.append(indexes[p.parent][p.name] if p.name in indexes[p.parent] else count_samples(p))
        sources = [s for s, group in enumerate(groups) for _ in group]
        totals = [sum(n for n, s in zip(counts, sources) if s == src) for src in range(len(groups))]
        for src, total in enumerate(totals):
            if total == 0 and (not weights or weights[src] > 0):
                raise AnnotationError(f"data.train source {src + 1} ({train.split('::')[src].strip()}) has no samples")
        shares = [float(w) for w in weights] if weights else [float(t) for t in totals]
        return cls(paths, counts, sources, [w / sum(shares) for w in shares])

    def shard_weights(self) -> list[float]:
        """Draw probability of each shard: its source's share over the source's samples, so that the samples of a
        source are equally likely and sources give their shares of samples."""
        totals: dict[int, int] = {}
        for n, s in zip(self.counts, self.sources):
            totals[s] = totals.get(s, 0) + n
        return [self.shares[s] / totals[s] if n > 0 else 0.0 for n, s in zip(self.counts, self.sources)]

    def captions(self) -> Iterator[str | list[str]]:
        """Every record's caption, reading only the shards' json members (for a vocab when none is given)."""
        for path in dict.fromkeys(self.paths):
            try:
                with tarfile.open(path) as tar:
                    for member in tar:
                        if member.isreg() and member.name.endswith(".json"):
                            try:
                                caption = json.loads(tar.extractfile(member).read()).get("caption")
                            except (ValueError, AttributeError):
                                continue
                            if caption:
                                yield caption
            except (tarfile.TarError, EOFError, OSError):
                continue


# --- reading --------------------------------------------------------------------------------------------------------

def read_shard(path: Path, n: int, skip: int = 0) -> Iterator[dict]:
    """Raw samples {__key__, __url__, json, png|jpg|...: bytes} number `skip` to `n` of a shard: exactly n - skip
    of them, those a damaged shard lacks as {__url__, __missing__}. The first `skip` are read but not kept."""
    got = 0
    try:
        with open(path, "rb") as f:
            members = ({**m, "__url__": str(path)} for m in tar_file_iterator(f))
            for sample in group_by_keys(members):
                if got >= n:
                    break
                if got >= skip:
                    yield sample
                got += 1
    except FileNotFoundError:
        raise ShardNotFoundError(f"shard not found: {path}") from None
    except (tarfile.TarError, EOFError, OSError, ValueError):
        pass  # a truncated or damaged shard: what follows is missing
    for _ in range(max(got, skip), n):
        yield {"__url__": str(path), "__missing__": True}


def decode(raw: dict) -> tuple[Image.Image, dict] | None:
    """(RGB image, record) of a raw sample, or None when it is unreadable."""
    if raw.get("__missing__"):
        return None
    try:
        record = json.loads(raw["json"])
        if not record.get("caption") and "txt" in raw:
            record["caption"] = raw["txt"].decode()
        caption = record["caption"]
        if not (isinstance(caption, str) or (isinstance(caption, list) and caption and
                                             all(isinstance(c, str) for c in caption))):
            return None
        ext = next(e for e in (*IMAGE_EXTENSIONS, "bmp", "gif", "tif", "tiff") if e in raw)
        with Image.open(io.BytesIO(raw[ext])) as img:
            return img.convert("RGB"), record
    except (KeyError, StopIteration, ValueError, TypeError, AttributeError, OSError, SyntaxError,
            Image.DecompressionBombError):
        return None


def image_id(record: dict, raw: dict) -> int:
    """The record's integer image_id (`vlpt data shard` writes one for every record, mapped per file as the JSON path
    maps them). Shards written by other tools may hold another id ("coco_391895") or none: then a 63-bit hash of the
    id, else of the image path, else of the key. Two of n distinct hashed images share an id with probability about
    n^2 / 2^64 (5e-8 for a million, 5e-4 for 100 million), and then only confuse ITC when they meet in a batch or
    the queues."""
    value = integer_id(record.get("image_id"))
    if value is not None:
        return value
    if record.get("image_id") is not None:
        name = "id:" + json.dumps(record["image_id"])
    else:
        name = "image:" + str(record["image"]) if record.get("image") is not None else "key:" + str(raw["__key__"])
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") % ID_SPACE


class Stream:
    """Stream j of a run, read from position `start` on: shards drawn with replacement, read in order, emitted in
    blocks of `block` samples, each in a seeded order. `sample(q)` is the raw sample at position q (q increasing)."""

    STAND_IN_TRIES = 8

    def __init__(self, shards: ShardSet, j: int, seed: int, block: int, start: int = 0):
        self.shards, self.j, self.seed, self.block = shards, j, seed, block
        self.cum, total = [], 0.0
        for w in shards.shard_weights():
            total += w
            self.cum.append(total)
        first = start // block
        self.number, self.items, self.order, self.spare = first - 1, [], [], None
        self.input = self._samples(skip=first * block)

    def _draw(self, rng: random.Random) -> int:
        return rng.choices(range(len(self.shards.paths)), cum_weights=self.cum)[0]

    def _samples(self, skip: int) -> Iterator[dict]:
        rng = random.Random(f"vlpt-stream:{self.seed}:{self.j}")
        while True:
            x = self._draw(rng)
            n = self.shards.counts[x]
            if skip >= n:  # resuming: whole shards are skipped from their counts, unread
                skip -= n
                continue
            yield from read_shard(self.shards.paths[x], n, skip)
            skip = 0

    def _load(self, number: int) -> None:
        while self.number < number:
            self.number += 1
            self.items = [next(self.input) for _ in range(self.block)]
            self.order = list(range(self.block))
            random.Random(f"vlpt-block:{self.seed}:{self.j}:{self.number}").shuffle(self.order)

    def sample(self, q: int, offset: int = 0) -> dict:
        """The raw sample at position q, or with `offset` the one that many places after it in its block's order."""
        number, i = divmod(q, self.block)
        if number < self.number:
            raise ValueError(f"stream {self.j} is at block {self.number}; position {q} is behind it")
        self._load(number)
        return self.items[self.order[(i + offset) % self.block]]

    def readable(self, q: int) -> tuple[Image.Image, dict, int, dict]:
        """(image, record, skipped, raw sample) at position q. An unreadable sample (skipped = 1, so each bad sample
        read counts once) is replaced by the next readable one in its block's order, or, when the whole block is
        unreadable (a damaged shard), by a sample of another shard drawn for the block."""
        for offset in range(self.block):
            raw = self.sample(q, offset)
            decoded = decode(raw)
            if decoded is not None:
                return (*decoded, int(offset > 0), raw)
        return (*self._stand_in(), 1, self.spare[1])

    def _stand_in(self) -> tuple[Image.Image, dict]:
        """The first readable sample of a shard drawn (seeded by the block, so any reader finds the same)."""
        if self.spare is None or self.spare[0] != self.number:
            for attempt in range(self.STAND_IN_TRIES):
                x = self._draw(random.Random(f"vlpt-stand-in:{self.seed}:{self.j}:{self.number}:{attempt}"))
                for raw in read_shard(self.shards.paths[x], self.shards.counts[x]):
                    decoded = decode(raw)
                    if decoded is not None:
                        self.spare = (self.number, raw, decoded)
                        return decoded
            urls = sorted({item["__url__"] for item in self.items})
            raise ImageError(f"no readable sample in a block of shard stream {self.j} (read from {', '.join(urls)}) "
                             f"nor in {self.STAND_IN_TRIES} other shards drawn to stand in")
        return self.spare[2]


def auto_streams(global_batch: int) -> int:
    """data.streams = 0: the largest divisor of the global batch up to 64 (a function of the global batch alone)."""
    return max(d for d in range(1, min(MAX_AUTO_STREAMS, global_batch) + 1) if global_batch % d == 0)


def rank_parts(streams: int, global_batch: int, rank: int, batch_size: int) -> list[tuple[int, int, int]]:
    """(stream, lo, hi): the parts [lo, hi) of each stream's c = G / S samples per step that fall in the rank's
    slice [rank * B, (rank + 1) * B) of the global batch, in order."""
    c = global_batch // streams
    lo, hi = rank * batch_size, (rank + 1) * batch_size
    return [(j, max(lo, j * c) - j * c, min(hi, (j + 1) * c) - j * c) for j in range(lo // c, (hi - 1) // c + 1)]


def split(parts: list, lanes: int) -> list[list]:
    """Contiguous, balanced split of a rank's parts among its worker lanes (joined in lane order, they are in order)."""
    bounds = [round(k * len(parts) / lanes) for k in range(lanes + 1)]
    return [parts[bounds[k]:bounds[k + 1]] for k in range(lanes)]


class ShardStream(IterableDataset):
    """One rank's data: each worker (lane) yields, for every step from `start`, its streams' part of the rank's
    slice, decoded, augmented and collated."""

    def __init__(self, shards: ShardSet, parts: list[tuple[int, int, int]], lanes: int, *, global_batch: int,
                 streams: int, start: int, seed: int, block: int, transform, augment: bool, collate: Collate,
                 source_ids: bool, view2=None):
        self.shards, self.parts, self.lanes = shards, parts, lanes
        self.global_batch, self.streams = global_batch, streams
        self.start, self.seed, self.block, self.transform, self.augment = start, seed, block, transform, augment
        self.collate, self.source_ids, self.view2 = collate, source_ids, view2  # view2: `image_view2`'s transform
        self.sources = {str(p): s for p, s in zip(shards.paths, shards.sources)}

    def lane_parts(self) -> list[tuple[int, int, int]]:
        info = get_worker_info()
        return split(self.parts, self.lanes)[info.id if info is not None else 0]

    def samples(self, step: int, parts, readers: dict[int, Stream]) -> list[dict]:
        c, out = self.global_batch // self.streams, []
        for j, lo, hi in parts:
            for o in range(lo, hi):
                draw = step * self.global_batch + j * c + o
                image, record, skipped, raw = readers[j].readable(step * c + o)
                caption = record["caption"]
                if isinstance(caption, list):
                    caption = caption[draw % len(caption)]
                second = second_view(self.view2, image, self.seed, draw) if self.view2 is not None else None
                if self.augment:  # seeded by the draw: the same crop whichever rank or worker decodes it
                    image = transform_seeded(self.transform, image, rng.seed_of("augment", self.seed, draw))
                else:
                    image = self.transform(image)
                offset = self.sources[raw["__url__"]] * SOURCE_ID_STRIDE if self.source_ids else 0
                ident = image_id(record, raw) + offset
                ident -= ID_SPACE if ident >= ID_SPACE else 0  # a hashed id of a later source wraps, an int64 still
                out.append({"image": image, "text": caption, "image_id": ident,
                            "draw": draw, "skipped": skipped, **({} if second is None else {"image_view2": second})})
        return out

    def __iter__(self):
        parts = self.lane_parts()
        c = self.global_batch // self.streams
        readers = {j: Stream(self.shards, j, self.seed, self.block, self.start * c + lo) for j, lo, _ in parts}
        step = self.start
        while True:
            yield self.collate(self.samples(step, parts, readers))
            step += 1


class ShardLoader:
    """Endless batches of one rank: a DataLoader whose workers each produce their lanes' parts of every step (in
    worker order, so deterministic), joined here. Pinned memory on CUDA; persistent workers."""

    def __init__(self, dataset: ShardStream, num_workers: int, pad_id: int):
        self.dataset, self.lanes, self.pad_id = dataset, dataset.lanes, pad_id
        self.pin = torch.cuda.is_available()
        self.loader = DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                 pin_memory=self.pin and self.lanes == 1, persistent_workers=num_workers > 0,
                                 prefetch_factor=4 if num_workers > 0 else None)

    def __iter__(self):
        pieces = iter(self.loader)
        while True:
            yield merge([next(pieces) for _ in range(self.lanes)], self.pad_id, self.pin)


def shard_loader(shards: ShardSet, collate: Collate, *, image_size: int, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1, start: int = 0, num_workers: int = 0, augment: bool = False, streams: int = 0,
                 shuffle_block: int = 64, view2: bool = False) -> ShardLoader:
    """Batches of `batch_size` for `rank` of `world`, from global batch `start` on (see the module docstring)."""
    global_batch = batch_size * world
    streams = streams or auto_streams(global_batch)
    if streams < 1 or global_batch % streams:  # the one data rule that needs the world size (config.py: the rest)
        raise ConfigError(f"config key 'data.streams' must divide the global batch of {global_batch} "
                          f"(data.batch_size={batch_size} x {world} processes), or be 0; got {streams}")
    if shuffle_block < 1:
        raise ConfigError(f"config key 'data.shuffle_block' must be >= 1; got {shuffle_block}")
    parts = rank_parts(streams, global_batch, rank, batch_size)
    lanes = min(num_workers, len(parts)) if num_workers > 0 else 1
    dataset = ShardStream(shards, parts, lanes, global_batch=global_batch, streams=streams, start=start, seed=seed,
                          block=shuffle_block, transform=image_transform(image_size, augment), augment=augment,
                          collate=collate, source_ids=len(shards.shares) > 1,
                          view2=image_transform(image_size, True) if view2 else None)
    return ShardLoader(dataset, lanes if num_workers > 0 else 0, collate.tokenizer.pad_id)

"""WebDataset shards: writing, the same tensors as the JSON path, rank slices, resume, weighted sources, bad data
skipped and counted in training, clear errors for missing shards and bad patterns."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

import vlpt.cli
from vlpt.config import ConfigError, DataConfig
from vlpt.data.annotations import ImageError, load_annotations
from vlpt.data.collate import Collate
from vlpt.data.loader import PairDataset, captions, training_set
from vlpt.data.shards import (INDEX, SOURCE_ID_STRIDE, ShardSet, Stream, auto_streams, count_samples, decode,
                              rank_parts, shard_loader, write_shards)
from vlpt.data.tokenizer import Tokenizer
from vlpt.data.transforms import image_transform
from vlpt.engine.logging import read_metrics
from vlpt.pretrain import pretrain as train
from helpers import CONFIG, cli_error, config, overrides

SHARD_SIZE = 50


@pytest.fixture(scope="module")
def shards(shapes_data, tmp_path_factory) -> Path:
    """The shapes data set's pretrain.json as shards of 50 samples (treat as read-only)."""
    out = tmp_path_factory.mktemp("shards") / "shards"
    write_shards(shapes_data / "pretrain.json", shapes_data, out, SHARD_SIZE, progress=False)
    return out


@pytest.fixture(scope="module")
def tokenizer(shapes_data) -> Tokenizer:
    return Tokenizer(shapes_data / "vocab.txt")


def pattern(folder: Path) -> str:
    n = len(json.loads((folder / INDEX).read_text())["shards"])
    return str(folder / f"{{000000..{n - 1:06d}}}.tar")


def members(tar_path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar]


def replace_member(tar_path: Path, name: str, data: bytes) -> None:
    """Rewrite a shard with one member's bytes replaced (damage after writing, as on a bad disk)."""
    entries = members(tar_path)
    assert name in [m.name for m, _ in entries]
    with tarfile.open(tar_path, "w") as tar:
        for m, d in entries:
            if m.name == name:
                d, m.size = data, len(data)
            tar.addfile(m, io.BytesIO(d))


def load(shard_set: ShardSet, tokenizer: Tokenizer, **kwargs):
    args = dict(image_size=32, batch_size=8, seed=2, shuffle_block=16)
    args.update(kwargs)
    collate = Collate(tokenizer, 24, {"mlm"}, seed=args["seed"], fixed=args.get("world", 1) > 1)
    return iter(shard_loader(shard_set, collate, **args))


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def same_batch(a: dict, b: dict, pad_id: int) -> None:
    """Equal tensors; texts may be padded to different widths (fixed under DDP), the extra columns all padding."""
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if key in ("text_ids", "text_mask", "mlm_ids", "mlm_labels"):
            w = min(x.shape[1], y.shape[1])
            pad = {"text_mask": 0, "mlm_labels": -100}.get(key, pad_id)
            for z in (x, y):
                assert (z[:, w:] == pad).all(), key
            x, y = x[:, :w], y[:, :w]
        if key == "mlm_positions":  # indices into the flattened texts: compare as (row, column)
            x, y = (torch.stack([z // w, z % w]) for z, w in ((x, a["text_ids"].shape[1]), (y, b["text_ids"].shape[1])))
        assert torch.equal(x, y), key


# --- writing ----------------------------------------------------------------------------------------------------

def test_write_shards_counts_keys_and_records(shapes_data, shards, tmp_path, capsys):
    records = load_annotations(shapes_data / "pretrain.json")
    index = json.loads((shards / INDEX).read_text())
    n = len(records)
    expected = [SHARD_SIZE] * (n // SHARD_SIZE) + ([n % SHARD_SIZE] if n % SHARD_SIZE else [])
    assert list(index["shards"].values()) == expected and index["samples"] == n
    assert sorted(p.name for p in shards.glob("*.tar")) == list(index["shards"])
    assert [count_samples(shards / name) for name in index["shards"]] == expected  # headers agree with the index

    width = len(str(n - 1))
    seen = []
    for name in index["shards"]:
        entries = members(shards / name)
        for (img, img_bytes), (meta, meta_bytes) in zip(entries[1::2], entries[0::2]):
            key = meta.name.removesuffix(".json")
            assert img.name == f"{key}.png" and len(key) == width
            record = records[int(key)]
            assert json.loads(meta_bytes) == {**record, "image_id": record["image_id"]}
            assert img_bytes == (shapes_data / record["image"]).read_bytes()  # the file's bytes, not re-encoded
            seen.append(int(key))
    assert sorted(seen) == list(range(n))
    assert seen != sorted(seen)  # shuffled: a file lists an image's captions together, shards mix them
    first = [int(m.name.split(".")[0]) for m, _ in members(shards / "000000.tar")[::2]]
    assert len({records[i]["image_id"] for i in first}) > SHARD_SIZE // 2

    # --no-shuffle keeps the file's order; the CLI prints the pattern to train on; an existing folder is refused.
    out = tmp_path / "ordered"
    vlpt.cli.main(["data", "shard", "--annotations", str(shapes_data / "pretrain.json"), "--out", str(out),
                   "--shard-size", "100", "--no-shuffle"])
    assert f"data.train={out}/{{000000..000003}}.tar" in capsys.readouterr().out
    keys = [int(m.name.split(".")[0]) for name in sorted(p.name for p in out.glob("*.tar"))
            for m, _ in members(out / name)[::2]]
    assert keys == list(range(n))
    message = cli_error(["data", "shard", "--annotations", str(shapes_data / "pretrain.json"), "--out", str(out)],
                        capsys)
    assert "already holds shards" in message


def test_writer_fails_or_skips_and_reports_unreadable_images(shapes_data, tmp_path):
    data = Path(shutil.copytree(shapes_data, tmp_path / "shapes"))
    records = load_annotations(data / "pretrain.json")
    bad = data / records[7]["image"]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(ImageError, match="corrupt") as err:
        write_shards(data / "pretrain.json", data, tmp_path / "strict", 100, progress=False)
    assert str(bad) in str(err.value)

    index = write_shards(data / "pretrain.json", data, tmp_path / "skip", 100, skip_bad=True, progress=False)
    lost = sum(r["image"] == records[7]["image"] for r in records)
    assert index["skipped_images"] == [str(bad)] and index["samples"] == len(records) - lost
    assert sum(ShardSet.open(pattern(tmp_path / "skip"), "/").counts) == len(records) - lost


# --- reading: the same tensors as the JSON path, rank slices, resume ----------------------------------------------

def expected_batches(shard_set: ShardSet, records, root, tokenizer, *, steps: int, start: int, streams: int,
                     batch: int = 8, seed: int = 2, block: int = 16) -> list[dict]:
    """The JSON path's PairDataset and Collate on the records the shard streams hold at each position."""
    c = batch // streams
    readers = [Stream(shard_set, j, seed, block, start * c) for j in range(streams)]
    dataset = PairDataset(records, root, image_transform(32))
    collate = Collate(tokenizer, 24, {"mlm"}, seed)
    out = []
    for step in range(start, start + steps):
        keys = [(int(readers[j].sample(step * c + o)["__key__"]), step * batch + j * c + o)
                for j in range(streams) for o in range(c)]
        out.append(collate([dataset[k] for k in keys]))
    return out


@pytest.mark.parametrize("streams", [2, 8])
def test_shards_give_the_json_path_tensors(shapes_data, shards, tokenizer, streams):
    records = load_annotations(shapes_data / "pretrain.json")
    shard_set = ShardSet.open(pattern(shards), "/")
    got = take(load(shard_set, tokenizer, streams=streams, start=3), 4)
    want = expected_batches(shard_set, records, shapes_data, tokenizer, steps=4, start=3, streams=streams)
    for a, b in zip(got, want):
        same_batch(a, b, tokenizer.pad_id)
        assert (a["mlm_labels"] >= 0).any()


@pytest.mark.parametrize("world, streams", [(2, 8), (2, 2), (2, 1), (4, 2)])
def test_rank_slices_concatenate_to_the_global_batch(shards, tokenizer, world, streams):
    """What DDP relies on: `world` ranks x 8 / world samples = 1 process x 8, for streams owned by one rank,
    shared by several (streams < world) or straddling two."""
    shard_set = ShardSet.open(pattern(shards), "/")
    one = take(load(shard_set, tokenizer, streams=streams, start=2), 3)
    ranks = [take(load(shard_set, tokenizer, streams=streams, start=2, batch_size=8 // world, rank=r, world=world), 3)
             for r in range(world)]
    for step, whole in enumerate(one):
        parts = [ranks[r][step] for r in range(world)]
        joined = {k: torch.cat([p[k] for p in parts]) if k not in ("skipped", "mlm_positions") else None
                  for k in parts[0]}
        joined["skipped"] = sum(p["skipped"] for p in parts)
        joined["mlm_positions"] = (joined["mlm_labels"].flatten() != -100).nonzero().squeeze(1)
        if "mlm_positions" not in whole:
            del joined["mlm_positions"]
        same_batch(whole, joined, tokenizer.pad_id)


def test_workers_split_streams_and_give_the_same_batches(shards, tokenizer):
    """2 workers each decoding their own streams' part of every step = one process decoding all."""
    shard_set = ShardSet.open(pattern(shards), "/")
    alone = take(load(shard_set, tokenizer, streams=4, start=1), 3)
    workers = take(load(shard_set, tokenizer, streams=4, start=1, num_workers=2), 3)
    for a, b in zip(alone, workers):
        same_batch(a, b, tokenizer.pad_id)


def test_resume_continues_the_same_stream(shards, tokenizer):
    shard_set = ShardSet.open(pattern(shards), "/")
    full = take(load(shard_set, tokenizer, streams=2), 14)  # 4 samples per stream per step: blocks of 16, shards of 50
    assert not torch.equal(full[0]["image"], full[4]["image"])
    for start in (1, 4, 9, 13):
        resumed = take(load(shard_set, tokenizer, streams=2, start=start), 14 - start)
        for a, b in zip(full[start:], resumed):
            same_batch(a, b, tokenizer.pad_id)


def test_streams_draw_every_shard_and_depend_on_the_seed(shards):
    shard_set = ShardSet.open(pattern(shards), "/")
    def keys(seed: int) -> list[str]:
        stream = Stream(shard_set, 0, seed, 16)
        return [stream.sample(q)["__key__"] for q in range(400)]

    a = keys(0)
    assert a == keys(0) and a != keys(1)
    assert len(set(a)) > 150  # shards drawn with replacement: most samples appear, some twice
    assert auto_streams(8) == 8 and auto_streams(512) == 64 and auto_streams(96) == 48 and auto_streams(7) == 7
    assert rank_parts(2, 8, 1, 4) == [(1, 0, 4)] and rank_parts(8, 8, 1, 4) == [(4, 0, 1), (5, 0, 1), (6, 0, 1),
                                                                                 (7, 0, 1)]
    assert rank_parts(1, 8, 1, 4) == [(0, 4, 8)] and rank_parts(3, 6, 1, 2) == [(1, 0, 2)]


# --- several sources ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_source(shapes_data, tmp_path_factory) -> Path:
    """A second source: the first 80 records, in shards of 30."""
    folder = tmp_path_factory.mktemp("small")
    records = load_annotations(shapes_data / "pretrain.json")[:80]
    (folder / "small.json").write_text(json.dumps(records))
    write_shards(folder / "small.json", shapes_data, folder / "shards", 30, progress=False)
    return folder / "shards"


def source_share(shard_set: ShardSet, n: int = 3000, streams: int = 4) -> float:
    """Fraction of the first n samples of the streams read from the first source."""
    first = {str(p) for p, s in zip(shard_set.paths, shard_set.sources) if s == 0}
    readers = [Stream(shard_set, j, 0, 16) for j in range(streams)]
    urls = [reader.sample(q)["__url__"] for reader in readers for q in range(n // streams)]
    return sum(u in first for u in urls) / len(urls)


def test_weighted_sources_give_their_shares(shards, small_source, tokenizer):
    both = f"{pattern(shards)}::{pattern(small_source)}"
    n_big = json.loads((shards / INDEX).read_text())["samples"]
    proportional = ShardSet.open(both, "/")
    assert proportional.shares == pytest.approx([n_big / (n_big + 80), 80 / (n_big + 80)])
    assert source_share(proportional) == pytest.approx(n_big / (n_big + 80), abs=0.05)
    weighted = ShardSet.open(both, "/", [1.0, 3])
    assert source_share(weighted) == pytest.approx(0.25, abs=0.05)
    assert source_share(ShardSet.open(both, "/", [1, 0])) == 1.0

    # Image ids of the second source are offset, so ITC never takes two sources' images for the same one.
    batches = take(load(weighted, tokenizer, streams=8), 6)
    ids = torch.cat([b["image_id"] for b in batches])
    assert (ids >= SOURCE_ID_STRIDE).any() and (ids < SOURCE_ID_STRIDE).any()

    with pytest.raises(ConfigError, match="3 values for 2 sources"):
        ShardSet.open(both, "/", [1, 2, 3])
    with pytest.raises(ConfigError, match="data.weights"):
        ShardSet.open(both, "/", [1, -1])


# --- errors and bad data --------------------------------------------------------------------------------------------

def test_missing_shard_fails_naming_it_before_any_work(shapes_data, shards, tmp_path, capsys):
    n = len(json.loads((shards / INDEX).read_text())["shards"])
    wanted = str(shards / f"{{000000..{n + 1:06d}}}.tar")
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="shard not found") as err:
        train(config(shapes_data, out, "train.steps=1", f"data.train={wanted}"))
    assert str(shards / f"{n:06d}.tar") in str(err.value) and "1 more" in str(err.value)
    assert not out.exists()
    message = cli_error(["pretrain", "--config", CONFIG, *overrides(shapes_data, out, f"data.train={wanted}")], capsys)
    assert message.startswith(f"vlpt: error: shard not found: {shards / f'{n:06d}.tar'}")


@pytest.mark.parametrize("train_value, message", [("shards/{000000..000003.tar", "bad shard pattern"),
                                                  ("shards/000000.zip", "neither a .json"),
                                                  ("::a/{0..1}.tar", "empty source")])
def test_bad_patterns_are_config_errors(shapes_data, tmp_path, train_value, message):
    with pytest.raises(ConfigError, match=message):
        training_set(config(shapes_data, tmp_path / "run", f"data.train={train_value}"))


def test_weights_need_sharded_sources(shapes_data, tmp_path):
    with pytest.raises(ConfigError, match="data.weights"):
        training_set(config(shapes_data, tmp_path / "run", "data.weights=[1.0]"))


BLOCK = DataConfig().shuffle_block  # what training uses


def sample_at(shard_set: ShardSet, stream: int, q: int) -> dict:
    """The raw sample the default training stream of the tiny config (seed 0, batch 8 -> 8 streams) reads at q."""
    return Stream(shard_set, stream, 0, BLOCK).sample(q)


def test_corrupt_image_and_record_are_skipped_and_counted_in_training(shapes_data, shards, tmp_path):
    """Damage a shard's image and another's record after writing: training goes through both and logs them."""
    folder = Path(shutil.copytree(shards, tmp_path / "shards"))
    shard_set = ShardSet.open(pattern(folder), "/")
    assert auto_streams(8) == 8  # stream j gives position j of every global batch of 8
    image = sample_at(shard_set, 0, 0)   # step 1, first sample
    record = sample_at(shard_set, 3, 1)  # step 2, fourth sample
    assert image["__key__"] != record["__key__"]
    replace_member(Path(image["__url__"]), image["__key__"] + ".png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    replace_member(Path(record["__url__"]), record["__key__"] + ".json", b'{"caption": "no end')

    # Shards are drawn with replacement: other streams may meet the damaged samples too. Count them per step.
    bad = {image["__key__"], record["__key__"]}
    readers = [Stream(shard_set, j, 0, BLOCK) for j in range(8)]
    hits = [sum(readers[j].sample(q)["__key__"] in bad for j in range(8)) for q in range(3)]
    assert hits[0] >= 1 and hits[1] >= 1
    counts = [sum(hits[:i + 1]) for i in range(3)]

    out = train(config(shapes_data, tmp_path / "run", "train.steps=3", "train.log_every=1",
                       f"data.train={pattern(folder)}"))
    rows = read_metrics(out)
    assert [r["skipped_images"] for r in rows] == counts
    assert all(r["itc"] > 0 for r in rows)

    # The same with 2 workers (each decoding its own streams); a truncated shard's missing samples count too.
    out = train(config(shapes_data, tmp_path / "workers", "train.steps=2", "train.log_every=1", "data.num_workers=2",
                       f"data.train={pattern(folder)}"))
    assert [r["skipped_images"] for r in read_metrics(out)] == counts[:2]

    truncated = Path(sample_at(shard_set, 5, 0)["__url__"])
    truncated.write_bytes(truncated.read_bytes()[:1500])
    readers = [Stream(shard_set, j, 0, BLOCK) for j in range(8)]
    unreadable = sum(decode(readers[j].sample(q)) is None for j in range(8) for q in range(2))
    whole_block = [all(decode(item) is None for item in r.items) for r in readers]
    assert unreadable >= 2 and any(whole_block)  # a block with nothing readable: a sample of another shard stands in
    batches = take(load(shard_set, Tokenizer(shapes_data / "vocab.txt"), streams=8, shuffle_block=BLOCK, seed=0), 2)
    assert sum(int(b["skipped"]) for b in batches) == unreadable


def test_vocab_from_shard_captions_when_none_is_given(shapes_data, shards, tmp_path):
    shard_set = training_set(config(shapes_data, tmp_path / "run", f"data.train={pattern(shards)}"))
    records = load_annotations(shapes_data / "pretrain.json")
    assert Counter(captions(shard_set)) == Counter(r["caption"] for r in records)
    out = train(config(shapes_data, tmp_path / "run", "train.steps=1", f"data.train={pattern(shards)}",
                       "data.vocab=missing.txt"))
    assert (out / "vocab.txt").is_file() and "circle" in (out / "vocab.txt").read_text().split()

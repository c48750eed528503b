"""Data loading: errors that name the file, skipping bad images, config typos, the resumable sampler, MLM masks.

(Byte-identical data sets per seed are tested in test_synthetic.py.)
"""
from __future__ import annotations

import json
import shutil
import traceback
from pathlib import Path

import pytest
import torch

import vlpt.cli
from vlpt.data.annotations import AnnotationError, ImageError, load_annotations
from vlpt.data.collate import Collate
from vlpt.data.loader import ResumableSampler, load_pairs, pair_loader
from vlpt.data.tokenizer import Tokenizer
from vlpt.engine.logging import read_metrics
from vlpt.pretrain import pretrain as train
from helpers import CONFIG, cli_error, config, overrides



@pytest.fixture
def data_copy(shapes_data, tmp_path) -> Path:
    return Path(shutil.copytree(shapes_data, tmp_path / "shapes"))


def first_batch_image(root: Path, seed: int = 0, batch_size: int = 8) -> str:
    """The image of the first record the training run reads."""
    records = load_pairs(root / "pretrain.json")
    index, _ = next(iter(ResumableSampler(len(records), batch_size, seed)))[0]
    return records[index]["image"]


# --- images ------------------------------------------------------------------------------------------------------

def release(excinfo) -> None:
    """Free the frames a caught exception keeps alive now: a DataLoader iterator with workers that is left to a
    later garbage collection makes torch wait 5 s for its worker to join (in whichever test comes next)."""
    err = excinfo.value
    while err is not None:
        traceback.clear_frames(err.__traceback__)
        err = err.__context__


@pytest.mark.parametrize("num_workers", [0, 1])
def test_missing_image_fails_naming_the_file(data_copy, tmp_path, num_workers, capsys):
    image = data_copy / first_batch_image(data_copy)
    image.unlink()
    with pytest.raises(ImageError, match="not found") as err:
        train(config(data_copy, tmp_path / "run", "train.steps=1", f"data.num_workers={num_workers}"))
    release(err)
    assert str(image) in str(err.value)

    # The CLI turns it into a one-line message, not a traceback, also when a worker raised it.
    message = cli_error(["pretrain", "--config", CONFIG,
                         *overrides(data_copy, tmp_path / "cli", "train.steps=1", f"data.num_workers={num_workers}")],
                        capsys)
    assert message == f"vlpt: error: image not found: {image}"


def test_corrupt_image_fails_or_is_skipped_and_counted(data_copy, tmp_path):
    bad = first_batch_image(data_copy)
    (data_copy / bad).write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)

    with pytest.raises(ImageError, match="corrupt") as err:
        train(config(data_copy, tmp_path / "strict", "train.steps=1"))
    assert str(data_copy / bad) in str(err.value)

    # With skip_bad each unreadable record is replaced by the next readable one and counted.
    records = load_pairs(data_copy / "pretrain.json")
    expected = 0
    for keys in [b for b, _ in zip(ResumableSampler(len(records), 8, seed=0), range(2))]:
        for index, _ in keys:
            while records[index % len(records)]["image"] == bad:
                expected, index = expected + 1, index + 1
    assert expected > 0
    out = train(config(data_copy, tmp_path / "skip", "train.steps=2", "train.log_every=1", "data.skip_bad=true"))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["skipped_images"] == expected
    assert 0 < rows[0]["skipped_images"] <= expected


def test_skipping_when_no_image_is_readable_fails_clearly(data_copy, tmp_path):
    for png in (data_copy / "images" / "train").glob("*.png"):
        png.write_bytes(b"not a png")
    with pytest.raises(ImageError, match="no readable image"):
        train(config(data_copy, tmp_path / "run", "train.steps=1", "data.skip_bad=true"))


# --- annotations -------------------------------------------------------------------------------------------------

def test_malformed_json_names_file_line_and_column(data_copy, tmp_path, capsys):
    records = json.loads((data_copy / "pretrain.json").read_text())[:3]
    text = "[\n" + ",\n".join(json.dumps(r) for r in records) + ",\n]\n"  # a trailing comma
    bad = data_copy / "pretrain_bad.json"
    bad.write_text(text)
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        line, column = err.lineno, err.colno
    assert line in (4, 5)  # at the trailing comma (line 4) or at the bracket after it (line 5)

    with pytest.raises(AnnotationError) as err:
        load_annotations(bad)
    message = str(err.value)
    assert str(bad) in message and f"line {line}" in message and f"column {column}" in message

    with pytest.raises(AnnotationError, match=f"line {line}"):  # the trainer reports it as such
        train(config(data_copy, tmp_path / "run", "data.train=pretrain_bad.json", "train.steps=1"))
    message = cli_error(["pretrain", "--config", CONFIG,
                         *overrides(data_copy, tmp_path / "cli", "data.train=pretrain_bad.json", "train.steps=1")],
                        capsys)
    assert str(bad) in message and f"line {line}" in message


def test_record_without_caption_names_its_index(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"image": "a.png", "caption": "a red circle"},
                                {"image": "b.png", "caption": ["two", "captions"]},
                                {"image": "c.png", "text": "no caption key"}]))
    with pytest.raises(AnnotationError) as err:
        load_annotations(path, "pretrain")
    message = str(err.value)
    assert str(path) in message and "record 2" in message and "caption" in message

    path.write_text(json.dumps({"image": "a.png", "caption": "not a list"}))
    with pytest.raises(AnnotationError, match="list"):
        load_annotations(path)
    path.write_text(json.dumps([{"image": "a.png", "caption": "x"}, "just a string"]))
    with pytest.raises(AnnotationError, match="record 1"):
        load_annotations(path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_annotations(tmp_path / "missing.json")


# --- configuration -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("typo, unknown, suggestion", [("train.stesp=3", "train.stesp", "train.steps"),
                                                       ("model.vision.widht=16", "model.vision.widht",
                                                        "model.vision.width"),
                                                       ("trian.steps=3", "trian", "train")])
def test_unknown_config_key_exits_before_any_work(shapes_data, tmp_path, monkeypatch, typo, unknown, suggestion,
                                                  capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    message = cli_error(["pretrain", "--config", CONFIG, typo, f"data.root={shapes_data}", f"train.out={out}"], capsys)
    assert message.startswith("vlpt: error:")
    assert f"'{unknown}'" in message and f"'{suggestion}'" in message
    assert not out.exists() and list(tmp_path.iterdir()) == []


# --- sampler -----------------------------------------------------------------------------------------------------

def take(sampler: ResumableSampler, n: int) -> list[list[tuple[int, int]]]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("n, batch, world", [(48, 4, 3), (50, 4, 2), (37, 5, 1)])
def test_rank_slices_are_contiguous_parts_of_the_global_batch(n, batch, world):
    steps = 3 * (n // (batch * world)) + 2  # several epochs
    whole = take(ResumableSampler(n, batch * world, seed=5), steps)
    ranks = [take(ResumableSampler(n, batch, seed=5, rank=r, world=world), steps) for r in range(world)]
    for step, global_batch in enumerate(whole):
        assert [k for r in range(world) for k in ranks[r][step]] == global_batch
        for r in range(world):
            assert ranks[r][step] == global_batch[r * batch:(r + 1) * batch]
        # draws number the samples of the run in order
        assert [d for _, d in global_batch] == list(range(step * batch * world, (step + 1) * batch * world))


@pytest.mark.parametrize("world, rank", [(1, 0), (2, 1)])
def test_start_continues_the_same_sequence(world, rank):
    n, batch = 30, 4
    full = take(ResumableSampler(n, batch, seed=1, rank=rank, world=world), 20)
    for start in (1, 3, 7, 11):
        resumed = take(ResumableSampler(n, batch, seed=1, rank=rank, world=world, start=start), 20 - start)
        assert resumed == full[start:]


@pytest.mark.parametrize("n, batch", [(48, 8), (50, 8)])
def test_each_epoch_is_a_permutation(n, batch):
    per_epoch = n // batch
    batches = take(ResumableSampler(n, batch, seed=3), 3 * per_epoch)
    epochs = []
    for e in range(3):
        indices = [i for b in batches[e * per_epoch:(e + 1) * per_epoch] for i, _ in b]
        assert len(indices) == per_epoch * batch == len(set(indices))  # no index twice in an epoch
        assert set(indices) <= set(range(n))
        if n % batch == 0:
            assert sorted(indices) == list(range(n))
        epochs.append(indices)
    assert epochs[0] != epochs[1] != epochs[2]  # a fresh order every epoch
    assert take(ResumableSampler(n, batch, seed=4), per_epoch) != batches[:per_epoch]  # and per seed


def test_sampler_rejects_fewer_records_than_a_global_batch():
    with pytest.raises(ValueError, match="global batch"):
        ResumableSampler(7, 4, seed=0, world=2)


# --- collate -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(shapes_data) -> Tokenizer:
    return Tokenizer(shapes_data / "vocab.txt")


def samples(shapes_data, n: int) -> list[dict]:
    captions = [r["caption"] for r in load_pairs(shapes_data / "pretrain.json")]
    return [{"image": torch.full((3, 4, 4), float(i)), "text": captions[i], "image_id": i, "draw": 1000 + 7 * i,
             "skipped": 0} for i in range(n)]


def test_mlm_masks_depend_only_on_seed_and_draw(shapes_data, tokenizer):
    s = samples(shapes_data, 6)
    collate = Collate(tokenizer, max_len=24, needs={"mlm"}, mlm_probability=0.5, seed=3)
    full = collate(s)
    assert (full["mlm_labels"] >= 0).any() and (full["mlm_ids"] == tokenizer.mask_id).any()
    assert torch.equal(full["mlm_labels"] >= 0, (full["mlm_labels"] == full["text_ids"]) & (full["mlm_labels"] >= 0))
    for subset in ([5, 0, 3], [2], [4, 1, 2, 3, 0, 5]):
        part = collate([s[i] for i in subset])
        for row, i in enumerate(subset):
            assert torch.equal(part["mlm_ids"][row], full["mlm_ids"][i])
            assert torch.equal(part["mlm_labels"][row], full["mlm_labels"][i])
            assert torch.equal(part["text_ids"][row], full["text_ids"][i])

    # Another draw or another seed masks differently.
    redrawn = collate([{**x, "draw": x["draw"] + 1} for x in s])
    reseeded = Collate(tokenizer, max_len=24, needs={"mlm"}, mlm_probability=0.5, seed=4)(s)
    assert not torch.equal(redrawn["mlm_labels"], full["mlm_labels"])
    assert not torch.equal(reseeded["mlm_labels"], full["mlm_labels"])
    assert "mlm_ids" not in Collate(tokenizer, max_len=24)(s)


def test_rank_loaders_split_the_single_process_batches(shapes_data, tokenizer):
    """What DDP relies on: 2 ranks x 4 samples = 1 process x 8, images, texts and MLM masks alike."""
    records = load_pairs(shapes_data / "pretrain.json")
    kwargs = dict(image_size=32, seed=2, start=3)
    one = iter(pair_loader(records, shapes_data, Collate(tokenizer, 24, {"mlm"}, seed=2), batch_size=8, **kwargs))
    collate = Collate(tokenizer, 24, {"mlm"}, seed=2, fixed=True)  # ranks pad to max_len: they gather texts
    two = [iter(pair_loader(records, shapes_data, collate, batch_size=4, rank=r, world=2, **kwargs))
           for r in range(2)]
    for _ in range(3):
        whole, parts = next(one), [next(it) for it in two]
        for key in ("image", "text_ids", "text_mask", "image_id", "mlm_ids", "mlm_labels"):
            assert torch.equal(whole[key], torch.cat([p[key] for p in parts])), key

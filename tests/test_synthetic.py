"""The synthetic shapes data set: determinism, file formats, closed vocabulary and agreement with the pixels."""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlpt.data import synthetic
from vlpt.data.annotations import load_image
from vlpt.data.synthetic import COLOURS, generate

SIZES = dict(train=40, val=10, test=20, image_size=64)
FILES = ["pretrain.json", "retrieval_train.json", "retrieval_val.json", "retrieval_test.json",
         "retrieval_test_hard.json", "vqa_train.json", "vqa_val.json", "vqa_test.json", "answer_list.json",
         "nlvr_train.json", "nlvr_val.json", "nlvr_test.json", "ve_train.json", "ve_val.json", "ve_test.json",
         "grounding_train.json", "grounding_val.json", "grounding_test.json",
         "classification_test.json", "classes.json", "meta.json"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("a") / "shapes", seed=0, progress=False, **SIZES)


def load(root: Path, name: str):
    return json.loads((root / name).read_text())


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def pixels(root: Path, image: str) -> np.ndarray:
    return np.asarray(Image.open(root / image).convert("RGB"))


def colour_mask(arr: np.ndarray, colour: str) -> np.ndarray:
    return (arr == np.array(COLOURS[colour], dtype=arr.dtype)).all(axis=-1)


def colours_in(arr: np.ndarray) -> set[str]:
    return {c for c in COLOURS if colour_mask(arr, c).any()}


def texts(root: Path) -> list[str]:
    """Every piece of language in every file."""
    out = list(load(root, "classes.json")) + list(load(root, "answer_list.json"))
    for name in ("pretrain.json", "retrieval_train.json"):
        out += [r["caption"] for r in load(root, name)]
    for name in ("retrieval_val.json", "retrieval_test.json"):
        out += [c for r in load(root, name) for c in r["caption"]]
    out += [t for r in load(root, "retrieval_test_hard.json") for t in [r["caption"], *r["negatives"]]]
    for split in ("train", "test"):
        out += [t for r in load(root, f"vqa_{split}.json") for t in [r["question"], *r["answer"]]]
        out += [r["sentence"] for r in load(root, f"nlvr_{split}.json") + load(root, f"ve_{split}.json")]
        out += [r["text"] for r in load(root, f"grounding_{split}.json")]
    return out


def test_same_seed_gives_identical_bytes(root, tmp_path):
    again = generate(tmp_path / "again", seed=0, progress=False, **SIZES)
    assert digests(again) == digests(root)


def test_different_seed_gives_different_data(root, tmp_path):
    other = digests(generate(tmp_path / "other", seed=1, progress=False, **SIZES))
    mine = digests(root)
    assert other.keys() == mine.keys()
    assert other["pretrain.json"] != mine["pretrain.json"]
    assert other["images/train/000000.png"] != mine["images/train/000000.png"]


def test_every_file_exists_and_parses(root):
    meta = load(root, "meta.json")
    assert {k: meta[k] for k in SIZES} == SIZES and meta["seed"] == 0
    for name in FILES:
        data = load(root, name)
        assert isinstance(data, (list, dict)) and data, name
        if name != "meta.json":
            assert meta["counts"][name] == len(data)
    assert (root / "vocab.txt").is_file()
    assert not list(root.parent.glob(".shapes.*")), "temporary directories left behind"


def test_images_have_the_right_size_and_count(root):
    for split in ("train", "val", "test"):
        paths = sorted((root / "images" / split).glob("*.png"))
        assert len(paths) == SIZES[split]
        for p in paths:
            with Image.open(p) as img:
                assert img.mode == "RGB" and img.size == (64, 64)


def test_every_referenced_image_exists(root):
    for name in FILES:
        if name in ("meta.json", "classes.json", "answer_list.json"):
            continue
        for record in load(root, name):
            for image in record.get("images", [record.get("image")]):
                assert load_image(root / image).size == (64, 64), (name, image)  # VE names images without .png


def test_every_text_tokenises_into_the_vocab(root):
    lines = (root / "vocab.txt").read_text().splitlines()
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert lines[5:] == sorted(set(lines[5:]))
    vocab = set(lines)
    for text in texts(root):
        assert re.fullmatch(r"[a-z]+( [a-z]+)*", text), text
        assert set(text.split()) <= vocab, (text, set(text.split()) - vocab)


def test_bert_wordpiece_finds_no_unknown_words(root):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.BertWordPieceTokenizer(str(root / "vocab.txt"), lowercase=True)
    for enc in tok.encode_batch(texts(root), add_special_tokens=False):
        assert "[UNK]" not in enc.tokens and "##" not in "".join(enc.tokens)


def test_at_least_three_captions_naming_every_colour_in_the_image(root):
    for split in ("val", "test"):
        for record in load(root, f"retrieval_{split}.json"):
            caps = record["caption"]
            assert len(caps) >= 3 and len(set(caps)) == len(caps)
            present = colours_in(pixels(root, record["image"]))
            for cap in caps:
                assert {w for w in cap.split() if w in COLOURS} == present, (record["image"], cap)
    per_image = Counter(r["image_id"] for r in load(root, "pretrain.json"))
    assert len(per_image) == SIZES["train"] and min(per_image.values()) >= 3


def test_hard_negatives_only_swap_colour_words(root):
    records = load(root, "retrieval_test_hard.json")
    assert records
    captions = {r["image"]: r["caption"] for r in load(root, "retrieval_test.json")}
    for r in records:
        assert r["caption"] in captions[r["image"]] and r["negatives"]
        words = r["caption"].split()
        for negative in r["negatives"]:
            neg = negative.split()
            assert negative not in captions[r["image"]] and len(neg) == len(words)
            diff = [(a, b) for a, b in zip(words, neg) if a != b]
            assert len(diff) == 2 and all(a in COLOURS and b in COLOURS for a, b in diff)
            assert diff[0] == diff[1][::-1]


def test_grounding_boxes_hold_the_referred_shape(root):
    for split in ("train", "test"):
        records = load(root, f"grounding_{split}.json")
        assert len({r["ref_id"] for r in records}) == len(records)
        for r in records:
            x, y, w, h = r["bbox"]
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 64 and y + h <= 64, r
            arr = pixels(root, r["image"])
            inside = colours_in(arr[y:y + h, x:x + w])
            named = [w for w in r["text"].split() if w in COLOURS]
            assert len(inside) == 1 and set(named) <= inside, r
            mask = colour_mask(arr, inside.pop())
            assert mask[y:y + h, x:x + w].sum() == mask.sum(), "the shape sticks out of its box"


def test_vqa_answers_agree_with_the_image(root):
    answers = set(load(root, "answer_list.json"))
    numbers = {"one": 1, "two": 2, "three": 3}
    for split in ("train", "test"):
        records = load(root, f"vqa_{split}.json")
        assert len({r["question_id"] for r in records}) == len(records)
        for r in records:
            assert set(r["answer"]) <= answers and len(r["answer"]) == 10 and r["dataset"] == "vqa"
            top, votes = Counter(r["answer"]).most_common(1)[0]
            assert votes >= 6  # the true answer, given by most of the ten annotators
            r["answer"] = [top]
            if r["question"] == "how many shapes are there":
                assert r["question_type"] == "count"
                assert numbers[r["answer"][0]] == len(colours_in(pixels(root, r["image"])))
            if r["question"].startswith("what shape is ") and r["question"].split()[-1] in COLOURS:
                assert r["question"].split()[-1] in colours_in(pixels(root, r["image"]))
    test = load(root, "vqa_test.json")
    yes_no = Counter(Counter(r["answer"]).most_common(1)[0][0] for r in test if r["question_type"] == "yes/no")
    assert yes_no["yes"] == yes_no["no"] == SIZES["test"] // 2


def test_test_splits_are_balanced(root):
    nlvr = Counter(r["label"] for r in load(root, "nlvr_test.json"))
    assert nlvr["True"] == nlvr["False"] == SIZES["test"] // 2  # spelt as ALBEF's released files
    ve = Counter(r["label"] for r in load(root, "ve_test.json"))
    assert ve == {"entailment": SIZES["test"], "neutral": SIZES["test"], "contradiction": SIZES["test"]}
    for r in load(root, "nlvr_test.json"):
        assert len(r["images"]) == 2 and r["label"] in ("True", "False")


def test_classification_labels_name_a_colour_in_the_image(root):
    classes = load(root, "classes.json")
    records = load(root, "classification_test.json")
    assert records and len(set(classes)) == len(classes)
    for r in records:
        colour = classes[r["label"]].split()[0]
        assert colour in colours_in(pixels(root, r["image"]))


def test_failed_run_leaves_the_old_data_set(tmp_path, monkeypatch):
    out = generate(tmp_path / "shapes", seed=0, progress=False, **SIZES)
    before = digests(out)

    def broken(*args):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(synthetic, "annotation_files", broken)
    with pytest.raises(RuntimeError):
        generate(out, seed=1, progress=False, **SIZES)
    assert digests(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]

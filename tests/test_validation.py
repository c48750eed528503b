"""Config values typed by their key and validated once when the config is built; image ids of any JSON scalar."""
from __future__ import annotations

import json
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest

import vlpt.cli
from vlpt.config import ConfigError, key_type, load_config
from vlpt.data.annotations import AnnotationError, image_ids, load_annotations
from vlpt.data.loader import PairDataset
from vlpt.data.shards import ID_SPACE, ShardSet, image_id, shard_loader, write_shards
from vlpt.engine.logging import read_metrics
from vlpt.pretrain import pretrain
from helpers import cli_error, config

ALBEF_TINY = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "albef_tiny.yaml"
SAFE = ["train.steps=1", "data.num_workers=0", "train.device=cpu", "train.progress=false"]  # should a case not fail


# --- bad overrides on the command line -------------------------------------------------------------------------------

BAD = [  # (overrides, what the one-line message must name)
    (["data.batch_size=0"], "data.batch_size"),                 # was a ZeroDivisionError traceback
    (["method.queue_size=0"], "method.queue_size"),             # was a ZeroDivisionError traceback
    (["train.steps=-1"], "train.steps"),                        # "trained" and exited 0
    (["model.vision.patch_size=7"], "model.vision.patch_size"),  # trained on a truncated grid
    (["model.text.heads=5"], "model.text.heads"),               # 128 is not a multiple of 5
    (["method.mlm_probability=1.5"], "method.mlm_probability"),
    (["method.momentum=2"], "method.momentum"),
    (["optim.lr=-1"], "optim.lr"),
    (["optim.accumulate=0"], "optim.accumulate"),
    (["data.num_workers=-1"], "data.num_workers"),
    (["train.precision=fp16"], "train.precision"),
    (["method.losses=[itc, 3]"], "method.losses"),
    (["method.name=maskvlm", "method.maskvlm.region=24"], "method.maskvlm.region"),
    (["method.maskvlm.region=24", "method.name=maskvlm"], "method.maskvlm.region"),  # the name may come after
    (["optim.betas=[0.9]"], "optim.betas"),
    (["optim.lr=nan"], "optim.lr"),
    (["method.losses=[itc"], "method.losses"),                 # not YAML: one line, no parser traceback
    (["data.streams=-1"], "data.streams"),
    (["modle.text.width={a}"], "modle"),                        # an unknown key still says what it may be
]


@pytest.mark.parametrize("case, key", BAD, ids=[" ".join(case) for case, _ in BAD])
def test_a_bad_override_stops_the_command_with_one_line_naming_the_key(case, key, shapes_data, tmp_path, capsys):
    out = tmp_path / "run"
    message = cli_error(["pretrain", "--config", str(ALBEF_TINY), *SAFE, *case, f"train.out={out}",
                         f"data.root={shapes_data}"], capsys)
    assert "\n" not in message and message.startswith("vlpt: error:"), message
    assert f"'{key}'" in message or f"'{key}[" in message, message  # the key, or one element of it
    assert not out.exists()


def test_a_brace_pattern_is_read_as_text_and_a_missing_shard_is_named(shapes_data, tmp_path, capsys):
    """`data.train={000000..000002}.tar` used to die in the YAML parser; now it is a str key's text, so the run stops
    where data is opened, at the first missing shard."""
    out = tmp_path / "run"
    message = cli_error(["pretrain", "--config", str(ALBEF_TINY), *SAFE, "data.train={000000..000002}.tar",
                         f"train.out={out}", f"data.root={shapes_data}"], capsys)
    assert "\n" not in message and "shard not found" in message, message
    assert str(shapes_data / "000000.tar") in message and "2 more" in message, message
    assert not out.exists()


# --- values typed by their key ---------------------------------------------------------------------------------------

def test_override_values_are_read_by_their_key_type():
    cfg = load_config(overrides=["train.out={a}", "data.train={000..009}.tar::b/{0..1}.tar", "data.root= x: y",
                                 "train.steps=12", "optim.lr=1e-3", "train.progress=off", "method.losses=[itc, itm]",
                                 "method.loss_weights.mlm=0.5", "train.resume="])
    assert cfg.train.out == "{a}" and cfg.data.train == "{000..009}.tar::b/{0..1}.tar" and cfg.data.root == " x: y"
    assert cfg.train.steps == 12 and cfg.optim.lr == 1e-3 and cfg.train.progress is False
    assert cfg.method.losses == ["itc", "itm"]
    assert cfg.method.loss_weights == {"mlm": 0.5} and type(cfg.method.loss_weights["mlm"]) is float
    assert cfg.train.resume == ""


def test_method_keys_are_typed_by_the_method_named_in_overrides_file_or_base():
    maskvlm = ALBEF_TINY.with_name("maskvlm_tiny.yaml")
    assert load_config(maskvlm, ["method.maskvlm.region=16"]).method.maskvlm.region == 16       # YAML file
    assert load_config(base={"method": {"name": "maskvlm"}},
                       overrides=["model.vision.image_size=64", "method.maskvlm.region=16"]).method.maskvlm.region == 16
    assert load_config(ALBEF_TINY, ["method.maskvlm.masking=both", "method.name=maskvlm"]).method.maskvlm.masking == "both"
    assert key_type("method.maskvlm.region", {"method": "maskvlm"}) is int
    assert key_type("method.maskvlm.region", {"method": "albef"}) is None
    with pytest.raises(ConfigError, match="unknown config key 'method.maskvlm'"):
        load_config(ALBEF_TINY, ["method.maskvlm.region=16"])
    with pytest.raises(ConfigError, match="unknown method 'maskvlmm'"):
        load_config(overrides=["method.name=maskvlmm", "method.maskvlm.region=16"])


# --- validation, once, of every source of values ---------------------------------------------------------------------

@pytest.mark.parametrize("base, key", [
    ({"data": {"batch_size": 0}}, "data.batch_size"),
    ({"model": {"vision": {"width": 100, "heads": 3}}}, "model.vision.heads"),
    ({"method": {"loss_weights": {"itc": -1}}}, "method.loss_weights.itc"),
    ({"method": {"losses": []}}, "method.losses"),
    ({"data": {"weights": [1, -2]}}, "data.weights[1]"),
    ({"train": {"log_every": 0}}, "train.log_every"),
    ({"method": {"name": "codis", "codebook": {"size": 0}}}, "method.codebook.size"),
    ({"method": {"name": "cbvila", "cbvila": {"image_ratio": 1.5}}}, "method.cbvila.image_ratio"),
    ({"method": {"name": "maskvlm", "maskvlm": {"region": 48}}}, "method.maskvlm.region"),
])
def test_values_from_a_base_dict_or_file_are_validated_too(base, key):
    with pytest.raises(ConfigError) as excinfo:
        load_config(base=base)
    message = str(excinfo.value)
    assert message.startswith(f"config key '{key}' must be ") and "; got " in message and "\n" not in message


def test_the_rule_and_the_value_are_in_the_message():
    with pytest.raises(ConfigError) as excinfo:
        load_config(overrides=["data.batch_size=0"])
    assert str(excinfo.value) == "config key 'data.batch_size' must be >= 1; got 0"
    with pytest.raises(ConfigError) as excinfo:
        load_config(overrides=["method.name=maskvlm", "method.maskvlm.region=24"])
    assert str(excinfo.value) == ("config key 'method.maskvlm.region' must be a multiple of model.vision.patch_size "
                                  "(8) that divides model.vision.image_size (64); got 24")


def test_limits_that_are_allowed():
    cfg = load_config(overrides=["method.queue_size=1", "data.batch_size=64", "optim.warmup_steps=0", "optim.min_lr=0",
                                 "optim.grad_clip=0", "data.num_workers=0", "method.alpha=0", "method.momentum=1",
                                 "optim.betas=[0.9, 1]", "data.streams=0", "train.eval_every=0"])
    assert cfg.method.queue_size == 1  # smaller than the global batch: the queue keeps the last queue_size


# --- image ids: any JSON scalar --------------------------------------------------------------------------------------

def test_image_ids_map_each_distinct_non_integer_id_to_its_own_integer():
    records = [{"image": "a.png", "image_id": "coco_1"}, {"image": "a.png", "image_id": "coco_1"},
               {"image": "b.png", "image_id": "coco_2"}, {"image": "c.png", "image_id": 7},
               {"image": "d.png", "image_id": 3.0}, {"image": "e.png"}, {"image": "e.png"},
               {"image": "f.png", "image_id": True}, {"image": "g.png", "image_id": "12"},
               {"image": "h.png", "image_id": 1.5}, {"image": "i.png", "image_id": None}]
    ids = image_ids(records)
    assert ids[3:5] == [7, 3] and ids[8] == 12               # integers (and their decimal text) stay as they are
    assert ids[0] == ids[1] and ids[5] == ids[6]             # two captions of one image share an id
    mapped = [ids[0], ids[2], ids[5], ids[7], ids[9], ids[10]]
    assert mapped == list(range(13, 19))                     # in order of first appearance, above the largest id
    assert image_ids([{"image": "x", "image_id": -4}, {"image": "y", "image_id": "s"}]) == [-4, 0]  # never below 0


def test_an_image_id_that_is_not_a_scalar_names_the_record(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"image": "a.png", "caption": "x", "image_id": 1},
                                {"image": "b.png", "caption": "y", "image_id": ["coco", 2]}]))
    with pytest.raises(AnnotationError, match=r"record 1 has image_id \[\"coco\", 2\]"):
        load_annotations(path)


def test_foreign_shards_hash_non_integer_ids_into_63_bits():
    raw = {"__key__": "k1"}
    a, b = image_id({"image_id": "coco_5"}, raw), image_id({"image_id": "coco_6"}, raw)
    assert a == image_id({"image_id": "coco_5"}, {"__key__": "other"}) and a != b
    assert all(0 <= x < ID_SPACE for x in (a, b))
    assert image_id({"image_id": 42}, raw) == 42 and image_id({"image_id": "42"}, raw) == 42
    assert image_id({"image": "p.jpg"}, raw) == image_id({"image": "p.jpg"}, {"__key__": "k2"})
    assert image_id({}, raw) != image_id({}, {"__key__": "k2"})


@pytest.fixture(scope="module")
def string_ids(shapes_data, tmp_path_factory) -> Path:
    """A copy of the shapes data whose pretraining records carry COCO-Karpathy-style ids ("coco_391895")."""
    root = Path(shutil.copytree(shapes_data, tmp_path_factory.mktemp("strings") / "shapes"))
    records = json.loads((root / "pretrain.json").read_text())
    for r in records:
        r["image_id"] = f"coco_{391895 + r['image_id']}"
    (root / "pretrain.json").write_text(json.dumps(records))
    write_shards(root / "pretrain.json", root, root / "shards", 50, progress=False)
    return root


def shard_pattern(folder: Path) -> str:
    n = len(list(folder.glob("*.tar")))
    return str(folder / f"{{000000..{n - 1:06d}}}.tar")


def shard_records(folder: Path) -> dict[int, dict]:
    """Every json member of a shard folder, by its key (the record's index in the file)."""
    out = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    out[int(m.name.split(".")[0])] = json.loads(tar.extractfile(m).read())
    return out


def test_string_ids_give_the_same_integers_on_the_json_and_shard_paths(string_ids):
    records = load_annotations(string_ids / "pretrain.json")
    ids = PairDataset(records, string_ids, transform=None).image_ids
    by_string = defaultdict(set)
    for r, i in zip(records, ids):
        by_string[r["image_id"]].add(i)
    assert all(len(s) == 1 for s in by_string.values())                     # captions of one image: one id
    assert len({next(iter(s)) for s in by_string.values()}) == len(by_string)  # different images: different ids
    written = shard_records(string_ids / "shards")
    assert sorted(written) == list(range(len(records)))
    for key, meta in written.items():
        assert meta["image_id"] == ids[key] and meta["image_id_original"] == records[key]["image_id"]
        assert image_id(meta, {"__key__": str(key)}) == ids[key]  # the reader takes the writer's integer


def test_string_ids_train_from_json_and_from_shards(string_ids, tmp_path):
    run = pretrain(config(string_ids, tmp_path / "json", "train.steps=2", "train.log_every=1"))
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    pattern = shard_pattern(string_ids / "shards")
    run = pretrain(config(string_ids, tmp_path / "shards", "train.steps=2", "train.log_every=1",
                          f"data.train={pattern}"))
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and all(r["itc"] > 0 for r in rows)


def test_streams_that_do_not_divide_the_global_batch_name_the_key(string_ids):
    from vlpt.data.collate import Collate
    from vlpt.data.tokenizer import Tokenizer
    shards = ShardSet.open(shard_pattern(string_ids / "shards"), "/")
    collate = Collate(Tokenizer(string_ids / "vocab.txt"), 24, set(), seed=0)
    with pytest.raises(ConfigError, match=r"config key 'data.streams' must divide the global batch of 8 .*; got 3"):
        shard_loader(shards, collate, image_size=32, batch_size=8, seed=0, streams=3)

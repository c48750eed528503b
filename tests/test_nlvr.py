"""NLVR2: ALBEF's paired fusion (copies of the pretrained layer, shared key/value), text assignment's labels, MaskVLM's
way through the joint feature, the teacher made from the loaded weights, the CLI end to end (text assignment, then
both ways), and the annotation reader."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlpt.cli
from vlpt import methods
from vlpt.cli import find_config
from vlpt.config import load_config
from vlpt.data.annotations import AnnotationError
from vlpt.engine import checkpoint
from vlpt.engine.logging import read_metrics
from vlpt.objectives.assignment import LEFT, NEITHER, RIGHT, draw_assignment
from vlpt.pretrain import pretrain
from vlpt.tasks.nlvr import NLVR2, read_split
from helpers import TINY, config

FINETUNE = [*TINY, "train.steps=2", "train.eval_every=1", "train.keep=5", "task.val_split=val"]


@pytest.fixture(scope="module")
def albef(shapes_data, tmp_path_factory) -> Path:
    return pretrain(config(shapes_data, tmp_path_factory.mktemp("albef") / "run", "train.steps=3"))


@pytest.fixture(scope="module")
def maskvlm(shapes_data, tmp_path_factory) -> Path:
    return pretrain(config(shapes_data, tmp_path_factory.mktemp("maskvlm") / "run", "train.steps=2",
                           "method.maskvlm.image_cross_layers=1", "method.maskvlm.decoder_layers=1",
                           "method.maskvlm.region=16", preset="pretrain/maskvlm_tiny.yaml"))


@pytest.fixture(scope="module")
def assigned(albef, shapes_data, tmp_path_factory) -> Path:
    """Two steps of text assignment on the ALBEF checkpoint, through `vlpt pretrain`."""
    out = tmp_path_factory.mktemp("ta") / "run"
    vlpt.cli.main(["pretrain", "--config", "finetune/nlvr_ta_tiny.yaml", f"train.init={albef}", *TINY,
                   "train.steps=2", "train.log_every=1", f"data.root={shapes_data}", f"train.out={out}"])
    return out


def test_paired_blocks_start_as_copies_of_the_pretrained_layer_sharing_key_and_value(albef):
    model, _, _ = checkpoint.load_method(albef)
    pair = model.add_pair_fusion()
    assert model.add_pair_fusion() is pair and len(pair.layers) == len(model.backbone.fusion.layers)
    for layer, blocks in zip(model.backbone.fusion.layers, pair.layers):
        pretrained = layer.state_dict()
        for block in (blocks.first, blocks.second):
            copy = block.state_dict()
            assert copy.keys() == pretrained.keys()
            assert all(torch.equal(copy[k], pretrained[k]) for k in pretrained)
            assert all(p is not q for p, q in zip(block.parameters(), layer.parameters()))  # copies, not the layer
        for shared in ("key", "value"):
            for p in ("weight", "bias"):
                assert getattr(getattr(blocks.second.cross, shared), p) is getattr(getattr(blocks.first.cross, shared), p)
        assert blocks.second.cross.query.weight is not blocks.first.cross.query.weight  # only K/V are shared
        assert blocks.second.attention.key.weight is not blocks.first.attention.key.weight
    # the first block attends to the left image, the second to the right
    gen = torch.Generator().manual_seed(0)
    x, left, right = (torch.randn(2, n, 32, generator=gen) for n in (5, 17, 17))
    mask = torch.ones(2, 5, dtype=torch.long)
    blocks = pair.layers[0]
    torch.testing.assert_close(blocks(x, mask, left, right), blocks.second(blocks.first(x, mask, left), mask, right))
    assert not torch.allclose(blocks(x, mask, left, right), blocks(x, mask, right, left))


def test_a_checkpoint_without_the_paired_fusion_fills_it_from_the_fusion_layers(albef):
    """ALBEF Pretrain_nlvr.py's key mapping: a method that trains TA, started from a plain checkpoint."""
    path, cfg, tok = checkpoint.open_checkpoint(albef, ["method.losses=[nlvr_ta]"])
    model = methods.build(cfg, tok.vocab_size)
    missing, _ = checkpoint.load_weights(path, model, strict=False)
    assert not [k for k in missing if "pair_fusion" in k] and sorted(missing) == ["ta_head.bias", "ta_head.weight"]
    saved = load_file(str(path / checkpoint.WEIGHTS))
    for k, blocks in enumerate(model.pair_fusion.layers):
        for block in (blocks.first, blocks.second):
            for name, value in block.state_dict().items():
                assert torch.equal(value, saved[f"backbone.fusion.layers.{k}.{name}"]), (k, name)


def test_text_assignment_labels_are_drawn_as_albefs_pretrain_nlvr():
    """model_pretrain_nlvr.py: 2/3 own image + one other (left or right, 1/2 each), 1/3 two distinct others
    (NEITHER); others drawn by softmax(sim) without the caption's own image (or another showing it)."""
    rows, candidates = 6000, 5
    # every row: candidate 0 is its own image, 1 shows the same image (a second caption), 2..4 others with softmax
    # weights 0.6, 0.3, 0.1 (after the positives are removed)
    others = torch.tensor([0.6, 0.3, 0.1]).log()
    sim = torch.cat([torch.full((rows, 2), 5.0), others.expand(rows, 3)], 1)
    positives = torch.zeros(rows, candidates, dtype=torch.bool)
    positives[:, :2] = True
    own = torch.zeros(rows, dtype=torch.long)
    uniform = torch.rand(rows, candidates + 2, generator=torch.Generator().manual_seed(0))
    left, right, labels = draw_assignment(sim, positives, own, uniform)
    share = torch.bincount(labels, minlength=3).float() / rows
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.025), share
    is_left, is_right, neither = labels == LEFT, labels == RIGHT, labels == NEITHER
    assert (left[is_left] == 0).all() and (right[is_right] == 0).all()            # its own image on its side
    one = torch.cat([right[is_left], left[is_right]])                             # the other image
    assert (one >= 2).all() and (left[neither] >= 2).all() and (right[neither] >= 2).all()  # never a positive
    assert (left[neither] != right[neither]).all()                                # two distinct others
    freq = torch.bincount(one, minlength=candidates)[2:].float() / len(one)
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.03), freq  # drawn by softmax(sim)
    # NEITHER's pair: the first drawn by softmax(sim), the second from the rest (without replacement)
    first = torch.bincount(left[neither], minlength=candidates)[2:].float() / int(neither.sum())
    assert torch.allclose(first, torch.tensor([0.6, 0.3, 0.1]), atol=0.04), first
    # the branch and the side come from the first two noise columns, as ALBEF's two torch.rand(1) draws
    assert ((uniform[:, 0] < 1 / 3) == neither).all() and ((uniform[:, 1] >= 0.5) == is_left)[~neither].all()


def test_text_assignment_trains_through_vlpt_pretrain_from_a_checkpoint(assigned, albef):
    rows = read_metrics(assigned)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["nlvr_ta"]) for r in rows)
    assert all("itc" not in r and "mlm" not in r for r in rows)
    cfg = checkpoint.load_config(checkpoint.resolve(assigned))
    assert cfg["method"]["losses"] == ["nlvr_ta"] and cfg["train"]["init"] == str(albef)
    weights = load_file(str(checkpoint.resolve(assigned) / checkpoint.WEIGHTS))
    assert "ta_head.weight" in weights and "pair_fusion.layers.0.second.cross.key.weight" in weights
    assert (checkpoint.resolve(assigned) / checkpoint.VOCAB).read_bytes() == \
        (checkpoint.resolve(albef) / checkpoint.VOCAB).read_bytes()  # the checkpoint's vocab, not a new one


def test_separate_fusion_reads_the_methods_joint_feature(maskvlm, shapes_data):
    """MaskVLM's way: the head's input is [joint(left, text), joint(right, text)], the joint feature being MaskVLM's
    element-wise product (Eq. 3), not the text fusion's pooled state."""
    path, cfg, tok = checkpoint.open_checkpoint(maskvlm, [f"data.root={shapes_data}", "task.name=nlvr",
                                                         "task.fusion=separate"])
    method = methods.build(cfg, tok.vocab_size)
    checkpoint.load_weights(path, method)
    task = NLVR2(cfg, tok, torch.device("cpu"))
    model = task.build(method).eval()
    assert model.teacher is None and not hasattr(method, "pair_fusion")  # MaskVLM has no teacher: no distillation
    batch = next(iter(task.batches(0)))
    seen = []
    model.head[0].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        model.logits(batch, model.parts)
        backbone, mask = method.backbone, batch["text_mask"]
        hidden = backbone.encode_text(batch["text_ids"], mask)
        sides = [backbone.encode_image(batch["image"][:, side]) for side in (0, 1)]
        joint = torch.cat([backbone.joint_feature(tokens, hidden, mask) for tokens in sides], 1)
        pooled = torch.cat([backbone.pool(backbone.fuse(tokens, hidden, mask), mask) for tokens in sides], 1)
    torch.testing.assert_close(seen[0], joint, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(seen[0], pooled, atol=1e-3)


def test_the_teacher_starts_as_the_loaded_student(assigned, shapes_data, tmp_path, monkeypatch):
    """finetune builds the head and the teacher after loading: teacher == student == the checkpoint's weights (a
    teacher copied before loading, as ALBEF's NLVR.py does, would hold the random initialisation)."""
    import vlpt.engine.fit

    class Stop(Exception):
        pass

    def inspect(model, *args, **kwargs):
        student = dict(model.named_parameters())
        assert set(model.teacher.copies) == {"backbone", "pair_fusion", "head"}
        for part in ("backbone", "pair_fusion", "head"):
            own = "head" if part == "head" else f"method.{part}"
            copies = dict(model.teacher[part].named_parameters())
            mine = dict(model.get_submodule(own).named_parameters())
            assert copies.keys() == mine.keys() and all(torch.equal(copies[k], mine[k]) for k in mine), part
        saved = load_file(str(checkpoint.resolve(assigned) / checkpoint.WEIGHTS))
        for name in ("backbone.vision.patch_embed.proj.weight", "pair_fusion.layers.0.second.cross.query.weight",
                     "backbone.fusion.layers.0.cross.key.weight"):
            assert torch.equal(student[f"method.{name}"], saved[name]), name
        assert model.method.teacher is None and model.method.queues is None  # pretraining's teacher dropped
        assert not any(k.startswith("method.teacher.") for k in model.state_dict())
        raise Stop

    monkeypatch.setattr(vlpt.engine.fit, "fit", inspect)
    with pytest.raises(Stop):
        vlpt.cli.main(["finetune", "nlvr", "--config", "finetune/nlvr_tiny.yaml", "--checkpoint", str(assigned),
                       *FINETUNE, "task.fusion=paired", f"data.root={shapes_data}", f"train.out={tmp_path / 'ft'}"])


@pytest.mark.filterwarnings("ignore:NLVR2 dev accuracy")  # two steps stay at chance
@pytest.mark.parametrize("source, fusion", [("assigned", "paired"), ("albef", "paired"), ("maskvlm", "separate")])
def test_finetune_and_evaluate_through_the_cli(source, fusion, request, shapes_data, tmp_path, capsys):
    start = request.getfixturevalue(source)
    out = tmp_path / "ft"
    vlpt.cli.main(["finetune", "nlvr", "--config", "finetune/nlvr_tiny.yaml", "--checkpoint", str(start),
                   *FINETUNE, f"task.fusion={fusion}", f"data.root={shapes_data}", f"train.out={out}"])
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "val_dev_accuracy" in r] == [1, 2]
    assert all(r["val_dev_pairs"] == 8 for r in rows if "val_dev_pairs" in r)
    assert all(math.isfinite(r["nlvr"]) for r in rows if "nlvr" in r)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "finetuned" and metrics["test_p_pairs"] == 16
    assert 0 <= metrics["test_p_accuracy"] <= 100 and metrics["test_p_majority"] == 50.0
    best = [r for r in rows if r["step"] == metrics["selected_step"] and "val_dev_accuracy" in r][-1]
    assert metrics["val_dev_accuracy"] == best["val_dev_accuracy"]
    # the finetuned checkpoint evaluates to the test metrics finetune wrote, its shared K/V shared again
    result = tmp_path / "eval.json"
    capsys.readouterr()
    vlpt.cli.main(["evaluate", "nlvr", "--checkpoint", str(out / "best"), "--num-workers", "0", "--device", "cpu",
                   "--out", str(result)])
    assert "NLVR2 test_p" in capsys.readouterr().out
    assert json.loads(result.read_text()) == {k: v for k, v in metrics.items() if k.startswith("test_p_")}
    weights = load_file(str(out / "best" / checkpoint.WEIGHTS))
    if fusion == "paired":  # the text-assignment run's paired fusion is the method's, else the task's own
        pair = "method.pair_fusion" if source == "assigned" else "pair_fusion"
        assert torch.equal(weights[f"{pair}.layers.0.first.cross.key.weight"],
                           weights[f"{pair}.layers.0.second.cross.key.weight"])
        assert any(k.startswith("teacher.copies.pair_fusion.") for k in weights)
    else:
        assert not any("pair_fusion" in k or k.startswith("teacher.") for k in weights)
    # its encoders serve the zero-shot tasks too
    vlpt.cli.main(["evaluate", "all", "--checkpoint", str(out / "best"), "--tasks", "nlvr", "retrieval",
                   "--num-workers", "0", "--device", "cpu"])
    assert "NLVR2 test_p" in capsys.readouterr().out


def test_a_warning_when_dev_accuracy_stays_at_chance(albef, shapes_data):
    path, cfg, tok = checkpoint.open_checkpoint(albef, [f"data.root={shapes_data}", "task.name=nlvr",
                                                       "task.val_split=val", "data.num_workers=0"])
    task = NLVR2(cfg, tok, torch.device("cpu"))
    model = task.build(methods.build(cfg, tok.vocab_size)).eval()
    model.logits = lambda batch, parts: torch.tensor([[0.0, 1.0]]).expand(len(batch["label"]), 2)  # always true
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = task.evaluate(model, "val")  # the first evaluation may be at chance
        task.evaluate(model, "test")         # test is no validation
    assert first["dev_accuracy"] == 50.0 and first["dev_majority"] == 50.0
    with pytest.warns(UserWarning, match="dev accuracy 50.0 % is still at chance.*run text assignment first"):
        task.evaluate(model, "val")
    assert not task.text_assigned
    cfg.method.losses = [*cfg.method.losses, "nlvr_ta"]  # a checkpoint of text assignment: no advice to run it
    task.build(methods.build(cfg, tok.vocab_size))
    assert task.text_assigned
    with pytest.warns(UserWarning, match="still at chance") as caught:
        task.evaluate(model, "val")
    assert "text assignment" not in str(caught[0].message)


def write(tmp_path: Path, records) -> Path:
    path = tmp_path / "nlvr_x.json"
    path.write_text(json.dumps(records))
    return path


def test_a_label_spelled_either_way_is_read(tmp_path):
    pair = {"images": ["a.png", "b.png"], "sentence": "s"}
    records = [{**pair, "label": label} for label in ("True", True, "false", False, "FALSE")]
    assert [r["label"] for r in read_split(write(tmp_path, records))] == [1, 1, 0, 0, 0]
    for bad in ("yes", 1, None):
        with pytest.raises(AnnotationError, match=r"nlvr_x\.json: record 1 has label"):
            read_split(write(tmp_path, [{**pair, "label": True}, {**pair, "label": bad}]))


@pytest.mark.parametrize("field", ["images", "sentence", "label"])
def test_a_record_missing_a_field_names_file_record_and_field(tmp_path, field):
    good = {"images": ["a.png", "b.png"], "sentence": "s", "label": "True"}
    bad = {k: v for k, v in good.items() if k != field}
    with pytest.raises(AnnotationError, match=rf"nlvr_x\.json: record 2 lacks {field}"):
        read_split(write(tmp_path, [good, good, bad]))
    with pytest.raises(AnnotationError, match=r"nlvr_x\.json: record 0 has images \['a.png'\]"):
        read_split(write(tmp_path, [{**good, "images": ["a.png"]}]))


def test_presets_load_as_the_task_and_method_they_name():
    tiny = load_config(find_config("finetune/nlvr_tiny.yaml"))
    assert (tiny.task.name, tiny.task.fusion, tiny.task.val_split, tiny.task.distill) == ("nlvr", "separate", "val",
                                                                                          True)
    assert (tiny.optim.lr, tiny.train.steps) == (1e-4, 3000)  # the separate fusion needs ~1,500 steps to leave chance
    base = load_config(find_config("finetune/nlvr_base.yaml"))  # ALBEF configs/NLVR.yaml
    assert (base.optim.lr, base.optim.min_lr, base.optim.warmup_lr, base.method.alpha) == (2e-5, 1e-6, 1e-5, 0.4)
    assert (base.model.vision.image_size, base.data.batch_size * 8, base.task.val_split) == (384, 128, "dev")
    ta = load_config(find_config("finetune/nlvr_ta_base.yaml"))  # ALBEF configs/NLVR_pretrain.yaml
    assert ta.method.losses == ["nlvr_ta"] and (ta.optim.lr, ta.optim.min_lr) == (2e-5, 1e-5)
    assert methods.check(ta).name == "albef"

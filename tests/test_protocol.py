"""The extension protocol: a method or a task added from outside the package (registered in the test, nothing central
edited), zero-shot retrieval and finetuning through the generated CLI, legacy (format 1) checkpoints, config element
types, the optimiser's groups and schedule, CB-ViLA's warm-up and the blocks every method lists."""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

import vlpt.cli
from vlpt import methods, tasks
from vlpt.config import ConfigError, MethodConfig, TaskConfig, load_config, opt
from vlpt.data import collate as collate_module
from vlpt.data.annotations import load_annotations, load_image
from vlpt.data.loader import captions, train_loader, training_set
from vlpt.data.tokenizer import tokenizer_for
from vlpt.data.transforms import image_transform
from vlpt.engine import checkpoint
from vlpt.engine.fit import fit
from vlpt.engine.logging import read_metrics
from vlpt.engine.optim import build_optimizer
from vlpt.methods import steps
from vlpt.methods.base import Method
from vlpt.methods.maskvlm import MaskVLM
from vlpt.pretrain import pretrain
from vlpt.tasks import Task, TaskModel
from helpers import TINY, cli_error, config


@pytest.fixture(scope="module")
def pretrained(shapes_data, tmp_path_factory) -> Path:
    """A 3-step ALBEF pretraining run folder."""
    return pretrain(config(shapes_data, tmp_path_factory.mktemp("pre") / "run", "train.steps=3"))


def first_batch(cfg, needs) -> dict:
    data = training_set(cfg)
    tokenizer = tokenizer_for(cfg, captions(data), cfg.train.out)
    return next(iter(train_loader(cfg, data, tokenizer, needs))), tokenizer


# --- 1. adding a method ---------------------------------------------------------------------------------------------

@dataclass
class ToyConfig(MethodConfig):
    toy_scale: float = opt(1.0, "factor on the toy method's ITC loss")


class Toy(Method):
    loss_names = ("itc",)
    momentum_teacher = False

    @classmethod
    def batch_needs(cls, m) -> set[str]:
        return set()

    def forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        f = steps.features(self, batch)
        return {"itc": self.cfg.method.toy_scale * steps.itc(self, f, step)}


@pytest.fixture
def toy():
    methods.register("toy", ToyConfig)(Toy)
    try:
        yield Toy
    finally:
        methods.registry.unregister("toy")


def test_a_method_added_from_outside_configures_lists_and_trains(toy, shapes_data, tmp_path, capsys, monkeypatch):
    cfg = load_config(overrides=["method.name=toy", "method.toy_scale=2", "method.losses=[itc]"])
    assert type(cfg.method) is ToyConfig and cfg.method.toy_scale == 2.0 and cfg.method.losses == ["itc"]
    assert "toy" in methods.available()

    vlpt.cli.main(["config"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["method.toy_scale"]]
    assert len(lines) == 1 and "[toy]" in lines[0], lines
    with pytest.raises(ConfigError, match=r"method\.toy_scale"):
        load_config(overrides=["method.name=albef", "method.toy_scale=2"])
    with pytest.raises(ConfigError, match="has no loss 'itm'"):
        methods.check(load_config(overrides=["method.name=toy"]))  # the shared default losses include mlm

    # forward: itc only, times toy_scale, from the same weights
    cfg1 = config(shapes_data, tmp_path / "x", "method.name=toy", "method.losses=[itc]",
                  "method.loss_weights={}")  # the ALBEF preset weighs an ITM the toy has not
    batch, tokenizer = first_batch(cfg1, Toy.batch_needs(cfg1.method))
    assert not any(k.startswith("mlm") for k in batch)
    torch.manual_seed(0)
    one = methods.build(cfg1, tokenizer.vocab_size)
    cfg2 = config(shapes_data, tmp_path / "x", "method.name=toy", "method.losses=[itc]", "method.toy_scale=2",
                  "method.loss_weights={}")
    two = methods.build(cfg2, tokenizer.vocab_size)
    two.load_state_dict(one.state_dict())
    a, b = one(batch, 0), two(batch, 0)
    assert set(a) == {"itc"} and torch.isfinite(a["itc"])
    torch.testing.assert_close(b["itc"], 2 * a["itc"])
    assert not one.may_leave_parameters_unused()

    # a short pretraining run: the collated batches have no MLM keys, the metrics log ITC only
    seen = []
    original = collate_module.Collate.__call__

    def spy(self, samples):
        out = original(self, samples)
        seen.append((set(self.needs), set(out)))
        return out

    monkeypatch.setattr(collate_module.Collate, "__call__", spy)
    run = pretrain(config(shapes_data, tmp_path / "run", "method.name=toy", "method.losses=[itc]", "train.steps=3",
                          "train.log_every=1", "method.toy_scale=2", "method.loss_weights={}"))
    assert len(seen) >= 3
    for needs, keys in seen:
        assert needs == set() and not any(k.startswith("mlm") for k in keys), keys
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["itc"]) and "mlm" not in r and "itm" not in r for r in rows)
    meta = json.loads((checkpoint.resolve(run) / checkpoint.META).read_text())
    assert meta["method"] == "toy" and meta["step"] == 3
    model, loaded, _ = checkpoint.load_method(run)
    assert isinstance(model, Toy) and loaded.method.toy_scale == 2.0


def test_unregistered_method_is_gone():
    """The fixture above leaves the registry as it found it."""
    assert "toy" not in methods.available()
    with pytest.raises(ConfigError, match="unknown method 'toy'"):
        load_config(overrides=["method.name=toy"])


# --- 2. adding a task -----------------------------------------------------------------------------------------------

@dataclass
class MatchConfig(TaskConfig):
    offset: int = opt(160, "records between a training record and the one its negative caption comes from")


class MatchModel(TaskModel):
    losses = ["match"]

    def __init__(self, method):
        super().__init__(method)
        self.head = nn.Linear(method.cfg.model.text.width, 2)

    def logits(self, batch: dict) -> torch.Tensor:
        tokens, _ = self.method.encode_image(batch["image"])
        hidden, _ = self.method.encode_text(batch["text_ids"], batch["text_mask"])
        return self.head(self.method.joint_feature(tokens, hidden, batch["text_mask"]))

    def forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        logits = self.logits(batch)
        return {"match": F.cross_entropy(logits, batch["label"]),
                "accuracy": (logits.argmax(1) == batch["label"]).float().mean()}


class Match(Task):
    """Does a caption describe its image? (a test task)"""

    trains = True
    select = "accuracy"

    def __init__(self, cfg, tokenizer, device):
        super().__init__(cfg, tokenizer, device)
        self.transform = image_transform(cfg.model.vision.image_size)

    def build(self, method):
        return MatchModel(method)

    def batch(self, pairs: list[tuple[str, str, int]]) -> dict:
        ids, mask = self.tokenizer([text for _, text, _ in pairs], self.cfg.model.text.max_len)
        return {"image": torch.stack([self.transform(load_image(self.data / image)) for image, _, _ in pairs]),
                "text_ids": ids, "text_mask": mask, "label": torch.tensor([label for _, _, label in pairs]),
                "skipped": torch.tensor(0)}

    def batches(self, start: int):
        records = load_annotations(self.data / "retrieval_train.json")
        n, half, i = len(records), self.cfg.data.batch_size // 2, start
        while True:
            pairs = []
            for j in range(i * half, (i + 1) * half):
                record, other = records[j % n], records[(j + self.cfg.task.offset) % n]
                assert record["image"] != other["image"]
                pairs += [(record["image"], record["caption"], 1), (record["image"], other["caption"], 0)]
            yield self.batch(pairs)
            i += 1

    def evaluate(self, model, split: str) -> dict:
        records = load_annotations(self.data / f"retrieval_{split}.json", "retrieval")
        first = [r["caption"][0] if isinstance(r["caption"], list) else r["caption"] for r in records]
        pairs = [p for i, r in enumerate(records)
                 for p in ((r["image"], first[i], 1), (r["image"], first[(i + 1) % len(records)], 0))]
        batch = {k: v.to(self.device) for k, v in self.batch(pairs).items()}
        with torch.no_grad():
            logits = model.logits(batch).float()
        correct = logits.argmax(1) == batch["label"]
        # the mean log-likelihood of the labels tells apart weights that classify alike
        likelihood = -F.cross_entropy(logits, batch["label"]).item()
        return {"accuracy": round(100.0 * correct.float().mean().item(), 4), "likelihood": likelihood,
                "pairs": len(pairs)}


@pytest.fixture
def match_task():
    tasks.register("match", MatchConfig)(Match)
    try:
        yield Match
    finally:
        tasks.registry.unregister("match")


def test_a_task_added_from_outside_finetunes_selects_the_best_step_and_evaluates(match_task, pretrained, shapes_data,
                                                                                  tmp_path, capsys):
    out = tmp_path / "ft"
    vlpt.cli.main(["finetune", "match", "--checkpoint", str(pretrained), "train.steps=4", "train.eval_every=2",
                   f"train.out={out}", "train.keep=10", "task.offset=100", *TINY, f"data.root={shapes_data}"])
    rows = read_metrics(out)
    evals = [(r["step"], r["val_accuracy"]) for r in rows if "val_accuracy" in r]
    assert [step for step, _ in evals] == [2, 4]
    assert all(r["val_pairs"] == 16 for r in rows if "val_pairs" in r)
    top = max(value for _, value in evals)
    selected = next(step for step, value in evals if value == top)  # the first best: a later tie is not better
    best = json.loads((out / "best" / checkpoint.META).read_text())
    assert best["step"] == selected
    assert best["task"] == "match" and best["method"] == "albef" and "match" in best["heads"]
    kept = load_file(str(out / "checkpoints" / f"step_{selected:06d}" / checkpoint.WEIGHTS))
    copy = load_file(str(out / "best" / checkpoint.WEIGHTS))
    assert kept.keys() == copy.keys() and all(torch.equal(kept[k], copy[k]) for k in kept)
    assert "head.weight" in copy and any(k.startswith("method.backbone.vision.") for k in copy)
    saved = yaml.safe_load((out / "best" / checkpoint.CONFIG).read_text())
    assert saved["task"] == {"name": "match", "checkpoint": str(pretrained), "val_split": "val", "offset": 100}

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "finetuned" and metrics["selected_step"] == selected
    assert metrics["pairs"] == 32 and 0 <= metrics["accuracy"] <= 100

    # evaluating the pretraining checkpoint: no trained head, one line saying what to run
    message = cli_error(["evaluate", "match", "--checkpoint", str(pretrained), "--num-workers", "0", "--device", "cpu"],
                        capsys)
    assert "\n" not in message and "vlpt finetune match" in message and "head" in message, message

    # the finetuned checkpoint evaluates, and gives the test metrics finetune wrote
    capsys.readouterr()
    result = tmp_path / "eval.json"
    vlpt.cli.main(["evaluate", "match", "--checkpoint", str(out / "best"), "--num-workers", "0", "--device", "cpu",
                   "--out", str(result)])
    assert "accuracy" in capsys.readouterr().out
    assert json.loads(result.read_text()) == {k: v for k, v in metrics.items() if k in ("accuracy", "likelihood", "pairs")}
    # the run folder reads as its selected step too; the last step's weights score otherwise
    folder = tmp_path / "folder.json"
    vlpt.cli.main(["evaluate", "match", "--checkpoint", str(out), "--num-workers", "0", "--device", "cpu",
                   "--out", str(folder)])
    assert json.loads(folder.read_text()) == json.loads(result.read_text())
    if selected != 4:
        last = tmp_path / "last.json"
        vlpt.cli.main(["evaluate", "match", "--checkpoint", str(checkpoint.resolve(out, latest=True)),
                       "--num-workers", "0", "--device", "cpu", "--out", str(last)])
        assert json.loads(last.read_text())["likelihood"] != metrics["likelihood"]


def test_unregistered_task_is_gone():
    assert "match" not in tasks.registry.names()
    with pytest.raises(SystemExit):
        vlpt.cli.main(["finetune", "match", "--checkpoint", "x"])


class Scored(nn.Module):
    """The smallest model `fit` trains."""
    losses, loss_weights = ["loss"], {}

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))

    def forward(self, batch, step):
        return {"loss": ((self.w - batch["image"].mean()) ** 2).sum()}

    def after_step(self, step):
        pass

    def blocks(self):
        return []

    def set_grad_checkpointing(self, enable=True):
        pass

    def may_leave_parameters_unused(self):
        return False


def test_fit_keeps_the_best_evaluated_step_not_the_last(tmp_path):
    """Scripted validation scores: the best step is kept as <out>/best, not the latest one."""
    scores = iter([0.2, 0.9, 0.5, 0.9])
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n")
    cfg = load_config(overrides=[f"train.out={tmp_path / 'run'}", "train.steps=4", "train.eval_every=1",
                                 "train.progress=false", "train.device=cpu", "optim.warmup_steps=1", "train.keep=10",
                                 "optim.lr=0.1"])

    def batches(start):
        while True:
            yield {"image": torch.ones(2, 1), "skipped": torch.tensor(0)}

    out = fit(Scored(), cfg, torch.device("cpu"), batches, vocab=vocab, evaluate=lambda m: {"score": next(scores)},
              select="score")
    assert [r["val_score"] for r in read_metrics(out) if "val_score" in r] == [0.2, 0.9, 0.5, 0.9]
    assert json.loads((out / "best" / checkpoint.META).read_text())["step"] == 2
    best = load_file(str(out / "best" / checkpoint.WEIGHTS))["w"]
    assert torch.equal(best, load_file(str(out / "checkpoints" / "step_000002" / checkpoint.WEIGHTS))["w"])
    assert not torch.equal(best, load_file(str(out / "checkpoints" / "step_000004" / checkpoint.WEIGHTS))["w"])
    assert checkpoint.load_state(out / "checkpoints" / "step_000004")["best"] == {"step": 2, "metric": "score",
                                                                                   "value": 0.9}


# --- 3. zero-shot retrieval -----------------------------------------------------------------------------------------

def test_zero_shot_retrieval_through_the_cli(pretrained, tmp_path, capsys):
    saved = yaml.safe_load((checkpoint.resolve(pretrained) / checkpoint.CONFIG).read_text())
    assert saved["eval"]["k"] != 4
    written = {}
    for name, flags in (("k4", ["--k", "4"]), ("default", []), ("override", ["eval.k=3"])):
        written[name] = tmp_path / f"{name}.json"
        vlpt.cli.main(["evaluate", "retrieval", "--checkpoint", str(pretrained), *flags, "--out", str(written[name]),
                       "--num-workers", "0", "--device", "cpu"])
    assert "retrieval (itm)" in capsys.readouterr().out
    m = json.loads(written["k4"].read_text())
    assert m["protocol"] == "zero-shot" and m["k"] == 4
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean", "itc_r_mean"):
        assert 0 <= m[key] <= 100, key
    assert m["images"] == 16 and m["texts"] > 16
    assert json.loads(written["default"].read_text())["k"] == saved["eval"]["k"]
    assert json.loads(written["override"].read_text())["k"] == 3  # key=value, as every other command takes them
    message = cli_error(["evaluate", "retrieval", "--checkpoint", str(pretrained), "eval.kk=3"], capsys)
    assert "eval.kk" in message and "eval.k" in message


# --- 4. legacy checkpoints ------------------------------------------------------------------------------------------

FORMAT1 = [("teacher.copies.backbone.vision.", "teacher.copies.vision."),
           ("teacher.copies.backbone.text.", "teacher.copies.text."),
           ("teacher.copies.backbone.fusion.", "teacher.copies.fusion."),
           ("backbone.vision.", "vision."), ("backbone.text.", "text."), ("backbone.fusion.", "fusion.")]


def as_format1(key: str, prefixes=FORMAT1) -> str:
    for new, old in prefixes:
        if key == new.rstrip(".") or key.startswith(new):
            return old + key[len(new):]
    return key


def test_format1_checkpoint_loads_its_weights_and_refuses_to_resume(pretrained, tmp_path):
    source = checkpoint.resolve(pretrained)
    legacy = tmp_path / "legacy"
    shutil.copytree(source, legacy)
    (legacy / checkpoint.META).unlink()
    original = load_file(str(source / checkpoint.WEIGHTS))
    old = {as_format1(k): v for k, v in original.items()}
    assert {"vision.pos_embed", "teacher.copies.text.embeddings.word.weight"} <= set(old)
    assert not any(k.startswith("backbone.") or k.startswith("teacher.copies.backbone.") for k in old)
    save_file(old, str(legacy / checkpoint.WEIGHTS))
    values = yaml.safe_load((legacy / checkpoint.CONFIG).read_text())
    values["method"].update(intra=True, codebook={"size": 4000, "epsilon": 0.1},
                            maskvlm={"image_ratio": 0.6, "decoder_layers": 3},
                            cbvila={"warmup_steps": 1000, "beta": 0.25})
    values["optim"]["module_lr"] = {"vision": 1e-4}
    (legacy / checkpoint.CONFIG).write_text(yaml.safe_dump(values, sort_keys=False))
    with pytest.raises(ConfigError):  # the old sections are not ALBEF's keys: the loader must cut them
        load_config(base=values)

    assert checkpoint.read_meta(legacy) == {"format": 1}
    model, cfg, _ = checkpoint.load_method(legacy)
    assert cfg.method.name == "albef" and cfg.optim.module_lr == {"backbone.vision": 1e-4}
    state = model.state_dict()
    assert state.keys() == original.keys()
    differ = [k for k in original if not torch.equal(state[k], original[k])]
    assert not differ, differ[:5]
    with pytest.raises(ValueError, match="format 1"):
        checkpoint.load_state(legacy)


def test_a_checkpoint_from_a_newer_vlpt_says_to_upgrade(pretrained, tmp_path, capsys):
    future = tmp_path / "future"
    shutil.copytree(checkpoint.resolve(pretrained), future)
    meta = json.loads((future / checkpoint.META).read_text())
    (future / checkpoint.META).write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(ValueError, match="upgrade vlpt"):
        checkpoint.load_method(future)
    message = cli_error(["evaluate", "retrieval", "--checkpoint", str(future), "--num-workers", "0", "--device", "cpu"],
                        capsys)
    assert "\n" not in message and "format 99" in message and "upgrade" in message, message


def test_maskvlm_format1_keys_map_onto_the_backbone(shapes_data, tmp_path):
    cfg = config(shapes_data, tmp_path, preset="pretrain/maskvlm_tiny.yaml")
    model = methods.build(cfg, 64)
    state = model.state_dict()
    assert "backbone.vision.mask_token" in state
    prefixes = [("backbone.vision.mask_token", "mask_token"), ("backbone.image_fusion.", "image_fusion."),
                ("backbone.itm_image_proj.", "itm_image_proj."), *FORMAT1]
    old = {as_format1(k, prefixes): v for k, v in state.items()}
    assert "mask_token" in old and any(k.startswith("image_fusion.") for k in old)
    migrated = checkpoint.migrate_keys(old, MaskVLM.legacy_keys)
    assert migrated.keys() == state.keys()
    assert migrated["backbone.vision.mask_token"] is state["backbone.vision.mask_token"]
    assert checkpoint.migrate_keys({"mask_token": 1}, MaskVLM.legacy_keys) == {"backbone.vision.mask_token": 1}
    assert checkpoint.migrate_keys({"mask_token": 1}, Method.legacy_keys) == {"mask_token": 1}  # CB-ViLA's own


# --- 5. config element types ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, named", [
    ("method.losses=[itc, 3]", "method.losses[1]"),
    ("optim.betas=[0.9, x]", "optim.betas[1]"),
    ("optim.module_lr={backbone.vision: fast}", "optim.module_lr.backbone.vision"),
    ("method.loss_weights={itc: heavy}", "method.loss_weights.itc"),
])
def test_element_types_are_checked_and_named(override, named):
    with pytest.raises(ConfigError) as excinfo:
        load_config(overrides=[override])
    assert f"'{named}'" in str(excinfo.value), str(excinfo.value)


def test_literal_names_its_choices_and_elements_coerce():
    with pytest.raises(ConfigError) as excinfo:
        load_config(overrides=["model.text.pool=max"])
    message = str(excinfo.value)
    assert "model.text.pool" in message and "cls" in message and "mean" in message and "max" in message
    cfg = load_config(overrides=["optim.module_lr={backbone.vision: 1e-4}", "optim.betas=[0.9, 1]",
                                 "model.text.pool=mean"])
    assert cfg.optim.module_lr == {"backbone.vision": 1e-4} and type(cfg.optim.module_lr["backbone.vision"]) is float
    assert cfg.optim.betas == [0.9, 1.0] and all(type(b) is float for b in cfg.optim.betas)
    assert cfg.model.text.pool == "mean"


# --- 6. optimiser and schedule --------------------------------------------------------------------------------------

def expected_lr(step: int, peak: float, floor: float, o, total: int) -> float:
    start = o.warmup_lr * peak / o.lr
    if step < o.warmup_steps:
        return start + (peak - start) * (step + 1) / o.warmup_steps
    t = (step - o.warmup_steps) / (total - o.warmup_steps)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * t))


def test_schedule_and_groups_match_a_hand_oracle(shapes_data, tmp_path):
    cfg = config(shapes_data, tmp_path, "optim.lr=5e-4", "optim.min_lr=1e-5", "optim.warmup_lr=1e-5",
                 "optim.warmup_steps=3", "train.steps=10", "optim.weight_decay=0.05",
                 "optim.module_lr={backbone.vision: 1e-3, backbone.text: 2e-4}",
                 "optim.module_min_lr={backbone.vision: 1e-6}")
    o, total = cfg.optim, cfg.train.steps
    model = methods.build(cfg, 64)
    optimizer, scheduler = build_optimizer(model, cfg, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    peaks = {"backbone.vision": (1e-3, 1e-6), "backbone.text": (2e-4, 1e-5 * 2e-4 / 5e-4), "": (5e-4, 1e-5)}

    def module(name: str) -> str:
        return next((m for m in ("backbone.vision", "backbone.text") if name.startswith(m + ".")), "")

    plan, covered = [], []
    for group in optimizer.param_groups:
        owners = {module(names[id(p)]) for p in group["params"]}
        assert len(owners) == 1, owners
        plan.append(peaks[owners.pop()])
        for p in group["params"]:
            name = names[id(p)]
            covered.append(name)
            no_decay = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "embeddings.position.weight"))
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(covered) == sorted(trainable) and not any(n.startswith("teacher.") for n in covered)
    decay = {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay["backbone.vision.pos_embed"] == decay["backbone.vision.cls_token"] == decay["temp"] == 0.0
    assert decay["vision_proj.weight"] == decay["itm_head.weight"] == 0.05 and decay["vision_proj.bias"] == 0.0
    assert set(plan) == set(peaks.values())

    for step in range(total + 1):
        for group, (peak, floor) in zip(optimizer.param_groups, plan):
            assert group["lr"] == pytest.approx(expected_lr(step, peak, floor, o, total), rel=1e-9), \
                (step, peak)
        optimizer.step()
        scheduler.step()

    # the hand-written landmarks of the shared group
    rest = next(i for i, p in enumerate(plan) if p == peaks[""])
    assert expected_lr(0, 5e-4, 1e-5, o, total) == pytest.approx(1e-5 + (5e-4 - 1e-5) / 3)
    lrs = []
    optimizer, scheduler = build_optimizer(model, cfg, torch.device("cpu"))
    for _ in range(total + 1):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert lrs[0][rest] == pytest.approx(1e-5 + (5e-4 - 1e-5) / 3)
    assert [row[rest] for row in lrs[2:4]] == pytest.approx([5e-4, 5e-4])  # end of warm-up: the peak
    ends = {plan[i]: lrs[total][i] for i in range(len(plan))}
    assert ends[peaks["backbone.vision"]] == pytest.approx(1e-6)         # its own floor
    assert ends[peaks["backbone.text"]] == pytest.approx(4e-6)           # min_lr scaled by its peak
    assert ends[peaks[""]] == pytest.approx(1e-5)                        # min_lr


def test_module_min_lr_without_a_peak_is_an_error(shapes_data, tmp_path):
    for extra, match in ((["optim.module_min_lr={backbone.text: 1e-6}"], "without a peak"),
                         (["optim.module_lr={backbone.nothing: 1e-4}"], "backbone.nothing")):
        cfg = config(shapes_data, tmp_path, *extra)
        with pytest.raises(ConfigError, match=match):
            build_optimizer(methods.build(cfg, 64), cfg, torch.device("cpu"))


# --- 7. CB-ViLA warm-up and unused parameters -----------------------------------------------------------------------

def test_cbvila_table4_row1_trains_mlm_from_step0_and_the_full_preset_waits(shapes_data, tmp_path):
    row1 = config(shapes_data, tmp_path, "method.name=cbvila", "method.losses=[itc,itm,mlm]",
                  "method.cbvila.warmup_steps=10", "method.codebook.size=32")
    batch, tokenizer = first_batch(row1, methods.registry.get("cbvila").batch_needs(row1.method))
    assert "mlm_ids" in batch
    torch.manual_seed(0)
    model = methods.build(row1, tokenizer.vocab_size).train()
    out = model(batch, 0)
    assert {"itc", "itm", "mlm"} <= set(out) and torch.isfinite(out["mlm"])
    assert model.may_leave_parameters_unused()  # pixel, codebook and mim are not trained

    full = config(shapes_data, tmp_path, preset="pretrain/cbvila_tiny.yaml")
    assert full.method.losses == ["itc", "itm", "mlm", "pixel", "codebook", "mim"]
    warm = full.method.cbvila.warmup_steps
    assert warm > 0
    model = methods.build(full, tokenizer.vocab_size).train()
    for step in (0, warm - 1):
        out = model(batch, step)
        assert not {"mlm", "mim"} & set(out) and {"itc", "itm", "pixel", "codebook"} <= set(out), (step, set(out))
    assert {"mlm", "mim"} <= set(model(batch, warm))
    assert model.may_leave_parameters_unused()
    no_warmup = config(shapes_data, tmp_path, "method.cbvila.warmup_steps=0", preset="pretrain/cbvila_tiny.yaml")
    assert not methods.build(no_warmup, tokenizer.vocab_size).may_leave_parameters_unused()


def test_may_leave_parameters_unused_follows_the_losses(shapes_data, tmp_path):
    assert not methods.build(config(shapes_data, tmp_path), 64).may_leave_parameters_unused()
    assert methods.build(config(shapes_data, tmp_path, "method.losses=[itc]"), 64).may_leave_parameters_unused()


# --- 8. blocks -----------------------------------------------------------------------------------------------------

def test_albef_blocks_are_every_student_and_teacher_block(shapes_data, tmp_path):
    cfg = config(shapes_data, tmp_path, "model.vision.depth=2", "model.text.text_layers=1",
                 "model.text.fusion_layers=3")
    model = methods.build(cfg, 64)
    blocks = model.blocks()
    per_copy = cfg.model.vision.depth + cfg.model.text.text_layers + cfg.model.text.fusion_layers
    assert len(blocks) == 2 * per_copy == len({id(b) for b in blocks})
    expected = []
    for backbone in (model.backbone, model.teacher["backbone"]):
        expected += [*backbone.vision.blocks, *backbone.text.layers, *backbone.fusion.layers]
    assert [id(b) for b in blocks] == [id(b) for b in expected]
    student = {id(b) for b in expected[:per_copy]}
    assert not student & {id(b) for b in expected[per_copy:]}
    assert len(model.backbone.vision.blocks) == 2 and len(model.backbone.fusion.layers) == 3


def test_maskvlm_blocks_include_its_cross_encoder_and_decoder_and_no_teacher(shapes_data, tmp_path):
    cfg = config(shapes_data, tmp_path, "model.vision.depth=2", "method.maskvlm.image_cross_layers=2",
                 "method.maskvlm.decoder_layers=3", preset="pretrain/maskvlm_tiny.yaml")
    model = methods.build(cfg, 64)
    assert model.teacher is None and model.queues is None
    assert not any(k.startswith(("teacher.", "queues.")) for k in model.state_dict())
    blocks = model.blocks()
    t = cfg.model.text
    assert len(blocks) == 2 + t.text_layers + t.fusion_layers + 2 + 3 == len({id(b) for b in blocks})
    b = model.backbone
    expected = [*b.vision.blocks, *b.text.layers, *b.fusion.layers, *b.image_fusion.layers, *model.decoder.layers]
    assert {id(x) for x in blocks} == {id(x) for x in expected}

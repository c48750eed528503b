"""The training loop: learning, exact resume (library and CLI), atomic and checked checkpoints (DDP and FSDP:
test_parallel.py)."""
from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlpt.cli
from vlpt.engine import checkpoint
from vlpt.engine.logging import read_metrics
from vlpt.pretrain import pretrain as train
from helpers import CONFIG, METHODS, cli_error, config, method_config, overrides

LOSSES = ("itc", "itm", "mlm")


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / checkpoint.WEIGHTS))


def step_folders(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))


class Interrupt(Exception):
    pass


def crash_after_saving(monkeypatch, at: int) -> None:
    """Make `checkpoint.save` raise once checkpoint `at` is on disk, as if the job were killed right after it."""
    original = checkpoint.save

    def save(out, step, *args, **kwargs):
        path = original(out, step, *args, **kwargs)
        if step == at:
            raise Interrupt(f"killed after step {at}")
        return path

    monkeypatch.setattr(checkpoint, "save", save)


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230), "yellow": (230, 220, 40),
           "cyan": (40, 210, 220), "purple": (150, 40, 200), "orange": (240, 140, 20), "grey": (128, 128, 128)}


def colour_data(root: Path, per_colour: int = 8) -> Path:
    """A data set learnable at a glance: 32 px images of one colour with pixel noise, captioned by the colour's name;
    the pairs of a colour share an image id (they are positives of one another for ITC and ITM)."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    records = []
    for c, (name, rgb) in enumerate(COLOURS.items()):
        for i in range(per_colour):
            path = f"images/{name}_{i}.png"
            Image.fromarray(np.clip(np.array(rgb) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)).save(
                root / path)
            records.append({"image": path, "caption": name, "image_id": c})
    (root / "pretrain.json").write_text(json.dumps(records))
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *COLOURS]) + "\n")
    return root


def test_losses_fall_below_what_a_blind_predictor_reaches(tmp_path):
    """300 deterministic steps on `colour_data` (distillation off, so each loss is a plain cross entropy, and MLM
    masking nearly every caption's one word): each loss ends well below the best a predictor blind to one modality
    can do. ITC: log(batch + queue), the uniform guess; ITM: 0.6365, the entropy of its 1/3-positive prior; MLM:
    log 8, the colour guessed from the text '[CLS] [MASK] [SEP]' alone. A contrastive loss with wrong targets or no
    gradient, or a matching head that cannot see the image, stays near them."""
    cfg = config(colour_data(tmp_path / "colours"), tmp_path / "run", "train.steps=300", "train.log_every=10",
                 "optim.lr=5e-3", "optim.warmup_steps=10", "method.alpha=0", "method.mlm_probability=0.99",
                 "method.mlm_mask_only=true")
    rows = read_metrics(train(cfg))
    assert [r["step"] for r in rows] == list(range(10, 301, 10))
    last = {name: sum(r[name] for r in rows[-3:]) / 3 for name in LOSSES}  # the last 30 steps
    blind = {"itc": math.log(cfg.data.batch_size + cfg.method.queue_size), "itm": 0.6365, "mlm": math.log(8)}
    margin = {"itc": 1.5, "itm": 0.45, "mlm": 1.5}
    for name in LOSSES:
        assert last[name] < blind[name] - margin[name], (name, last[name], blind[name])
    assert rows[-1]["skipped_images"] == 0
    assert all(r["lr"] > 0 and r["samples_per_s"] > 0 for r in rows)


@pytest.mark.parametrize("method", ["albef", "simla", "semmim"])
def test_resume_is_exact(method, shapes_data, tmp_path, monkeypatch):
    """A run killed after its step-3 checkpoint and resumed from `latest` ends bitwise equal to an uninterrupted
    one: weights, momentum teacher and queues (SIMLA's fitted tokenizer, SemMIM's teacher centres). Text dropout
    makes the result depend on the restored RNG state; SIMLA's and SemMIM's masks and splits on the step."""
    n = 3
    common = ["train.steps=6", f"train.save_every={n}", "model.text.dropout=0.1", "optim.lr=0.001"]
    a = train(method_config(method, shapes_data, tmp_path / "a", *common, "train.log_every=1"))

    crash_after_saving(monkeypatch, n)
    with pytest.raises(Interrupt):
        train(method_config(method, shapes_data, tmp_path / "b", *common, "train.log_every=2"))
    monkeypatch.undo()
    assert checkpoint.resolve("latest", tmp_path / "b").name == f"step_{n:06d}"
    b = train(method_config(method, shapes_data, tmp_path / "b", *common, "train.log_every=2", "train.resume=latest"))

    wa, wb = weights(a, 2 * n), weights(b, 2 * n)
    assert wa.keys() == wb.keys()
    assert any(k.startswith("teacher.") for k in wa) and {"queues.image", "queues.text", "queues.ids"} <= set(wa)
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"resumed weights differ from the uninterrupted run's: {differ[:5]}"
    assert not torch.equal(wa["queues.image"], weights(a, n)["queues.image"])  # the check is not vacuous
    sa, sb = (checkpoint.load_state(run / "checkpoints" / f"step_{2 * n:06d}") for run in (a, b))
    assert sa["step"] == sb["step"] == 2 * n
    assert sa["scheduler"] == sb["scheduler"]

    # Metrics after a resume average only the steps run since it: step 4 is step 4 alone, not half of it.
    per_step = {r["step"]: r for r in read_metrics(a)}
    logged = {r["step"]: r for r in read_metrics(b)}
    assert sorted(logged) == [2, 4, 6]
    for name in METHODS[method].losses:
        assert logged[2][name] == pytest.approx((per_step[1][name] + per_step[2][name]) / 2, abs=1e-4)
        assert logged[4][name] == pytest.approx(per_step[4][name], abs=1e-4)
        assert logged[6][name] == pytest.approx((per_step[5][name] + per_step[6][name]) / 2, abs=1e-4)


def test_cli_resume_latest(shapes_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["pretrain", "--config", CONFIG, *overrides(shapes_data, out, "train.log_every=1", "train.save_every=2")]
    error = cli_error([*args, "train.steps=2", "--resume", "latest"], capsys)  # nothing to resume yet: one line
    assert "no checkpoint" in error and str(out) in error

    vlpt.cli.main([*args, "train.steps=2"])
    before = weights(out, 2)
    vlpt.cli.main([*args, "train.steps=4", "--resume", "latest"])
    assert f"run folder: {out}" in capsys.readouterr().out
    assert checkpoint.resolve(out).name == "step_000004"
    assert checkpoint.load_state(checkpoint.resolve(out))["step"] == 4
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]  # continued at step 3, did not start over
    assert not torch.equal(before["temp"], weights(out, 4)["temp"])
    model, cfg, _ = checkpoint.load_method(out)
    assert cfg.train.steps == 4 and cfg.train.resume == "latest" and not model.training


@pytest.mark.parametrize("failing", ["weights", "state", "latest"])
def test_crash_while_saving_keeps_the_previous_checkpoint(shapes_data, tmp_path, monkeypatch, failing):
    out = tmp_path / "run"
    cfg = config(shapes_data, out, "train.steps=4", "train.save_every=2")
    calls = []

    def half_written(write, file_arg: int | None):
        def broken(*args, **kwargs):
            calls.append(args)
            if len(calls) == 1:
                return write(*args, **kwargs)
            if file_arg is not None:
                Path(args[file_arg]).write_bytes(b"\0" * 100)  # a partial file, then the disk fills up
            raise OSError(28, "No space left on device")
        return broken

    if failing == "weights":
        monkeypatch.setattr(checkpoint, "save_file", half_written(checkpoint.save_file, 1))
    elif failing == "state":
        monkeypatch.setattr(checkpoint.torch, "save", half_written(torch.save, 1))
    else:  # the new folder is in place but `latest` was not updated
        monkeypatch.setattr(checkpoint, "_replace_text", half_written(checkpoint._replace_text, None))
    with pytest.raises(OSError, match="No space left"):
        train(cfg)
    monkeypatch.undo()

    assert len(calls) == 2
    path = checkpoint.resolve("latest", out)
    assert path.name == "step_000002"
    for name in step_folders(out):  # every folder named step_* is complete
        folder = out / "checkpoints" / name
        assert {p.name for p in folder.iterdir()} >= {checkpoint.WEIGHTS, checkpoint.STATE, checkpoint.CONFIG,
                                                       checkpoint.VOCAB}
        load_file(str(folder / checkpoint.WEIGHTS))
        assert checkpoint.load_state(folder)["step"] == int(name.split("_")[1])
    assert step_folders(out) == (["step_000002", "step_000004"] if failing == "latest" else ["step_000002"])
    model, _, _ = checkpoint.load_method(out)
    saved = weights(out, 2)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())

    leftovers = list((out / "checkpoints").glob(".step_*.tmp*"))
    assert leftovers or failing == "latest"  # the half-written folder of the crash is still there ...

    # ... training resumes from the previous checkpoint, and the next save clears the leftover.
    train(config(shapes_data, out, "train.steps=4", "train.save_every=2", "train.resume=latest"))
    assert checkpoint.resolve(out).name == "step_000004"
    assert not list((out / "checkpoints").glob(".step_*.tmp*"))
    assert checkpoint.load_state(checkpoint.resolve(out))["step"] == 4


@pytest.fixture(scope="module")
def finished_run(shapes_data, tmp_path_factory) -> Path:
    return train(config(shapes_data, tmp_path_factory.mktemp("run") / "run", "train.steps=1"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_weights_give_an_error_naming_the_file(finished_run, shapes_data, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    file = checkpoint.resolve(run) / checkpoint.WEIGHTS
    data = file.read_bytes()
    file.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"\xff" * 64, "empty": b""}[damage])

    with pytest.raises(ValueError, match="corrupt") as err:
        checkpoint.load_method(run)
    assert str(file) in str(err.value)
    with pytest.raises(ValueError, match="corrupt") as err:
        train(config(shapes_data, run, "train.steps=2", "train.resume=latest"))
    assert str(file) in str(err.value)


def test_module_lr_gives_named_modules_their_own_peak_rate():
    from vlpt import methods
    from vlpt.config import ConfigError, load_config
    from vlpt.engine.optim import build_optimizer

    cfg = load_config(vlpt.cli.find_config(CONFIG), [*overrides(Path("."), Path(".")), "optim.lr=1e-3",
                                                     "optim.module_lr={backbone.vision: 1.0e-5, backbone.text: 2.0e-5}"])
    model = methods.build(cfg, 30)
    optimizer, scheduler = build_optimizer(model, cfg, torch.device("cpu"))
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lr_of[id(model.backbone.vision.pos_embed)] == 1e-5 * scheduler.lr_lambdas[0](0)
    assert lr_of[id(model.backbone.text.layers[0].fc1.weight)] == 2e-5 * scheduler.lr_lambdas[0](0)
    assert lr_of[id(model.backbone.fusion.layers[0].fc1.weight)] == 1e-3 * scheduler.lr_lambdas[0](0)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay_of[id(model.backbone.vision.pos_embed)] == 0 and decay_of[id(model.backbone.text.layers[0].fc1.weight)] > 0
    bad = load_config(vlpt.cli.find_config(CONFIG), ["optim.module_lr={visoin: 1.0e-5}"])
    with pytest.raises(ConfigError, match="visoin"):
        build_optimizer(methods.build(bad, 30), bad, torch.device("cpu"))


# --- the step's arithmetic ------------------------------------------------------------------------------------------

def micro_batch(seed: int, n: int = 4, length: int = 12) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (n, length), generator=gen)
    ids[:, 0] = 2
    labels = torch.where(torch.rand(n, length, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
    labels[:, 0], labels[0, 1] = -100, ids[0, 1]
    return {"image": torch.randn(n, 3, 32, 32, generator=gen), "text_ids": ids, "text_mask": torch.ones_like(ids),
            "image_id": torch.arange(10 * seed, 10 * seed + n), "mlm_ids": torch.where(labels >= 0, 4, ids),
            "mlm_labels": labels}


def test_the_step_differentiates_the_weighted_losses_averaged_over_micro_batches():
    """`forward_backward` with `method.loss_weights={itc: 2.5, mlm: 0.25}` (itm unnamed: weight 1) and
    `optim.accumulate=2`: the gradient is that of sum_b sum_k w_k L_k(b) / 2, worked out here on a copy of the model
    micro-batch by micro-batch; the outputs returned for logging are the unweighted means."""
    from vlpt import methods
    from vlpt.engine.fit import forward_backward

    cfg = config(Path("."), Path("."), "method.loss_weights={itc: 2.5, mlm: 0.25}", "optim.accumulate=2",
                 "data.batch_size=4")
    torch.manual_seed(0)
    model = methods.build(cfg, 40)
    weighted, unweighted = copy.deepcopy(model), copy.deepcopy(model)
    batches = [micro_batch(1), micro_batch(2)]
    outputs = forward_backward(model, model, iter([dict(b) for b in batches]), 3, cfg, torch.device("cpu"))
    means = {}
    for batch in batches:
        out = weighted(dict(batch), 3)
        ((2.5 * out["itc"] + out["itm"] + 0.25 * out["mlm"]) / 2).backward()
        sum(unweighted(dict(batch), 3).values()).backward()
        for k, v in out.items():
            means[k] = means.get(k, 0) + v.detach() / 2
    assert outputs["samples"] == 8
    for k in LOSSES:
        torch.testing.assert_close(outputs[k], means[k], rtol=1e-6, atol=0)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == {n for n, p in weighted.named_parameters() if p.grad is not None} and len(grads) > 20
    for name, p in weighted.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-8, msg=lambda m: f"{name}: {m}")
    # the MLM head hears only MLM: its gradient is 0.25 of the unweighted sum's, over 2 micro-batches
    head = dict(unweighted.named_parameters())["mlm_head.dense.weight"].grad
    torch.testing.assert_close(grads["mlm_head.dense.weight"], 0.25 * head / 2, rtol=1e-5, atol=1e-9)


def test_accumulation_reads_each_micro_batch_once_and_resumes_exactly(shapes_data, tmp_path, monkeypatch):
    """`optim.accumulate=2` of 4 pairs: step k reads micro-batches 2k and 2k+1, the 8 pairs one batch of 8 reads at
    step k; a run killed after its step-2 checkpoint resumes at micro-batch 4 and ends bitwise equal to the
    uninterrupted run."""
    from vlpt.methods.albef import ALBEF

    seen: list[tuple[int, list[int]]] = []
    forward = ALBEF.forward

    def record(self, batch, step):
        seen.append((step, batch["image_id"].tolist()))
        return forward(self, batch, step)

    monkeypatch.setattr(ALBEF, "forward", record)

    def per_step() -> dict[int, list[int]]:
        steps: dict[int, list[int]] = {}
        for step, ids in seen:
            steps.setdefault(step, []).extend(ids)
        seen.clear()
        return steps

    common = ["train.steps=4", "train.save_every=2", "optim.lr=0.001", "model.text.dropout=0.1"]
    train(config(shapes_data, tmp_path / "whole", *common))
    whole = per_step()
    accumulated = [*common, "data.batch_size=4", "optim.accumulate=2"]
    a = train(config(shapes_data, tmp_path / "a", *accumulated))
    assert per_step() == whole and sorted(whole) == [0, 1, 2, 3] and all(len(ids) == 8 for ids in whole.values())

    with pytest.MonkeyPatch.context() as crash:
        crash_after_saving(crash, 2)
        with pytest.raises(Interrupt):
            train(config(shapes_data, tmp_path / "b", *accumulated))
    seen.clear()
    b = train(config(shapes_data, tmp_path / "b", *accumulated, "train.resume=latest"))
    assert per_step() == {2: whole[2], 3: whole[3]}  # micro-batches 4 to 7
    wa, wb = weights(a, 4), weights(b, 4)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert checkpoint.load_state(checkpoint.resolve(b))["data_position"] == 8


def test_queues_wrap_around_during_a_run_and_hold_the_latest_teacher_features(shapes_data, tmp_path, monkeypatch):
    """A queue of 20 pushed 8 pairs a step for 4 steps wraps mid-batch: every step's ITC keys are the batch's teacher
    features then the queue as the earlier steps left it (slot g % 20 holding the newest of the pushed pairs g), the
    positives follow the queued image ids, and the checkpoint holds the final queue and pointer."""
    from vlpt.methods import steps

    size, batch, n_steps = 20, 8, 4
    seen = []
    push = steps.push_queues

    def record(method, f):
        seen.append({k: getattr(f, k).detach().clone() for k in ("image_id", "teacher_image", "teacher_text",
                                                                   "image_feat", "image_keys", "text_keys",
                                                                   "positives")})
        push(method, f)

    monkeypatch.setattr(steps, "push_queues", record)
    out = train(config(shapes_data, tmp_path / "run", f"method.queue_size={size}", f"train.steps={n_steps}",
                       "optim.lr=0.001"))
    assert len(seen) == n_steps
    ids = torch.full((size,), -1)
    for step, f in enumerate(seen):
        if step == 0:  # the random initial queue, no ids
            image, text = f["image_keys"][batch:].clone(), f["text_keys"][batch:].clone()
        torch.testing.assert_close(f["image_keys"], torch.cat([f["teacher_image"], image]), rtol=0, atol=0)
        torch.testing.assert_close(f["text_keys"], torch.cat([f["teacher_text"], text]), rtol=0, atol=0)
        assert torch.equal(f["positives"], f["image_id"][:, None] == torch.cat([f["image_id"], ids])[None])
        slots = (step * batch + torch.arange(batch)) % size                     # the oracle's push
        ids[slots], image[slots], text[slots] = f["image_id"], f["teacher_image"], f["teacher_text"]
    final = weights(out, n_steps)
    assert torch.equal(final["queues.ids"], ids) and final["queues.ptr"].item() == (n_steps * batch) % size
    assert torch.equal(final["queues.image"], image) and torch.equal(final["queues.text"], text)
    assert not torch.allclose(seen[-1]["teacher_image"], seen[-1]["image_feat"])  # teacher and student differ
    assert (ids >= 0).all() and seen[-1]["positives"][:, batch:].any()  # wrapped: every slot written, some positive

"""The training loop: learning, exact resume (library and CLI), atomic and checked checkpoints (DDP and FSDP:
test_parallel.py)."""
from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlpt.cli
from vlpt.engine import checkpoint
from vlpt.engine.logging import read_metrics
from vlpt.pretrain import pretrain as train
from helpers import CONFIG, cli_error, config, overrides

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


def test_loss_goes_down(shapes_data, tmp_path):
    out = train(config(shapes_data, tmp_path / "run", "train.steps=40", "train.log_every=1", "optim.lr=0.001",
                       "optim.warmup_steps=5"))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 41))
    for name in LOSSES:
        first = statistics.mean(r[name] for r in rows[:5])
        last = statistics.mean(r[name] for r in rows[-5:])
        assert last < first, (name, first, last)
    assert rows[-1]["skipped_images"] == 0
    assert all(r["lr"] > 0 and r["samples_per_s"] > 0 for r in rows)


def test_resume_is_exact(shapes_data, tmp_path, monkeypatch):
    """A run killed after its step-3 checkpoint and resumed from `latest` ends bitwise equal to an uninterrupted
    one: weights, momentum teacher and queues. Text dropout makes the result depend on the restored RNG state."""
    n = 3
    common = ["train.steps=6", f"train.save_every={n}", "model.text.dropout=0.1", "optim.lr=0.001"]
    a = train(config(shapes_data, tmp_path / "a", *common, "train.log_every=1"))

    crash_after_saving(monkeypatch, n)
    with pytest.raises(Interrupt):
        train(config(shapes_data, tmp_path / "b", *common, "train.log_every=2"))
    monkeypatch.undo()
    assert checkpoint.resolve("latest", tmp_path / "b").name == f"step_{n:06d}"
    b = train(config(shapes_data, tmp_path / "b", *common, "train.log_every=2", "train.resume=latest"))

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
    for name in LOSSES:
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

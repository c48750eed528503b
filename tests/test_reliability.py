"""Reliability of the training loop and its checkpoints: steps whose loss or gradient is not finite are skipped and,
in a row, stop the run with one line; metrics are strict JSON; `state.pt` is read without running code; replacing a
checkpoint never leaves `latest` naming nothing, also under SIGKILL; `train.keep` prunes."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlpt.engine import checkpoint
from vlpt.engine.logging import MetricsLog
from vlpt.errors import VlptError
from vlpt.methods.albef import ALBEF
from vlpt.pretrain import pretrain as train
from helpers import config

TESTS = Path(__file__).resolve().parent
LOSSES = ("itc", "itm", "mlm")


def strict_rows(run: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON: NaN and Infinity are errors."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / checkpoint.WEIGHTS))


def step_folders(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))


def plant_nan(monkeypatch, steps: set[int], value_only: bool = False) -> list[int]:
    """Make ALBEF's ITC loss NaN at the given (0-based) steps; with `value_only` its gradient stays finite. Returns
    the list of steps `after_step` runs for."""
    forward, after_step, applied = ALBEF.forward, ALBEF.after_step, []

    def poisoned(self, batch, step):
        out = forward(self, batch, step)
        if step in steps:
            nan = torch.tensor(float("nan"))
            out["itc"] = out["itc"] + nan * out["itc"].detach() if value_only else out["itc"] * nan
        return out

    def recorded(self, step):
        applied.append(step)
        after_step(self, step)

    monkeypatch.setattr(ALBEF, "forward", poisoned)
    monkeypatch.setattr(ALBEF, "after_step", recorded)
    return applied


# --- non-finite steps -----------------------------------------------------------------------------------------------

def test_a_huge_learning_rate_stops_with_one_line_and_keeps_the_last_good_checkpoint(shapes_data, tmp_path):
    """The issue's run: `optim.lr=1e6 optim.grad_clip=0` goes NaN at step 3 (deterministically on this tiny model);
    steps 3-5 are skipped and the run stops there, instead of training 30 steps of NaN and saving them."""
    out = tmp_path / "run"
    with pytest.raises(VlptError) as err:
        train(config(shapes_data, out, "optim.lr=1e6", "optim.grad_clip=0", "train.steps=30", "train.log_every=1",
                     "train.save_every=1"))
    message = str(err.value)
    assert "\n" not in message
    assert "step 5" in message and "steps 3-5" in message and "max_bad_steps=3" in message, message
    assert all(name in message for name in (*LOSSES, "grad_norm")), message
    assert "step_000002" in message

    rows = strict_rows(out)  # valid JSON, no NaN
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert "nonfinite" not in rows[1] and all(isinstance(rows[1][k], float) for k in LOSSES)
    for row in rows[2:]:
        assert row["bad_steps"] == 1 and set(row["nonfinite"]) == {*LOSSES, "grad_norm"}
        assert all(row[k] is None for k in (*LOSSES, "grad_norm"))

    assert step_folders(out) == ["step_000001", "step_000002"]  # nothing written after a bad step
    latest = checkpoint.resolve(out)
    assert latest.name == "step_000002" and checkpoint.load_state(latest)["step"] == 2
    model, _, _ = checkpoint.load_method(out)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


@pytest.mark.parametrize("gradient", ["NaN", "finite"])
def test_a_transient_bad_step_is_skipped_and_training_goes_on(shapes_data, tmp_path, monkeypatch, gradient):
    """One step (step 2) whose ITC loss is NaN, its gradient NaN too or finite, applies nothing (no AdamW step, no
    teacher EMA); the checkpoint due at step 2 is written at step 3, the next applied one; its metric line is valid
    JSON naming what was not finite."""
    applied = plant_nan(monkeypatch, {1}, value_only=gradient == "finite")
    out = train(config(shapes_data, tmp_path / "run", "train.steps=4", "train.save_every=2", "train.log_every=1",
                       "optim.lr=0.001"))
    assert applied == [0, 2, 3]
    assert step_folders(out) == ["step_000003", "step_000004"]
    state = checkpoint.load_state(checkpoint.resolve(out))
    assert state["step"] == 4 and state["data_position"] == 4
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {3}  # 3 AdamW steps in 4
    assert state["scheduler"]["last_epoch"] == 4  # the schedule advanced on the skipped step

    rows = {r["step"]: r for r in strict_rows(out)}
    bad = ["grad_norm", "itc"] if gradient == "NaN" else ["itc"]
    assert rows[2]["itc"] is None and rows[2]["bad_steps"] == 1 and rows[2]["nonfinite"] == bad
    assert isinstance(rows[2]["itm"], float)  # finite values of the skipped step are still shown
    assert all("nonfinite" not in rows[s] and isinstance(rows[s]["itc"], float) for s in (1, 3, 4))
    assert all(torch.isfinite(v).all() for v in weights(checkpoint.resolve(out)).values() if v.is_floating_point())


def test_a_window_averages_only_its_applied_steps(shapes_data, tmp_path, monkeypatch):
    """With log_every=2, the line of steps 1-2 (step 2 skipped) shows step 1's ITC, not NaN, and says one step
    was skipped; max_bad_steps=1 stops at the first one."""
    plant_nan(monkeypatch, {1})
    out = train(config(shapes_data, tmp_path / "run", "train.steps=2", "train.log_every=2", "optim.lr=0.001"))
    (row,) = strict_rows(out)
    assert isinstance(row["itc"], float) and row["bad_steps"] == 1 and row["nonfinite"] == ["grad_norm", "itc"]

    with pytest.raises(VlptError, match=r"step 2: non-finite itc, grad_norm in step 2 \(train.max_bad_steps=1"):
        train(config(shapes_data, tmp_path / "one", "train.steps=4", "train.max_bad_steps=1"))
    assert not (tmp_path / "one" / "latest").exists()


def test_metrics_lines_are_strict_json(tmp_path):
    import math
    out = tmp_path / "run"
    log = MetricsLog(out, tensorboard=False)
    log.write(1, loss=math.nan, grad_norm=math.inf, ok=1.5, nested={"a": -math.inf, "b": 2.0})
    log.write(2, nonfinite=["itc"], itc=1.0)
    rows = strict_rows(out)
    assert rows[0]["loss"] is None and rows[0]["grad_norm"] is None and rows[0]["ok"] == 1.5
    assert rows[0]["nested"] == {"a": None, "b": 2.0}
    assert rows[0]["nonfinite"] == ["grad_norm", "loss", "nested"]
    assert rows[1]["itc"] == 1.0 and rows[1]["nonfinite"] == ["itc"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_RUNNER = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
import torch.distributed as dist
from helpers import config
from vlpt.methods.albef import ALBEF
from vlpt.pretrain import pretrain

forward, after_step = ALBEF.forward, ALBEF.after_step
def poisoned(self, batch, step):  # rank 1 alone: ITC's value NaN at step 2, its gradient finite
    out = forward(self, batch, step)
    if step == 1 and dist.get_rank() == 1:
        out["itc"] = out["itc"] + float("nan") * out["itc"].detach()
    return out
def recorded(self, step):
    with open(Path({out!r}) / f"applied.{{dist.get_rank()}}", "a") as f:
        f.write(f"{{step}}\\n")
    after_step(self, step)
ALBEF.forward, ALBEF.after_step = poisoned, recorded
pretrain(config(Path({root!r}), Path({out!r}), *sys.argv[1:]))
"""


def test_ranks_agree_to_skip_a_step_that_one_rank_finds_non_finite(shapes_data, tmp_path):
    """2 gloo ranks (DDP): rank 1's ITC value goes NaN with finite gradients, so only its flag says so; both ranks
    skip the step (else rank 0 would apply an update rank 1 did not, and the replicas would part)."""
    out = tmp_path / "run"
    out.mkdir()
    runner = tmp_path / "runner.py"
    runner.write_text(DDP_RUNNER.format(tests=str(TESTS), root=str(shapes_data), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(runner), "train.steps=3", "train.log_every=1",
           "data.batch_size=4", "optim.lr=0.001"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for rank in (0, 1):
        assert (out / f"applied.{rank}").read_text().split() == ["0", "2"]
    rows = {r["step"]: r for r in strict_rows(out)}
    assert rows[2]["itc"] is None and rows[2]["nonfinite"] == ["itc"] and rows[2]["bad_steps"] == 1
    assert isinstance(rows[2]["grad_norm"], float)
    state = checkpoint.load_state(checkpoint.resolve(out))
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2}


# --- safe loading ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(shapes_data, tmp_path_factory) -> Path:
    return train(config(shapes_data, tmp_path_factory.mktemp("run") / "run", "train.steps=1"))


class RunsCode:
    """A pickle that calls os.system when loaded."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_a_state_that_would_run_code_is_refused_before_it_runs(finished_run, shapes_data, tmp_path, kind):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    file = checkpoint.resolve(run) / checkpoint.STATE
    pwned = tmp_path / "pwned"
    payload = {"step": 1, "optimizer": RunsCode(pwned)}
    if kind == "torch.save":
        torch.save(payload, file)
    else:
        file.write_bytes(pickle.dumps(payload))

    with pytest.raises(VlptError) as err:
        checkpoint.load_state(checkpoint.resolve(run))
    message = str(err.value)
    assert "\n" not in message and str(file) in message
    assert ("refused" in message and "system" in message) if kind == "torch.save" else "not a vlpt" in message
    with pytest.raises(VlptError, match="refused" if kind == "torch.save" else "not a vlpt"):
        train(config(shapes_data, run, "train.steps=2", "train.resume=latest"))
    assert not pwned.exists()


@pytest.mark.parametrize("damage", ["random", "empty", "not a dict", "meta"])
def test_a_file_that_is_no_vlpt_state_fails_with_one_line(finished_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    folder = checkpoint.resolve(run)
    if damage == "random":
        (folder / checkpoint.STATE).write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "empty":
        (folder / checkpoint.STATE).write_bytes(b"")
    elif damage == "not a dict":
        torch.save([torch.zeros(2)], folder / checkpoint.STATE)
    else:
        (folder / checkpoint.META).write_text("{not json")
    with pytest.raises(VlptError) as err:
        checkpoint.load_state(folder)
    message = str(err.value)
    assert "\n" not in message and "not a" in message and str(folder) in message, message


def test_rng_states_are_plain_tensors(finished_run):
    """What this vlpt writes loads with torch's own weights_only rules, nothing allow-listed, and restores numpy."""
    state = checkpoint.load_state(checkpoint.resolve(finished_run))
    np.random.seed(7)
    expected = np.random.rand(3)
    np.random.seed(7)
    saved = checkpoint.rng_state()
    np.random.seed(0)
    checkpoint.set_rng_state([saved])
    assert np.array_equal(np.random.rand(3), expected)
    assert isinstance(state["rng"][0]["numpy"]["state"]["key"], torch.Tensor)


# --- replacing and pruning checkpoints ------------------------------------------------------------------------------

def save(out: Path, step: int, value: float, **kwargs) -> Path:
    vocab = out / "vocab.src"
    if not vocab.exists():
        out.mkdir(parents=True, exist_ok=True)
        vocab.write_text("[PAD]\n")
    return checkpoint.save(out, step, {"w": torch.full((2,), value)}, {"train": {}}, vocab, {"value": value},
                           **kwargs)


def test_keep_prunes_old_checkpoints_but_never_latest_or_best(tmp_path):
    out = tmp_path / "run"
    for step in range(1, 6):
        save(out, step, float(step), keep=2, as_best=step == 3)
    assert step_folders(out) == ["step_000004", "step_000005"]
    assert checkpoint.resolve(out, latest=True).name == "step_000005"
    assert checkpoint.read_meta(out / "best")["step"] == 3 and weights(out / "best")["w"][0] == 3
    assert checkpoint.resolve(out) == out / "best"  # reading a run folder: the selected step, not the last

    save(out, 2, 20.0, keep=2)  # a new run re-saving an older step: `latest` names it, so it stays
    assert step_folders(out) == ["step_000002", "step_000005"]
    assert checkpoint.resolve(out, latest=True).name == "step_000002"
    assert weights(checkpoint.resolve(out, latest=True))["w"][0] == 20
    save(out, 4, 4.0, keep=1)
    assert step_folders(out) == ["step_000004"] and checkpoint.read_meta(out / "best")["step"] == 3
    assert not list(out.rglob(".*"))  # no temporary folder or aside left


def test_big_step_numbers_prune_in_numeric_order(tmp_path):
    out = tmp_path / "run"
    for step in (999_998, 999_999, 1_000_000):
        save(out, step, 1.0, keep=2)
    assert step_folders(out) == ["step_1000000", "step_999999"]


@pytest.mark.parametrize("what", ["step", "best"])
def test_a_crash_while_replacing_a_folder_leaves_it_readable(tmp_path, monkeypatch, what):
    """Re-saving the step `latest` names (or `best`): a crash between moving the old folder aside and renaming the
    new one into place leaves the old one readable under its name, and the next save puts it back."""
    out = tmp_path / "run"
    save(out, 4, 1.0, as_best=True)
    real = os.rename

    def crash(src, dst):
        if Path(dst).name == ("step_000004" if what == "step" else "best"):
            raise OSError("killed")
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", crash)
    with pytest.raises(OSError, match="killed"):
        save(out, 4, 2.0, as_best=True)
    monkeypatch.undo()
    folder = out / "checkpoints" / "step_000004" if what == "step" else out / "best"
    assert not folder.exists()
    found = checkpoint.resolve(out, latest=True) if what == "step" else checkpoint.resolve(out)
    assert found.name == f".{folder.name}.old" and weights(found)["w"][0] == 1.0
    assert checkpoint.load_state(found)["value"] == 1.0

    save(out, 6, 3.0)  # the next save first puts the aside back
    assert weights(folder)["w"][0] == 1.0 and not list(folder.parent.glob(".*.old"))


SIGKILL_RUNNER = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import vlpt.engine.checkpoint as checkpoint
from helpers import config
from vlpt.pretrain import pretrain

real = checkpoint.os.rename
def rename(src, dst):
    if Path(dst).name == {target!r}:  # the new checkpoint folder, complete, about to be renamed into place
        Path({marker!r}).write_text(str(src))
        time.sleep(600)
    return real(src, dst)
checkpoint.os.rename = rename
pretrain(config(Path({root!r}), Path({out!r}), *sys.argv[1:]))
"""
COMMON = ["train.steps=6", "train.save_every=2", "train.keep=3", "model.text.dropout=0.1", "optim.lr=0.001"]


@pytest.fixture(scope="module")
def uninterrupted(shapes_data, tmp_path_factory) -> Path:
    return train(config(shapes_data, tmp_path_factory.mktemp("ref") / "run", *COMMON))


def kill_while_saving(tmp_path: Path, root: Path, out: Path, target: str, *extra: str) -> None:
    """Run pretraining in a subprocess and SIGKILL it while it renames checkpoint folder `target` into place."""
    marker = tmp_path / "reached"
    runner = tmp_path / "runner.py"
    runner.write_text(SIGKILL_RUNNER.format(tests=str(TESTS), target=target, marker=str(marker), root=str(root),
                                            out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, str(runner), *COMMON, *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the checkpoint"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


@pytest.mark.parametrize("case", ["new step", "re-saving latest"])
def test_sigkill_while_saving_leaves_latest_loadable_and_resume_exact(uninterrupted, shapes_data, tmp_path, case):
    """SIGKILL while checkpoint 4 is renamed into place. A new step: `latest` still names step 2. Re-saving the step
    `latest` names (a run resumed from step 2 of a run whose latest is step 4): the old step 4, moved aside, is what
    `latest` reads. Either way it loads, and `--resume latest` ends bitwise equal to the uninterrupted run."""
    out = tmp_path / "run"
    extra = []
    if case == "re-saving latest":
        shutil.copytree(uninterrupted, out)
        shutil.rmtree(out / "checkpoints" / "step_000006")
        (out / "latest").write_text("step_000004\n")
        (out / "metrics.jsonl").unlink()
        extra = [f"train.resume={out / 'checkpoints' / 'step_000002'}"]
    kill_while_saving(tmp_path, shapes_data, out, "step_000004", *extra)

    latest = checkpoint.resolve("latest", out)
    reference = uninterrupted / "checkpoints"
    if case == "new step":
        assert latest.name == "step_000002" and list((out / "checkpoints").glob(".step_000004.tmp*"))
    else:
        assert latest.name == ".step_000004.old" and not (out / "checkpoints" / "step_000004").exists()
    expected = weights(reference / latest.name.strip(".").removesuffix(".old"))
    model, _, _ = checkpoint.load_method(out)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert checkpoint.load_state(latest)["step"] == int(latest.name.strip(".").removesuffix(".old")[5:])

    train(config(shapes_data, out, *COMMON, "train.resume=latest"))
    assert checkpoint.resolve(out).name == "step_000006"
    wa, wb = weights(reference / "step_000006"), weights(out / "checkpoints" / "step_000006")
    assert wa.keys() == wb.keys() and {"queues.image", "teacher.copies.backbone.vision.pos_embed"} <= set(wa)
    assert not [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not list((out / "checkpoints").glob(".*"))  # the leftover of the kill is gone
    assert step_folders(out) == ["step_000002", "step_000004", "step_000006"]


def test_a_resumed_run_may_prune_the_checkpoint_it_resumed_from(shapes_data, tmp_path):
    """`train.keep=2` in a run resumed from step 2: saving step 6 prunes step 2, whose vocabulary the run was
    started with; step 8 is still written (the vocabulary is read once, not from the pruned folder)."""
    out = tmp_path / "run"
    train(config(shapes_data, out, "train.steps=2", "train.save_every=2"))
    train(config(shapes_data, out, "train.steps=8", "train.save_every=2", "train.keep=2", "train.resume=latest"))
    assert step_folders(out) == ["step_000006", "step_000008"]
    assert (out / "checkpoints" / "step_000008" / checkpoint.VOCAB).read_text() == \
        (out / "checkpoints" / "step_000006" / checkpoint.VOCAB).read_text()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_augmented_json_run_resumes_bitwise(shapes_data, tmp_path, num_workers):
    """With data.augment (every base preset) the JSON path seeds each sample's crop and ops by (seed, draw), as the
    shard path does: a run stopped after a checkpoint and resumed ends with the weights of an uninterrupted one,
    whichever worker decoded which sample; and augmentation does change the pixels."""
    extra = ["data.augment=true", f"data.num_workers={num_workers}", "train.save_every=2"]
    whole = train(config(shapes_data, tmp_path / "whole", *extra, "train.steps=4"))
    train(config(shapes_data, tmp_path / "part", *extra, "train.steps=2"))
    resumed = train(config(shapes_data, tmp_path / "part", *extra, "train.steps=4", "train.resume=latest"))
    a = load_file(checkpoint.resolve(whole) / checkpoint.WEIGHTS)
    b = load_file(checkpoint.resolve(resumed) / checkpoint.WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = train(config(shapes_data, tmp_path / "plain", "train.steps=4", f"data.num_workers={num_workers}"))
    c = load_file(checkpoint.resolve(plain) / checkpoint.WEIGHTS)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_native_crash_prints_the_python_stack_of_the_command():
    """A segfault inside a library (seen once in CI: gloo under FSDP) must say where Python was: `vlpt` turns on
    faulthandler, so a crash in a command's code prints that code's frames."""
    code = ("import ctypes, vlpt.cli\n"
            "def crash_in_command(args):\n"
            "    ctypes.string_at(0)\n"
            "vlpt.cli.cmd_synth = crash_in_command\n"
            "vlpt.cli.main(['data', 'synth', '--out', 'never-written'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONFAULTHANDLER": ""})
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr[-2000:])
    assert "Fatal Python error: Segmentation fault" in proc.stderr
    assert "crash_in_command" in proc.stderr, proc.stderr[-2000:]


def test_a_run_folder_short_of_its_steps_warns_which_checkpoint_it_gives(finished_run, tmp_path):
    """Evaluating `runs/X` while X still trains silently took its step-350 checkpoint once (issue 14's session): a run
    folder whose latest checkpoint is short of `train.steps` says so; a finished run, a checkpoint folder named
    outright, resuming (which wants the latest) and a converted release do not."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    ckpt = checkpoint.resolve(run)
    values = yaml.safe_load((ckpt / checkpoint.CONFIG).read_text())
    values["train"]["steps"] = 700  # as a run that is still on its way to step 700
    (ckpt / checkpoint.CONFIG).write_text(yaml.safe_dump(values))
    with pytest.warns(UserWarning, match=r"step 1 of 700 \(the run is still training, or stopped early\)"):
        assert checkpoint.resolve(run) == ckpt
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checkpoint.resolve(ckpt) == ckpt
        assert checkpoint.resolve("latest", run, latest=True) == ckpt
        assert checkpoint.resolve(finished_run) == checkpoint.resolve(finished_run / "checkpoints" / "step_000001")
        meta = json.loads((ckpt / checkpoint.META).read_text())
        (ckpt / checkpoint.META).write_text(json.dumps({**meta, "converted": {"from": "albef"}}))
        assert checkpoint.resolve(run) == ckpt  # a converted release: step 0 of the paper's schedule, not a run

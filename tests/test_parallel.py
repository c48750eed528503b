"""Distributed training (torchrun, gloo): DDP and FSDP equal one process on the same global batch (JSON pairs and
WebDataset shards), and resume exactly;
checkpoints resume across modes; gradient checkpointing and compile leave the maths unchanged."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlpt import methods
from vlpt.engine import checkpoint, parallel
from vlpt.engine.logging import read_metrics
from vlpt.engine.optim import build_optimizer
from vlpt.pretrain import pretrain as train
from helpers import METHODS, config, method_config, overrides

LOSSES = ("itc", "itm", "mlm")
STEPS = ["train.steps=4", "train.save_every=2", "train.log_every=1", "optim.lr=0.001"]


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / checkpoint.WEIGHTS))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(root: Path, out: Path, *extra: str, nproc: int = 2, preset: str = METHODS["albef"].preset) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "vlpt", "pretrain", "--config", preset,
           *overrides(root, out, *extra)]
    before = out.with_name(out.name + ".before")  # what a rerun starts from (a resume's rolled-back run)
    if out.exists():
        shutil.copytree(out, before)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode and "Signal 11 (SIGSEGV)" in proc.stderr:
        # A rank died in native code: rarely (once in CI on 2026-12-07, rank 0 inside the gloo all-gather of an FSDP
        # checkpoint; 70 runs of that test here did not repeat it). Shown, and run once more from the same start: a
        # crash that repeats, and every other failure, fails the test.
        warnings.warn(f"a torchrun rank segfaulted; running it once more. Its output:\n{proc.stderr[-4000:]}")
        shutil.rmtree(out, ignore_errors=True)
        if before.exists():
            shutil.copytree(before, out)
        cmd[cmd.index("--master-port") + 1] = str(free_port())
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    shutil.rmtree(before, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def torchrun_method(method: str, root: Path, out: Path, *extra: str) -> None:
    """`torchrun` of METHODS[method]: its preset and overrides, then `extra`."""
    torchrun(root, out, *METHODS[method].extra, *extra, preset=METHODS[method].preset)


def roll_back(run: Path, copy: Path, step: int) -> Path:
    """A copy of `run` as a crash right after checkpoint `step` would leave it: `latest` and the log at `step`."""
    shutil.copytree(run, copy)
    (copy / "latest").write_text(f"step_{step:06d}\n")
    lines = (copy / "metrics.jsonl").read_text().splitlines(keepends=True)
    (copy / "metrics.jsonl").write_text("".join(lines[:step]))
    return copy


def comparable(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The elements of a weight that training determines: attention key biases are left out, as their gradient is 0
    in exact arithmetic (q.(k + b) adds q.b to every logit of a query's row, which the softmax ignores), so AdamW
    scales rounding noise up to lr-sized steps there, which differ with the order of the ranks' sums."""
    if name.endswith("attn.qkv.bias"):  # timm: [query | key | value]
        query, _, value = tensor.chunk(3)
        return torch.cat([query, value])
    return tensor[:0] if name.endswith("key.bias") else tensor


def assert_same_training(a: Path, b: Path, steps, atol: float, losses=LOSSES, teacher: bool = True) -> None:
    """Equal losses, gradient norms and learning rates at `steps`, and final weights within `atol` (with the momentum
    teacher and queues unless `teacher` is false: MaskVLM has neither)."""
    ra, rb = ({r["step"]: r for r in read_metrics(run)} for run in (a, b))
    for step in steps:
        assert ra[step].keys() == rb[step].keys()
        for name in (n for n in (*losses, "grad_norm", "lr") if n in ra[step]):  # CB-ViLA adds MIM, MLM mid-run
            assert rb[step][name] == pytest.approx(ra[step][name], rel=1e-4, abs=1e-6), (step, name)
    wa, wb = weights(a, max(steps)), weights(b, max(steps))
    assert wa.keys() == wb.keys()
    queues = {"queues.image", "queues.text", "queues.ids"}
    if teacher:
        assert any(k.startswith("teacher.") for k in wa) and queues <= set(wa)
    else:
        assert not any(k.startswith(("teacher.", "queues.")) for k in wa)
    for k in wa:
        torch.testing.assert_close(comparable(k, wb[k]), comparable(k, wa[k]), atol=atol, rtol=0,
                                   msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def reference(shapes_data, tmp_path_factory):
    """`reference(method, *extra)`: the run every mode must reproduce, one process of METHODS[method] with global
    batch 8, 4 steps, checkpoints at 2 and 4 (and `extra`); trained once per module."""
    runs = {}

    def run(method: str, *extra: str) -> Path:
        if (method, extra) not in runs:
            out = tmp_path_factory.mktemp(f"one_{method}") / "run"
            runs[method, extra] = train(method_config(method, shapes_data, out, *STEPS, *extra))
        return runs[method, extra]
    return run


@pytest.fixture(scope="module")
def shard_data(shapes_data, tmp_path_factory) -> str:
    """`data.train` naming the shapes pretraining pairs written as WebDataset shards of 16 samples."""
    from vlpt.data.shards import write_shards
    out = tmp_path_factory.mktemp("shards") / "shards"
    write_shards(shapes_data / "pretrain.json", shapes_data, out, 16, progress=False)
    n = len(list(out.glob("*.tar")))
    return f"data.train={out}/{{000000..{n - 1:06d}}}.tar"


@pytest.mark.parametrize("method, mode, data", [
    ("albef", "ddp", "json"), ("albef", "fsdp", "json"), ("albef", "fsdp", "shards"),
    ("simla", "fsdp", "json"), ("semmim", "fsdp", "json"),
    # DDP is ALBEF's row's code path for every method; these two only repeat it (half a minute each)
    pytest.param("simla", "ddp", "json", marks=pytest.mark.slow),
    pytest.param("semmim", "ddp", "json", marks=pytest.mark.slow)])
def test_two_processes_match_one_and_resume_exactly(method, mode, data, shapes_data, reference, tmp_path, request):
    """2 gloo ranks with 4 samples each = 1 process with 8 (every loss at every step, weights, teacher and queues); a
    2-rank run killed after its step-2 checkpoint and resumed ends bitwise equal to the uninterrupted one. From the
    JSON annotations, and from WebDataset shards. SIMLA: the single stream sharded by layer, its k-means tokenizer
    fitted on the gathered first batch, BEiT block masks drawn for the global batch and sliced by rank, MIM's masked
    count averaged over ranks. SemMIM: the decoder's layers sharded, second views seeded by draw, text-guided masks
    and prefix splits drawn for the global batch, masked-patch and suffix-token counts averaged over ranks, the
    teacher centres (in the weights) over the global batch."""
    data = [request.getfixturevalue("shard_data")] if data == "shards" else []
    losses = METHODS[method].losses
    extra = [*STEPS, *data, "data.batch_size=4", f"train.parallel={mode}"]
    two = tmp_path / "two"
    torchrun_method(method, shapes_data, two, *extra)
    assert [r["step"] for r in read_metrics(two)] == [1, 2, 3, 4]
    assert_same_training(reference(method, *data), two, [1, 2, 3, 4], atol=1e-5, losses=losses)

    resumed = roll_back(two, tmp_path / "resumed", 2)
    torchrun_method(method, shapes_data, resumed, *extra, "train.resume=latest")
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3, 4]
    assert_same_training(two, resumed, [3, 4], atol=0, losses=losses)
    state = checkpoint.load_state(checkpoint.resolve(resumed))
    assert state["step"] == 4 and len(state["rng"]) == 2  # one RNG state per rank
    assert all(isinstance(name, str) for name in state["optimizer"]["state"])  # keyed by parameter name


def test_cbvila_under_fsdp_matches_one_process_codebook_restarts_included(shapes_data, tmp_path):
    """CB-ViLA's codebook bookkeeping under 2-rank FSDP: usage counted over the global batch, restart candidates drawn
    from global positions and written into each rank's shard of the codewords, as one process does. The
    straight-through estimator: gumbel noise is drawn per rank."""
    preset = "pretrain/cbvila_tiny.yaml"
    extra = [*STEPS, "method.cbvila.estimator=straight_through", "method.cbvila.warmup_steps=2",
             "method.cbvila.dead_after=1", "method.codebook.size=33"]  # 33: uneven shards
    reference = train(config(shapes_data, tmp_path / "one", *extra, preset=preset))
    two = tmp_path / "two"
    torchrun(shapes_data, two, *extra, "data.batch_size=4", "train.parallel=fsdp", preset=preset)
    losses = (*LOSSES, "pixel", "codebook", "mim", "codebook_usage")
    assert_same_training(reference, two, [1, 2, 3, 4], atol=1e-5, losses=losses)
    assert not torch.equal(weights(two, 4)["quantizer.codewords"], weights(two, 2)["quantizer.codewords"])


@pytest.mark.parametrize("preset, extra, metrics", [
    ("pretrain/codis_tiny.yaml", ["method.codebook.size=16"], ("codebook", "codebook_usage", "codebook_perplexity")),
    ("pretrain/maskvlm_tiny.yaml", ["method.maskvlm.region=16"], ("mim",)),
], ids=["codis", "maskvlm"])
def test_codis_and_maskvlm_under_ddp_match_one_process(preset, extra, metrics, shapes_data, tmp_path):
    """2 DDP ranks of 4 = 1 process of 8 for CODIS (the IPOT plans solved over the global batch, codebook usage and
    perplexity counted over it) and MaskVLM (in-batch ITC over the global batch, region masks drawn for it and
    sliced by rank, masked-pixel and masked-token counts averaged over ranks): every loss and metric at every step,
    and the weights."""
    extra = [*STEPS, *extra]
    reference = train(config(shapes_data, tmp_path / "one", *extra, preset=preset))
    two = tmp_path / "two"
    torchrun(shapes_data, two, *extra, "data.batch_size=4", preset=preset)
    rows = read_metrics(reference)
    assert all(set(metrics) <= set(r) for r in rows)
    assert_same_training(reference, two, [1, 2, 3, 4], atol=1e-5, losses=(*LOSSES, *metrics),
                         teacher="codis" in preset)


@pytest.mark.parametrize("method", ["albef", "simla", "semmim"])
def test_a_checkpoint_resumes_under_another_mode(method, reference, shapes_data, tmp_path):
    """One format for every mode: the single process's step-2 checkpoint resumed by 2 FSDP ranks continues as the
    single process did."""
    one = reference(method)
    resumed = roll_back(one, tmp_path / "resumed", 2)
    torchrun_method(method, shapes_data, resumed, *STEPS, "data.batch_size=4", "train.parallel=fsdp",
                    "train.resume=latest")
    assert_same_training(one, resumed, [3, 4], atol=1e-5, losses=METHODS[method].losses)


def tiny_model(*extra: str, method: str = "albef"):
    cfg = method_config(method, Path("."), Path("."), "model.text.dropout=0.1", "model.vision.drop_path=0.1", *extra)
    torch.manual_seed(0)
    return methods.build(cfg, 40), cfg


def tiny_batch(n: int = 4, length: int = 12) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 40, (n, length), generator=gen)
    ids[:, 0] = 2
    labels = torch.where(torch.rand(n, length, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
    labels[:, 0] = -100
    labels[0, 1] = ids[0, 1]
    return {"image": torch.randn(n, 3, 32, 32, generator=gen), "text_ids": ids,
            "text_mask": torch.ones_like(ids), "image_id": torch.arange(n), "mlm_ids": torch.where(labels >= 0, 4, ids),
            "mlm_labels": labels, "image_view2": torch.randn(n, 3, 32, 32, generator=gen)}  # SemMIM's second view


def gradients(model, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(3)
    out = model(batch, step=5)
    sum(out.values()).backward()
    return {k: v.detach() for k, v in out.items()}, {n: p.grad.clone() for n, p in model.named_parameters()
                                                      if p.grad is not None}


def draws_as_rank(monkeypatch, rank: int, world: int, setup) -> torch.Tensor:
    from vlpt.engine import distributed
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    setup()
    return torch.rand(6)


def test_joining_a_group_leaves_it_at_exit(monkeypatch):
    """A rank that exits still in its gloo group aborts now and then at interpreter shutdown (the SIGSEGV this file
    reruns): `init` registers `close`, and `close` leaves the group."""
    import torch.distributed as dist
    from vlpt.engine import distributed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    registered = []
    monkeypatch.setattr(distributed.atexit, "register", registered.append)
    distributed.init(torch.device("cpu"))
    try:
        assert dist.is_initialized() and registered == [distributed.close]
    finally:
        distributed.close()
    assert not dist.is_initialized()
    distributed.close()                                   # outside a group: nothing to do


def test_each_rank_draws_its_own_dropout_and_rank_0_keeps_one_process_stream(monkeypatch):
    from vlpt.engine import distributed

    def seeded():
        torch.manual_seed(3)
        distributed.seed_rank(3)
    draws = [draws_as_rank(monkeypatch, r, 3, seeded) for r in range(3)]
    torch.manual_seed(3)
    assert torch.equal(draws[0], torch.rand(6))
    assert not torch.equal(draws[1], draws[0]) and not torch.equal(draws[2], draws[1])
    assert torch.equal(draws_as_rank(monkeypatch, 1, 3, seeded), draws[1])  # reproducible

    # resuming: each rank its saved state; under another number of ranks, rank 0's split into distinct streams
    saved = []
    for r in range(2):
        torch.manual_seed(10 + r)
        saved.append(checkpoint.rng_state())
    same = [draws_as_rank(monkeypatch, r, 2, lambda: checkpoint.set_rng_state(saved)) for r in range(2)]
    for r in range(2):
        torch.manual_seed(10 + r)
        assert torch.equal(same[r], torch.rand(6))
    split = [draws_as_rank(monkeypatch, r, 3, lambda: checkpoint.set_rng_state(saved)) for r in range(3)]
    assert len({tuple(d.tolist()) for d in split}) == 3


@pytest.mark.parametrize("method", ["albef", "simla", "semmim"])
def test_grad_checkpointing_gives_the_same_losses_and_gradients(method, monkeypatch):
    """Recomputation replays dropout and drop-path with the saved RNG state: the same step, less memory. Every
    student block is recomputed (SIMLA's one stack, SemMIM's decoder included), no teacher module is set to."""
    from vlpt.models import text
    batch = tiny_batch()
    plain, _ = tiny_model(method=method)
    recomputed, _ = tiny_model(method=method)
    recomputed.set_grad_checkpointing()
    assert not any(getattr(m, "grad_checkpointing", False) for m in recomputed.teacher.modules())
    losses_a, grads_a = gradients(plain, batch)
    checkpointed, run = [], text.checkpoint

    def recording(layer, *args, **kwargs):
        checkpointed.append(layer)
        return run(layer, *args, **kwargs)
    monkeypatch.setattr(text, "checkpoint", recording)
    losses_b, grads_b = gradients(recomputed, batch)
    teacher = {id(m) for m in recomputed.teacher.modules()}
    student = {id(b) for b in recomputed.blocks()} - teacher  # the blocks FSDP and compile act on
    assert {id(b) for b in checkpointed} == student
    assert losses_a.keys() == losses_b.keys() and set(METHODS[method].losses) <= losses_a.keys()
    for k in losses_a:
        torch.testing.assert_close(losses_b[k], losses_a[k], rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 20
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_mlm_at_the_data_pipelines_positions_equals_finding_them():
    """`mlm_positions` from the data pipeline (no wait for the device) gives the loss of finding them from labels."""
    model, _ = tiny_model("model.text.dropout=0.0", "model.vision.drop_path=0.0")
    batch = tiny_batch()
    given = {**batch, "mlm_positions": (batch["mlm_labels"].flatten() >= 0).nonzero().squeeze(1)}
    with torch.no_grad():
        torch.testing.assert_close(model(given, 5)["mlm"], model(batch, 5)["mlm"], rtol=0, atol=1e-6)


def test_optimizer_state_by_name_round_trip_and_old_formats():
    model, cfg = tiny_model()
    optimizer, _ = build_optimizer(model, cfg, torch.device("cpu"))
    gradients(model, tiny_batch())
    optimizer.step()
    state = parallel.optimizer_state(model, optimizer)
    assert set(state["state"]) <= {n for n, _ in model.named_parameters()} and len(state["state"]) > 20
    for old in (state, optimizer.state_dict()):  # by name, and the index-keyed format of older checkpoints
        fresh, _ = build_optimizer(model, cfg, torch.device("cpu"))
        parallel.load_optimizer_state(model, fresh, old)
        a, b = optimizer.state_dict(), fresh.state_dict()
        assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
        assert all(torch.equal(a["state"][i]["exp_avg"], b["state"][i]["exp_avg"]) for i in a["state"])


def test_checkpoints_with_a_scalar_temperature_still_load():
    model, _ = tiny_model()
    state = model.state_dict()
    state["temp"] = torch.tensor(0.05)  # written before the temperature became 1-D for FSDP
    model.load_state_dict(state)
    assert model.temperature().shape == () and model.temperature().item() == pytest.approx(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["albef", "simla", "semmim"])
def test_compiled_blocks_train_as_eager_ones(method, shapes_data, tmp_path):
    """train.compile=true (each block compiled, dynamic text lengths and masked-token counts) trains the same steps."""
    common = ["train.steps=3", "train.log_every=1", "optim.lr=0.001"]
    eager = train(method_config(method, shapes_data, tmp_path / "eager", *common))
    compiled = train(method_config(method, shapes_data, tmp_path / "compiled", *common, "train.compile=true"))
    assert_same_training(eager, compiled, [1, 2, 3], atol=1e-4, losses=METHODS[method].losses)

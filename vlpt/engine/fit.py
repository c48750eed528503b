"""The one training loop, for pretraining a method and for finetuning a task: AdamW with warm-up + cosine
(`optim.py`), clipping, accumulation, autocast, torchrun DDP or FSDP, compile and gradient checkpointing
(`parallel.py`), tqdm progress, JSONL metrics, atomic checkpoints, exact resume, and an evaluation hook every
`train.eval_every` steps that keeps the best checkpoint by the selected metric.

Non-finite steps: a step whose loss (any of `model.losses`) or gradient norm is not finite on any rank is skipped:
no optimiser update and no `after_step` (teacher EMA, codebook restarts), its gradients dropped. The step still
counts: its batch is consumed and the learning-rate schedule advances, so the step number keeps indexing the data
position, the seeded draws and the schedule, and a run resumes exactly whatever it skipped. A checkpoint or an
evaluation due on a skipped step waits for the next applied one (the run's last step is always saved: a skipped
step leaves the weights as the last applied step left them). After `train.max_bad_steps` skipped steps in a row
the run stops with one line naming the steps and values; the last checkpoint, which `latest` names, is intact.
A method's queue push happens inside `forward` and is kept on a skipped step: it pushes the momentum teacher's
features of a real batch, and the teacher, which only `after_step` moves, is the last applied step's, so they are
keys like any other step's (undoing it would mean copying the queues every step). Were they not finite, every
later ITC loss would not be, and the run would stop as above; and no checkpoint is written with a weight or buffer
that is not finite.

The model is any `nn.Module` with `forward(batch, step) -> {name: scalar}`, `losses` (the names summed, weighted by
`loss_weights`), `after_step(step)`, `blocks()`, `set_grad_checkpointing()` and `may_leave_parameters_unused()`:
every `Method` and every task model.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from vlpt.config import Config
from vlpt.engine import checkpoint, distributed, parallel
from vlpt.engine.logging import MetricsLog
from vlpt.engine.optim import build_optimizer
from vlpt.engine.runtime import autocast, to_device
from vlpt.errors import VlptError


def forward_backward(ddp, model, batches, step: int, cfg: Config, device: torch.device) -> dict[str, torch.Tensor]:
    """`optim.accumulate` micro-batches of forward and backward; the weighted sum of the losses named in
    `model.losses` is differentiated, every output (losses and metrics) is returned averaged over micro-batches,
    with `skipped` (unreadable images replaced) and `samples` (global) counts."""
    accumulate, weights, losses = cfg.optim.accumulate, model.loss_weights, model.losses
    sums: dict[str, torch.Tensor] = {}
    for micro in range(accumulate):
        batch = to_device(next(batches), device)
        sums["skipped"] = sums.get("skipped", 0) + batch.pop("skipped", torch.tensor(0))
        with parallel.grad_sync(ddp, micro == accumulate - 1), autocast(device, cfg.train.precision):
            outputs = ddp(batch, step)
            total = sum(weights.get(k, 1.0) * v for k, v in outputs.items() if k in losses)
        (total / accumulate).backward()
        for k, v in outputs.items():
            sums[k] = sums.get(k, 0) + v.detach() / accumulate
    sums["samples"] = accumulate * batch["image"].shape[0] * distributed.world_size()
    return sums


def gradient_norm(model) -> torch.Tensor:
    """The global gradient norm without clipping (FSDP: over all shards), as `parallel.clip_grad_norm` returns it."""
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if total_norm is None:  # pragma: no cover - older torch: a clip that scales by exactly 1 (or NaN: skipped)
        return parallel.clip_grad_norm(model, float("inf"))
    norm = total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return norm.full_tensor() if distributed.DTensor is not None and isinstance(norm, distributed.DTensor) else norm


def nonfinite(outputs: dict[str, torch.Tensor], losses, device: torch.device) -> list[str]:
    """The names among `losses` and `grad_norm` whose value is not finite on some rank; every rank gets the same
    list (one all-reduce of a flag per name). Reading it is a host sync every step, the only one this loop adds:
    whether to launch the optimiser step must be known before it is launched."""
    names = [k for k in outputs if k in losses or k == "grad_norm"]
    flags = torch.stack([(~torch.isfinite(outputs[k].detach())).any().to(device) for k in names]).int()
    flags = distributed.all_sum(flags)
    return [k for k, bad in zip(names, flags.tolist()) if bad]


def nonfinite_state(model, device: torch.device) -> list[str]:
    """The names of the model's floating-point weights and buffers (teacher, queues) that hold a value that is not
    finite on some rank (this rank's shards under FSDP); the same list on every rank. A host sync, once per save."""
    state = {k: distributed.local(v) for k, v in model.state_dict().items() if v.is_floating_point()}
    flags = torch.stack([(~torch.isfinite(v.detach())).any().to(device) for v in state.values()]).int()
    flags = distributed.all_sum(flags)
    return [k for k, bad in zip(state, flags.tolist()) if bad]


def train_step(ddp, model, optimizer, scheduler, batches, step: int, cfg: Config,
               device: torch.device) -> tuple[dict, list[str]]:
    """One optimiser step: forward/backward over the micro-batches, clipping, AdamW, schedule, `after_step`. Returns
    the outputs and the names of those that were not finite, in which case nothing was applied (see the module)."""
    outputs = forward_backward(ddp, model, batches, step, cfg, device)
    clip = cfg.optim.grad_clip  # the norm is needed even without clipping: it says whether the gradients are finite
    outputs["grad_norm"] = (parallel.clip_grad_norm(model, clip) if clip > 0 else gradient_norm(model)).detach()
    bad = nonfinite(outputs, model.losses, device)
    if not bad:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        if bad:  # torch warns when a schedule's first step comes before any optimiser step: deliberate here
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
        scheduler.step()
    if not bad:
        model.after_step(step)
    return outputs, bad


def fit(model: torch.nn.Module, cfg: Config, device: torch.device, batches_from: Callable[[int], Iterable], *,
        vocab: str | Path, resume: Path | None = None, evaluate: Callable[[torch.nn.Module], dict] | None = None,
        select: str = "", meta: dict | None = None, desc: str = "") -> Path:
    """Train `model` (built, on `device`, seeded alike on every rank) for `train.steps` optimiser steps on
    `batches_from(position)`, the batches from that many micro-batches on; write checkpoints (with `vocab` and
    `meta`) to `train.out`; from checkpoint `resume` when given. With `evaluate` (model -> metrics, on the main
    process), `select` names the metric whose highest value is kept as `<train.out>/best`. Returns `train.out`."""
    distributed.seed_rank(cfg.train.seed)  # the same weights on every rank, then each rank its own draws
    out, main = Path(cfg.train.out), distributed.is_main()
    step, skipped, state, best = 0, 0, None, None
    if resume:
        checkpoint.load_weights(resume, model)  # full weights, before FSDP shards them
        state = checkpoint.load_state(resume)
        step, skipped, best = state["step"], state.get("skipped", 0), state.get("best")
    ddp = parallel.prepare(model, cfg, device)  # checkpointing, compile; DDP or FSDP under torchrun
    optimizer, scheduler = build_optimizer(model, cfg, device)  # after FSDP, which replaces the parameters
    if state is not None:
        parallel.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    accumulate = cfg.optim.accumulate
    loader = batches_from(step * accumulate)
    log = MetricsLog(out, main, cfg.train.tensorboard)
    save_config = cfg.to_dict()
    vocab = Path(vocab).read_bytes()  # read once: the folder it came from (a resumed checkpoint) may be pruned

    def save(at: int, as_best: bool = False) -> None:
        # every rank takes part: FSDP gathers the shards to rank 0; each rank's RNG state is kept
        broken = nonfinite_state(model, device)
        if broken:  # never a checkpoint with NaN over a good one (a queue pushed in a skipped step, say)
            raise VlptError(f"checkpoint {at} not written: {len(broken)} weights or buffers are not finite "
                            f"({', '.join(broken[:4])}); `latest` still names the previous one")
        weights, optim = parallel.model_state(model), parallel.optimizer_state(model, optimizer)
        rng = distributed.gather_objects(checkpoint.rng_state())
        if main:
            state = {"optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rng,
                     "skipped": skipped, "data_position": at * accumulate, "best": best}
            checkpoint.save(out, at, weights, save_config, vocab, state, keep=cfg.train.keep, meta=meta,
                            as_best=as_best)
        if distributed.is_distributed():
            torch.distributed.barrier()

    def run_evaluation(at: int) -> bool:
        """Evaluate, log, and say whether this is the best step so far (the same answer on every rank)."""
        nonlocal best
        better = torch.zeros((), device=device)
        if main:
            model.eval()
            metrics = evaluate(model)
            model.train()
            log.write(at, **{f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
            value = float(metrics[select])
            if best is None or value > best["value"]:
                best = {"step": at, "metric": select, "value": value}
                better.fill_(1)
        if distributed.is_distributed():
            torch.distributed.broadcast(better, 0)
        return bool(better)

    model.train()
    batches = iter(loader)
    if state is not None:  # after iter(): creating the loader's iterator draws from the global RNG
        checkpoint.set_rng_state(state["rng"])
    bar = tqdm(total=cfg.train.steps, initial=step, disable=not (main and cfg.train.progress), desc=desc,
               dynamic_ncols=True)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}  # steps that returned each output (a method may add losses mid-run, e.g. CB-ViLA)
    bad_sums: dict[str, torch.Tensor] = {}  # the same for the window's skipped steps: logged only where no applied
    bad_counts: dict[str, int] = {}         # step of the window has the output
    window_bad, window_names = 0, {}        # skipped steps since the last metric line, and what was not finite
    streak, streak_names = 0, {}            # skipped steps in a row, and what was not finite in them
    due_eval = due_save = False
    tick, samples = time.perf_counter(), 0
    try:
        while step < cfg.train.steps:
            outputs, bad = train_step(ddp, model, optimizer, scheduler, batches, step, cfg, device)
            samples += outputs.pop("samples")
            sums["skipped"] = sums.get("skipped", 0) + outputs.pop("skipped")  # unreadable images: every step
            step += 1
            bar.update(1)
            streak = streak + 1 if bad else 0
            streak_names = {**streak_names, **dict.fromkeys(bad)} if bad else {}
            window_bad += bool(bad)
            window_names.update(dict.fromkeys(bad))
            into, into_counts = (bad_sums, bad_counts) if bad else (sums, counts)
            for k, v in outputs.items():  # losses, the method's metrics (codebook usage, ...), grad_norm
                into[k] = into.get(k, 0) + v
                into_counts[k] = into_counts.get(k, 0) + 1
            stop = streak >= cfg.train.max_bad_steps
            if step % cfg.train.log_every == 0 or step == cfg.train.steps or stop:
                values = {k: distributed.all_mean(v.float()).item() / (1 if k == "skipped" else counts[k])
                          for k, v in sums.items()}
                values.update({k: distributed.all_mean(v.float()).item() / bad_counts[k]  # NaN: a null in the line
                               for k, v in bad_sums.items() if k not in values})
                skipped += int(round(values.pop("skipped") * distributed.world_size()))
                elapsed = time.perf_counter() - tick
                row = {**{k: round(v, 5) for k, v in values.items()}, "lr": scheduler.get_last_lr()[0],
                       "samples_per_s": round(samples / elapsed, 2), "skipped_images": skipped}
                if window_bad:
                    row["bad_steps"] = window_bad
                log.write(step, nonfinite=list(window_names), **row)
                bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k in model.losses or k == "samples_per_s"})
                sums, counts, bad_sums, bad_counts, tick, samples = {}, {}, {}, {}, time.perf_counter(), 0
                window_bad, window_names = 0, {}
            if stop:
                try:
                    kept = f"`latest` names the last checkpoint, {checkpoint.resolve(out, latest=True)}, intact"
                except FileNotFoundError:
                    kept = "no checkpoint was written"
                hint = "lower optim.lr" + (", or set optim.grad_clip" if cfg.optim.grad_clip == 0 else "")
                steps = f"step {step}" if streak == 1 else f"steps {step - streak + 1}-{step}"
                raise VlptError(f"training stopped at step {step}: non-finite {', '.join(streak_names)} in {steps} "
                                f"(train.max_bad_steps={cfg.train.max_bad_steps} in a row), whose updates were "
                                f"skipped; {kept} ({hint})")
            every = cfg.train.eval_every
            due_eval |= evaluate is not None and ((every > 0 and step % every == 0) or step == cfg.train.steps)
            due_save |= step % cfg.train.save_every == 0 or step == cfg.train.steps
            if bad and step < cfg.train.steps:
                continue  # no checkpoint or evaluation after a skipped step: they wait for the next applied one
            as_best = due_eval and run_evaluation(step)
            if due_save or as_best:
                save(step, as_best)
            due_eval = due_save = False
    finally:
        bar.close()
        log.close()
    return out

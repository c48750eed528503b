"""The one training loop, for pretraining a method and for finetuning a task: AdamW with warm-up + cosine
(`optim.py`), clipping, accumulation, autocast, torchrun DDP or FSDP, compile and gradient checkpointing
(`parallel.py`), tqdm progress, JSONL metrics, atomic checkpoints, exact resume, and an evaluation hook every
`train.eval_every` steps that keeps the best checkpoint by the selected metric.

The model is any `nn.Module` with `forward(batch, step) -> {name: scalar}`, `losses` (the names summed, weighted by
`loss_weights`), `after_step(step)`, `blocks()`, `set_grad_checkpointing()` and `may_leave_parameters_unused()`:
every `Method` and every task model.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from vlpt.config import Config
from vlpt.engine import checkpoint, distributed, parallel
from vlpt.engine.logging import MetricsLog
from vlpt.engine.optim import build_optimizer
from vlpt.engine.runtime import autocast, to_device


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


def train_step(ddp, model, optimizer, scheduler, batches, step: int, cfg: Config, device: torch.device) -> dict:
    """One optimiser step: forward/backward over the micro-batches, clipping, AdamW, schedule, `after_step`."""
    outputs = forward_backward(ddp, model, batches, step, cfg, device)
    if cfg.optim.grad_clip > 0:
        outputs["grad_norm"] = parallel.clip_grad_norm(model, cfg.optim.grad_clip).detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    model.after_step(step)
    return outputs


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

    def save(at: int, as_best: bool = False) -> None:
        # every rank takes part: FSDP gathers the shards to rank 0; each rank's RNG state is kept
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
    tick, samples = time.perf_counter(), 0
    while step < cfg.train.steps:
        outputs = train_step(ddp, model, optimizer, scheduler, batches, step, cfg, device)
        samples += outputs.pop("samples")
        for k, v in outputs.items():  # losses, the method's metrics (codebook usage, ...), skipped, grad_norm
            sums[k] = sums.get(k, 0) + v
            counts[k] = counts.get(k, 0) + 1
        step += 1
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            values = {k: distributed.all_mean(v.float()).item() / (1 if k == "skipped" else counts[k])
                      for k, v in sums.items()}
            skipped += int(round(values.pop("skipped") * distributed.world_size()))
            elapsed = time.perf_counter() - tick
            row = {**{k: round(v, 5) for k, v in values.items()}, "lr": scheduler.get_last_lr()[0],
                   "samples_per_s": round(samples / elapsed, 2), "skipped_images": skipped}
            log.write(step, **row)
            bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k in model.losses or k == "samples_per_s"})
            sums, counts, tick, samples = {}, {}, time.perf_counter(), 0
        every = cfg.train.eval_every
        evaluating = evaluate is not None and ((every > 0 and step % every == 0) or step == cfg.train.steps)
        as_best = evaluating and run_evaluation(step)
        if step % cfg.train.save_every == 0 or step == cfg.train.steps or as_best:
            save(step, as_best)
    bar.close()
    log.close()
    return out

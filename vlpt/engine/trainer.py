"""The one training loop for every method: AdamW, warm-up + cosine, clipping, accumulation, bf16 autocast on GPU,
torchrun DDP or FSDP, compile and gradient checkpointing (`parallel.py`), tqdm progress, JSONL metrics, atomic
checkpoints and exact resume."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from vlpt import methods
from vlpt.config import Config, ConfigError
from vlpt.data.loader import captions, train_loader, training_set
from vlpt.data.tokenizer import Tokenizer, tokenizer_for
from vlpt.engine import checkpoint, distributed, parallel
from vlpt.engine.logging import MetricsLog


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and distributed.is_distributed():
        name = f"cuda:{distributed.rank() % torch.cuda.device_count()}"
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision not in ("auto", "fp32"):
        raise ValueError(f"train.precision must be auto, bf16 or fp32; got {precision!r}")
    return nullcontext()


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device):
    """AdamW without weight decay on biases, norms, tokens and embeddings of positions (1-D or named); top-level
    modules named in `optim.module_lr` get their own peak learning rate, on the same schedule."""
    o = cfg.optim
    unknown = set(o.module_lr) - {name for name, _ in model.named_children()}
    if unknown:
        raise ConfigError(f"optim.module_lr names no module of the model: {sorted(unknown)}")
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = not (p.ndim < 2 or "pos_embed" in name or "cls_token" in name)
            groups.setdefault((float(o.module_lr.get(name.split(".")[0], o.lr)), decay), []).append(p)
    optimizer = torch.optim.AdamW([{"params": params, "lr": lr, "weight_decay": o.weight_decay if decay else 0.0}
                                   for (lr, decay), params in groups.items()],
                                  lr=o.lr, betas=tuple(o.betas), fused=device.type == "cuda")
    total, warm = cfg.train.steps, o.warmup_steps

    def factor(step: int) -> float:  # warm-up, then cosine from lr to min_lr (each group's peak scaled alike)
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return (o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))) / o.lr

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def forward_backward(ddp, batches, step: int, cfg: Config, device: torch.device) -> dict[str, torch.Tensor]:
    """`optim.accumulate` micro-batches of forward and backward; the weighted sum of the losses named in
    `method.losses` is differentiated, every output (losses and metrics) is returned averaged over micro-batches,
    with `skipped` (unreadable images replaced) and `samples` (global) counts."""
    accumulate, weights = cfg.optim.accumulate, cfg.method.loss_weights
    sums: dict[str, torch.Tensor] = {}
    for micro in range(accumulate):
        batch = to_device(next(batches), device)
        sums["skipped"] = sums.get("skipped", 0) + batch.pop("skipped", torch.tensor(0))
        with parallel.grad_sync(ddp, micro == accumulate - 1), autocast(device, cfg.train.precision):
            outputs = ddp(batch, step)
            total = sum(weights.get(k, 1.0) * v for k, v in outputs.items() if k in cfg.method.losses)
        (total / accumulate).backward()
        for k, v in outputs.items():
            sums[k] = sums.get(k, 0) + v.detach() / accumulate
    sums["samples"] = accumulate * batch["image"].shape[0] * distributed.world_size()
    return sums


def train_step(ddp, model, optimizer, scheduler, batches, step: int, cfg: Config, device: torch.device) -> dict:
    """One optimiser step: forward/backward over the micro-batches, clipping, AdamW, schedule, teacher EMA."""
    outputs = forward_backward(ddp, batches, step, cfg, device)
    if cfg.optim.grad_clip > 0:
        outputs["grad_norm"] = parallel.clip_grad_norm(model, cfg.optim.grad_clip).detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    model.after_step(step)
    return outputs


def train(cfg: Config) -> Path:
    """Pretrain `cfg.method.name` on `cfg.data.train`; returns the run folder."""
    methods.check(cfg)  # a misnamed method or loss stops here, before any work
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    distributed.init(pick_device(cfg.train.device))  # the backend follows the device type
    device = pick_device(cfg.train.device)            # now with this rank's GPU
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # NCCL and FSDP use the current device
    out, main = Path(cfg.train.out), distributed.is_main()
    path = checkpoint.resolve(cfg.train.resume, out) if cfg.train.resume else None
    data = training_set(cfg)  # JSON records or shards: a missing file or shard fails here
    tokenizer = Tokenizer(path / checkpoint.VOCAB) if path else tokenizer_for(cfg, captions(data), out)

    torch.manual_seed(cfg.train.seed)
    model = methods.build(cfg, tokenizer.vocab_size).to(device)
    distributed.seed_rank(cfg.train.seed)  # the same weights on every rank, then each rank its own draws
    step, skipped, state = 0, 0, None
    if path:
        checkpoint.load_weights(path, model)  # full weights, before FSDP shards them
        state = checkpoint.load_state(path)
        step, skipped = state["step"], state.get("skipped", 0)
    ddp = parallel.prepare(model, cfg, device)  # checkpointing, compile; DDP or FSDP under torchrun
    optimizer, scheduler = build_optimizer(model, cfg, device)  # after FSDP, which replaces the parameters
    if state is not None:
        parallel.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    accumulate = cfg.optim.accumulate
    loader = train_loader(cfg, data, tokenizer, rank=distributed.rank(), world=distributed.world_size(),
                          start=step * accumulate)
    log = MetricsLog(out, main)
    save_config = cfg.to_dict()

    def save(at: int) -> None:
        # every rank takes part: FSDP gathers the shards to rank 0; each rank's RNG state is kept
        weights, optim = parallel.model_state(model), parallel.optimizer_state(model, optimizer)
        rng = distributed.gather_objects(checkpoint.rng_state())
        if main:
            state = {"optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rng,
                     "skipped": skipped, "data_position": at * accumulate}
            checkpoint.save(out, at, weights, save_config, tokenizer.vocab_path, state, keep=cfg.train.keep)
        if distributed.is_distributed():
            torch.distributed.barrier()

    model.train()
    batches = iter(loader)
    if state is not None:  # after iter(): creating the loader's iterator draws from the global RNG
        checkpoint.set_rng_state(state["rng"])
    bar = tqdm(total=cfg.train.steps, initial=step, disable=not (main and cfg.train.progress), desc=cfg.method.name,
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
            bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k in cfg.method.losses or k == "samples_per_s"})
            sums, counts, tick, samples = {}, {}, time.perf_counter(), 0
        if step % cfg.train.save_every == 0 or step == cfg.train.steps:
            save(step)
    bar.close()
    return out

"""Training throughput of the real pretraining step: samples/s, ms/step, peak memory, FLOPs and MFU per config.

The model, optimiser, autocast and device transfer are the engine's own (`methods.build`, `build_optimizer`,
`autocast`) and so is the step (`train_step`, `forward_backward`); FLOPs and memory come from
`vlpt.engine.profiling`. Batches are `vlpt.data.collate.synthetic_batches` (random images, random token ids with a
realistic padding mask, MLM ids/labels where the method needs them, distinct image ids), so no data set is needed; `--data DIR` additionally times the trainer's loader (`train_loader`: JSON pairs
or WebDataset shards) on its own.

    python benchmarks/train_throughput.py                          # albef_tiny on CPU (+ albef_base on CUDA)
    python benchmarks/train_throughput.py --configs configs/pretrain/{simla,semmim}_tiny.yaml   # on CPU
    python benchmarks/train_throughput.py --configs configs/pretrain/{simla,semmim}_base.yaml --device cuda
    python benchmarks/train_throughput.py --steps 5 --warmup 2 --batch-size 16
    python benchmarks/train_throughput.py --configs configs/pretrain/albef_base.yaml --device cuda train.precision=bf16
    python benchmarks/train_throughput.py --data data/shapes       # also the loader's own samples/s
    python benchmarks/train_throughput.py --configs configs/pretrain/albef_base.yaml --device cuda --warmup 6 \
        --compile false true --grad-checkpointing false true --batch-size 64 256 --parallel none fsdp --profile prof/

See benchmarks/README.md for what each column means.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from machine import cpu_info, describe, peak_gflops  # noqa: E402

from vlpt import methods  # noqa: E402
from vlpt.cli import find_config  # noqa: E402
from vlpt.config import Config, load_config  # noqa: E402
from vlpt.data import synthetic  # noqa: E402
from vlpt.data.collate import synthetic_batches as fake_batches  # noqa: E402
from vlpt.engine.fit import train_step  # noqa: E402
from vlpt.engine.optim import build_optimizer  # noqa: E402
from vlpt.engine.profiling import RSSPeak, flop_batch, step_flops  # noqa: E402
from vlpt.engine.runtime import autocast, pick_device  # noqa: E402

TINY, BASE = "configs/pretrain/albef_tiny.yaml", "configs/pretrain/albef_base.yaml"
BERT_VOCAB = 30522  # bert-base-uncased, ALBEF's vocabulary
SHAPES_VOCAB = len(synthetic.SPECIAL_TOKENS) + len(synthetic.VOCAB)
# Vocabulary size of the synthetic batches when neither --vocab-size, --data nor model.text.pretrained gives one:
# the data each config is meant for (the tiny configs train on the shapes data set, the others on BERT's vocabulary).
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM (and H200)


def synthetic_batches(cfg: Config, batch_size: int, vocab_size: int, n: int, pin: bool, seed: int = 0):
    """The package's synthetic batches with what the config's method needs."""
    needs = methods.check(cfg).batch_needs(cfg.method)
    return fake_batches(cfg.model.vision.image_size, cfg.model.text.max_len, batch_size, vocab_size, n, needs,
                        cfg.method.mlm_probability, pin, seed)


# -------------------------------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loader(cfg: Config, steps: int, warmup: int) -> float:
    """The trainer's own loader alone (`train_loader`: JSON pairs or WebDataset shards, with the config's workers,
    augmentation and masking): samples/s over `steps` batches after `warmup` ones (which include the workers'
    start). The model's timing does not use it."""
    from vlpt.data.loader import captions, train_loader, training_set
    from vlpt.data.tokenizer import tokenizer_for

    data = training_set(cfg)
    with tempfile.TemporaryDirectory() as tmp:  # a vocab is only trained (into tmp) if the data has none
        tokenizer = tokenizer_for(cfg, captions(data), tmp)
    loader = train_loader(cfg, data, tokenizer)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    seconds = time.perf_counter() - start
    del it, loader  # stops persistent workers
    return cfg.data.batch_size * steps / seconds


# ------------------------------------------------------------------------------------------------------- runs
def is_tiny(config: str) -> bool:
    """A `<method>_tiny` config: made for the CPU and the shapes data."""
    return Path(config).stem.endswith("_tiny")


def default_device(config: str, requested: str) -> str:
    """`auto`: the tiny configs on CPU; every other config on CUDA when there is one, else CPU."""
    if requested != "auto":
        return requested
    if is_tiny(config) or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def stand_in_dvae(model, folder: str) -> None:
    """A dVAE tokenizer without weights (SIMLA's base preset names DALL-E's encoder, which is not shipped) gets a
    DALL-E-sized encoder with random weights, written into `folder`: the same FLOPs, so the step's time holds."""
    from safetensors.torch import save_file
    from vlpt.models.visual_tokens import DVAEEncoder, VisualTokens
    for m in model.modules():
        if isinstance(m, VisualTokens) and m.source == "dvae" and not m.path:
            m.path = str(Path(folder) / f"dvae_{m.codes}.safetensors")
            if not Path(m.path).is_file():
                save_file(DVAEEncoder(vocab=m.codes).state_dict(), m.path)


def setting_rows(args) -> list[dict]:
    """The grid of settings each config runs under: batch x parallel x gradient checkpointing x compile."""
    return [{"batch_size": b, "parallel": p, "grad_checkpointing": g, "compile": c}
            for b in args.batch_size for p in args.parallel for g in args.grad_checkpointing for c in args.compile]


def init_single_process_group(device: torch.device) -> None:
    """A process group of one rank, so that `--parallel ddp|fsdp` wraps the model as under torchrun."""
    import os
    from vlpt.engine import distributed
    if distributed.is_distributed():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    distributed.init(device)


def bench_config(config: str, args) -> list[dict]:
    """One row per setting of the grid for this config (a setting that runs out of memory gives a row saying so)."""
    name = Path(config).stem
    overrides = list(args.overrides) + ([f"data.root={args.data}"] if args.data else [])
    cfg = load_config(find_config(config), overrides)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(default_device(config, args.device))
    if device.index is not None:
        torch.cuda.set_device(device)
    pretrained_vocab = Path(cfg.model.text.pretrained) / "vocab.txt" if cfg.model.text.pretrained else None
    if args.vocab_size:
        vocab = args.vocab_size
    elif pretrained_vocab and pretrained_vocab.is_file():
        vocab = sum(1 for _ in pretrained_vocab.open())
    else:
        vocab = SHAPES_VOCAB if is_tiny(config) else BERT_VOCAB
    loader_rate = None
    if args.data:  # the loader alone, at the config's own batch size
        loader_rate = time_loader(cfg, args.steps, args.warmup)
    rows, flops_at = [], {}  # FLOPs per batch size: they depend on neither compile, checkpointing nor parallel
    for setting in setting_rows(args):
        batch_size = setting["batch_size"] or cfg.data.batch_size
        c = load_config(find_config(config), overrides + [f"data.batch_size={batch_size}"] + [
            f"train.{k}={v}" for k, v in setting.items() if k in ("compile", "grad_checkpointing")] + (
            [f"train.parallel={setting['parallel']}"] if setting["parallel"] != "none" else []))
        if setting["parallel"] != "none":
            init_single_process_group(device)
        row = {"config": name, "device": str(device), "batch": batch_size * c.optim.accumulate, "vocab": vocab,
               "threads": torch.get_num_threads() if device.type == "cpu" else None,
               "precision": "bf16" if isinstance(autocast(device, c.train.precision), torch.autocast) else "fp32",
               "loader_samples_per_s": loader_rate, **{k: v for k, v in setting.items() if k != "batch_size"}}
        try:
            label = "_".join([name, f"b{batch_size}", setting["parallel"], "ckpt" if setting["grad_checkpointing"]
                              else "nockpt", "compile" if setting["compile"] else "eager"])
            row.update(bench_setting(c, device, vocab, batch_size, args, flops_at, label))
        except torch.OutOfMemoryError:
            row.update(samples_per_s=None, ms_per_step=None, peak_mib=None, memory="out of memory",
                       gflop_per_sample=None, mfu=None)
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(table([row], header=not rows), flush=True)
        rows.append(row)
        if args.stop_at_oom and row["memory"] == "out of memory":
            break
    return rows


def wrap_for_profile(model) -> None:
    """Name the step's parts in profiles: each call of these methods becomes a record_function range."""
    from torch.profiler import record_function

    def named(fn, label):
        def call(*a, **kw):
            with record_function(label + (" (teacher)" if kw.get("teacher") else "")):
                return fn(*a, **kw)
        return call

    for attr in ("features", "itc", "itm", "mlm", "push_queues", "encode_image", "encode_text", "mlm_logits",
                 "itm_logits"):
        if hasattr(model, attr):
            setattr(model, attr, named(getattr(model, attr), attr))
    model.teacher.update = named(model.teacher.update, "teacher_ema")


def profile_steps(step_fn, device: torch.device, path: Path, steps: int = 3) -> dict:
    """torch.profiler over `steps` steps: a table of operators by device (or CPU) time written to `path`, and the
    busy share of the step's wall time (kernel time / wall time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step_fn()
        sync(device)
    wall = (time.perf_counter() - start) / steps
    averages = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    busy = None
    if device.type == "cuda":
        kernels = [e for e in prof.events() if getattr(e, "device_type", None) is not None
                   and "CUDA" in str(e.device_type) and not e.is_user_annotation]
        busy = sum(e.device_time if hasattr(e, "device_time") else e.cuda_time for e in kernels) / 1e6 / steps
    path.parent.mkdir(parents=True, exist_ok=True)
    text = [f"wall {1000 * wall:.1f} ms/step (profiled)" + (f"; kernels {1000 * busy:.1f} ms/step "
                                                             f"({100 * busy / wall:.0f} % busy)" if busy else "")]
    text.append(averages.table(sort_by=key, row_limit=45, max_name_column_width=70))
    ranges = [e for e in averages if e.key.startswith(("features", "itc", "itm", "mlm", "push_queues", "encode_",
                                                        "teacher_ema"))]
    text.append("named parts (per step): " + "; ".join(
        f"{e.key}: cpu {e.cpu_time_total / 1e3 / steps:.1f} ms"
        + (f", device {getattr(e, 'device_time_total', 0) / 1e3 / steps:.1f} ms" if device.type == "cuda" else "")
        for e in sorted(ranges, key=lambda e: e.key)))
    path.write_text("\n".join(text) + "\n")
    print(text[0] + "\n" + text[-1], flush=True)
    return {"profile": str(path), "busy_ms": None if busy is None else 1000 * busy}


def bench_setting(cfg: Config, device: torch.device, vocab: int, batch_size: int, args, flops_at: dict,
                  label: str) -> dict:
    """Time one setting (a fresh model each time: compile and FSDP change it in place); `label` names its profile."""
    from vlpt.engine import parallel

    torch.manual_seed(cfg.train.seed)
    model = methods.build(cfg, vocab).to(device)
    stand_in_dvae(model, args.scratch)
    model.train()
    row = {"params_M": round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 1)}
    step_module = parallel.prepare(model, cfg, device)
    optimizer, scheduler = build_optimizer(model, cfg, device)
    batches = synthetic_batches(cfg, batch_size, vocab, n=min(4, args.steps + args.warmup),
                                pin=device.type == "cuda", seed=cfg.train.seed)
    rss = RSSPeak() if device.type == "cpu" else None
    if rss:
        rss.reset()  # baseline: model and optimiser built, no step run (gradients, AdamW state not yet allocated)
    times, peaks = [], []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        train_step(step_module, model, optimizer, scheduler, batches, step, cfg, device)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            peaks.append(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.growth())
    # The same number of steps back to back, synchronised only before and after, as the trainer runs them: the host
    # prepares step n+1 while the GPU still runs step n. This is the throughput (and MFU) reported.
    step = args.warmup + args.steps
    sync(device)
    start = time.perf_counter()
    for step in range(step, step + args.steps):
        train_step(step_module, model, optimizer, scheduler, batches, step, cfg, device)
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    batch = batch_size * cfg.optim.accumulate
    row.update(samples_per_s=batch / seconds, ms_per_step=1000 * seconds, step_ms_all=[1000 * t for t in times],
               isolated_ms_per_step=1000 * statistics.median(times), peak_mib=max(peaks) / 2**20,
               memory="cuda max_memory_allocated" if device.type == "cuda" else f"RSS growth ({rss.how})")
    step += 1
    if args.profile:
        wrap_for_profile(model)

        def one_step():
            nonlocal step
            train_step(step_module, model, optimizer, scheduler, batches, step, cfg, device)
            step += 1
        row.update(profile_steps(one_step, device, Path(args.profile) / f"{label}.txt"))

    row["gflop_per_sample"] = row["mfu"] = None
    if not args.no_flops:
        if batch_size not in flops_at:
            # Counted eagerly through math attention, which holds every attention matrix: on a sub-batch, scaled up,
            # so that a batch that trains compiled does not run out of memory here. Every term but the in-batch
            # similarities (ITC, ITM sampling; < 1e-5 of the step at batch 256) is linear in the batch.
            sub = flop_batch(batch_size, args.flop_batch)
            counted = synthetic_batches(cfg, sub, vocab, n=1, pin=False, seed=cfg.train.seed)
            model.set_grad_checkpointing(False)  # model FLOPs: recomputation is not counted
            flops_at[batch_size] = step_flops(step_module, model, counted, step, cfg, device) * batch_size // sub
            model.set_grad_checkpointing(cfg.train.grad_checkpointing)
        flops = flops_at[batch_size]
        row["gflop_per_sample"] = flops / batch / 1e9
        peak = args.peak_tflops if args.peak_tflops is not None else default_peak_tflops(device)
        if peak:
            row["mfu"] = flops / seconds / (peak * 1e12)
        row["peak_tflops"] = peak
    return row


def default_peak_tflops(device: torch.device) -> float | None:
    """H100 bf16 on CUDA; on CPU the fp32 peak of the cores torch's threads use, estimated from lscpu (machine.py)."""
    if device.type == "cuda":
        return H100_BF16_TFLOPS
    gflops = peak_gflops(cpu_info(), torch.get_num_threads())
    return gflops / 1e3 if gflops else None


def peak_text(tflops: float) -> str:
    return f"{tflops:g} TFLOP/s" if tflops >= 1 else f"{1e3 * tflops:.0f} GFLOP/s"


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(rows: list[dict], header: bool = True) -> str:
    head = ["config", "device", "precision", "parallel", "grad ckpt", "compile", "batch", "vocab", "samples/s",
            "ms/step", "isolated ms/step", "peak MiB", "memory measure", "GFLOP/sample", "MFU", "loader samples/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"] if header else []
    for r in rows:
        cells = [r["config"], r["device"] + (f" ({r['threads']} threads)" if r["threads"] else ""), r["precision"],
                 r["parallel"], "yes" if r["grad_checkpointing"] else "no", "yes" if r["compile"] else "no",
                 str(r["batch"]), str(r["vocab"]), fmt(r["samples_per_s"], ".1f"), fmt(r["ms_per_step"], ".1f"),
                 fmt(r.get("isolated_ms_per_step"), ".1f"), fmt(r["peak_mib"], ".0f"), r["memory"], fmt(r["gflop_per_sample"], ".2f"),
                 "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f} % of {peak_text(r['peak_tflops'])}",
                 fmt(r["loader_samples_per_s"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="key=value arguments override every config (as `vlpt pretrain` does)")
    p.add_argument("--configs", nargs="+", default=None,
                   help=f"config files (default: {TINY}, and {BASE} when CUDA is available)")
    p.add_argument("--device", default="auto", help="auto (*_tiny on CPU, others on CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--steps", type=int, default=20, help="timed optimiser steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--batch-size", nargs="+", default=["0"],
                   help="samples per micro-batch; several give one row each (default: the config's data.batch_size)")
    p.add_argument("--parallel", nargs="+", default=["none"], help="none, ddp, fsdp (train.parallel; one process: a "
                   "process group of one rank, so the wrapping's own cost shows); several give one row each")
    p.add_argument("--grad-checkpointing", nargs="*", default=None,
                   help="train.grad_checkpointing: the flag alone means true; `--grad-checkpointing false true` one row each")
    p.add_argument("--compile", nargs="*", default=None,
                   help="train.compile (torch.compile of each block): the flag alone means true; `--compile false true` "
                        "one row each (use --warmup 5 or more: compiling happens in the first steps)")
    p.add_argument("--stop-at-oom", action="store_true",
                   help="stop a config's grid at its first out-of-memory row (e.g. over increasing batch sizes)")
    p.add_argument("--profile", default="",
                   help="folder: also profile 3 steps per row (torch.profiler), write each row's operator table there "
                        "and print the kernel-busy share of the step and the time of its named parts")
    p.add_argument("--vocab-size", type=int, default=0,
                   help=f"vocabulary of the synthetic ids and the model (default: model.text.pretrained's vocab if set, "
                        f"else {SHAPES_VOCAB} (shapes) for the tiny configs and {BERT_VOCAB} (BERT) for the others)")
    p.add_argument("--data", default="", help="data folder (data.root): also time the trainer's loader alone on "
                   "data.train there (JSON pairs, or shards: data.train='shards/{000000..000009}.tar')")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"device peak for MFU (default {H100_BF16_TFLOPS:g} on CUDA = H100 bf16 dense; on CPU the fp32 "
                   "peak of the threads' cores from lscpu: cores x GHz x FLOP/cycle of its SIMD, benchmarks/machine.py)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one extra untimed step)")
    p.add_argument("--flop-batch", type=int, default=64,
                   help="count FLOPs on the largest divisor of the batch up to this, scaled to the batch (default 64)")
    p.add_argument("--json", default="", help="also write the rows (with every step's time) to this file")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.threads=2")
    args = p.parse_args(argv)
    for key in ("configs", "batch_size", "parallel", "grad_checkpointing", "compile"):
        values = getattr(args, key)  # `--flag a k=v` puts the override into the flag's list: move it back
        if values:
            args.overrides += [v for v in values if "=" in v]
            setattr(args, key, [v for v in values if "=" not in v])

    def as_bool(v: str) -> bool:
        if v.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            p.error(f"expected true/false, got {v!r}")
        return v.lower() in ("true", "1", "yes", "on")

    args.grad_checkpointing = [False] if args.grad_checkpointing is None else [as_bool(v) for v in
                                                                               args.grad_checkpointing] or [True]
    args.compile = [False] if args.compile is None else [as_bool(v) for v in args.compile] or [True]
    try:
        args.batch_size = [int(b) for b in args.batch_size] or [0]
    except ValueError:
        p.error(f"--batch-size takes integers, got {args.batch_size}")
    if set(args.parallel) - {"none", "ddp", "fsdp"}:
        p.error(f"--parallel takes none, ddp, fsdp; got {args.parallel}")
    if not args.configs:
        args.configs = [TINY] + ([BASE] if torch.cuda.is_available() else [])
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as args.scratch:  # stand-in tokenizer weights (`stand_in_dvae`)
        rows = [row for c in args.configs for row in bench_config(c, args)]
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    print(f"\ntorch {torch.__version__}, {platform.processor() or platform.machine()}{gpu}; "
          f"{args.steps} steps back to back after {args.warmup} warm-up and {args.steps} isolated (synchronised) "
          f"ones\n")
    print(table(rows))
    if any(r["device"] == "cpu" for r in rows):
        print("\n" + describe(cpu_info(), torch.get_num_threads()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": rows},
                                              indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()

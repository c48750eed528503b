"""`vlpt demo`: the whole pipeline on the embedded data. Generate the data set if it is missing, pretrain a tiny
method, evaluate it zero-shot (retrieval, classification), then finetune and evaluate each downstream task from it,
two at a time on a CPU, and print one table of every stage's headline metric beside its trivial baseline, with
seconds. Each stage runs its tiny preset with the demo's budget on top (`configs/demo/stages.yaml`)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from tqdm import tqdm

from vlpt.config import load_config
from vlpt.engine.runtime import pick_device
from vlpt.errors import ConfigError, VlptError

FINETUNED = ("retrieval", "ve", "nlvr", "vqa", "caption", "grounding")  # in this order, each from the pretraining checkpoint
STAGES = "demo/stages.yaml"              # the demo's budget: each stage's overrides of its tiny preset
LONGEST_FIRST = {"nlvr": 6, "caption": 5, "vqa": 4, "retrieval": 3, "grounding": 2, "ve": 1}  # side-by-side order


def find_config(name: str) -> Path:
    from vlpt.cli import find_config as find
    return find(name)


def task_preset(task: str, method: str) -> Path:
    """The task's tiny preset for `method`: finetune/<task>_<method>_tiny.yaml where one is shipped (SIMLA's
    grounding layer), else finetune/<task>_tiny.yaml."""
    from vlpt.errors import MissingFileError
    try:
        return find_config(f"finetune/{task}_{method}_tiny.yaml")
    except MissingFileError:
        return find_config(f"finetune/{task}_tiny.yaml")


def row(stage: str, seconds: float, metric: str = "", value=None, baseline: str = "", baseline_value=None) -> dict:
    rounded = [None if v is None else round(float(v), 2) for v in (value, baseline_value)]
    return {"stage": stage, "metric": metric, "value": rounded[0], "baseline": baseline,
            "baseline_value": rounded[1], "seconds": round(seconds, 1)}


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def stage_overrides(stage: str) -> list[str]:
    """What `configs/demo/stages.yaml` sets on `stage` (its `key=value` list; the demo's budget, issue 19)."""
    import yaml
    path = find_config(STAGES)
    spec = yaml.safe_load(path.read_text()) or {}
    known = ("pretrain", "nlvr_ta", *FINETUNED)
    for name, items in spec.items():
        if name not in known or not isinstance(items, list) or not all(isinstance(i, str) and "=" in i
                                                                         for i in items):
            raise ConfigError(f"{path}: '{name}' must be one of {', '.join(known)} with a list of key=value "
                              f"strings, got {items!r}")
    return list(spec.get(stage, []))


def compiler_missing(cfg) -> bool:
    """`train.compile` on a CPU needs a C++ compiler (Inductor builds its kernels with one)."""
    return (cfg.train.compile and pick_device(cfg.train.device).type == "cpu"
            and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++")))


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def finetune_stage(task: str, method: str, data: Path, out: Path, overrides: list[str], zero_img_r1: float,
                   log: Path | None = None) -> list[dict]:
    """One downstream stage from `out/method` (ALBEF's text assignment first for paired NLVR2): its table rows.
    With `log`, everything it prints goes there (a stage run beside others)."""
    with output_to(log) if log is not None else contextlib.nullcontext():
        return _finetune_stage(task, method, data, out, overrides, zero_img_r1)


@contextlib.contextmanager
def output_to(log: Path):
    """This process's stdout and stderr into `log`: Python's streams, and the file descriptors, so that child
    processes (the Java tokenizer of the caption metrics) write there too; restored after."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with log.open("w") as stream, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


def _finetune_stage(task, method, data, out, overrides, zero_img_r1) -> list[dict]:
    from vlpt.pretrain import pretrain, pretrain_config
    from vlpt.tasks.base import finetune, finetune_config, registry

    rows, source, preset = [], out / method, task_preset(task, method)
    given = [*stage_overrides(task), *overrides, f"data.root={data}", f"train.out={out / task}"]
    ft = finetune_config(preset, [*given, f"task.checkpoint={source}"])
    if task == "nlvr" and ft.task.fusion == "paired":  # ALBEF's text assignment first; NLVR2 starts from that run
        ta_out = out / "nlvr_ta"
        ta = pretrain_config(find_config("finetune/nlvr_ta_tiny.yaml"),
                             [*stage_overrides("nlvr_ta"), *overrides, f"train.init={source}",
                              f"data.root={data}", f"train.out={ta_out}"])
        rows.append(row("NLVR2 text assignment", timed(lambda: pretrain(ta))[1]))
        ft = finetune_config(preset, [*given, f"task.checkpoint={ta_out}"])
    m, s = timed(lambda: json.loads((finetune(ft) / "metrics.json").read_text()))
    task_cls = registry.get(task)
    metric, value, baseline, baseline_value = task_cls.headline(m)
    if task == "retrieval":
        baseline, baseline_value = "zero-shot img_r1", zero_img_r1
    print(f"{task}: {metric} {value:.2f} ({baseline} {baseline_value or 0:.2f}) in {s:.0f} s; metrics in "
          f"{out / task / 'metrics.json'}")
    return rows + [{**row(task_cls.label, s, metric, value, baseline, baseline_value), "task": task}]


def run(method: str, data: Path, out: Path, overrides: list[str] = (), tasks=FINETUNED, jobs: int = 0) -> list[dict]:
    """Every stage for `method` under `out`: each stage's tiny preset, then `configs/demo/stages.yaml`'s line for
    it, then `overrides`. The downstream stages run `jobs` at a time (0: two on a CPU with two cores or more, each
    with its share of the threads; one on a GPU). Returns the table's rows, the last the wall time (also written
    to `out/demo.json`)."""
    from vlpt.data.synthetic import generate
    from vlpt.pretrain import pretrain
    from vlpt.tasks.base import evaluate_checkpoint

    if jobs < 0:
        raise ConfigError(f"--jobs must be 0 (two on a CPU, one on a GPU) or a number of stages, got {jobs}")
    start = time.perf_counter()
    if not (data / "meta.json").is_file():
        generate(out=data, seed=0)
    rows = [row("data", time.perf_counter() - start)]
    pre = out / method
    given = [*stage_overrides("pretrain"), *overrides, f"data.root={data}", f"train.out={pre}"]
    cfg = load_config(find_config(f"pretrain/{method}_tiny.yaml"), given)
    if compiler_missing(cfg):
        print("no C++ compiler found (g++, clang++ or $CXX): pretraining eagerly, without train.compile")
        cfg = load_config(find_config(f"pretrain/{method}_tiny.yaml"), [*given, "train.compile=false"])
    rows.append(row(f"pretrain {method}", timed(lambda: pretrain(cfg))[1]))

    device = pick_device(cfg.train.device)
    evaluation = [f"data.root={data}", f"data.num_workers={cfg.data.num_workers}"]
    zero, s = timed(lambda: evaluate_checkpoint("retrieval", pre, device, "test", evaluation)[1])
    (pre / "metrics.json").write_text(json.dumps(zero, indent=2) + "\n")
    rows.append(row("retrieval, zero-shot", s, "img_r1", zero["img_r1"], "chance", 100 / zero["images"]))
    rows.append(row("  binding (hard negatives)", 0.0, "ITM accuracy", zero["binding_itm"], "chance",
                    zero["binding_chance"]))
    cls, s = timed(lambda: evaluate_checkpoint("classification", pre, device, "test", evaluation)[1])
    rows.append(row("classification, zero-shot", s, "top-1 (ITM, prompts)", cls["itm_prompts_top1"], "chance",
                    cls["chance_top1"]))

    jobs = jobs or (min(2, cores()) if device.type == "cpu" else 1)
    args = (method, data, out, list(overrides), zero["img_r1"])
    if jobs == 1:
        done, failed = {task: finetune_stage(task, *args) for task in tasks}, []
    else:
        done, failed = run_side_by_side(tasks, args, jobs)
    rows += [r for task in tasks if task in done for r in done[task]]
    rows.append(row("total (wall)", time.perf_counter() - start))
    (out / "demo.json").write_text(json.dumps(rows, indent=2) + "\n")  # what finished, also when a stage failed
    if failed:
        task, error = failed[0]
        raise VlptError(f"demo stage '{task}' failed ({error}); its output: {out / 'logs' / f'{task}.log'}"
                        + (f"; also failed: {', '.join(t for t, _ in failed[1:])}" if failed[1:] else ""))
    return rows


def run_side_by_side(tasks, args: tuple, jobs: int) -> tuple[dict[str, list[dict]], list]:
    """The downstream stages in `jobs` processes, each with `cores() // jobs` threads (on a 2-core CPU two 1-thread
    stages do ~1.4x the work of one 2-thread stage: small operators scale poorly over threads), longest first;
    each stage's output in `out/logs/<task>.log`. Returns each finished stage's rows and the (task, error) of those
    that failed."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing

    method, data, out, overrides, zero_img_r1 = args
    threads = [f"train.threads={max(1, cores() // jobs)}", *overrides]  # a given train.threads still wins
    done, failed = {}, []
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(finetune_stage, task, method, data, out, threads, zero_img_r1,
                               out / "logs" / f"{task}.log"): task
                   for task in sorted(tasks, key=lambda t: -LONGEST_FIRST.get(t, 0))}
        bar = tqdm(total=len(futures), desc=f"downstream ({jobs} at a time; logs in {out / 'logs'})")
        for future in as_completed(futures):
            task = futures[future]
            try:
                done[task] = future.result()
                bar.set_postfix_str(f"{task} done in {sum(r['seconds'] for r in done[task]):.0f} s")
            except Exception as error:  # noqa: BLE001 - reported by `run` with its log, after the others finish
                failed.append((task, error))
            bar.update()
        bar.close()
    return done, failed


def table(rows: list[dict]) -> str:
    """The rows as aligned text (the last row: the wall time of the whole run)."""
    def number(v, width):
        return f"{'':>{width}s}" if v is None else f"{v:{width}.2f}"

    lines = [f"{'stage':28s} {'metric':22s} {'value':>8s}   {'baseline':18s} {'value':>8s} {'seconds':>8s}"]
    for r in rows:
        lines.append(f"{r['stage']:28s} {r['metric']:22s} {number(r['value'], 8)}   {r['baseline']:18s} "
                     f"{number(r['baseline_value'], 8)} {r['seconds']:8.0f}")
    return "\n".join(lines)

"""`vlpt demo`: the whole pipeline on the embedded data. Generate the data set if it is missing, pretrain a tiny
method, evaluate it zero-shot (retrieval, classification), then finetune and evaluate each downstream task from it,
and print one table of every stage's headline metric beside its trivial baseline, with wall seconds."""
from __future__ import annotations

import json
import time
from pathlib import Path

from vlpt.config import load_config
from vlpt.engine.runtime import pick_device

FINETUNED = ("retrieval", "ve", "nlvr", "vqa", "caption", "grounding")  # in this order, each from the pretraining checkpoint
NLVR_FUSION = {"maskvlm": "separate"}    # MaskVLM's way (no text assignment); the others: ALBEF's paired fusion


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


def run(method: str, data: Path, out: Path, overrides: list[str] = (), tasks=FINETUNED) -> list[dict]:
    """Every stage for `method` under `out`, `overrides` applied to each stage's preset; returns the table's rows
    (also written to `out/demo.json`)."""
    from vlpt.data.synthetic import generate
    from vlpt.pretrain import pretrain, pretrain_config
    from vlpt.tasks.base import evaluate_checkpoint, finetune, finetune_config, registry

    start = time.perf_counter()
    if not (data / "meta.json").is_file():
        generate(out=data, seed=0)
    rows = [row("data", time.perf_counter() - start)]
    pre = out / method
    cfg = load_config(find_config(f"pretrain/{method}_tiny.yaml"),
                      [*overrides, f"data.root={data}", f"train.out={pre}"])
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

    for task in tasks:
        source, extra = pre, []
        if task == "nlvr":
            fusion = NLVR_FUSION.get(method, "paired")
            extra = [f"task.fusion={fusion}"]
            if fusion == "paired":  # ALBEF's text assignment first; NLVR2 starts from that run
                source = out / "nlvr_ta"
                ta = pretrain_config(find_config("finetune/nlvr_ta_tiny.yaml"),
                                     [*overrides, f"train.init={pre}", f"data.root={data}", f"train.out={source}"])
                rows.append(row("NLVR2 text assignment", timed(lambda: pretrain(ta))[1]))
        ft = finetune_config(task_preset(task, method),
                             [*overrides, f"task.checkpoint={source}", f"data.root={data}", f"train.out={out / task}",
                              *extra])
        m, s = timed(lambda: json.loads((finetune(ft) / "metrics.json").read_text()))
        task_cls = registry.get(task)
        metric, value, baseline, baseline_value = task_cls.headline(m)
        if task == "retrieval":
            baseline, baseline_value = "zero-shot img_r1", zero["img_r1"]
        rows.append({**row(task_cls.label, s, metric, value, baseline, baseline_value), "task": task})
    (out / "demo.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def table(rows: list[dict]) -> str:
    """The rows as aligned text, with the total seconds."""
    def number(v, width):
        return f"{'':>{width}s}" if v is None else f"{v:{width}.2f}"

    lines = [f"{'stage':28s} {'metric':22s} {'value':>8s}   {'baseline':18s} {'value':>8s} {'seconds':>8s}"]
    for r in rows:
        lines.append(f"{r['stage']:28s} {r['metric']:22s} {number(r['value'], 8)}   {r['baseline']:18s} "
                     f"{number(r['baseline_value'], 8)} {r['seconds']:8.0f}")
    lines.append(f"{'total':28s} {'':22s} {'':>8s}   {'':18s} {'':>8s} {sum(r['seconds'] for r in rows):8.0f}")
    return "\n".join(lines)

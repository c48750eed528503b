"""Downstream tasks on the embedded data, per method: the demo's pipeline (pretrain, zero-shot retrieval and
classification, finetuned retrieval, SNLI-VE, NLVR2 with its text assignment, VQA, captioning, grounding), each stage's headline metric beside its
trivial baseline, the wall seconds of each finetune (its validation passes included) and of one test evaluation of
its checkpoint.

    python benchmarks/downstream.py --data data/shapes                       # ALBEF and MaskVLM, tiny presets
    python benchmarks/downstream.py --methods albef codis maskvlm cbvila train.threads=1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from vlpt import demo  # noqa: E402
from vlpt.engine.runtime import pick_device  # noqa: E402
from vlpt.tasks.base import evaluate_checkpoint  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/shapes", help="embedded data set folder")
    p.add_argument("--methods", nargs="+", default=["albef", "maskvlm"])
    p.add_argument("--out", default="runs/downstream", help="run folders go here")
    p.add_argument("--json", default="", help="also write the rows here")
    p.add_argument("overrides", nargs="*", help="key=value overrides of every stage")
    args = p.parse_args(argv)
    rows = []
    for method in args.methods:
        out = Path(args.out) / method
        for r in demo.run(method, Path(args.data), out, args.overrides):
            r["method"], r["eval_seconds"] = method, None
            task = r.get("task")  # a finetuned task's row
            if task:  # one test evaluation of the finetuned checkpoint, timed alone
                start = time.perf_counter()
                evaluate_checkpoint(task, out / task, pick_device("auto"), "test",
                                    [f"data.root={args.data}", *[o for o in args.overrides if o.startswith("data.")]])
                r["eval_seconds"] = round(time.perf_counter() - start, 1)
            rows.append(r)
    print("| method | stage | metric | value | baseline | baseline value | stage s | test eval s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        value = "" if r["value"] is None else f"{r['value']:.2f}"
        base = "" if r["baseline_value"] is None else f"{r['baseline_value']:.2f}"
        ev = "" if r["eval_seconds"] is None else f"{r['eval_seconds']:.0f}"
        print(f"| {r['method']} | {r['stage'].strip()} | {r['metric']} | {value} | {r['baseline']} | {base} | "
              f"{r['seconds']:.0f} | {ev} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

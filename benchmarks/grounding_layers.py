"""Which fusion layer's cross-attention grounds best: weakly supervised grounding accuracy on the validation split
for every fusion layer of a checkpoint (a pretraining one, zero-shot, or a grounding finetune), one row each.

    python benchmarks/grounding_layers.py --checkpoint runs/grounding_tiny --data data/shapes
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vlpt.engine.runtime import pick_device  # noqa: E402
from vlpt.tasks.base import load, registry  # noqa: E402


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--split", default="val")
    p.add_argument("--device", default="auto")
    p.add_argument("overrides", nargs="*", help="key=value overrides (task.proposals=..., eval.batch_size=...)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    task, model = load(registry.get("grounding"), args.checkpoint, device, [f"data.root={args.data}", *args.overrides])
    method = getattr(model, "method", model)
    rows = []
    print("| fusion layer | accuracy | random proposal | upper bound |\n|---|---|---|---|")
    for layer in range(len(method.backbone.fusion.layers)):
        task.cfg.task.layer = layer
        m = task.evaluate(model, args.split)
        rows.append(m)
        print(f"| {layer} | {m['accuracy']:.2f} | {m['random_baseline']:.2f} | {m['upper_bound']:.2f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()

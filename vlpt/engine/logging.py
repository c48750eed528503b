"""Metrics: one JSON object per line in `<out>/metrics.jsonl`, and the same scalars as TensorBoard events in
`<out>/tensorboard/` (`train.tensorboard`; `tensorboard --logdir runs`).

Every line is strict JSON: a value that is not finite (NaN, inf) is written as `null` and named in the line's
`nonfinite` list (with the names the caller passes in `nonfinite`, e.g. a loss that went non-finite in a skipped
step of the averaged window)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path


class MetricsLog:
    def __init__(self, out: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(out) / "metrics.jsonl"
        self.enabled, self.board = enabled, None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.board = SummaryWriter(str(Path(out) / "tensorboard"))

    def write(self, step: int, nonfinite: list[str] | tuple[str, ...] = (), **metrics) -> None:
        if not self.enabled:
            return
        names = list(nonfinite)
        metrics = {k: finite(v, k, names) for k, v in metrics.items()}
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        if names:
            row["nonfinite"] = sorted(set(names))
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if self.board is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.board.add_scalar(name, value, step)
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def finite(value, name: str, names: list[str]):
    """`value` with each float that is not finite replaced by None (inside lists and dicts too); `name` is added to
    `names` when one was."""
    if isinstance(value, float) and not math.isfinite(value):
        names.append(name)
        return None
    if isinstance(value, dict):
        return {k: finite(v, name, names) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v, name, names) for v in value]
    return value


def read_metrics(out: str | Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

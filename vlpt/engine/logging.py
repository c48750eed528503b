"""Metrics: one JSON object per line in `<out>/metrics.jsonl`, and the same scalars as TensorBoard events in
`<out>/tensorboard/` (`train.tensorboard`; `tensorboard --logdir runs`)."""
from __future__ import annotations

import json
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

    def write(self, step: int, **metrics) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.board is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.board.add_scalar(name, value, step)
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def read_metrics(out: str | Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

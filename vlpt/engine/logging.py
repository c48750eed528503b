"""Metrics: one JSON object per line in `<out>/metrics.jsonl`, plus the tqdm bar's postfix."""
from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLog:
    def __init__(self, out: str | Path, enabled: bool = True):
        self.path = Path(out) / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, **metrics) -> None:
        if self.enabled:
            row = {"step": step, "time": round(time.time(), 3), **metrics}
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def read_metrics(out: str | Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

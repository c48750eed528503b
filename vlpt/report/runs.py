"""Run folders as `vlpt report` reads them: the training log `metrics.jsonl` (`engine/logging.py`: training rows
carry the losses, `lr` and `samples_per_s`; validation rows `val_*`), the final metrics `metrics.json` (written by
`vlpt finetune`, `vlpt demo`'s zero-shot evaluation and benchmarks/compare_methods.py; one object per task as
`vlpt evaluate all --out` writes it) and the config of the run's latest checkpoint (`engine/checkpoint.py`)."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlpt.errors import MissingFileError, VlptError

LOG, METRICS = "metrics.jsonl", "metrics.json"


@dataclass
class Run:
    path: Path
    name: str
    log: list[dict]            # training rows of the log (those with a learning rate), in the order written
    metrics: dict[str, Any]    # final metrics, scalars only; a nested file's as "task.metric"
    config: dict[str, Any]     # every config key (dotted, as `key=value` overrides name it) with its value


def flatten(section, prefix: str = "") -> dict[str, Any]:
    """A config dataclass as {dotted key: value}; dict- and list-valued keys stay one key."""
    values = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        values.update(flatten(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value)
                      else {prefix + f.name: value})
    return values


def scalars(values: dict, prefix: str = "") -> dict[str, Any]:
    """Numbers, strings and booleans of a metrics object; nested objects as "outer.inner", lists left out."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[prefix + key] = value
    return out


def read_run(path: str | Path, name: str = "") -> Run:
    """One run folder; VlptError when it is missing, has neither file of metrics, or has no checkpoint."""
    from vlpt.config import load_config
    from vlpt.engine import checkpoint
    from vlpt.engine.logging import read_metrics

    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"run folder {path} does not exist")
    if not (path / LOG).is_file() and not (path / METRICS).is_file():
        raise VlptError(f"{path} has no metrics: neither {LOG} (the training log) nor {METRICS} (evaluation); "
                        f"give a folder that vlpt pretrain or vlpt finetune wrote")
    try:
        cfg = load_config(base=checkpoint.load_config(checkpoint.resolve(path)))
    except checkpoint.NoCheckpoint:
        raise VlptError(f"{path} has metrics but no checkpoint, so no config to compare (expected {path}/latest)"
                        ) from None
    try:
        log = [row for row in read_metrics(path) if "lr" in row] if (path / LOG).is_file() else []
        metrics = scalars(json.loads((path / METRICS).read_text())) if (path / METRICS).is_file() else {}
    except (ValueError, UnicodeDecodeError) as err:
        raise VlptError(f"{path}: a metrics file is not JSON ({err})") from None
    return Run(path, name or path.name, log, metrics, flatten(cfg))


def read_runs(paths: list[str | Path]) -> list[Run]:
    """The runs, each named by its path below the folder they share (the folder's name for one run)."""
    paths = [Path(p) for p in paths]
    resolved = [p.resolve() for p in paths]
    common = Path(os.path.commonpath(resolved)) if len(paths) > 1 else resolved[0].parent
    names = [str(p.relative_to(common)) for p in resolved]
    if len(set(names)) < len(names):
        raise VlptError(f"a run folder is named twice: {' '.join(map(str, paths))}")
    return [read_run(path, name) for path, name in zip(paths, names)]


def differences(runs: list[Run], ignore: tuple[str, ...] = ("train.out",)) -> list[str]:
    """The config keys whose values are not the same in every run (`ignore`d ones aside: each run's own folder),
    in config order."""
    keys = dict.fromkeys(key for run in runs for key in run.config)
    return [key for key in keys if key not in ignore
            and len({json.dumps(run.config.get(key), sort_keys=True, default=str) for run in runs}) > 1]

"""The papers' ablation tables from runs: runs of one method (and task) are a group; within it, runs whose configs
are the same but for the seed are one configuration, a row; its cells are the mean (± the sample standard deviation
over its seeds) of each metric; the best row of each metric is marked."""
from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from typing import Any

from vlpt.report.runs import Run, differences

SEED = "train.seed"
# metrics where less is better: losses, errors, seconds and milliseconds; every other metric: more is better
LOWER = re.compile(r"loss|error|(^|_)(l1|ce|s|ms|seconds)(_|$)")


def lower_is_better(metric: str) -> bool:
    return bool(LOWER.search(metric))


@dataclass
class Row:
    settings: dict[str, Any]                  # the group's varying keys -> this configuration's values
    runs: list[Run]
    cells: dict[str, tuple[float, float | None]] = field(default_factory=dict)  # metric -> (mean, std or None)
    best: set[str] = field(default_factory=set)                                # metrics where this row is best


@dataclass
class Table:
    title: str
    keys: list[str]       # the config keys that tell the rows apart
    metrics: list[str]
    rows: list[Row]


def group_title(run: Run) -> str:
    task = run.config.get("task.name")
    return f"{run.config.get('method.name')} finetuned on {task}" if task else str(run.config.get("method.name"))


def numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def default_metrics(runs: list[Run]) -> list[str]:
    """The numeric metrics every run has and whose values are not all the same."""
    names = [m for m in runs[0].metrics if all(numeric(run.metrics.get(m)) for run in runs)]
    return [m for m in names if len({run.metrics[m] for run in runs}) > 1]


def table(runs: list[Run], metrics: list[str] | tuple[str, ...] = ()) -> Table:
    """One group's table: rows in the order of their first run; `metrics` (default: `default_metrics`) that some
    run has."""
    keys = differences(runs, ignore=("train.out", SEED))
    rows: dict[tuple, Row] = {}
    for run in runs:
        settings = {k: run.config.get(k) for k in keys}
        rows.setdefault(tuple(map(repr, settings.values())), Row(settings, [])).runs.append(run)
    metrics = ([m for m in metrics if any(numeric(run.metrics.get(m)) for run in runs)] if metrics
               else default_metrics(runs))
    for row in rows.values():
        for m in metrics:
            values = [run.metrics[m] for run in row.runs if numeric(run.metrics.get(m))]
            if values:
                row.cells[m] = mean_std(values)
    for m in metrics:
        means = [row.cells[m][0] for row in rows.values() if m in row.cells]
        if not means:
            continue
        best = min(means) if lower_is_better(m) else max(means)
        for row in rows.values():
            if m in row.cells and row.cells[m][0] == best:
                row.best.add(m)
    return Table(group_title(runs[0]), keys, metrics, list(rows.values()))


def tables(runs: list[Run], metrics: list[str] | tuple[str, ...] = ()) -> list[Table]:
    """A table for each group of two runs or more (several configurations, or seeds of one)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_title(run), []).append(run)
    return [table(group, metrics) for group in groups.values() if len(group) > 1]

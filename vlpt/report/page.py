"""`vlpt report`: one self-contained HTML page comparing runs (no file or network beside it: the plots are PNGs
inside the page). Training curves of each logged loss (and grad_norm, a task's training accuracy, ...), learning
rate and samples/s (a line per run, one colour per run throughout); every run's final metrics in one table; the
config keys that differ; and per group of runs of one method the papers' ablation table (`ablation.py`)."""
from __future__ import annotations

import base64
import html
import time
from pathlib import Path

from vlpt.report import ablation
from vlpt.report.runs import Run, differences, read_runs
from vlpt.viz.figures import png_bytes

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
td { white-space: nowrap; } div.wide { overflow-x: auto; }
th { background: #f3f3f3; } td.key, th.key { text-align: left; font-family: monospace; white-space: normal; }
td.runs { font-size: 0.8em; color: #555; }
img.plot { max-width: 100%; display: block; }
p.note { color: #555; font-size: 0.9em; }
"""


THROUGHPUT = {"lr": "learning rate", "samples_per_s": "samples / s"}  # their own plot, beside the losses'
NOT_PLOTTED = ("step", "time", "skipped_images", "bad_steps")


def number(value) -> str:
    """A metric as the page shows it: integers as they are, floats to 2 decimals, 4 below 1, 3 significant digits
    below 0.001."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if value == 0 or abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}" if abs(value) >= 1e-3 else f"{value:.3g}"


def mean_std(mean: float, std: float | None) -> str:
    """`number(mean)`, and the standard deviation to as many decimals as the mean shows."""
    text = number(mean)
    if std is None:
        return text
    return f"{text} ± {std:.3g}" if "e" in text else f"{text} ± {std:.{len(text.partition('.')[2])}f}"


def cell(value: str, tag: str = "td", cls: str = "", bold: bool = False) -> str:
    text = html.escape(value)
    return f"<{tag}{f' class={cls!r}' if cls else ''}>{f'<b>{text}</b>' if bold else text}</{tag}>"


def html_table(header: list[str], rows: list[list[str]], ident: str = "", cls: str = "", keys: int = 1) -> str:
    """A table of already formatted cells (`cell`); the first `keys` columns are left-aligned labels."""
    attrs = (f' id="{ident}"' if ident else "") + (f' class="{cls}"' if cls else "")
    head = "".join(cell(h, "th", "key" if i < keys else "") for i, h in enumerate(header))
    body = "".join(f"<tr>{''.join(row)}</tr>" for row in rows)
    return f'<div class="wide"><table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def curves(runs: list[Run], names: list[str], ylabels: dict[str, str] | None = None, cols: int = 3) -> str:
    """An <img> of one subplot per logged name, one line per run that logged it (step on x)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    cols = min(cols, len(names))
    rows, legend_rows = -(-len(names) // cols), -(-len(runs) // 4)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows + 0.25 * legend_rows + 0.2), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, name in zip(axes.flat, names):
        for run, colour in zip(runs, colours):
            points = [(row["step"], row[name]) for row in run.log if row.get(name) is not None]
            if points:
                ax.plot(*zip(*points), color=colour, linewidth=1.2)
        ax.set_title(name, fontsize=10)
        ax.set(xlabel="step", ylabel=(ylabels or {}).get(name, ""))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.legend(handles=[Line2D([], [], color=c, label=run.name) for run, c in zip(runs, colours)],
               loc="outside upper center", ncols=min(len(runs), 4), fontsize=8)  # seen before the plots
    data = base64.b64encode(png_bytes(fig)).decode()
    return f'<img class="plot" alt="{html.escape(", ".join(names))}" src="data:image/png;base64,{data}">'


def runs_section(runs: list[Run]) -> str:
    rows = [[cell(run.name, cls="key"), cell(str(run.path), cls="key"), cell(str(run.config["method.name"])),
             cell(run.config["task.name"] or "pretraining"), cell(number(run.log[-1]["step"]) if run.log else "-"),
             cell(number(run.config["train.seed"]))] for run in runs]
    return html_table(["run", "folder", "method", "task", "steps logged", "seed"], rows, "runs", keys=2)


def metrics_section(runs: list[Run]) -> str:
    names = list(dict.fromkeys(m for run in runs for m in run.metrics))
    if not names:
        return '<p class="note">No run has final metrics (metrics.json).</p>'
    rows = [[cell(m, cls="key"), *(cell(number(run.metrics.get(m))) for run in runs)] for m in names]
    return html_table(["metric", *(run.name for run in runs)], rows, "metrics")


def config_section(runs: list[Run]) -> str:
    keys = differences(runs)
    if not keys:
        return '<p class="note">The runs\' configs are the same (train.out aside).</p>'
    rows = [[cell(k, cls="key"), *(cell(setting(run.config.get(k))) for run in runs)] for k in keys]
    return html_table(["key", *(run.name for run in runs)], rows, "config")


def setting(value) -> str:
    """A config value as a `key=value` override writes it, exactly."""
    if isinstance(value, list):
        return "[" + ",".join(map(setting, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {setting(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


def ablation_section(t: ablation.Table) -> str:
    seeds = any(len(row.runs) > 1 for row in t.rows)
    header = [*t.keys, "runs", *(f"{m} {'↓' if ablation.lower_is_better(m) else '↑'}" for m in t.metrics)]
    rows = []
    for row in t.rows:
        label = ", ".join(f"{run.name} (seed {setting(run.config['train.seed'])})" if seeds else run.name
                          for run in row.runs)
        cells = []
        for m in t.metrics:
            mean, std = row.cells.get(m, (None, None))
            text = "-" if mean is None else mean_std(mean, std)
            cells.append(cell(text, bold=m in row.best))
        rows.append([*(cell(setting(row.settings[k]), cls="key") for k in t.keys), cell(label, cls="key runs"), *cells])
    note = ("mean ± sample standard deviation over each row's seeds; " if seeds else "") + \
        "best of each column in bold (↑ more is better, ↓ less)"
    return (f"<h3>{html.escape(t.title)}</h3>" + html_table(header, rows, cls="ablation", keys=len(t.keys) + 1)
            + f'<p class="note">{note}.</p>')


def render(runs: list[Run], metrics: list[str] | tuple[str, ...] = (), title: str = "",
           notes: list[str] | tuple[str, ...] = ()) -> str:
    """The page; `notes`: lines shown under the ablation tables (benchmarks/compare_methods.py: which of the papers'
    orderings hold)."""
    title = title or "vlpt report: " + ", ".join(run.name for run in runs)
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="note">{len(runs)} runs, written {time.strftime("%Y-%m-%d %H:%M")}.</p>', runs_section(runs)]
    logged = [run for run in runs if run.log]
    if logged:
        names = [name for name in dict.fromkeys(k for run in logged for row in run.log for k, v in row.items()
                                                 if ablation.numeric(v))
                 if name not in THROUGHPUT and name not in NOT_PLOTTED]
        parts += ["<h2>Losses (and the other values of the training log)</h2>", curves(logged, names),
                  "<h2>Learning rate and throughput</h2>", curves(logged, list(THROUGHPUT), THROUGHPUT)]
    parts += ["<h2>Metrics</h2>", metrics_section(runs), "<h2>Config differences</h2>", config_section(runs)]
    tables = ablation.tables(runs, metrics)
    if tables:
        parts += ["<h2>Ablations</h2>", *map(ablation_section, tables)]
    if notes:
        parts += ["<h3>Against the papers</h3><ul>", *(f"<li>{html.escape(line)}</li>" for line in notes), "</ul>"]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")


def write_report(paths: list[str | Path], out: str | Path, metrics: list[str] | tuple[str, ...] = (),
                 title: str = "", notes: list[str] | tuple[str, ...] = ()) -> Path:
    """Read the run folders and write the page to `out` (its folders made); returns its path."""
    runs = read_runs(paths)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(runs, metrics, title, notes))
    return out

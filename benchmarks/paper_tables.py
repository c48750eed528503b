"""The papers' ablation tables as rows of `compare_methods.py`, and which of their orderings measured rows reproduce.

Each table keeps the paper's R@1 (TR, IR) of the rows it has. An ordering is a pair of rows the paper ranks (ties
skipped). Runs of one seed share their initial weights and data order, and at the demo's budget the seed moves every
row together (by more than the rows differ), so rows are compared seed by seed: the gap is the mean of the per-seed
gaps over the seeds both rows ran (the means' difference where they share none), the ordering *holds* when the gap
is positive, and a count says in how many shared seeds the higher row came out higher. An ordering is *separated*
when no run of one row falls inside the other's range (every seed of the higher row above every seed of the lower,
seeds unpaired); with a single run in either row nothing is separated. txt_r1 is compared with TR@1 and img_r1 with
IR@1.
"""
from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class PaperTable:
    title: str                               # the paper's table, where its numbers are, the split they are on
    rows: dict[str, tuple[float, float]]     # compare_methods row -> the paper's (TR@1, IR@1)


# The paper files are in ../shared/papers (their README maps file to method); l. = line of that file.
TABLES = (
    # 001 l.313-322; COCO's second "Text Retrieval" header is its image retrieval (a typo of the table)
    PaperTable("CODIS Table 4 (zero-shot COCO 5K)", {
        "codis:cross": (68.6, 50.10), "codis:intra+cross": (69.86, 50.52),
        "codis:cross+codebook(teacher)": (70.74, 51.39), "codis:intra+cross+codebook(student)": (71.12, 51.40),
        "codis": (71.10, 52.10)}),
    # 002 l.194-205, zero-shot columns; MLM + MIM has no zero-shot figure (its ITC and ITM heads are untrained)
    PaperTable("MaskVLM Table 5 (zero-shot Flickr30K)", {
        "maskvlm:itc": (68.40, 55.08), "maskvlm:itc+itm": (82.40, 69.50), "maskvlm:itc+itm+mlm": (84.40, 70.74),
        "maskvlm:itc+itm+mim": (82.90, 69.26), "maskvlm": (85.60, 71.18)}),
    # 000 l.185-194
    PaperTable("CB-ViLA Table IV (zero-shot COCO 5K)", {
        "cbvila:mlm+itm": (65.2, 47.2), "cbvila:mlm+itm+pixel": (67.4, 49.5), "cbvila": (70.1, 52.4)}),
    # 003 l.141-150, rows (a)-(e); (e) is the preset
    PaperTable("SIMLA Table 1 (zero-shot Flickr30K)", {
        "simla:itm": (6.1, 7.3), "simla:itm+itc": (73.1, 56.6), "simla:itm+itc+mlm": (84.0, 69.5),
        "simla:itm+itc+mlm+mim": (85.1, 70.1), "simla": (86.2, 69.5)}),
    # 004 l.197-207 (dVAE tokens: ours are a k-means tokenizer's)
    PaperTable("SemMIM Table 4, MIM targets (finetuned COCO 5K)", {
        "semmim:no-mim": (79.0, 62.3), "semmim:pixels": (78.6, 62.2), "semmim:tokens": (79.8, 62.7),
        "semmim": (81.5, 64.2)}),
    # 004 l.209-211
    PaperTable("SemMIM Table 5, masking (finetuned COCO 5K)", {"semmim:random-mask": (81.0, 63.6),
                                                              "semmim": (81.5, 64.2)}),
    # 004 l.223-227
    PaperTable("SemMIM Table 6, mask ratio (finetuned COCO 5K)", {
        "semmim:ratio-0.15": (80.8, 63.6), "semmim": (81.5, 64.2), "semmim:ratio-0.45": (80.6, 63.4)}),
    # 004 l.229-237: start layer i of 12 is the last 13 - i blocks; of the tiny ViT's 4, "-" is none, i = 12 the
    # last one (the preset), i = 6 (7 of 12) about the last 2, i = 1 all of them
    PaperTable("SemMIM Table 7, text layers (finetuned COCO 5K)", {
        "semmim:text-none": (80.4, 63.2), "semmim:text-all": (80.0, 62.9), "semmim:text-last2": (80.9, 63.6),
        "semmim": (81.5, 64.2)}),
)
METRICS = (("txt_r1", "TR@1"), ("img_r1", "IR@1"))


@dataclass(frozen=True)
class Ordering:
    higher: str          # the row the paper ranks higher
    lower: str
    difference: float    # mean over the seeds both rows ran of higher - lower (without one: the means' difference)
    separated: bool
    agree: int           # seeds (of those both rows ran) where the higher row's run is above the lower row's
    paired: int          # seeds both rows ran

    @property
    def holds(self) -> bool:
        return self.difference > 0


def orderings(table: PaperTable, runs: list[dict], metric: str) -> list[Ordering]:
    """The paper's ranked pairs among `table`'s rows that `runs` (compare_methods' rows: "row", metric) have."""
    column = [m for m, _ in METRICS].index(metric)
    by_seed = {name: {r["seed"]: r[metric] for r in runs if r["row"] == name} for name in table.rows}
    present = [name for name in table.rows if by_seed[name]]
    out = []
    for a, b in itertools.combinations(present, 2):
        pa, pb = table.rows[a][column], table.rows[b][column]
        if pa == pb:
            continue
        higher, lower = (a, b) if pa > pb else (b, a)
        hi, lo = list(by_seed[higher].values()), list(by_seed[lower].values())
        separated = len(hi) > 1 and len(lo) > 1 and (min(hi) > max(lo) or max(hi) < min(lo))
        seeds = by_seed[higher].keys() & by_seed[lower].keys()
        gaps = [by_seed[higher][s] - by_seed[lower][s] for s in seeds]
        difference = statistics.mean(gaps) if gaps else statistics.mean(hi) - statistics.mean(lo)
        out.append(Ordering(higher, lower, difference, separated, sum(g > 0 for g in gaps), len(seeds)))
    return out


def describe(table: PaperTable, runs: list[dict]) -> list[str]:
    """A line per metric: how many of the paper's orderings hold, and each with its verdict."""
    lines = []
    for metric, paper in METRICS:
        found = orderings(table, runs, metric)
        if not found:
            continue
        seeds = sorted({len([r for r in runs if r["row"] == name]) for name in table.rows} - {0})
        held, reversed_ = [o for o in found if o.holds], [o for o in found if not o.holds]

        def counts(group: list[Ordering], every) -> str:
            return (f"{sum(o.paired > 1 and every(o) for o in group)} in every seed, "
                    f"{sum(o.separated for o in group)} separated")

        parts = [f"{o.higher} > {o.lower} {'holds' if o.holds else 'reversed'} ({o.difference:+.2f}; "
                 f"{o.agree}/{o.paired} seeds{', separated' if o.separated else ''})" for o in found]
        lines.append(f"{table.title}, {metric} against the paper's {paper} ({'/'.join(map(str, seeds))} runs a row): "
                     f"{len(held)} of {len(found)} orderings hold ({counts(held, lambda o: o.agree == o.paired)}), "
                     f"{len(reversed_)} reversed ({counts(reversed_, lambda o: o.agree == 0)}): " + "; ".join(parts))
    return lines


def report(runs: list[dict]) -> list[str]:
    """`describe` for every table with two rows or more among `runs`."""
    return [line for table in TABLES for line in describe(table, runs)]

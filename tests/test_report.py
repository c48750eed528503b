"""`vlpt report`: the page's tables hold the runs' own numbers, the config table exactly the keys that differ, the
ablation table marks the best row of each metric (mean ± std over seeds), a bad run folder is one line; and (marked
`browser`) the page renders in Debian's Chromium with its plots and tables."""
from __future__ import annotations

import json
import statistics
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from vlpt.pretrain import pretrain
from vlpt.report import write_report
from helpers import TINY, cli_error, config

STEPS = 6
# each run's final metrics, written into its folder as a finetuning run would: (img_r1, itm_loss)
RUNS = {"albef_seed0": ([], (10.0, 0.5)), "albef_seed1": (["train.seed=1"], (20.0, 0.7)),
        "itc_itm": (["method.losses=[itc,itm]"], (12.0, 0.55))}


@pytest.fixture(scope="module")
def runs(shapes_data, tmp_path_factory) -> dict[str, Path]:
    """Three tiny ALBEF runs of a few steps: two seeds of the preset and one without MLM, each with a metrics.json."""
    root = tmp_path_factory.mktemp("runs")
    folders = {}
    for name, (extra, (img_r1, itm_loss)) in RUNS.items():
        out = root / name
        pretrain(config(shapes_data, out, f"train.steps={STEPS}", f"train.save_every={STEPS}", "train.log_every=2",
                        "train.tensorboard=false", *extra))
        (out / "metrics.json").write_text(json.dumps({"protocol": "zero-shot", "img_r1": img_r1,
                                                      "itm_loss": itm_loss, "images": 16}))
        folders[name] = out
    return folders


class Tables(HTMLParser):
    """Every <table> of a page: its id and class, and its rows as lists of (text, bold) cells."""

    def __init__(self, page: str):
        super().__init__()
        self.tables, self.bold, self.cell = [], False, False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"id": attrs.get("id"), "class": attrs.get("class"), "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self.tables[-1]["rows"][-1].append(["", False])
            self.cell = True
        elif tag == "b":
            self.bold = True

    def handle_endtag(self, tag):
        self.bold = self.bold and tag != "b"
        self.cell = self.cell and tag not in ("td", "th")

    def handle_data(self, data):
        if self.cell:
            self.tables[-1]["rows"][-1][-1][0] += data
            self.tables[-1]["rows"][-1][-1][1] |= self.bold

    def get(self, ident: str = "", cls: str = "") -> list[list[tuple[str, bool]]]:
        found = [t["rows"] for t in self.tables if (ident and t["id"] == ident) or (cls and t["class"] == cls)]
        assert len(found) == 1, (ident, cls, len(found))
        return [[tuple(c) for c in row] for row in found[0]]


@pytest.fixture(scope="module")
def page(runs, tmp_path_factory) -> Path:
    return write_report(list(runs.values()), tmp_path_factory.mktemp("report") / "report.html")


def columns(rows) -> dict[str, dict[str, str]]:
    """A table whose first column names its rows: {row name: {column header: text}}."""
    header = [text for text, _ in rows[0]]
    return {row[0][0]: {h: text for h, (text, _) in zip(header[1:], row[1:])} for row in rows[1:]}


def test_the_metrics_table_holds_each_runs_final_metrics(page, runs):
    table = columns(Tables(page.read_text()).get("metrics"))
    assert set(table) == {"protocol", "img_r1", "itm_loss", "images"}
    for name, folder in runs.items():
        metrics = json.loads((folder / "metrics.json").read_text())
        assert table["protocol"][name] == metrics["protocol"] and int(table["images"][name]) == metrics["images"]
        for key in ("img_r1", "itm_loss"):
            assert float(table[key][name]) == pytest.approx(metrics[key], abs=5e-3), (name, key)


def test_the_config_table_lists_exactly_the_keys_that_differ(page, runs):
    table = columns(Tables(page.read_text()).get("config"))
    assert set(table) == {"train.seed", "method.losses"}   # train.out aside: each run's own folder
    assert [table["train.seed"][n] for n in RUNS] == ["0", "1", "0"]
    assert [table["method.losses"][n] for n in RUNS] == ["[itc,itm,mlm]", "[itc,itm,mlm]", "[itc,itm]"]


def test_the_ablation_table_gives_mean_and_std_over_seeds_and_marks_the_best(page):
    rows = Tables(page.read_text()).get(cls="ablation")
    header = [text for text, _ in rows[0]]
    assert header == ["method.losses", "runs", "img_r1 ↑", "itm_loss ↓"]  # images is the same everywhere: no column
    preset, no_mlm = ({text: cell for text, cell in zip(header, row)} for row in rows[1:])
    assert preset["method.losses"][0] == "[itc,itm,mlm]" and "albef_seed0" in preset["runs"][0]
    seeds = [v for v, _ in (RUNS["albef_seed0"][1], RUNS["albef_seed1"][1])]
    assert preset["img_r1 ↑"] == (f"{statistics.mean(seeds):.2f} ± {statistics.stdev(seeds):.2f}", True)
    assert no_mlm["img_r1 ↑"] == ("12.00", False)
    assert preset["itm_loss ↓"] == ("0.6000 ± 0.1414", False)          # the mean of 0.5 and 0.7 loses to 0.55
    assert no_mlm["itm_loss ↓"] == ("0.5500", True)


def test_a_standard_deviation_shows_as_many_decimals_as_its_mean():
    from vlpt.report.page import mean_std
    assert mean_std(38.3333, 0.2858) == "38.33 ± 0.29"
    assert mean_std(0.47921, 0.017693) == "0.4792 ± 0.0177"
    assert mean_std(700, 0.0) == "700 ± 0" and mean_std(12.5, None) == "12.50"
    assert mean_std(1.5e-5, 2.5e-6) == "1.5e-05 ± 2.5e-06"


def test_the_page_is_self_contained(page):
    text = page.read_text()
    assert text.count('src="data:image/png;base64,') == 2        # the losses, and learning rate with samples/s
    assert "http://" not in text and "https://" not in text and "<link" not in text and "<script" not in text


def test_a_missing_folder_or_one_without_metrics_is_one_line(runs, tmp_path, capsys):
    err = cli_error(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r.html")], capsys)
    assert "nope does not exist" in err
    (tmp_path / "empty").mkdir()
    err = cli_error(["report", str(runs["itc_itm"]), str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")],
                    capsys)
    assert "empty has no metrics" in err
    assert not (tmp_path / "r.html").exists()


def test_notes_follow_the_ablation_tables_escaped(runs, tmp_path):
    """compare_methods' lines on the papers' orderings ("a > b holds") are text in the page, not markup."""
    page = write_report(list(runs.values()), tmp_path / "r.html", notes=["x > y holds (+1.00)", "<b>no</b>"])
    text = page.read_text()
    assert "<h3>Against the papers</h3><ul><li>x &gt; y holds (+1.00)</li><li>&lt;b&gt;no&lt;/b&gt;</li></ul>" in text
    assert text.index("Against the papers") > text.index("<h2>Ablations</h2>")
    assert "Against the papers" not in write_report(list(runs.values()), tmp_path / "plain.html").read_text()


def test_compare_methods_writes_its_rows_through_the_report(shapes_data, tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import compare_methods
    rows, page = tmp_path / "rows.json", tmp_path / "compare.html"
    compare_methods.main(["--data", str(shapes_data), "--rows", "albef", "--seeds", "0", "1", "--steps", "2",
                          "--device", "cpu", "--out", str(tmp_path / "runs"), "--json", str(rows), "--report",
                          str(page), *TINY, "train.tensorboard=false"])
    assert f"report: {page}" in capsys.readouterr().out
    results = json.loads(rows.read_text())
    tables = Tables(page.read_text())
    metrics = columns(tables.get("metrics"))
    for r in results:
        assert float(metrics["img_r1"][Path(r["run"]).name]) == pytest.approx(r["img_r1"], abs=5e-3)
    ablation = tables.get(cls="ablation")
    header = [text for text, _ in ablation[0]]
    cells = dict(zip(header, ablation[1]))
    values = [r["img_r1"] for r in results]
    assert cells["img_r1 ↑"][0].startswith(f"{statistics.mean(values):.2f} ± ")


@pytest.mark.browser
def test_the_page_renders_with_its_plots_and_tables(browser, screenshots, page):
    view = browser.new_page(viewport={"width": 1300, "height": 1000})
    view.goto(page.as_uri())
    sizes = view.eval_on_selector_all("img.plot", "imgs => imgs.map(i => [i.complete, i.naturalWidth, "
                                      "i.getBoundingClientRect().width, i.getBoundingClientRect().height])")
    assert len(sizes) == 2 and all(done and natural > 0 and w > 0 and h > 0 for done, natural, w, h in sizes), sizes
    for table in ("#runs", "#metrics", "#config", "table.ablation"):
        assert view.locator(f"{table} tbody tr").count() >= 2, table
    assert view.locator("table.ablation b").count() == 2           # one best cell per column
    for path in (screenshots / "report.png", Path("/tmp/report.png")):
        view.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {screenshots / 'report.png'}")
    view.close()

"""The benchmark scripts run on the engine as it is (one tiny step each): a refactor that breaks them fails here."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import machine  # noqa: E402
import train_throughput  # noqa: E402

import pytest  # noqa: E402

from helpers import METHODS, TINY, config  # noqa: E402


@pytest.mark.parametrize("method", ["albef", "simla", "semmim"])
def test_train_throughput_runs_a_row_with_flops(method, capsys):
    """Each method's tiny preset gives its rows (on the CPU, over the shapes vocabulary; SemMIM's batches with their
    second view)."""
    overrides = [o for o in [*TINY, *METHODS[method].extra] if not o.startswith(("data.", "train.progress"))]
    rows = train_throughput.main(["--configs", METHODS[method].preset, "--steps", "1", "--warmup", "0",
                                  "--grad-checkpointing", "false", "true", *overrides])
    assert len(rows) == 2 and all(r["samples_per_s"] > 0 and r["gflop_per_sample"] > 0 for r in rows)
    assert all(r["device"] == "cpu" and r["vocab"] == train_throughput.SHAPES_VOCAB for r in rows)
    assert rows[0]["gflop_per_sample"] == rows[1]["gflop_per_sample"]  # recomputation is not counted
    if machine.peak_gflops(machine.cpu_info(), 1):  # lscpu names a frequency: MFU against the cores' fp32 peak
        assert all(0 < r["mfu"] < 1 for r in rows)
    assert f"| {method}_tiny |" in capsys.readouterr().out


LSCPU = "Vendor ID: {vendor}\nModel name: {model}\nCPU family: {family}\nCPU max MHz: 2000.0000\nFlags: fpu {flags}\n"


@pytest.mark.parametrize("vendor,family,flags,per_cycle", [
    ("GenuineIntel", "6", "avx2 fma avx512f", 64),  # two 512-bit FMA units
    ("AuthenticAMD", "25", "avx2 fma avx512f", 32),  # Zen 4: 512-bit operations over two 256-bit units
    ("AuthenticAMD", "25", "avx2 fma", 32),  # Zen 3
    ("GenuineIntel", "6", "sse4_2", 8),
])
def test_cpu_peak_follows_the_simd_of_lscpu(vendor, family, flags, per_cycle):
    cpu = machine.cpu_info(LSCPU.format(vendor=vendor, model="X", family=family, flags=flags))
    assert cpu["flop_per_cycle"] == per_cycle and cpu["mhz"] == 2000.0
    assert machine.peak_gflops(cpu, 1) == 2.0 * per_cycle  # one core x 2 GHz x FLOP per cycle
    assert machine.peak_gflops(cpu, 10 ** 6) == cpu["cores"] * 2.0 * per_cycle  # at most the cores there are


def test_train_throughput_gives_a_dvae_without_weights_a_stand_in(tmp_path):
    """SIMLA's base preset names DALL-E's dVAE, not shipped: a random encoder of its layout is written and read."""
    import torch
    from vlpt import methods
    cfg = config(tmp_path, tmp_path, *METHODS["simla"].extra, "method.simla.tokens.source=dvae",
                 preset=METHODS["simla"].preset)
    model = methods.build(cfg, 40)
    train_throughput.stand_in_dvae(model, str(tmp_path))
    tokens = model.visual_tokens(torch.randn(2, 3, 32, 32))
    assert Path(model.visual_tokens.path).parent == tmp_path and Path(model.visual_tokens.path).is_file()
    assert tokens.shape == (2, 16) and int(tokens.max()) < 16


def test_retrieval_eval_compares_the_batched_and_the_loop_reranking(shapes_data, capsys):
    import retrieval_eval
    retrieval_eval.main(["--data", str(shapes_data), "--limit", "8", "--k", "2", "--device", "cpu",
                         *[o for o in TINY if o.startswith("model.")]])
    assert "recall metrics identical" in capsys.readouterr().out


def test_every_compare_methods_row_is_a_shipped_preset_with_known_keys():
    """A row that names a missing preset or a misspelled key would only fail after the rows before it had trained."""
    import compare_methods
    from vlpt.cli import find_config
    from vlpt.config import load_config
    for name, (preset, extra) in compare_methods.ROWS.items():
        cfg = load_config(find_config(preset), extra)
        assert cfg.method.name == name.split(":")[0], name


def test_every_paper_table_row_is_a_compare_methods_row():
    """A misspelled row would leave its table's orderings silently unchecked."""
    import compare_methods
    import paper_tables
    for t in paper_tables.TABLES:
        assert len(t.rows) > 1 and set(t.rows) <= set(compare_methods.ROWS), t.title


def paper_rows(values: dict[str, list[float]]) -> list[dict]:
    """compare_methods rows (one a seed) with img_r1 and txt_r1 both the given values."""
    return [{"row": name, "seed": seed, "img_r1": v, "txt_r1": v} for name, vs in values.items()
            for seed, v in enumerate(vs)]


def test_orderings_hold_reverse_and_separate_as_the_seeds_say():
    """SemMIM Table 6 ranks 0.30 > 0.15 > 0.45 (IR@1 63.6 / 64.2 / 63.4): hand-made seeds give each verdict."""
    from paper_tables import TABLES, describe, orderings
    table = next(t for t in TABLES if t.title.startswith("SemMIM Table 6"))
    runs = paper_rows({"semmim": [30.0, 32.0, 34.0], "semmim:ratio-0.15": [20.0, 21.0, 29.0],  # below every preset
                       "semmim:ratio-0.45": [31.0, 33.0, 38.0]})                               # overlaps it, above
    found = {(o.higher, o.lower): o for o in orderings(table, runs, "img_r1")}
    assert set(found) == {("semmim", "semmim:ratio-0.15"), ("semmim", "semmim:ratio-0.45"),
                          ("semmim:ratio-0.15", "semmim:ratio-0.45")}
    first, second, third = (found[k] for k in [("semmim", "semmim:ratio-0.15"), ("semmim", "semmim:ratio-0.45"),
                                               ("semmim:ratio-0.15", "semmim:ratio-0.45")])
    assert first.holds and first.separated and first.difference == pytest.approx(32.0 - 70 / 3)
    assert (first.agree, first.paired) == (3, 3)
    assert not second.holds and not second.separated and second.difference == pytest.approx(32.0 - 34.0)
    assert (second.agree, second.paired) == (0, 3)       # seed 0: 30 > 31 no, seed 1: 32 > 33 no, seed 2: 34 > 38 no
    assert not third.holds and third.separated           # every 0.45 seed above every 0.15 seed
    line = describe(table, runs)[1]
    assert line.startswith("SemMIM Table 6, mask ratio (finetuned COCO 5K), img_r1 against the paper's IR@1 (3 runs")
    assert ("1 of 3 orderings hold (1 in every seed, 1 separated), 2 reversed (2 in every seed, 1 separated): "
            "semmim > semmim:ratio-0.15 holds (+8.67; 3/3 seeds, separated); semmim:ratio-0.15 > semmim:ratio-0.45 "
            "reversed (-10.67; 0/3 seeds, separated); semmim > semmim:ratio-0.45 reversed (-2.00; 0/3 seeds)") in line
    one = orderings(table, paper_rows({"semmim": [40.0], "semmim:ratio-0.15": [10.0]}), "img_r1")
    assert len(one) == 1 and one[0].holds and not one[0].separated   # one run a row separates nothing


def test_orderings_pair_runs_by_seed():
    """A seed that lifts every row hides a gap that each seed shows: unseparated, yet the same way in every seed."""
    from paper_tables import TABLES, describe, orderings
    table = next(t for t in TABLES if t.title.startswith("SemMIM Table 5"))
    runs = paper_rows({"semmim": [21.0, 31.0, 41.0], "semmim:random-mask": [20.0, 30.0, 40.0]})
    (o,) = orderings(table, runs, "img_r1")
    assert o.holds and not o.separated and (o.agree, o.paired) == (3, 3)
    assert "1 of 1 orderings hold (1 in every seed, 0 separated)" in describe(table, runs)[1]
    del runs[2]                         # the preset without seed 2: its mean 26 is below random masking's 30,
    (o,) = orderings(table, runs, "img_r1")                          # yet the two seeds both rows ran say +1
    assert (o.agree, o.paired) == (2, 2) and o.difference == pytest.approx(1.0) and o.holds
    (o,) = orderings(table, paper_rows({"semmim": [25.0], "semmim:random-mask": [0.0, 20.0]})[::2], "img_r1")
    assert o.paired == 0 and o.difference == pytest.approx(25.0 - 20.0)  # no shared seed: the means' difference


def test_a_paper_tie_is_no_ordering():
    """SemMIM Table 7's i = 9 and i = 12 tie on TR@1; a tie in the paper is no ordering to check (here: text-none
    against the preset, TR@1 80.4 / 81.5, is one)."""
    from paper_tables import PaperTable, orderings
    table = PaperTable("t", {"a": (81.5, 63.9), "b": (81.5, 64.2)})
    runs = paper_rows({"a": [1.0, 2.0], "b": [3.0, 4.0]})
    assert orderings(table, runs, "txt_r1") == [] and len(orderings(table, runs, "img_r1")) == 1


def test_compare_methods_joins_earlier_json_files_without_training(tmp_path, capsys):
    import compare_methods
    base = {"itm_prior": 0.637, "itm_loss": 0.5, "r_mean": 50.0, "itc_img_r1": 10.0, "binding_itc": 38.0,
            "binding_itm": 38.0, "binding_chance": 38.18, "ms_per_step": 1000.0, "codebook_usage_pct": None,
            "run": str(tmp_path / "gone")}
    files = []
    for seed in (0, 1):
        rows = [{**base, **r} for r in paper_rows({"semmim": [30.0 + seed], "semmim:random-mask": [20.0 + seed]})]
        for r in rows:
            r["seed"] = seed
        files.append(tmp_path / f"seed{seed}.json")
        files[-1].write_text(json.dumps(rows))
    compare_methods.main(["--from-json", *map(str, files), "--out", str(tmp_path / "nothing")])
    out = capsys.readouterr().out
    assert not (tmp_path / "nothing").exists()                             # nothing trained
    assert "| semmim | 0, 1 | 0.637 ± 0.000 | 0.500 ± 0.000 | 30.50 ± 0.71 |" in out
    assert ("SemMIM Table 5, masking (finetuned COCO 5K), img_r1 against the paper's IR@1 (2 runs a row): 1 of 1 "
            "orderings hold (1 in every seed, 1 separated), 0 reversed (0 in every seed, 0 separated): "
            "semmim > semmim:random-mask holds (+10.00; 2/2 seeds, separated)") in out


def test_compare_methods_trains_and_evaluates_a_row(shapes_data, tmp_path, capsys):
    import compare_methods
    compare_methods.main(["--data", str(shapes_data), "--rows", "albef", "cbvila:mlm+itm+pixel", "--steps", "2",
                          "--device", "cpu", "--out", str(tmp_path), *TINY])
    out = capsys.readouterr().out
    assert "| albef |" in out and "cbvila:mlm+itm+pixel" in out


def test_compare_methods_over_seeds_gives_mean_and_std_and_the_prior_of_its_itm_rows(shapes_data, tmp_path, capsys):
    import math

    import compare_methods
    from vlpt.data.loader import load_pairs
    rows = str(tmp_path / "rows.json")
    swaps = "method.itm_swap_words=[[red,green,blue,yellow,purple,orange,white,cyan],[small,large]]"
    compare_methods.main(["--data", str(shapes_data), "--rows", "albef", "--seeds", "0", "1", "--steps", "2",
                          "--device", "cpu", "--out", str(tmp_path), "--json", rows, *TINY, swaps])
    out = capsys.readouterr().out
    runs = json.loads(Path(rows).read_text())
    assert [r["seed"] for r in runs] == [0, 1] and (tmp_path / "albef_seed1").is_dir()
    prior = runs[0]["itm_prior"]  # swapped colours and sizes: 1 match in 3 + s rows
    groups = [set(g) for g in config(shapes_data, tmp_path, swaps).method.itm_swap_words]
    captions = [r["caption"] for r in load_pairs(shapes_data / "pretrain.json")]
    s = sum(any(len(g & set(c.split())) >= 2 for g in groups) for c in captions) / len(captions)
    p = 1 / (3 + s)
    assert 0 < s < 1 and prior == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)))
    line = next(x for x in out.splitlines() if x.startswith("| albef | 0, 1 |"))
    itm = [r["itm_loss"] for r in runs]
    assert f"{(itm[0] + itm[1]) / 2:.3f} ± {abs(itm[0] - itm[1]) / math.sqrt(2):.3f}" in line


def test_downstream_runs_every_stage_of_a_method(shapes_data, tmp_path, capsys):
    import downstream
    downstream.main(["--data", str(shapes_data), "--methods", "maskvlm", "--out", str(tmp_path), *TINY,
                     "train.steps=2", "train.save_every=2", "train.eval_every=2", "eval.batch_size=16"])
    out = capsys.readouterr().out
    for stage in ("| maskvlm | retrieval, finetuned |", "| maskvlm | SNLI-VE |", "| maskvlm | NLVR2 (test-P) |"):
        assert stage in out
    assert "NLVR2 text assignment" not in out  # MaskVLM's NLVR2 fuses each image separately, without TA


def test_grounding_layers_sweeps_every_fusion_layer(shapes_data, tmp_path, capsys):
    import grounding_layers
    from vlpt.pretrain import pretrain
    out = tmp_path / "pre"
    pretrain(config(shapes_data, out, "train.steps=1", "train.save_every=1", "model.text.fusion_layers=2"))
    rows = grounding_layers.main(["--checkpoint", str(out), "--data", str(shapes_data), "--device", "cpu"])
    assert [r["layer"] for r in rows] == [0, 1] and "| 1 |" in capsys.readouterr().out


def test_decoding_benchmark_checks_cached_and_recomputed_greedy_agree(capsys):
    import decoding
    rows = decoding.main(["--batch", "2", "--tokens", "3", "--repeats", "1", "--context", "5"])
    assert [r["mode"] for r in rows][:2] == ["greedy, whole prefix each step", "greedy, cached (generate)"]
    assert "identical tokens" in capsys.readouterr().out

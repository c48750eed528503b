"""The benchmark scripts run on the engine as it is (one tiny step each): a refactor that breaks them fails here."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import train_throughput  # noqa: E402

from helpers import TINY  # noqa: E402


def test_train_throughput_runs_a_row_with_flops(capsys):
    overrides = [o for o in TINY if not o.startswith(("data.", "train.progress"))]
    rows = train_throughput.main(["--configs", "configs/pretrain/albef_tiny.yaml", "--device", "cpu", "--steps", "1",
                                  "--warmup", "0", "--grad-checkpointing", "false", "true", *overrides])
    assert len(rows) == 2 and all(r["samples_per_s"] > 0 and r["gflop_per_sample"] > 0 for r in rows)
    assert rows[0]["gflop_per_sample"] == rows[1]["gflop_per_sample"]  # recomputation is not counted
    assert "| albef_tiny |" in capsys.readouterr().out


def test_retrieval_eval_compares_the_batched_and_the_loop_reranking(shapes_data, capsys):
    import retrieval_eval
    retrieval_eval.main(["--data", str(shapes_data), "--limit", "8", "--k", "2", "--device", "cpu",
                         *[o for o in TINY if o.startswith("model.")]])
    assert "recall metrics identical" in capsys.readouterr().out


def test_compare_methods_trains_and_evaluates_a_row(shapes_data, tmp_path, capsys):
    import compare_methods
    compare_methods.main(["--data", str(shapes_data), "--rows", "albef", "cbvila:mlm+itm+pixel", "--steps", "2",
                          "--device", "cpu", "--out", str(tmp_path), *TINY])
    out = capsys.readouterr().out
    assert "| albef |" in out and "cbvila:mlm+itm+pixel" in out


def test_downstream_runs_every_stage_of_a_method(shapes_data, tmp_path, capsys):
    import downstream
    downstream.main(["--data", str(shapes_data), "--methods", "maskvlm", "--out", str(tmp_path), *TINY,
                     "train.steps=2", "train.save_every=2", "train.eval_every=2", "eval.batch_size=16"])
    out = capsys.readouterr().out
    for stage in ("| maskvlm | retrieval, finetuned |", "| maskvlm | SNLI-VE |", "| maskvlm | NLVR2 (test-P) |"):
        assert stage in out
    assert "NLVR2 text assignment" not in out  # MaskVLM's NLVR2 fuses each image separately, without TA

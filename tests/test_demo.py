"""`vlpt demo`: every stage runs on the embedded data and lands in one table (tiny model, a few steps each)."""
import json

from vlpt.cli import main
from helpers import TINY


def test_demo_runs_every_stage_and_prints_one_table(shapes_data, tmp_path, capsys):
    # the tiny presets' model itself (no model key given: each stage must take it from the run before), few steps
    small = [o for o in TINY if o.startswith(("data.", "train."))]
    steps = ["train.steps=2", "train.save_every=2", "train.eval_every=2", "eval.batch_size=16"]
    main(["demo", "--data", str(shapes_data), "--out", str(tmp_path), *small, *steps])
    printed = capsys.readouterr().out
    rows = json.loads((tmp_path / "demo.json").read_text())
    stages = [r["stage"] for r in rows]
    assert stages == ["data", "pretrain albef", "retrieval, zero-shot", "  binding (hard negatives)",
                      "classification, zero-shot", "retrieval, finetuned", "SNLI-VE", "NLVR2 text assignment",
                      "NLVR2 (test-P)", "VQA", "captioning", "grounding"]
    for r in rows:
        assert r["stage"] in printed and r["seconds"] >= 0
    zero = json.loads((tmp_path / "albef" / "metrics.json").read_text())
    assert rows[2]["value"] == zero["img_r1"] and rows[5]["baseline_value"] == zero["img_r1"]
    ve = json.loads((tmp_path / "ve" / "metrics.json").read_text())
    assert rows[6]["value"] == ve["accuracy"] and rows[6]["baseline_value"] == ve["majority_baseline"]
    vqa = json.loads((tmp_path / "vqa" / "metrics.json").read_text())
    assert rows[9]["value"] == vqa["vqa_accuracy"] and rows[9]["baseline_value"] == vqa["prior_baseline"]
    grounding = json.loads((tmp_path / "grounding" / "metrics.json").read_text())
    assert rows[11]["baseline_value"] == grounding["random_baseline"] and rows[11]["task"] == "grounding"
    assert "total" in printed.splitlines()[-3]
    assert printed.splitlines()[-1] == (f"try it in a browser: vlpt serve --checkpoint {tmp_path / 'albef'} --images "
                                        f"{shapes_data / 'images' / 'test'} --heads {tmp_path / 'vqa'} "
                                        f"{tmp_path / 'caption'}")

"""`vlpt demo`: every stage runs on the embedded data and lands in one table (tiny model, a few steps each)."""
import json

import pytest

from vlpt import demo
from vlpt.cli import main
from vlpt.config import load_config
from vlpt.engine.checkpoint import resolve
from vlpt.errors import ConfigError
from helpers import TINY


def test_demo_runs_every_stage_and_prints_one_table(shapes_data, tmp_path, capsys, monkeypatch):
    # the tiny presets' model itself (no model key given: each stage must take it from the run before), few steps
    small = [o for o in TINY if o.startswith(("data.", "train."))]
    steps = ["train.steps=2", "train.save_every=2", "train.eval_every=2", "eval.batch_size=16",
             "train.compile=false"]  # compiling is test_parallel.py's; here a cold compile would cost a minute
    main(["demo", "--data", str(shapes_data), "--out", str(tmp_path), "--jobs", "2", *small, *steps])
    printed = capsys.readouterr().out
    rows = json.loads((tmp_path / "demo.json").read_text())
    stages = [r["stage"] for r in rows]
    assert stages == ["data", "pretrain albef", "retrieval, zero-shot", "  binding (hard negatives)",
                      "classification, zero-shot", "retrieval, finetuned", "SNLI-VE", "NLVR2 (test-P)", "VQA",
                      "captioning", "grounding", "total (wall)"]  # NLVR2's tiny preset: separate fusion, no TA
    for r in rows:
        assert r["stage"] in printed and r["seconds"] >= 0
    zero = json.loads((tmp_path / "albef" / "metrics.json").read_text())
    assert rows[2]["value"] == zero["img_r1"] and rows[5]["baseline_value"] == zero["img_r1"]
    ve = json.loads((tmp_path / "ve" / "metrics.json").read_text())
    assert rows[6]["value"] == ve["accuracy"] and rows[6]["baseline_value"] == ve["majority_baseline"]
    vqa = json.loads((tmp_path / "vqa" / "metrics.json").read_text())
    assert rows[8]["value"] == vqa["vqa_accuracy"] and rows[8]["baseline_value"] == vqa["prior_baseline"]
    grounding = json.loads((tmp_path / "grounding" / "metrics.json").read_text())
    assert rows[10]["baseline_value"] == grounding["random_baseline"] and rows[10]["task"] == "grounding"
    assert "total (wall)" in printed.splitlines()[-3]
    assert rows[-1]["seconds"] >= max(r["seconds"] for r in rows[:-1])
    # the downstream stages ran two at a time, each printing into its own log; the given overrides won over
    # configs/demo/stages.yaml's (2 steps everywhere)
    for task in demo.FINETUNED:
        assert f"metrics in {tmp_path / task / 'metrics.json'}" in (tmp_path / "logs" / f"{task}.log").read_text()
        assert json.loads((tmp_path / task / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    assert printed.splitlines()[-1] == (f"try it in a browser: vlpt serve --checkpoint {tmp_path / 'albef'} --images "
                                        f"{shapes_data / 'images' / 'test'} --heads {tmp_path / 'vqa'} "
                                        f"{tmp_path / 'caption'}")
    # the paired fusion (ALBEF's) in the budget file: text assignment first, and NLVR2 starts from its run
    stages = tmp_path / "stages.yaml"
    stages.write_text("nlvr: [task.fusion=paired, task.val_split=]\n")
    monkeypatch.setattr(demo, "STAGES", str(stages))
    paired = demo.finetune_stage("nlvr", "albef", shapes_data, tmp_path, [*small, *steps], 0.0)
    assert [r["stage"] for r in paired] == ["NLVR2 text assignment", "NLVR2 (test-P)"]
    config = (resolve(tmp_path / "nlvr") / "config.yaml").read_text()
    assert "fusion: paired" in config and f"checkpoint: {tmp_path / 'nlvr_ta'}" in config


def test_stage_overrides_come_from_the_budget_file_and_a_bad_one_is_named(tmp_path, monkeypatch):
    cfg = load_config(demo.find_config("pretrain/albef_tiny.yaml"), demo.stage_overrides("pretrain"))
    assert cfg.train.compile and cfg.train.steps == 700  # compiled, the preset's steps
    ve = load_config(demo.find_config("finetune/ve_tiny.yaml"), demo.stage_overrides("ve"))
    assert ve.task.val_split == "" and ve.train.steps == 100
    for task in (*demo.FINETUNED, "nlvr_ta"):  # every line applies to its stage's preset (a bad key would fail)
        load_config(demo.find_config(f"finetune/{task}_tiny.yaml"), demo.stage_overrides(task))
    bad = tmp_path / "stages.yaml"
    bad.write_text("pretraining: [train.steps=1]\n")
    monkeypatch.setattr(demo, "STAGES", str(bad))
    with pytest.raises(ConfigError, match="pretraining.*must be one of pretrain"):
        demo.stage_overrides("pretrain")


def test_without_a_cpp_compiler_the_demo_does_not_compile(monkeypatch):
    cfg = load_config(demo.find_config("pretrain/albef_tiny.yaml"), ["train.compile=true", "train.device=cpu"])
    assert not demo.compiler_missing(cfg) or not any(map(demo.shutil.which, ("g++", "clang++", "c++")))
    monkeypatch.setattr(demo.shutil, "which", lambda name: None)
    assert demo.compiler_missing(cfg)
    assert not demo.compiler_missing(load_config(demo.find_config("pretrain/albef_tiny.yaml"), ["train.device=cpu"]))


def test_a_stage_beside_others_prints_into_its_log_with_its_child_processes(tmp_path, capfd):
    import subprocess
    import sys
    with demo.output_to(tmp_path / "logs" / "stage.log"):
        print("from python", flush=True)
        subprocess.run([sys.executable, "-c", "import sys; print('from a child'); print('to stderr', file=sys.stderr)"])
    print("after")
    assert (tmp_path / "logs" / "stage.log").read_text().split() == "from python from a child to stderr".split()
    assert capfd.readouterr().out == "after\n"

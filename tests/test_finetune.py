"""Finetuning through the Task protocol: finetuned retrieval and SNLI-VE from a tiny pretraining checkpoint, the
weights a task starts from (teacher, position embeddings, a task checkpoint's encoders), exact resume, the heads'
inputs and the distilled loss against their formulas, and bad annotations."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from vlpt import methods
from vlpt.cli import main
from vlpt.engine import checkpoint
from vlpt.objectives.classification import distilled_cross_entropy
from vlpt.pretrain import pretrain
from vlpt.tasks import ve
from helpers import TINY, cli_error, config


@pytest.fixture(scope="module")
def pretrained(shapes_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "albef"
    pretrain(config(shapes_data, out, "train.steps=4", "train.save_every=4"))
    return out


def finetune(task, shapes_data, source, out, *extra):
    main(["finetune", task, "--config", f"finetune/{task}_tiny.yaml", "--checkpoint", str(source), *TINY,
          f"data.root={shapes_data}", f"train.out={out}", "train.steps=4", "train.eval_every=2",
          "train.save_every=2", "eval.batch_size=16", *extra])
    return json.loads((out / "metrics.json").read_text())


def test_distilled_cross_entropy_against_its_formula():
    logits, teacher = torch.randn(5, 3), torch.randn(5, 3)
    labels = torch.tensor([0, 2, 1, 1, 0])
    ce = -F.log_softmax(logits, 1)[torch.arange(5), labels]
    soft = -(F.softmax(teacher, 1) * F.log_softmax(logits, 1)).sum(1)
    assert torch.allclose(distilled_cross_entropy(logits, labels, teacher, 0.4), (0.6 * ce + 0.4 * soft).mean())
    assert torch.allclose(distilled_cross_entropy(logits, labels, teacher, 0.0), ce.mean())


def test_retrieval_finetunes_and_names_its_protocol(pretrained, shapes_data, tmp_path, capsys):
    metrics = finetune("retrieval", shapes_data, pretrained, tmp_path / "ret")
    assert metrics["protocol"] == "finetuned" and metrics["selected_step"] in (2, 4)
    assert {"img_r1", "txt_r1", "r_mean", "binding_itm"} <= set(metrics)
    meta = checkpoint.read_meta(checkpoint.resolve(tmp_path / "ret"))
    assert meta["heads"] == ["retrieval"] and meta["task"] == "retrieval"
    assert meta["step"] == metrics["selected_step"]  # the run folder reads as the step its metrics report
    out = tmp_path / "zs.json"
    main(["evaluate", "retrieval", "--checkpoint", str(pretrained), "--data", str(shapes_data), "--out", str(out)])
    assert json.loads(out.read_text())["protocol"] == "zero-shot"
    other = tmp_path / "flickr"
    shutil.copytree(shapes_data, other)  # another data set: a transfer, named from both
    main(["evaluate", "retrieval", "--checkpoint", str(tmp_path / "ret"), "--data", str(other), "--out", str(out)])
    assert json.loads(out.read_text())["protocol"] == f"{shapes_data.name}-finetuned transfer to flickr"


def test_ve_finetunes_beside_a_majority_baseline_and_refuses_an_untrained_head(pretrained, shapes_data, tmp_path,
                                                                                capsys):
    metrics = finetune("ve", shapes_data, pretrained, tmp_path / "ve")
    labels = [r["label"] for r in json.loads((shapes_data / "ve_test.json").read_text())]
    assert metrics["majority_baseline"] == round(100 * max(map(labels.count, set(labels))) / len(labels), 2)
    assert metrics["examples"] == len(labels) and 0 <= metrics["accuracy"] <= 100
    assert sum(metrics[f"accuracy_{name}"] > 0 for name in ve.LABELS) >= 1
    err = cli_error(["evaluate", "ve", "--checkpoint", str(pretrained)], capsys)
    assert "no trained 've' head" in err and "vlpt finetune ve" in err


def test_without_a_validation_split_the_last_step_is_tested(pretrained, shapes_data, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(ve.VisualEntailment, "evaluate", lambda self, model, split: seen.append(split) or {"accuracy": 0.0})
    metrics = finetune("ve", shapes_data, pretrained, tmp_path / "ve", "task.val_split=")
    assert seen == ["test"]  # no validation pass at step 2 or 4, one test pass
    assert metrics["selected_step"] == 4 and not any(k.startswith("val_") for k in metrics)
    assert not (tmp_path / "ve" / "best").exists()


def test_a_killed_finetune_resumes_bitwise(pretrained, shapes_data, tmp_path):
    finetune("ve", shapes_data, pretrained, tmp_path / "whole")
    finetune("ve", shapes_data, pretrained, tmp_path / "cut", "train.steps=2")
    finetune("ve", shapes_data, pretrained, tmp_path / "cut", "--resume", "latest")
    a = checkpoint.resolve(tmp_path / "whole")
    b = checkpoint.resolve(tmp_path / "cut")
    from safetensors.torch import load_file
    wa, wb = load_file(str(a / checkpoint.WEIGHTS)), load_file(str(b / checkpoint.WEIGHTS))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def build(shapes_data, tmp_path, method="albef", *extra):
    from vlpt.cli import find_config
    from vlpt.config import load_config
    cfg = load_config(find_config(f"pretrain/{method}_tiny.yaml"),
                      [*TINY, f"data.root={shapes_data}", f"train.out={tmp_path}", "task.name=ve", *extra])
    torch.manual_seed(0)
    return cfg, methods.build(cfg, 120)


def test_ve_head_reads_maskvlm_product_and_albef_fused_state(shapes_data, tmp_path):
    for name in ("maskvlm", "albef"):
        cfg, method = build(shapes_data, tmp_path, name)
        model = ve.JointClassifier(method, 3).eval()
        batch = {"image": torch.randn(2, 3, 32, 32), "text_ids": torch.randint(5, 120, (2, 7)),
                 "text_mask": torch.ones(2, 7, dtype=torch.long)}
        b = method.backbone
        tokens = b.encode_image(batch["image"])
        hidden = b.encode_text(batch["text_ids"], batch["text_mask"])
        fused = b.fuse(tokens, hidden, batch["text_mask"]).mean(1)  # the tiny presets pool by mean
        if name == "maskvlm":  # Eq. 3: image cross-encoder [CLS] times pooled text cross-encoder output
            image_cls = b.image_fusion(tokens, None, hidden, batch["text_mask"])[:, 0]
            feature = b.itm_image_proj(image_cls) * fused
        else:
            feature = fused
        assert torch.allclose(model.logits(batch), model.head(feature), atol=1e-5)


def test_ve_teacher_starts_as_the_student_and_follows_it_by_ema(shapes_data, tmp_path):
    cfg, method = build(shapes_data, tmp_path)
    model = ve.JointClassifier(method, 3)
    assert method.teacher is None and method.queues is None  # pretraining's teacher replaced by the task's
    student = [*method.backbone.parameters(), *model.head.parameters()]
    teacher = [*model.teacher["backbone"].parameters(), *model.teacher["head"].parameters()]
    assert len(student) == len(teacher) and all(torch.equal(p, q) for p, q in zip(student, teacher))
    before = [p.clone() for p in teacher]
    with torch.no_grad():
        for p in student:
            p.add_(1.0)
    model.after_step(1)
    m = cfg.method.momentum
    assert all(torch.allclose(t, m * old + (1 - m) * s) for old, t, s in zip(before, teacher, student))
    assert not any(p.requires_grad for p in teacher)
    cfg, method = build(shapes_data, tmp_path, "maskvlm")  # no teacher: plain cross entropy
    assert ve.JointClassifier(method, 3).teacher is None


def test_task_weights_from_a_checkpoint_without_teacher_or_of_another_size(pretrained, shapes_data, tmp_path):
    from safetensors.torch import load_file, save_file
    src = checkpoint.resolve(pretrained)
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    weights = load_file(str(dst / checkpoint.WEIGHTS))
    save_file({k: v for k, v in weights.items() if not k.startswith("teacher.")}, str(dst / checkpoint.WEIGHTS))
    out = tmp_path / "ve"
    # 48 px: 6 x 6 patches instead of 4 x 4, position embeddings resampled; the teacher starts as the loaded student
    finetune("ve", shapes_data, dst, out, "model.vision.image_size=48", "train.steps=1", "train.eval_every=1",
             "train.save_every=1")
    first, cfg, tokenizer = checkpoint.open_checkpoint(out)
    model = ve.JointClassifier(methods.build(cfg, tokenizer.vocab_size), 3)
    checkpoint.load_weights(first, model)
    assert model.method.backbone.vision.pos_embed.shape[1] == 1 + 36
    student = model.method.backbone.text.embeddings.word.weight
    teacher = model.teacher["backbone"].text.embeddings.word.weight
    assert (student - teacher).abs().max() < 1e-2  # one EMA step apart, not two random initialisations
    # the VE checkpoint's encoders serve a method-only evaluation (its `method.` weights, no teacher needed)
    from vlpt.tasks import base, registry
    _, loaded = base.load(registry.get("classification"), out, "cpu")
    assert torch.equal(loaded.backbone.text.embeddings.word.weight, student) and loaded.teacher is None


def test_ve_labels_read_in_both_spellings_and_a_bad_one_named(tmp_path):
    path = tmp_path / "ve.json"
    path.write_text(json.dumps([{"image": "a.png", "sentence": "s", "label": "entailment"},
                                {"image": "b", "sentence": "s", "label": 0}]))
    assert [r["label"] for r in ve.read_ve(path)] == [2, 0]
    path.write_text(json.dumps([{"image": "a.png", "sentence": "s", "label": "entailment"},
                                {"image": "b", "sentence": "s", "label": "maybe"}]))
    with pytest.raises(Exception, match=r"ve.json: record 1 has label 'maybe'"):
        ve.read_ve(path)
    path.write_text(json.dumps([{"image": "a.png", "label": 1}]))
    with pytest.raises(Exception, match=r"record 0 lacks sentence"):
        ve.read_ve(path)


def test_evaluate_all_runs_what_the_checkpoint_has_and_refuses_an_untrained_head(pretrained, shapes_data, tmp_path,
                                                                                  capsys):
    main(["evaluate", "all", "--checkpoint", str(pretrained), "--num-workers", "0", "--out", str(tmp_path / "all")])
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert {"retrieval", "classification"} <= set(results) and "ve" not in results
    assert results["retrieval"]["protocol"] == "zero-shot" and (tmp_path / "all" / "retrieval.json").is_file()
    assert "not evaluated (no trained head" in printed and "ve" in printed.split("not evaluated")[1]
    err = cli_error(["evaluate", "all", "--checkpoint", str(pretrained), "--tasks", "retrieval", "ve"], capsys)
    assert "no trained 've' head" in err and "vlpt finetune ve --checkpoint" in err


def test_finetuned_retrieval_draws_hard_negatives_from_the_first_step(pretrained):
    """The tiny pretraining recipe's random ITM negatives (method.itm_easy_steps, issue 13) must not carry over:
    ALBEF's Retrieval.py mines hard ones throughout; with easy ones its ITM reranking got worse than ITC alone."""
    from vlpt.cli import find_config
    from vlpt.tasks.base import finetune_config
    assert checkpoint.load_config(checkpoint.resolve(pretrained))["method"]["itm_easy_steps"] == 300
    cfg = finetune_config(find_config("finetune/retrieval_tiny.yaml"), [f"task.checkpoint={pretrained}"])
    assert cfg.method.itm_easy_steps == 0 and cfg.method.name == "albef"


def test_finetuned_retrieval_ranks_by_its_checkpoints_rule(pretrained):
    """The demo compares finetuned img_r1 with the checkpoint's zero-shot one: both must rerank by the same rule
    (the tiny presets add the ITC logit, eval.itc_weight 1; before, finetuning fell back to ALBEF's 0 and its ITM-only
    figure was set against an ITM + ITC one). A task's YAML or an override still decides."""
    from vlpt.cli import find_config
    from vlpt.tasks.base import finetune_config
    assert checkpoint.load_config(checkpoint.resolve(pretrained))["eval"]["itc_weight"] == 1.0
    preset = find_config("finetune/retrieval_tiny.yaml")
    cfg = finetune_config(preset, [f"task.checkpoint={pretrained}"])
    assert cfg.eval.itc_weight == 1.0
    assert finetune_config(preset, [f"task.checkpoint={pretrained}", "eval.itc_weight=0"]).eval.itc_weight == 0.0
    assert cfg.eval.k == 16  # the task's YAML

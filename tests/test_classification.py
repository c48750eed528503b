"""Zero-shot classification: top-k accuracy and the ITM reranked order on hand-counted cases, CLIP's prompt
ensembling, confusion counts, the whole evaluation against a direct pair-by-pair computation, the CLI (metrics JSON and
the confusion PNG beside it) and bad input as one error line."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlpt.cli import main
from vlpt.data.annotations import load_image
from vlpt.data.transforms import image_transform
from vlpt.engine.checkpoint import load_method
from vlpt.pretrain import pretrain
from vlpt.tasks import classification, retrieval
from helpers import cli_error, config


def test_top_k_accuracy_against_hand_counted_ranks():
    sim = torch.tensor([[0.9, 0.1, 0.2, 0.0, 0.3, 0.4],    # label 0 ranked first
                        [0.9, 0.1, 0.8, 0.7, 0.6, 0.5],    # label 1 ranked last
                        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],    # label 1 ranked fifth
                        [0.6, 0.5, 0.9, 0.4, 0.3, 0.2]])   # label 0 ranked second
    m = classification.accuracy(sim.argsort(1, descending=True), torch.tensor([0, 1, 1, 0]), ks=(1, 2, 5))
    assert m == {"top1": 25.0, "top2": 50.0, "top5": 75.0}


def test_rerank_order_puts_the_top_k_in_itm_order_then_the_rest_in_itc_order():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.5]])         # ITC order: 0 1 2 4 3; the top 3 are 0 1 2
    scores = torch.tensor([[-2.0, 3.0, 1.0, -100, -100]])   # their ITM scores: 1 before 2 before 0
    assert classification.rerank_order(scores, sim, k=3).tolist() == [[1, 2, 0, 4, 3]]
    # a class outside the top k never moves up, however it scores; k beyond the classes reranks them all
    scores = torch.tensor([[-2.0, 3.0, 1.0, 50.0, 9.0]])
    assert classification.rerank_order(scores, sim, k=3).tolist() == [[1, 2, 0, 4, 3]]
    assert classification.rerank_order(scores, sim, k=99).tolist() == [[3, 4, 1, 2, 0]]


def test_prompt_ensemble_is_the_renormalised_mean_of_normalised_prompt_features():
    prompts, classes = 3, 4
    feat = F.normalize(torch.randn(prompts * classes, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    out = classification.ensemble(feat, prompts)
    for c in range(classes):
        mean = sum(feat[p * classes + c] for p in range(prompts)) / prompts
        assert torch.allclose(out[c], mean / mean.norm(), atol=1e-6)


def test_confusion_matrix_counts():
    m = classification.confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


@pytest.fixture(scope="module")
def trained(shapes_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("cls") / "run"
    pretrain(config(shapes_data, run, "train.steps=3"))
    return run


def test_scores_and_evaluation_equal_a_direct_computation_pair_by_pair(trained, shapes_data):
    """From the class names and prompts encoded one by one: ITC logits with the name or the prompts' renormalised mean
    feature, ITM match logits with the name or their mean over the prompts (k = all classes reranked, plus 0.5 x the
    ITC logit); and `evaluate`'s top-1 predictions (its confusion matrices) are the argmax of those scores."""
    model, cfg, tok = load_method(trained)
    prompts, weight = ["a picture of a {}", "an image of a {}"], 0.5
    classes = json.loads((shapes_data / "classes.json").read_text())
    records = json.loads((shapes_data / "classification_test.json").read_text())
    kwargs = dict(image_size=cfg.model.vision.image_size, max_len=cfg.model.text.max_len, batch_size=7,
                  progress=False)
    texts = [*classes, *(p.format(c) for p in prompts for c in classes)]
    enc = retrieval.encode_split(model, [shapes_data / r["image"] for r in records], texts, tok, device="cpu",
                                 **kwargs)
    ranked = classification.rank_classes(model, enc, len(classes), len(prompts), k=len(classes), batch_size=7,
                                         itc_weight=weight, progress=False)
    m = classification.evaluate(model, shapes_data / "classification_test.json", shapes_data / "classes.json",
                                shapes_data, tok, prompts=prompts, k=len(classes), itc_weight=weight, **kwargs)
    assert (m["images"], m["classes"], m["prompts"], m["chance_top1"]) == (len(records), 40, 2, 2.5)

    def text(s):
        ids, mask = tok([s], cfg.model.text.max_len)
        return (*model.encode_text(ids, mask), mask)

    names = [text(c) for c in classes]
    prompted = [[text(p.format(c)) for p in prompts] for c in classes]
    ensembled = torch.cat([F.normalize(sum(f for _, f, _ in group) / len(prompts), dim=-1) for group in prompted])
    transform, temp = image_transform(cfg.model.vision.image_size), model.temperature()
    direct = {name: [] for name in classification.PROTOCOLS}
    with torch.no_grad():
        for r in records:
            tokens, feat = model.encode_image(transform(load_image(shapes_data / r["image"]))[None])
            itc = (feat @ torch.cat([f for _, f, _ in names]).t())[0] / temp
            itc_prompts = (feat @ ensembled.t())[0] / temp
            itm = torch.stack([model.itm_logits(tokens, h, mask)[0, 1] for h, _, mask in names])
            itm_prompts = torch.stack([sum(model.itm_logits(tokens, h, mask)[0, 1] for h, _, mask in group) / len(group)
                                       for group in prompted])
            for name, row in (("itc", itc), ("itc_prompts", itc_prompts), ("itm", itm + weight * itc),
                              ("itm_prompts", itm_prompts + weight * itc_prompts)):
                direct[name].append(row)
    labels = [r["label"] for r in records]
    for name, rows in direct.items():
        scores, order = ranked[name]
        assert torch.allclose(scores, torch.stack(rows), atol=1e-4), name
        top1 = scores.argmax(1).tolist()
        assert order[:, 0].tolist() == top1, name
        assert m["confusion"][name] == classification.confusion_matrix(labels, top1, 40).tolist(), name
        assert m[f"{name}_top1"] == round(100 * float(np.mean(np.equal(top1, labels))), 2)
        assert m[f"{name}_top1"] <= m[f"{name}_top5"]


def test_cli_writes_metrics_and_the_confusion_png_beside_them(trained, shapes_data, tmp_path, capsys):
    out = tmp_path / "eval" / "cls.json"
    main(["evaluate", "classification", "--checkpoint", str(trained), "--data", str(shapes_data), "--k", "3",
          "--prompts", "a picture of a {}", "a drawing of a {}", "--num-workers", "0", "--device", "cpu",
          "--out", str(out)])
    printed = capsys.readouterr().out
    metrics = json.loads(out.read_text())
    png = tmp_path / "eval" / "cls_confusion.png"
    assert metrics["confusion_png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "confusion" not in metrics and (metrics["prompts"], metrics["k"]) == (2, 3)
    for name in classification.PROTOCOLS:
        assert 0 <= metrics[f"{name}_top1"] <= metrics[f"{name}_top5"] <= 100
    assert "ITM, prompts" in printed and str(png) in printed


def test_bad_input_is_one_error_line(trained, shapes_data, tmp_path, capsys):
    base = ["evaluate", "classification", "--checkpoint", str(trained), "--data", str(shapes_data),
            "--num-workers", "0", "--device", "cpu"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "images/test/000000.png", "label": 3},
                               {"image": "images/test/000001.png", "label": 40}]))
    err = cli_error([*base, "--files", str(bad)], capsys)
    assert str(bad) in err and "record 1" in err and "label 40" in err and "classes.json" in err, err
    err = cli_error([*base, "--classes", "missing.json"], capsys)
    assert "class file not found" in err and str(shapes_data / "missing.json") in err, err
    err = cli_error([*base, "--prompts", "a picture of"], capsys)
    assert "task.prompts[0]" in err and "{}" in err, err

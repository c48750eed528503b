"""Retrieval evaluation: ALBEF's recall metrics, batched ITM reranking equal to the per-query loop, the CLI."""
import json

import numpy as np
import pytest
import torch

from vlpt.cli import main
from vlpt.engine.checkpoint import load_method
from vlpt.pretrain import pretrain as train
from vlpt.tasks import retrieval
from helpers import config


def test_recall_metrics_against_hand_counted_ranks():
    # 3 images, 4 texts: image 0 owns texts 0 and 1, image 1 text 2, image 2 text 3.
    img2txt, txt2img = [[0, 1], [2], [3]], np.array([0, 0, 1, 2])
    i2t = np.array([[0.1, 0.9, 0.0, 0.2],    # best text 1 (its own): rank 0
                    [0.5, 0.1, 0.4, 0.3],    # own text 2 is second: rank 1
                    [0.9, 0.8, 0.7, 0.1]])   # own text 3 is last: rank 3
    t2i = np.array([[0.9, 0.1, 0.0],         # rank 0
                    [0.1, 0.9, 0.0],         # rank 1
                    [0.1, 0.2, 0.9],         # rank 1
                    [0.0, 0.1, 0.9]])        # rank 0
    m = retrieval.recall_metrics(i2t, t2i, img2txt, txt2img)
    assert (m["txt_r1"], m["txt_r5"], m["txt_r10"]) == (33.33, 100.0, 100.0)
    assert (m["img_r1"], m["img_r5"]) == (50.0, 100.0)
    assert m["r_mean"] == round((m["txt_r_mean"] + m["img_r_mean"]) / 2, 2)


@pytest.fixture(scope="module")
def trained(shapes_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ret") / "run"
    train(config(shapes_data, run, "train.steps=3"))
    return run


def test_batched_rerank_equals_per_query_loop(trained, shapes_data):
    model, cfg, tok = load_method(trained)
    images, texts, _, _ = retrieval.read_split(shapes_data / "retrieval_test.json")
    enc = retrieval.encode_split(model, [shapes_data / p for p in images], texts, tok, cfg.model.vision.image_size,
                                 cfg.model.text.max_len, batch_size=7, device="cpu", progress=False)
    sim = enc["image_feat"] @ enc["text_feat"].t() / model.temperature()
    for weight in (0.0, 1.0):
        batched = retrieval.rerank(model, enc, sim, k=5, batch_size=9, progress=False, itc_weight=weight)
        loop = retrieval.rerank_loop(model, enc, sim, k=5, itc_weight=weight)
        for b, l in zip(batched, loop):
            assert torch.allclose(b, l, atol=1e-5)
            assert ((b > -100).sum(1) == 5).all()  # k candidates per query are scored, the rest stay at -100
    # The ITC weight adds exactly the ITC logit of each reranked candidate.
    plain = retrieval.rerank(model, enc, sim, k=5, batch_size=9, progress=False)[0]
    mixed = retrieval.rerank(model, enc, sim, k=5, batch_size=9, progress=False, itc_weight=2.0)[0]
    scored = plain > -100
    assert torch.allclose((mixed - plain)[scored], 2.0 * sim[scored], atol=1e-5)


def test_evaluate_cli_writes_albef_metric_names(trained, shapes_data, tmp_path, capsys):
    out = tmp_path / "m.json"
    main(["evaluate", "retrieval", "--checkpoint", str(trained), "--data", str(shapes_data), "--k", "4",
          "--num-workers", "0", "--device", "cpu", "--out", str(out)])
    metrics = json.loads(out.read_text())
    names = ["txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean"]
    assert all(n in metrics and f"itc_{n}" in metrics for n in names)
    assert metrics["images"] == 16 and metrics["texts"] == 80 and metrics["k"] == 4
    assert all(0 <= metrics[n] <= 100 for n in names)
    assert "retrieval (itm)" in capsys.readouterr().out

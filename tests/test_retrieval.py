"""Retrieval evaluation: ALBEF's recall metrics, batched ITM reranking equal to the per-query loop, the CLI, and
ITM's match logit, as the evaluation reads it, ranking matched pairs above mismatched ones after a short training."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlpt import methods
from vlpt.cli import main
from vlpt.data.annotations import AnnotationError, load_image
from vlpt.data.transforms import image_transform
from vlpt.engine.checkpoint import load_method
from vlpt.engine.optim import build_optimizer
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


def test_binding_accuracy_against_hand_counted_groups():
    """True caption first: it counts only when strictly above every negative (a tie is a miss); chance is the mean of
    1 / group size."""
    groups = [(torch.tensor([0.9, 0.1, 0.2]), torch.tensor([1.0, 2.0, 0.0])),   # ITC right, ITM wrong
              (torch.tensor([0.3, 0.5]), torch.tensor([0.7, 0.1])),             # ITC wrong, ITM right
              (torch.tensor([0.4, 0.4]), torch.tensor([0.2, -1.0])),            # ITC tie: wrong; ITM right
              (torch.tensor([0.8, 0.7, 0.9]), torch.tensor([3.0, 2.0, 2.9]))]   # ITC wrong, ITM right
    m = retrieval.binding_metrics(groups)
    assert (m["binding_itc"], m["binding_itm"], m["binding_records"]) == (25.0, 75.0, 4)
    assert m["binding_chance"] == round(100 * (1 / 3 + 1 / 2 + 1 / 2 + 1 / 3) / 4, 2)


def test_binding_scores_each_image_against_its_own_caption_and_negatives(trained, shapes_data, tmp_path):
    """The scores are the image-text cosine and the ITM match logit of each image with its own caption and then its
    negatives (checked against a direct computation, pair by pair); evaluate retrieval adds the binding metrics when
    retrieval_<split>_hard.json is there; a record without negatives is an error naming the field."""
    from vlpt.tasks.base import evaluate_checkpoint
    model, cfg, tok = load_method(trained)
    hard = json.loads((shapes_data / "retrieval_test_hard.json").read_text())
    kwargs = dict(image_size=cfg.model.vision.image_size, max_len=cfg.model.text.max_len, batch_size=5,
                  progress=False)
    groups = retrieval.binding_scores(model, shapes_data / "retrieval_test_hard.json", shapes_data, tok, **kwargs)
    assert len(groups) == len(hard)
    transform = image_transform(cfg.model.vision.image_size)
    for (itc, itm), record in list(zip(groups, hard))[:3]:
        with torch.no_grad():
            tokens, image_feat = model.encode_image(transform(load_image(shapes_data / record["image"]))[None])
            for j, text in enumerate([record["caption"], *record["negatives"]]):
                ids, mask = tok([text], cfg.model.text.max_len)
                hidden, text_feat = model.encode_text(ids, mask)
                assert itc[j] == pytest.approx(float(image_feat @ text_feat.t()), abs=1e-5)
                assert itm[j] == pytest.approx(float(model.itm_logits(tokens, hidden, mask)[0, 1]), abs=1e-4)
    task, metrics = evaluate_checkpoint("retrieval", trained, torch.device("cpu"), "test",
                                        [f"data.root={shapes_data}", "data.num_workers=0"])
    assert metrics["binding_records"] == len(hard) and metrics == {**metrics, **retrieval.binding_metrics(groups)}
    assert "binding" in task.table(metrics)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": hard[0]["image"], "caption": "a"}]))
    with pytest.raises(AnnotationError, match="negatives"):
        retrieval.binding(model, bad, shapes_data, tok, **kwargs)


def colour_pairs(gen: torch.Generator, palette: torch.Tensor, n: int = 8) -> dict:
    """`n` pairs of distinct colours: an image of the colour with pixel noise, captioned [CLS] <colour word> [SEP]."""
    colour = torch.randperm(len(palette), generator=gen)[:n]
    image = palette[colour][:, :, None, None] + 0.3 * torch.randn(n, 3, 32, 32, generator=gen)
    ids = torch.stack([torch.full_like(colour, 2), 5 + colour, torch.full_like(colour, 3)], 1)
    return {"image": image, "text_ids": ids, "text_mask": torch.ones_like(ids), "image_id": colour}


def test_trained_itm_scores_matched_pairs_above_mismatched_ones():
    """150 steps of ITM (+ ITC, which ranks its hard negatives) on a task learnable at a glance (a solid colour and its
    word): on held-out images, the match score the evaluation reads (`_match_scores`) is higher for each image's own
    caption than for the others'. A flipped ITM label or the evaluation reading the no-match column fails here."""
    colours, steps = 8, 150
    cfg = config(Path("."), Path("."), "method.losses=[itc,itm]", f"train.steps={steps}", "optim.lr=5e-3",
                 "optim.warmup_steps=5")
    torch.manual_seed(0)
    model = methods.build(cfg, 5 + colours)
    optimizer, scheduler = build_optimizer(model, cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    palette = torch.rand(colours, 3, generator=gen) * 4 - 2
    model.train()
    for step in range(steps):
        out = model(colour_pairs(gen, palette), step)
        (out["itc"] + out["itm"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        model.after_step(step)
    assert out["itm"].item() < 0.5  # below the 1/3-positive prior's 0.6365: ITM learned something
    model.eval()
    held_out = colour_pairs(torch.Generator().manual_seed(123), palette)
    with torch.no_grad():
        enc = {"image_tokens": model.encode_image(held_out["image"])[0],
               "text_hidden": model.encode_text(held_out["text_ids"], held_out["text_mask"])[0],
               "text_mask": held_out["text_mask"]}
        image_idx, text_idx = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
        scores = retrieval._match_scores(model, enc, image_idx.flatten(), text_idx.flatten()).view(8, 8)
    matched = torch.eye(8, dtype=torch.bool)  # distinct colours: image i matches caption i only
    assert scores[matched].mean() > scores[~matched].mean() + 1.0, scores
    others = scores.masked_fill(matched, 0).sum(1) / 7
    assert (scores.diag() > others).all(), scores

"""CODIS: IPOT against exact OT, the codebook loss's plan pairing and gradients, intra/cross alignment terms."""
import math

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from vlpt import methods
from vlpt.config import load_config
from vlpt.objectives.codebook import PrototypeCodebook, ipot
from vlpt.objectives.contrastive import alignment_loss


@pytest.mark.parametrize("n,k", [(8, 12), (16, 5), (6, 6)])
def test_ipot_marginals_and_cost_match_exact_ot(n, k):
    gen = torch.Generator().manual_seed(n * 100 + k)
    cost = 1 - F.normalize(torch.randn(n, 4, generator=gen), dim=1) @ F.normalize(torch.randn(k, 4, generator=gen), dim=1).t()
    plan = ipot(cost, epsilon=0.1, outer=200)
    assert torch.allclose(plan.sum(1), torch.full((n,), 1 / n), atol=1e-3)
    assert torch.allclose(plan.sum(0), torch.full((k,), 1 / k), atol=1e-3)
    exact = ot.emd2(np.full(n, 1 / n), np.full(k, 1 / k), cost.double().numpy())
    assert abs((plan * cost).sum().item() - exact) <= 0.05 * exact


def test_ipot_small_epsilon_is_finite_and_batched():
    """exp(-D / 1e-3) underflows in float32; the log-domain iterations stay finite with exact column marginals."""
    cost = torch.rand(3, 10, 20) * 2
    plan = ipot(cost, epsilon=1e-3, outer=5)
    assert torch.isfinite(plan).all()
    assert torch.allclose(plan.sum(-2), torch.full((3, 20), 0.05), atol=1e-5)
    assert torch.allclose(plan.sum((-1, -2)), torch.ones(3), atol=1e-4)
    assert torch.allclose(plan[1], ipot(cost[1], epsilon=1e-3, outer=5), atol=1e-6)


def _feats(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, d, generator=g), dim=1) for _ in range(4)]


def test_codebook_loss_formula_and_swapped_pairing():
    image, text, plan_image, plan_text = _feats()
    book = PrototypeCodebook(10, 8, epsilon=0.1, outer=30)
    temp = torch.tensor(0.1)
    c = F.normalize(book.codewords, dim=1)
    plans = [ipot(1 - z @ c.t(), 0.1, 30) for z in (plan_image, plan_text)]
    rows = [p / p.sum(1, keepdim=True) for p in plans]
    ot_term = sum((p * (1 - z @ c.t())).sum() for p, z in zip(plans, (plan_image, plan_text)))

    def h(pred, target):
        return -(target * F.log_softmax(pred @ c.t() / temp, dim=1)).sum(1).mean()

    swapped = book.loss(image, text, plan_image, plan_text, temp, swapped=True)["codebook"]
    same = book.loss(image, text, plan_image, plan_text, temp, swapped=False)["codebook"]
    assert torch.allclose(swapped, ot_term + h(image, rows[1]) + h(text, rows[0]), atol=1e-5)
    assert torch.allclose(same, ot_term + h(image, rows[0]) + h(text, rows[1]), atol=1e-5)
    assert not torch.allclose(swapped, same)


def test_codebook_usage_and_perplexity_are_those_of_the_predictions():
    """Health of the prototype assignments P = softmax(Z C / temperature) of the image and text rows together: usage
    counts the codewords some row's argmax picks, perplexity is exp(entropy) of P's mean (under DDP over the global
    batch: tests/test_parallel.py)."""
    image, text, plan_image, plan_text = _feats(n=12)
    book = PrototypeCodebook(40, 8, epsilon=0.1, outer=30)
    temp = torch.tensor(0.2)
    out = book.loss(image, text, plan_image, plan_text, temp)
    p = torch.softmax(torch.cat([image, text]) @ F.normalize(book.codewords, dim=1).t() / temp, dim=1)
    mean = p.mean(0)
    assert out["codebook_usage"].item() == len(set(p.argmax(1).tolist()))
    assert out["codebook_perplexity"].item() == pytest.approx(math.exp(-(mean * mean.log()).sum().item()), rel=1e-5)
    assert 1 < out["codebook_usage"].item() < 24 and 1 < out["codebook_perplexity"].item() < 40


def test_alignment_terms_match_eq4_5():
    n, q, d = 4, 6, 8
    g = torch.Generator().manual_seed(1)
    zv, zt, zvm, ztm = (F.normalize(torch.randn(n, d, generator=g), dim=1) for _ in range(4))
    qv, qt = (F.normalize(torch.randn(q, d, generator=g), dim=1) for _ in range(2))
    keys_v, keys_t = torch.cat([zvm, qv]), torch.cat([ztm, qt])
    pos = torch.zeros(n, n + q, dtype=torch.bool)
    pos[range(n), range(n)] = True
    temp, alpha = torch.tensor(0.07), 0.4

    def term(s, s_m, keys):  # H(y, p) with y = (1-a) onehot + a softmax(teacher), p = softmax(student)
        y = (1 - alpha) * pos.float() + alpha * torch.softmax(s_m @ keys.t() / temp, 1)
        return -(y * torch.log_softmax(s @ keys.t() / temp, 1)).sum(1).mean()

    cross = (term(zv, zvm, keys_t) + term(zt, ztm, keys_v)) / 2
    intra = (term(zv, zvm, keys_v) + term(zt, ztm, keys_t)) / 2
    args = (zv, zt, keys_v, keys_t, pos, temp, alpha, zvm, ztm)
    assert torch.allclose(alignment_loss(*args, intra=False), cross, atol=1e-6)
    assert torch.allclose(alignment_loss(*args, intra=True), cross + intra, atol=1e-6)


def _tiny_codis(**over):
    cfg = load_config("configs/pretrain/codis_tiny.yaml", [
        "model.vision.image_size=32", "model.vision.width=32", "model.vision.depth=1", "model.vision.heads=2",
        "model.text.width=32", "model.text.heads=2", "model.text.intermediate=64", "model.text.text_layers=1",
        "model.text.fusion_layers=1", "method.embed_dim=16", "method.queue_size=32", "method.codebook.size=16",
        *[f"{k}={v}" for k, v in over.items()]])
    torch.manual_seed(0)
    return methods.build(cfg, 40), cfg


def _batch(b=4, length=10):
    ids = torch.randint(5, 40, (b, length))
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    mlm = ids.clone()
    mlm[:, 2] = 4
    return {"image": torch.randn(b, 3, 32, 32), "text_ids": ids, "text_mask": torch.ones_like(ids),
            "image_id": torch.arange(b), "mlm_ids": mlm, "mlm_labels": labels}


def test_codis_gradients_reach_codebook_and_students_not_teachers():
    model, cfg = _tiny_codis()
    out = model(_batch(), step=0)
    assert {"itc", "itm", "mlm", "codebook", "codebook_usage", "codebook_perplexity"} <= set(out)
    out["codebook"].backward()
    assert model.codebook.codewords.grad.abs().sum() > 0
    assert model.vision_proj.weight.grad.abs().sum() > 0 and model.text_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())


def test_student_plan_ablation_changes_the_loss():
    teacher_model, _ = _tiny_codis()
    student_model, _ = _tiny_codis(**{"method.codebook.plan_features": "student"})
    student_model.load_state_dict(teacher_model.state_dict())
    for p in teacher_model.teacher.parameters():  # make teacher and student differ
        p.data.add_(0.05)
    student_model.teacher.load_state_dict(teacher_model.teacher.state_dict())
    batch = _batch()
    a = teacher_model(batch, 0)["codebook"]
    b = student_model(batch, 0)["codebook"]
    assert not torch.allclose(a, b)
    assert math.isfinite(a.item()) and math.isfinite(b.item())


def test_codis_trains_and_logs_codebook_health(shapes_data, tmp_path):
    from helpers import TINY

    from vlpt.engine.logging import read_metrics
    from vlpt.pretrain import pretrain as train

    cfg = load_config("configs/pretrain/codis_tiny.yaml", [*TINY, f"data.root={shapes_data}",
                                                           f"train.out={tmp_path}", "train.steps=3",
                                                           "train.log_every=1", "method.codebook.size=16"])
    rows = read_metrics(train(cfg))
    assert len(rows) == 3
    for row in rows:
        assert {"itc", "itm", "mlm", "codebook"} <= set(row)
        assert 1 <= row["codebook_usage"] <= 16 and 1 <= row["codebook_perplexity"] <= 16

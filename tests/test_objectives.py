"""The pretraining objectives against direct computations of their equations (ALBEF Eq. 1-7), MLM masking and
the momentum feature queues."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlpt.data.masking import IGNORE, mask_tokens
from vlpt.objectives.contrastive import FeatureQueues, info_nce, itc_loss
from vlpt.objectives.masked_language import mlm_loss
from vlpt.objectives.matching import itm_loss, sample_hard_negatives


def unit(*shape, gen) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_info_nce(query, keys, ids_query, ids_keys, tau, alpha=0.0, teacher=None) -> float:
    """ALBEF Eq. 1-3 with Eq. 6, one query at a time: H((1-a) y + a q', p) with y uniform over the positives."""
    q, k = query.numpy(), keys.numpy()
    total = 0.0
    for i in range(len(q)):
        logits = np.array([q[i] @ k[j] for j in range(len(k))]) / tau
        log_p = np.log(np_softmax(logits))
        y = np.array([1.0 if ids_keys[j] == ids_query[i] else 0.0 for j in range(len(k))])
        y /= y.sum()
        if alpha > 0:
            t = teacher.numpy()[i]
            soft = np_softmax(np.array([t @ k[j] for j in range(len(k))]) / tau)
            y = (1 - alpha) * y + alpha * soft
        total += -(y * log_p).sum()
    return total / len(q)


def itc_case(seed: int, ids: list[int], queue_ids: list[int], dim: int = 8):
    gen = torch.Generator().manual_seed(seed)
    b, n_queue = len(ids), len(queue_ids)
    case = dict(image=unit(b, dim, gen=gen), text=unit(b, dim, gen=gen),
                teacher_image=unit(b, dim, gen=gen), teacher_text=unit(b, dim, gen=gen),
                queue_image=unit(n_queue, dim, gen=gen), queue_text=unit(n_queue, dim, gen=gen))
    case["image_keys"] = torch.cat([case["teacher_image"], case["queue_image"]])
    case["text_keys"] = torch.cat([case["teacher_text"], case["queue_text"]])
    ids_t, key_ids = torch.tensor(ids), torch.tensor(ids + queue_ids)
    case["positives"] = ids_t[:, None] == key_ids[None]
    case["ids"], case["key_ids"] = ids, ids + queue_ids
    return case


# --- ITC -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("ids,queue_ids", [
    ([0, 1, 2, 3], [10, 11, 12, 13, 14, 15]),   # one positive per row: the in-batch diagonal
    ([0, 1, 0, 2], [1, 7, 0, 8, 2, 9]),          # image 0 twice in the batch and ids repeated in the queue
])
def test_itc_loss_matches_albef_equations(alpha, ids, queue_ids):
    c = itc_case(0, ids, queue_ids)
    tau = 0.07
    loss, sim_i2t, sim_t2i = itc_loss(c["image"], c["text"], c["image_keys"], c["text_keys"], c["positives"],
                                      torch.tensor(tau, dtype=torch.float64), alpha,
                                      c["teacher_image"], c["teacher_text"])
    i2t = reference_info_nce(c["image"], c["text_keys"], c["ids"], c["key_ids"], tau, alpha, c["teacher_image"])
    t2i = reference_info_nce(c["text"], c["image_keys"], c["ids"], c["key_ids"], tau, alpha, c["teacher_text"])
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)  # the hard targets are built in float32
    assert sim_i2t.shape == sim_t2i.shape == (len(ids), len(ids) + len(queue_ids))
    torch.testing.assert_close(sim_i2t, c["image"] @ c["text_keys"].t() / tau)
    torch.testing.assert_close(sim_t2i, c["text"] @ c["image_keys"].t() / tau)


def test_info_nce_alpha_changes_loss_and_needs_teacher():
    c = itc_case(1, [0, 1, 2], [5, 6, 7, 8])
    tau = torch.tensor(0.1, dtype=torch.float64)
    hard, _ = info_nce(c["image"], c["text_keys"], c["positives"], tau)
    soft, _ = info_nce(c["image"], c["text_keys"], c["positives"], tau, 0.4, c["teacher_image"])
    no_teacher, _ = info_nce(c["image"], c["text_keys"], c["positives"], tau, 0.4, None)
    assert not math.isclose(hard.item(), soft.item(), rel_tol=1e-6)
    assert no_teacher.item() == pytest.approx(hard.item(), rel=1e-12)
    # alpha = 1: pure distillation, the cross entropy of the teacher's softmax against the student's
    full, _ = info_nce(c["image"], c["text_keys"], c["positives"], tau, 1.0, c["teacher_image"])
    p_t = F.softmax(c["teacher_image"] @ c["text_keys"].t() / tau, 1)
    log_p = F.log_softmax(c["image"] @ c["text_keys"].t() / tau, 1)
    assert full.item() == pytest.approx(-(p_t * log_p).sum(1).mean().item(), rel=1e-12)


def test_info_nce_gradient_reaches_query_only():
    """d loss / d q_i = (p_i - t_i) K / (tau B): targets are constants, the teacher gets no gradient."""
    c = itc_case(2, [0, 1, 0, 3], [1, 4, 5, 6, 7])
    tau, alpha = 0.2, 0.3
    query = c["image"].clone().requires_grad_(True)
    teacher = c["teacher_image"].clone().requires_grad_(True)
    keys = c["text_keys"]
    loss, _ = info_nce(query, keys, c["positives"], torch.tensor(tau, dtype=torch.float64), alpha, teacher)
    loss.backward()
    assert teacher.grad is None
    y = c["positives"].double() / c["positives"].sum(1, keepdim=True)
    targets = (1 - alpha) * y + alpha * F.softmax(c["teacher_image"] @ keys.t() / tau, 1)
    p = F.softmax(c["image"] @ keys.t() / tau, 1)
    expected = (p - targets) @ keys / (tau * len(query))
    torch.testing.assert_close(query.grad, expected)


def test_itc_loss_is_minimised_by_aligned_features():
    """Sanity that can fail on a sign error: matching pairs aligned give a lower loss than shuffled pairs."""
    c = itc_case(3, [0, 1, 2, 3], [9, 9, 9])
    tau = torch.tensor(0.05, dtype=torch.float64)
    image = c["teacher_text"]  # images identical to their captions' keys
    aligned, _, _ = itc_loss(image, c["teacher_image"], c["image_keys"], c["text_keys"], c["positives"], tau)
    shuffled, _, _ = itc_loss(image.roll(1, 0), c["teacher_image"], c["image_keys"], c["text_keys"],
                              c["positives"], tau)
    assert aligned < shuffled


# --- ITM: hard negatives and loss ------------------------------------------------------------------------------------

def random_positives(gen, b: int, c: int) -> torch.Tensor:
    """Diagonal positives plus random extra ones; every row keeps at least two negatives."""
    pos = torch.rand(b, c, generator=gen) < 0.3
    pos[torch.arange(b), torch.arange(b) % c] = True
    for i in range(b):
        free = (~pos[i]).nonzero().flatten()
        if len(free) < 2:
            pos[i, :] = False
            pos[i, i % c] = True
    return pos


def test_hard_negatives_never_positive():
    gen = torch.Generator().manual_seed(0)
    for trial in range(120):
        b, c, draws = 1 + trial % 7, 3 + trial % 9, 16
        sim = torch.randn(b, c, generator=gen) * (1 + trial % 5) * 5  # includes very peaked softmaxes
        pos = random_positives(gen, b, c)
        sim = sim.masked_fill(pos, 50.0)  # positives the most similar: the draw must still avoid them
        noise = torch.rand(draws * b, c, generator=gen)
        idx = sample_hard_negatives(sim.repeat(draws, 1), pos.repeat(draws, 1), noise)
        assert idx.shape == (draws * b,) and idx.dtype == torch.long
        assert not pos.repeat(draws, 1)[torch.arange(draws * b), idx].any()
    # extremes of the noise and of the similarities
    sim = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]])
    pos = torch.tensor([[True, False, False], [False, True, False]])
    for u in (1e-30, 1e-12, 0.5, 1 - 1e-9, 1.0):
        idx = sample_hard_negatives(sim, pos, torch.full((2, 3), u))
        assert not pos[torch.arange(2), idx].any()


def test_hard_negatives_deterministic_given_noise():
    gen = torch.Generator().manual_seed(1)
    sim, pos = torch.randn(6, 10, generator=gen), random_positives(gen, 6, 10)
    noise = torch.rand(6, 10, generator=gen)
    first = sample_hard_negatives(sim, pos, noise)
    assert torch.equal(first, sample_hard_negatives(sim, pos, noise.clone()))
    # constant noise adds the same Gumbel value everywhere: the draw is the most similar negative
    const = sample_hard_negatives(sim, pos, torch.full((6, 10), 0.5))
    assert torch.equal(const, sim.masked_fill(pos, float("-inf")).argmax(1))


def test_hard_negative_frequencies_follow_softmax_over_negatives():
    scipy_stats = pytest.importorskip("scipy.stats")
    sim = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0, 3.0],
                        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                        [1.0, -2.0, 4.0, 0.5, 1.5, -0.5]])
    pos = torch.tensor([[1, 0, 0, 0, 0, 1],
                        [0, 1, 0, 0, 0, 0],
                        [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    draws = 40000
    gen = torch.Generator().manual_seed(2)
    b, c = sim.shape
    idx = sample_hard_negatives(sim.repeat(draws, 1), pos.repeat(draws, 1), torch.rand(draws * b, c, generator=gen))
    idx = idx.view(draws, b)
    for i in range(b):
        counts = torch.bincount(idx[:, i], minlength=c).double()
        assert counts[pos[i]].sum() == 0
        expected = F.softmax(sim[i].double().masked_fill(pos[i], float("-inf")), 0) * draws
        neg = ~pos[i]
        chi2 = (((counts - expected) ** 2)[neg] / expected[neg]).sum().item()
        dof = int(neg.sum()) - 1
        assert scipy_stats.chi2.sf(chi2, dof) > 1e-4, (i, counts, expected)
        # and the distribution is clearly not uniform where sims differ
        if sim[i][neg].std() > 0.5:
            uniform = torch.full_like(expected, draws / neg.sum().item())
            chi2_u = (((counts - uniform) ** 2)[neg] / uniform[neg]).sum().item()
            assert scipy_stats.chi2.sf(chi2_u, dof) < 1e-6


def test_itm_loss_is_cross_entropy():
    logits = torch.tensor([[2.0, -1.0], [0.3, 0.7], [-1.5, 2.5], [0.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 1])
    by_hand = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        by_hand += -(row[label] - math.log(sum(math.exp(v) for v in row)))
    assert itm_loss(logits, labels).item() == pytest.approx(by_hand / 4, rel=1e-6)
    assert itm_loss(logits.half(), labels).dtype == torch.float32


# --- MLM -------------------------------------------------------------------------------------------------------------

def mlm_case(seed=0, b=3, l=7, v=11):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, l, v, generator=gen, dtype=torch.float64)
    teacher = torch.randn(b, l, v, generator=gen, dtype=torch.float64)
    labels = torch.randint(v, (b, l), generator=gen)
    labels[torch.rand(b, l, generator=gen) < 0.6] = IGNORE
    labels[0, 0] = 3  # at least one masked token
    return logits, teacher, labels


def reference_mlm(logits, labels, teacher=None, alpha=0.0, normalizer=None) -> float:
    total, count = 0.0, 0
    for i in range(labels.shape[0]):
        for j in range(labels.shape[1]):
            if labels[i, j] == IGNORE:
                continue
            log_p = np.log(np_softmax(logits[i, j].numpy()))
            ce = -log_p[labels[i, j]]
            if alpha > 0:
                ce = (1 - alpha) * ce - alpha * (np_softmax(teacher[i, j].numpy()) * log_p).sum()
            total += ce
            count += 1
    return total / (count if normalizer is None else normalizer)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_mlm_loss_matches_direct_computation(alpha):
    logits, teacher, labels = mlm_case()
    loss = mlm_loss(logits, labels, teacher, alpha)
    assert loss.item() == pytest.approx(reference_mlm(logits, labels, teacher, alpha), rel=1e-6)


def test_mlm_loss_ignores_unmasked_positions():
    logits, teacher, labels = mlm_case(1)
    ignored = labels == IGNORE
    assert ignored.any() and (~ignored).any()
    base = mlm_loss(logits, labels, teacher, 0.4)
    noisy = logits + 100 * torch.randn_like(logits) * ignored[..., None]
    noisy_teacher = teacher + 100 * torch.randn_like(teacher) * ignored[..., None]
    assert mlm_loss(noisy, labels, noisy_teacher, 0.4).item() == pytest.approx(base.item(), rel=1e-12)
    # but a masked position's logits do count
    changed = logits.clone()
    changed[~ignored] += torch.randn_like(changed[~ignored])
    assert mlm_loss(changed, labels, teacher, 0.4).item() != pytest.approx(base.item(), rel=1e-6)


def test_mlm_loss_normalizer_divides_the_sum():
    logits, teacher, labels = mlm_case(2)
    n = (labels != IGNORE).sum()
    mean = mlm_loss(logits, labels, teacher, 0.3)
    total = mean * n
    for norm in (torch.tensor(1.0), torch.tensor(7.5), torch.tensor(n.item() * 2)):
        assert mlm_loss(logits, labels, teacher, 0.3, norm).item() == pytest.approx((total / norm).item(), rel=1e-9)
    assert mlm_loss(logits, labels, teacher, 0.3, torch.tensor(4.0)).item() == pytest.approx(
        reference_mlm(logits, labels, teacher, 0.3, normalizer=4.0), rel=1e-6)


def test_mlm_loss_without_masked_tokens_is_zero():
    logits, teacher, labels = mlm_case(3)
    loss = mlm_loss(logits, torch.full_like(labels, IGNORE), teacher, 0.4)
    assert loss.item() == 0.0


# --- masking ---------------------------------------------------------------------------------------------------------

SPECIALS = [0, 1, 2, 3, 4]  # [PAD] [UNK] [CLS] [SEP] [MASK]
MASK_ID, VOCAB = 4, 1000


def corpus(gen, b=400, l=250) -> torch.Tensor:
    ids = torch.randint(5, VOCAB, (b, l), generator=gen)
    ids[:, 0], ids[:, -1] = 2, 3
    ids[:, -(l // 6):-1] = 0  # padding
    ids[::7, 5] = 1
    return ids


def test_mask_tokens_never_touches_special_tokens_and_labels():
    gen = torch.Generator().manual_seed(0)
    ids = corpus(gen, 200, 64)
    masked, labels = mask_tokens(ids, 0.9, MASK_ID, VOCAB, SPECIALS, generator=gen)
    special = torch.isin(ids, torch.tensor(SPECIALS))
    assert torch.equal(masked[special], ids[special])
    assert (labels[special] == IGNORE).all()
    picked = labels != IGNORE
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(masked[~picked], ids[~picked])  # nothing changes where nothing is predicted
    assert picked.float().sum() / (~special).sum() > 0.85


def test_mask_tokens_rate_and_80_10_10_split():
    gen = torch.Generator().manual_seed(1)
    ids = corpus(gen)
    masked, labels = mask_tokens(ids, 0.15, MASK_ID, VOCAB, SPECIALS, generator=gen)
    eligible = ~torch.isin(ids, torch.tensor(SPECIALS))
    picked = labels != IGNORE
    n = picked.sum().item()
    assert abs(n / eligible.sum().item() - 0.15) < 0.005  # ~80k eligible tokens: std ~0.0013
    to_mask = (masked[picked] == MASK_ID).float().mean().item()
    kept = (masked[picked] == ids[picked]).float().mean().item()
    random = ((masked[picked] != MASK_ID) & (masked[picked] != ids[picked])).float().mean().item()
    assert abs(to_mask - 0.8) < 0.015
    assert abs(kept - 0.1) < 0.012
    assert abs(random - 0.1) < 0.012
    assert masked.min() >= 0 and masked.max() < VOCAB


def test_mask_tokens_deterministic_given_seed():
    ids = corpus(torch.Generator().manual_seed(2), 20, 30)
    a = mask_tokens(ids, 0.3, MASK_ID, VOCAB, SPECIALS, generator=torch.Generator().manual_seed(5))
    b = mask_tokens(ids, 0.3, MASK_ID, VOCAB, SPECIALS, generator=torch.Generator().manual_seed(5))
    c = mask_tokens(ids, 0.3, MASK_ID, VOCAB, SPECIALS, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


# --- queues ----------------------------------------------------------------------------------------------------------

def test_feature_queues_fifo_with_wraparound():
    q = FeatureQueues(dim=3, size=5)
    assert q.ptr.item() == 0 and (q.ids == -1).all()
    feats = [torch.randn(3, 3, requires_grad=True) for _ in range(3)]
    texts = [torch.randn(3, 3, dtype=torch.float64) for _ in range(3)]

    q.push(torch.tensor([10, 11, 12]), image=feats[0] * 2, text=texts[0])
    assert q.ptr.item() == 3
    assert q.ids.tolist() == [10, 11, 12, -1, -1]
    torch.testing.assert_close(q.image[:3], feats[0].detach() * 2)
    torch.testing.assert_close(q.text[:3], texts[0].float())
    untouched = q.image[3:].clone()

    q.push(torch.tensor([13, 14, 15]), image=feats[1], text=texts[1])  # wraps: rows 3, 4, 0
    assert q.ptr.item() == 1
    assert q.ids.tolist() == [15, 11, 12, 13, 14]
    torch.testing.assert_close(q.image[[3, 4, 0]], feats[1].detach())
    torch.testing.assert_close(q.image[1:3], feats[0].detach()[1:] * 2)  # older rows kept
    assert not torch.equal(q.image[3:], untouched)

    q.push(torch.tensor([16, 17, 18]), image=feats[2], text=texts[2])  # overwrites the oldest: 11, 12, 13
    assert q.ptr.item() == 4
    assert q.ids.tolist() == [15, 16, 17, 18, 14]
    torch.testing.assert_close(q.text[1:4], texts[2].float())

    for name in ("image", "text"):
        assert q.get(name).dtype == torch.float32
        assert not q.get(name).requires_grad and q.get(name).grad_fn is None
    assert {"image", "text", "ids", "ptr"} <= set(q.state_dict())


def test_feature_queues_push_larger_than_queue_keeps_newest():
    q = FeatureQueues(dim=2, size=4)
    q.push(torch.tensor([0]), image=torch.zeros(1, 2), text=torch.zeros(1, 2))
    feats = torch.arange(12.0).view(6, 2)
    q.push(torch.arange(1, 7), image=feats, text=feats)
    assert q.ptr.item() == 1
    assert sorted(q.ids.tolist()) == [3, 4, 5, 6]
    for row, i in enumerate(q.ids.tolist()):
        torch.testing.assert_close(q.image[row], feats[i - 1])
    # the oldest of them (3) sits at the pointer: the next push overwrites it first
    assert q.ids[q.ptr].item() == 3


# --- ITM inside a step: the pair layout -------------------------------------------------------------------------------

def test_itm_rows_are_positives_then_negative_images_then_negative_texts(monkeypatch):
    """ALBEF Eq. 4 as `steps.itm` lays it out: rows [positive pairs | (hard negative image, own text) | (own image, hard
    negative text)], labels 1 for the first third only; every negative image or text comes from a pair of another
    image id (two captions of one image are never each other's negative), and a negative text keeps its own mask."""
    from pathlib import Path

    from helpers import config
    from vlpt import methods
    from vlpt.methods import steps

    torch.manual_seed(0)
    model = methods.build(config(Path("."), Path("."), "method.losses=[itc,itm]"), 40).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([7, 7, 3, 5, 5, 9, 2, 8])  # images 7 and 5 with two captions each
    n, length = len(ids), 12
    image = torch.randn(n, 3, 32, 32, generator=gen)
    image[1], image[4] = image[0], image[3]      # one image, two captions: the most similar candidate
    lengths = torch.tensor([12, 9, 5, 12, 7, 10, 6, 11])
    text_mask = (torch.arange(length)[None] < lengths[:, None]).long()
    text_ids = torch.randint(5, 40, (n, length), generator=gen) * text_mask
    batch = {"image": image, "text_ids": text_ids, "text_mask": text_mask, "image_id": ids}
    seen = {}
    itm_logits, itm_loss_fn = model.itm_logits, steps.itm_loss

    def record_pairs(images, texts, masks):
        seen.update(images=images, texts=texts, masks=masks)
        return itm_logits(images, texts, masks)

    def record_labels(logits, labels, weights):
        seen.update(logits=logits, labels=labels, weights=weights)
        return itm_loss_fn(logits, labels, weights)

    monkeypatch.setattr(model, "itm_logits", record_pairs)
    monkeypatch.setattr(steps, "itm_loss", record_labels)

    def rows_of(candidate, table):  # the batch rows whose entry equals `candidate` exactly
        return [j for j in range(n) if torch.equal(table[j], candidate)]

    chosen_image, chosen_text = set(), set()
    with torch.no_grad():
        f = steps.features(model, batch)
        for step in range(12):  # fresh hard-negative draws each step
            loss = steps.itm(model, f, step)
            images, texts, masks = seen["images"], seen["texts"], seen["masks"]
            assert images.shape[0] == texts.shape[0] == masks.shape[0] == 3 * n
            assert seen["labels"].tolist() == [1] * n + [0] * (2 * n) and seen["weights"] is None  # no swaps here
            assert loss.item() == pytest.approx(F.cross_entropy(seen["logits"], seen["labels"]).item(), rel=1e-6)
            for i in range(n):
                # positives: the row's own pair
                assert torch.equal(images[i], f.image_tokens[i]) and torch.equal(texts[i], f.text_hidden[i])
                assert torch.equal(masks[i], text_mask[i])
                # negative image with the row's text
                owners = rows_of(images[n + i], f.image_tokens)
                assert owners and all(ids[j] != ids[i] for j in owners), (step, i, owners)
                assert torch.equal(texts[n + i], f.text_hidden[i]) and torch.equal(masks[n + i], text_mask[i])
                chosen_image.update(owners)
                # the row's image with a negative text, and that text's own mask
                assert torch.equal(images[2 * n + i], f.image_tokens[i])
                owners = rows_of(texts[2 * n + i], f.text_hidden)
                assert len(owners) == 1 and ids[owners[0]] != ids[i], (step, i, owners)
                assert torch.equal(masks[2 * n + i], text_mask[owners[0]])
                chosen_text.update(owners)
    assert len(chosen_image) >= 4 and len(chosen_text) >= 4  # the draws vary: the checks above are not vacuous


def test_random_share_mixes_hard_negatives_with_uniform_draws():
    """(1 - r) softmax(sim) + r / C: r = 0 is ALBEF's draw, r = 1 uniform over the non-positives, whatever sim says;
    positives are never drawn."""
    from vlpt.objectives.matching import sample_hard_negatives
    gen = torch.Generator().manual_seed(0)
    n, c, draws = 4, 6, 4000
    sim = torch.zeros(n, c)
    sim[:, 1] = 50.0  # candidate 1 is the hard negative of every query
    positives = torch.zeros(n, c, dtype=torch.bool)
    positives[:, 0] = True
    picks = {r: torch.stack([sample_hard_negatives(sim, positives, torch.rand(n, c, generator=gen), r)
                             for _ in range(draws)]) for r in (0.0, 0.5, 1.0)}
    assert (picks[0.0] == 1).all()
    for r in (0.5, 1.0):
        share = torch.bincount(picks[r].flatten(), minlength=c).float() / (n * draws)
        assert share[0] == 0
        expected = torch.full((c,), r / c)  # the weights: softmax's mass on candidate 1, r / C everywhere
        expected[1] += 1 - r
        expected[0] = 0                        # the positive is never drawn: the others' weights renormalised
        expected = expected / expected.sum()
        assert torch.allclose(share, expected, atol=0.02), (r, share)


def test_itm_negatives_are_uniform_for_the_first_easy_steps_then_hard(shapes_data, tmp_path, monkeypatch):
    """method.itm_easy_steps = E: steps before E draw ITM negatives uniformly (random_share 1), from E on by
    contrastive similarity (ALBEF, random_share 0)."""
    from helpers import config
    from vlpt import methods
    from vlpt.data.loader import captions, train_loader, training_set
    from vlpt.data.tokenizer import tokenizer_for
    from vlpt.methods import steps
    cfg = config(shapes_data, tmp_path, "method.itm_easy_steps=3", "method.losses=[itc,itm]")
    data = training_set(cfg)
    tokenizer = tokenizer_for(cfg, captions(data), tmp_path)
    model = methods.build(cfg, tokenizer.vocab_size)
    batch = next(iter(train_loader(cfg, data, tokenizer)))
    shares = []
    real = steps.sample_hard_negatives
    monkeypatch.setattr(steps, "sample_hard_negatives", lambda *a: shares.append(a[3]) or real(*a))
    for step in range(5):
        model(batch, step)
    assert shares == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # images' and texts' draws per step

"""Attribute-swapped ITM negatives (issue 13, `method.itm_swap_words`): the swap itself, the batch keys the pipeline
adds, and the fourth block of ITM rows with its weights."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlpt.config import ConfigError
from vlpt.data.collate import Collate, merge
from vlpt.data.swaps import check_groups, swap_attributes
from vlpt.data.tokenizer import Tokenizer
from vlpt.objectives.matching import itm_loss

GROUPS = check_groups([["red", "green", "blue", "white"], ["small", "large"]])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_two_words_of_one_group_change_places_everywhere_keeping_case_and_punctuation():
    caption = "A large white star, a small Red triangle and a white circle."
    seen = {swap_attributes(caption, GROUPS, gen(s)) for s in range(40)}
    assert seen == {"A large red star, a small White triangle and a red circle.",   # colours
                    "A small white star, a large Red triangle and a white circle."}  # sizes


def test_a_caption_with_nothing_to_swap_gives_none():
    assert swap_attributes("a red star and a red circle", GROUPS, gen()) is None   # one distinct colour
    assert swap_attributes("two shapes on the left", GROUPS, gen()) is None
    assert swap_attributes("a reddish star and a blue one", GROUPS, gen()) is None  # whole words only


def test_same_generator_same_swap_and_three_colours_draw_every_pair():
    caption = "red green blue"
    assert swap_attributes(caption, GROUPS, gen(3)) == swap_attributes(caption, GROUPS, gen(3))
    pairs = {swap_attributes(caption, GROUPS, gen(s)) for s in range(60)}
    assert pairs == {"green red blue", "blue green red", "red blue green"}


def test_groups_need_two_distinct_words(shapes_data, tmp_path):
    from helpers import config
    with pytest.raises(ValueError, match="two distinct words"):
        check_groups([["red", "Red"]])
    with pytest.raises(ConfigError, match="itm_swap_words"):
        config(shapes_data, tmp_path, "method.itm_swap_words=[[red]]")


@pytest.fixture(scope="module")
def tokenizer(shapes_data) -> Tokenizer:
    return Tokenizer(shapes_data / "vocab.txt")


def samples(captions: list[str]) -> list[dict]:
    return [{"image": torch.zeros(3, 4, 4), "text": c, "image_id": i, "draw": 100 + i, "skipped": 0}
            for i, c in enumerate(captions)]


def test_collate_adds_swapped_captions_of_the_texts_width_drawn_per_sample(tokenizer):
    captions = ["a red star and a blue circle", "a green square", "a small red star and a large red circle"]
    collate = Collate(tokenizer, 24, {"swap"}, seed=1, swap_words=[["red", "green", "blue"], ["small", "large"]])
    batch = collate(samples(captions))
    assert batch["swap_ids"].shape == batch["text_ids"].shape == batch["swap_mask"].shape
    assert batch["swap_valid"].tolist() == [True, False, True]
    decoded = [tokenizer.decode(row[m.bool()].tolist()) for row, m in zip(batch["swap_ids"], batch["swap_mask"])]
    assert "blue star" in decoded[0] and "red circle" in decoded[0]
    assert torch.equal(batch["swap_ids"][1], batch["text_ids"][1])  # nothing to swap: the caption itself
    assert "large red star" in decoded[2] and "small red circle" in decoded[2]
    # drawn from (seed, draw) only: the same row alone gives the same swap
    alone = collate(samples(captions)[2:])
    width = alone["swap_ids"].shape[1]
    assert torch.equal(alone["swap_ids"][0], batch["swap_ids"][2, :width])
    joined = merge([collate(samples(captions)[:1]), alone], tokenizer.pad_id)
    assert torch.equal(joined["swap_ids"][1], batch["swap_ids"][2])
    assert "swap_ids" not in Collate(tokenizer, 24)(samples(captions))
    with pytest.raises(ValueError, match="swap_words"):
        Collate(tokenizer, 24, {"swap"})


def test_weighted_itm_loss_averages_the_rows_weighing_one():
    logits = torch.tensor([[2.0, -1.0], [0.3, 0.7], [-1.5, 2.5], [0.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 0])
    weights = torch.tensor([1.0, 1.0, 0.0, 1.0])
    by_hand = [-(row[y] - math.log(sum(math.exp(v) for v in row)))
               for row, y, w in zip(logits.tolist(), labels.tolist(), weights.tolist()) if w]
    assert itm_loss(logits, labels, weights).item() == pytest.approx(sum(by_hand) / 3, rel=1e-6)


def test_itm_adds_each_image_with_its_swapped_caption_as_a_counted_negative(shapes_data, tmp_path, monkeypatch):
    """Rows [positives | negative images | negative texts | own image with the swapped caption], labels 1 for the
    first block only, swap rows counted where the caption had a swap; the swapped caption goes through the student
    text encoder, so ITM's gradient reaches it through them."""
    from helpers import config
    from vlpt import methods
    from vlpt.data.loader import captions, train_loader, training_set
    from vlpt.data.tokenizer import tokenizer_for
    from vlpt.methods import steps
    cfg = config(shapes_data, tmp_path, "method.losses=[itc,itm]",
                 "method.itm_swap_words=[[red,green,blue,yellow,purple,orange,white,cyan],[small,large]]")
    data = training_set(cfg)
    tokenizer = tokenizer_for(cfg, captions(data), tmp_path)
    model = methods.build(cfg, tokenizer.vocab_size)
    assert model.batch_needs(cfg.method) == {"swap"}
    batch = next(iter(train_loader(cfg, data, tokenizer, model.batch_needs(cfg.method))))
    valid = batch["swap_valid"]
    assert valid.any() and not valid.all()  # the embedded data has captions of one shape too: both cases run
    seen = {}
    real = steps.itm_loss
    monkeypatch.setattr(steps, "itm_loss", lambda logits, labels, weights: seen.update(
        logits=logits, labels=labels, weights=weights) or real(logits, labels, weights))
    encoded = []
    encode = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda ids, mask, **kw: encoded.append(ids) or encode(ids, mask, **kw))
    f = steps.features(model, batch)
    loss = steps.itm(model, f, 0, batch)
    n = len(valid)
    assert seen["labels"].tolist() == [1] * n + [0] * (3 * n)
    assert seen["weights"].tolist() == [1.0] * (3 * n) + valid.float().tolist()
    rows = F.cross_entropy(seen["logits"].float(), seen["labels"], reduction="none")
    expected = (rows[:3 * n].sum() + rows[3 * n:][valid].sum()) / (3 * n + valid.sum())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(encoded[-1], batch["swap_ids"])
    swap_hidden = []
    monkeypatch.setattr(model, "encode_text", lambda ids, mask, **kw: (
        lambda out: swap_hidden.append(out[0]) or out)(encode(ids, mask, **kw)))
    f = steps.features(model, batch)
    swap_hidden.clear()
    loss = steps.itm(model, f, 0, batch)
    swap_hidden[0].retain_grad()
    loss.backward()
    grad = swap_hidden[0].grad.abs().sum(dim=(1, 2))
    assert (grad[valid] > 0).all() and (grad[~valid] == 0).all()  # an uncounted swap row teaches nothing

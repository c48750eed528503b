"""Cached ITM reranking (`retrieval.cached_match_scores`): each context's cross-attention keys and values projected
once, passes cut to their longest text, the same scores and rankings as the plain per-pair path for every method.

The models are tiny with random weights drawn at unit scale (std 1/sqrt(fan_in), not BERT's 0.02), so that the
image's cross-attention moves the ITM logits by far more than the tolerance: a cache that served the wrong image,
the wrong text or a cut mask would fail here (`test_the_scores_depend_on_each_pairs_own_image_and_text` checks
that this is so).
"""
import math

import pytest
import torch
from torch import nn

from helpers import TINY
from vlpt import methods
from vlpt.config import load_config
from vlpt.methods.albef import ALBEF
from vlpt.tasks import retrieval

VOCAB, IMAGES, TEXTS, MAX_LEN = 40, 6, 11, 24
PRESETS = {"albef": "albef_tiny", "maskvlm": "maskvlm_tiny", "codis": "codis_tiny", "cbvila": "cbvila_tiny"}
EXTRA = {"maskvlm": ["method.maskvlm.image_cross_layers=2", "method.maskvlm.decoder_layers=1",
                     "method.maskvlm.region=16"]}


def tiny(name: str):
    """A tiny method (2 fusion layers, vision width 48 against text width 32: K/V project across widths), its
    Linear weights redrawn at unit scale and biases nonzero, in eval mode."""
    over = [*TINY, "model.text.fusion_layers=2", "model.vision.width=48", "model.vision.heads=3",
            f"model.text.max_len={MAX_LEN}", *EXTRA.get(name, [])]
    cfg = load_config(f"configs/pretrain/{PRESETS[name]}.yaml", over)
    torch.manual_seed(0)
    model = methods.build(cfg, VOCAB).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / math.sqrt(m.in_features))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return model


def encodings(model, seed: int = 0) -> dict:
    """`encode_split`'s dict for random images and texts of different lengths (3 to 17 tokens), all padded to
    MAX_LEN as `encode_split` pads them."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, 17, 5, 9, 4, 12, 7, 3, 15, 6, 10])[:TEXTS]
    ids = torch.randint(5, VOCAB, (TEXTS, MAX_LEN), generator=gen)
    mask = (torch.arange(MAX_LEN)[None] < lengths[:, None]).long()
    ids = ids * mask
    with torch.no_grad():
        tokens, image_feat = model.encode_image(torch.randn(IMAGES, 3, 32, 32, generator=gen))
        hidden, text_feat = model.encode_text(ids, mask)
    return {"image_tokens": tokens, "image_feat": image_feat, "text_hidden": hidden, "text_feat": text_feat,
            "text_mask": mask}


def similarities(seed: int = 0) -> torch.Tensor:
    """Random ITC logits (I,T): random candidates, no ties."""
    return torch.randn(IMAGES, TEXTS, generator=torch.Generator().manual_seed(seed + 10))


def orderings(full: torch.Tensor) -> torch.Tensor:
    """Each query's reranked candidates, best first (the -100 rest after them)."""
    return full.argsort(dim=1, descending=True, stable=True)


def assert_same(cached: list[torch.Tensor], plain: list[torch.Tensor], k: int) -> None:
    """Image->text and text->image score matrices alike: candidates, scores within 1e-5, top-k orderings."""
    for c, p in zip(cached, plain):
        kq = min(k, c.shape[1])
        assert torch.equal(c > -100, p > -100)                   # the same candidates are scored
        assert ((c > -100).sum(1) == kq).all()
        assert (c - p).abs().max() <= 1e-5, (c - p).abs().max()  # ITM scores equal
        assert torch.equal(orderings(c)[:, :kq], orderings(p)[:, :kq])  # identical top-k orderings


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("k,batch_size,itc_weight", [(3, 7, 0.0), (4, 64, 1.0), (1, 1, 0.0), (TEXTS, 5, 0.5)])
def test_cached_rerank_equals_the_plain_path(name, k, batch_size, itc_weight):
    model = tiny(name)
    assert retrieval.cache_fits(model)
    enc, sim = encodings(model), similarities()
    plain = retrieval.rerank(model, enc, sim, k, batch_size, False, itc_weight, cache=False)
    cached = retrieval.rerank(model, enc, sim, k, batch_size, False, itc_weight)  # the default: cached
    assert_same(cached, plain, k)
    loop = retrieval.rerank_loop(model, enc, sim, k, itc_weight)  # and the reference loop
    assert_same(cached, loop, k)


@pytest.mark.parametrize("name", ["albef", "maskvlm"])
@pytest.mark.parametrize("query", ["image", "text"])
@pytest.mark.parametrize("cache_bytes", [1, 5_000, retrieval.CACHE_BYTES])
def test_chunked_candidate_caches_and_ragged_groups_give_the_plain_scores(name, query, cache_bytes):
    """Candidates' keys and values in chunks as small as one candidate (a query's pairs split between chunks, the
    pass then takes one row per pair), and queries with different numbers of pairs, in the caller's order."""
    model = tiny(name)
    enc = encodings(model)
    gen = torch.Generator().manual_seed(3)
    queries = torch.repeat_interleave(torch.randperm(IMAGES if query == "image" else TEXTS, generator=gen)[:5],
                                      torch.tensor([1, 4, 2, 6, 3]))
    candidates = torch.randint(0, TEXTS if query == "image" else IMAGES, (len(queries),), generator=gen)
    image_idx, text_idx = (queries, candidates) if query == "image" else (candidates, queries)
    plain = retrieval._match_scores(model, enc, image_idx, text_idx)
    cached = retrieval.cached_match_scores(model, enc, image_idx, text_idx, batch_size=5, query=query,
                                           cache_bytes=cache_bytes)
    assert (cached - plain).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["albef", "maskvlm"])
def test_the_scores_depend_on_each_pairs_own_image_and_text(name):
    """What makes the equality above mean something: another image, or the same text cut short, moves the score far
    beyond the tolerance."""
    model = tiny(name)
    enc = encodings(model)
    text_idx = torch.arange(IMAGES) % TEXTS
    own = retrieval._match_scores(model, enc, torch.arange(IMAGES), text_idx)
    other = retrieval._match_scores(model, enc, torch.arange(IMAGES).roll(1), text_idx)
    assert (own - other).abs().min() > 1e-3
    cut = {**enc, "text_mask": enc["text_mask"].clone()}
    cut["text_mask"][:, 2:] = 0                                  # every text cut to 2 tokens
    assert (own - retrieval._match_scores(model, cut, torch.arange(IMAGES), text_idx)).abs().min() > 1e-3


def counting(module: nn.Module, counts: dict, key: str) -> None:
    """Count the rows (first dimension) of the inputs `module` sees into counts[key]."""
    counts.setdefault(key, 0)

    def hook(_, args):
        counts[key] += args[0].shape[0]
    module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("name", ["albef", "maskvlm"])
def test_keys_and_values_are_projected_once_per_context_and_direction(name):
    model = tiny(name)
    enc, sim, k = encodings(model), similarities(), 4
    counts = {}
    for i, layer in enumerate(model.backbone.fusion.layers):
        counting(layer.cross.key, counts, f"fusion{i}")
    image_layers = model.backbone.image_fusion.layers if name == "maskvlm" else []
    for i, layer in enumerate(image_layers):
        counting(layer.cross.key, counts, f"image_fusion{i}")
    retrieval.rerank(model, enc, sim, k, 8, False, cache=False)
    plain = dict(counts)
    counts.update({key: 0 for key in counts})
    retrieval.rerank(model, enc, sim, k, 8, False)
    pairs = IMAGES * k + TEXTS * k
    for i in range(len(model.backbone.fusion.layers)):
        assert plain[f"fusion{i}"] == pairs
        assert counts[f"fusion{i}"] == 2 * IMAGES  # each image once as a query (image->text), once in the cache
    for i in range(len(image_layers)):
        assert plain[f"image_fusion{i}"] == pairs
        assert counts[f"image_fusion{i}"] == 2 * TEXTS  # each text once in the cache, once as a query


@pytest.mark.parametrize("name", ["albef", "maskvlm"])
def test_no_pass_computes_padding_beyond_its_longest_text(name):
    model = tiny(name)
    enc, sim = encodings(model), similarities()
    widths = []

    def hook(_, args):
        x, mask = args[0], args[1]
        widths.append((x.shape[1], int(retrieval.text_lengths(mask).max()), len(x)))
    model.backbone.fusion.register_forward_pre_hook(hook)
    retrieval.rerank(model, enc, sim, 3, 6, False)
    assert widths and all(width == longest for width, longest, _ in widths)
    assert max(width for width, _, _ in widths) < MAX_LEN       # the full padded width is never computed
    # Every distinct pair once: a text's candidate image that had the text among its candidates is not rescored.
    i2t = {(i, int(t)) for i, row in enumerate(sim.topk(3, dim=1).indices) for t in row}
    t2i = {(int(i), t) for t, row in enumerate(sim.t().topk(3, dim=1).indices) for i in row}
    assert len(i2t & t2i) > 0
    rows = [rows for _, _, rows in widths]
    assert sum(rows) == len(i2t | t2i)
    # Queries go in order of their longest text: the widths of the text->image passes (after the first 3 x IMAGES
    # rows, the image->text passes) rise.
    first_t2i = next(i for i in range(len(rows) + 1) if sum(rows[:i]) == IMAGES * 3)
    t2i_widths = [width for width, _, _ in widths[first_t2i:]]
    assert t2i_widths == sorted(t2i_widths)


def test_text_lengths_are_one_past_the_last_real_token():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert retrieval.text_lengths(mask).tolist() == [3, 1, 5]


class OwnITM(ALBEF):
    """A method whose ITM is not the base one's: the cache cannot serve it."""

    def itm_logits(self, image_tokens, text_hidden, text_mask):
        return super().itm_logits(image_tokens, text_hidden, text_mask) * 2


def test_a_method_with_its_own_itm_takes_the_plain_path():
    model = tiny("albef")
    model.__class__ = OwnITM
    assert not retrieval.cache_fits(model)
    enc, sim = encodings(model), similarities()
    default = retrieval.rerank(model, enc, sim, 3, 7, False)
    plain = retrieval.rerank(model, enc, sim, 3, 7, False, cache=False)
    assert all(torch.equal(d, p) for d, p in zip(default, plain))
    with pytest.raises(ValueError, match="cached keys and values"):
        retrieval.rerank(model, enc, sim, 3, 7, False, cache=True)


def test_grouped_keys_and_values_equal_one_copy_per_row():
    """`Attention.forward` with one context per group of rows (queries folded) against each row given its copy;
    with a key mask, and in capture mode (explicit probabilities, one row each)."""
    from vlpt.models.text import Attention
    torch.manual_seed(0)
    att = Attention(16, 4, 0.0, kv_width=12).eval()
    x, context = torch.randn(6, 5, 16), torch.randn(2, 7, 12)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.no_grad():
        kv = att.project_kv(context)
        rows = torch.tensor([0, 0, 0, 1, 1, 1])
        expected = att(x, context[rows], mask[rows])
        assert (att(x, mask=mask, kv=kv) - expected).abs().max() <= 1e-6
        assert (att(x, mask=mask[rows], kv=kv) - expected).abs().max() <= 1e-6
        att.capture = True
        assert (att(x, mask=mask, kv=kv) - expected).abs().max() <= 1e-6
        assert att.probs.shape == (6, 4, 5, 7)
        att.capture = False
        with pytest.raises(ValueError):
            att(x[:5], mask=mask, kv=kv)

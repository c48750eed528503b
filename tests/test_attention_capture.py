"""Attention capture: the explicit path keeps the probabilities (and their gradient) of the fast path's attention."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vlpt.config import TextConfig
from vlpt.models.text import Attention, FusionEncoder, capture_attention

torch.set_num_threads(min(2, torch.get_num_threads()))

WIDTH, HEADS = 16, 4


def split(x: torch.Tensor) -> torch.Tensor:
    return x.view(*x.shape[:2], HEADS, -1).transpose(1, 2)


def by_hand(attn: Attention, x, context=None, mask=None, causal=False):
    """(output, probabilities) of `attn` written out from its own weights."""
    context = x if context is None else context
    q, k, v = split(attn.query(x)), split(attn.key(context)), split(attn.value(context))
    scores = q @ k.transpose(-2, -1) / (WIDTH // HEADS) ** 0.5
    if mask is not None:
        scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    if causal:
        n = x.shape[1]
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    probs = scores.softmax(-1)
    h = (probs @ v).transpose(1, 2).flatten(2)
    return attn.norm(x + attn.out(h)), probs


CASES = {
    "self_padded": dict(context=False, mask=True, causal=False),
    "cross_padded": dict(context=True, mask=True, causal=False),
    "cross": dict(context=True, mask=False, causal=False),
    "causal": dict(context=False, mask=False, causal=True),
    "causal_padded": dict(context=False, mask=True, causal=True),
}


def inputs(case: dict, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, WIDTH, generator=gen)
    context = torch.randn(2, 5, 24, generator=gen) if case["context"] else None
    m = 5 if case["context"] else 6
    mask = torch.ones(2, m, dtype=torch.long) if case["mask"] else None
    if mask is not None:
        mask[0, m - 2:] = 0
    return x, context, mask


@pytest.mark.parametrize("name", list(CASES))
def test_captured_probs_and_output_match_fast_path_and_hand_attention(name):
    case = CASES[name]
    torch.manual_seed(1)
    attn = Attention(WIDTH, HEADS, 0.0, kv_width=24 if case["context"] else None).eval()
    x, context, mask = inputs(case)
    kw = dict(context=context, mask=mask, causal=case["causal"])
    fast = attn(x, **kw)
    assert attn.probs is None  # capture off: nothing kept
    with capture_attention(attn):
        slow = attn(x, **kw)
    assert not attn.capture
    torch.testing.assert_close(slow, fast, rtol=0, atol=1e-6)
    hand_out, hand_probs = by_hand(attn, x, **kw)
    probs = attn.probs
    m = probs.shape[-1]
    assert probs.shape == (2, HEADS, 6, m)
    torch.testing.assert_close(probs, hand_probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(slow, hand_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, HEADS, 6), rtol=0, atol=1e-6)
    if mask is not None:
        assert (probs[0, ..., m - 2:] == 0).all() and (probs[1] > 0).any(-1).all()
    if case["causal"]:
        assert (probs.triu(1) == 0).all()


@pytest.mark.parametrize("name", ["self_padded", "cross_padded", "causal"])
def test_probs_grad_equals_autograd_through_hand_attention(name):
    case = CASES[name]
    torch.manual_seed(2)
    attn = Attention(WIDTH, HEADS, 0.0, kv_width=24 if case["context"] else None).eval()
    x, context, mask = inputs(case, seed=3)
    kw = dict(context=context, mask=mask, causal=case["causal"])
    target = torch.randn(2, 6, WIDTH)
    with capture_attention(attn):
        (attn(x, **kw) * target).sum().backward()
    assert attn.probs.grad is not None and attn.probs.grad.abs().max() > 0
    out, probs = by_hand(attn, x, **kw)
    probs.retain_grad()
    (out * target).sum().backward()
    torch.testing.assert_close(attn.probs.grad, probs.grad, rtol=1e-5, atol=1e-6)


def test_capture_off_outside_the_block_and_probs_kept_after_it():
    torch.manual_seed(4)
    attn = Attention(WIDTH, HEADS, 0.0).eval()
    x = torch.randn(1, 3, WIDTH)
    with torch.no_grad():
        attn(x)
    assert not attn.capture and attn.probs is None
    with capture_attention(attn) as layers:
        assert layers == (attn,) and attn.capture
        with torch.no_grad():
            attn(x)
    kept = attn.probs
    assert kept is not None and not kept.requires_grad
    attn(2 * x)  # the fast path again: the captured probabilities are left as they were
    assert attn.probs is kept
    with capture_attention(attn):  # a new capture clears the old probabilities
        assert attn.probs is None


def test_capture_in_training_applies_dropout_to_the_probabilities():
    torch.manual_seed(5)
    attn = Attention(WIDTH, HEADS, 0.5).train()
    attn.drop = nn.Identity()  # only the attention dropout
    x = torch.randn(2, 6, WIDTH)
    with capture_attention(attn):
        out = attn(x)
    hand_out, _ = by_hand(attn, x)
    assert (out - hand_out).abs().max() > 1e-3  # dropped probabilities change the output
    torch.testing.assert_close(attn.probs.sum(-1), torch.ones(2, HEADS, 6))  # kept before dropout
    attn.eval()
    with capture_attention(attn):
        torch.testing.assert_close(attn(x), hand_out, rtol=0, atol=1e-6)


def test_capture_the_cross_attention_of_a_fusion_encoder():
    torch.manual_seed(6)
    cfg = TextConfig(width=WIDTH, heads=HEADS, intermediate=32, text_layers=1, fusion_layers=2)
    fusion = FusionEncoder(cfg, context_width=24).eval()
    x, image = torch.randn(2, 5, WIDTH), torch.randn(2, 7, 24)
    mask, image_mask = torch.ones(2, 5, dtype=torch.long), torch.ones(2, 7, dtype=torch.long)
    mask[0, 3:] = 0
    fast = fusion(x, mask, image, image_mask)
    crosses = [layer.cross for layer in fusion.layers]
    with capture_attention(*crosses):
        out = fusion(x, mask, image, image_mask)
        out[:, 0].sum().backward()
    torch.testing.assert_close(out, fast, rtol=0, atol=1e-5)
    for cross in crosses:
        assert cross.probs.shape == (2, HEADS, 5, 7) and cross.probs.grad is not None
    assert all(layer.attention.probs is None for layer in fusion.layers)  # self-attention not captured


def test_capture_under_grad_checkpointing_keeps_the_probabilities_that_get_the_gradient():
    torch.manual_seed(7)
    cfg = TextConfig(width=WIDTH, heads=HEADS, intermediate=32, text_layers=1, fusion_layers=1)
    fusion = FusionEncoder(cfg, context_width=24).eval()
    x, image, mask = torch.randn(2, 5, WIDTH), torch.randn(2, 7, 24), torch.ones(2, 5)
    cross = fusion.layers[0].cross
    grads = []
    for checkpointed in (False, True):
        fusion.set_grad_checkpointing(checkpointed)
        with capture_attention(cross):
            fusion(x, mask, image).sum().backward()
        grads.append(cross.probs.grad)
    assert grads[1] is not None
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_a_cross_layer_without_context_is_a_text_layer_and_its_cross_attention_gets_no_gradient():
    """One stack used with and without cross-attention (SIMLA's single stream): without a context the layer equals
    the same weights minus the cross-attention, and a loss of that text-only pass sends no gradient to it."""
    from vlpt.config import TextConfig
    from vlpt.models.text import Layer
    torch.manual_seed(0)
    cfg = TextConfig(width=16, heads=2, intermediate=32)
    cross, plain = Layer(cfg, cross=True, context_width=8), Layer(cfg)
    plain.load_state_dict({k: v for k, v in cross.state_dict().items() if not k.startswith("cross.")})
    x, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.long)
    out = cross(x, mask)
    assert torch.equal(out, plain(x, mask))
    out.sum().backward()
    assert all(p.grad is None for p in cross.cross.parameters())
    assert cross.attention.query.weight.grad is not None
    with_context = cross(x, mask, torch.randn(2, 3, 8))
    assert not torch.allclose(with_context, out)

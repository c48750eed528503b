"""`FusionEncoder.forward(first=k)` computes the last layer for the first k positions only: the same values (and
gradients) as the whole pass's first k, which [CLS]-pooled joint features (ITM, reranking) read."""
import dataclasses

import pytest
import torch

from vlpt.config import ModelConfig, TextConfig, VisionConfig
from vlpt.models.backbone import CrossPair, DualStream
from vlpt.models.text import FusionEncoder, capture_attention


def tiny_model(pool: str) -> ModelConfig:
    return ModelConfig(vision=VisionConfig(image_size=32, patch_size=16, width=32, depth=1, heads=2),
                       text=TextConfig(width=32, heads=2, intermediate=64, text_layers=1, fusion_layers=2, max_len=8,
                                       pool=pool))


def inputs(seed=0, b=3, length=7, m=5, width=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, width, generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 6:] = 0
    return x, mask, torch.randn(b, m, width, generator=g)


def test_first_equals_whole_pass_and_its_gradient():
    torch.manual_seed(0)
    cfg = tiny_model("cls").text
    enc = FusionEncoder(cfg, context_width=32)
    x, mask, ctx = inputs()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    whole = enc(xa, mask, ctx)[:, :1]
    cut = enc(xb, mask, ctx, first=1)
    assert cut.shape == (3, 1, 32)
    torch.testing.assert_close(cut, whole, rtol=1e-5, atol=1e-6)
    whole.sum().backward()
    cut.sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)


def test_first_with_grouped_keys_and_values():
    torch.manual_seed(0)
    enc = FusionEncoder(tiny_model("cls").text, context_width=32)
    x, mask, ctx = inputs(b=4)
    kv = enc.context_kv(ctx[:2])  # two contexts, each serving two consecutive rows
    whole = enc(x, mask, ctx[:2].repeat_interleave(2, 0))[:, :1]
    torch.testing.assert_close(enc(x, mask, context_kv=kv, first=1), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [DualStream, CrossPair])
def test_joint_feature_reads_the_whole_pass_value(cls):
    torch.manual_seed(0)
    cfg = tiny_model("cls")
    backbone = cls(cfg, 20, 1) if cls is CrossPair else cls(cfg, 20)
    x, mask, ctx = inputs(m=5)
    fused = backbone.fuse(ctx, x, mask)[:, 0]
    if cls is CrossPair:
        fused = backbone.itm_image_proj(backbone.fuse_image(ctx, x, mask)[:, 0]) * fused
    torch.testing.assert_close(backbone.joint_feature(ctx, x, mask), fused, rtol=1e-5, atol=1e-6)


def test_capturing_last_layer_keeps_every_token():
    torch.manual_seed(0)
    enc = FusionEncoder(tiny_model("cls").text, context_width=32)
    x, mask, ctx = inputs()
    with capture_attention(enc.layers[-1].cross) as (attn,):
        out = enc(x, mask, ctx, first=1)
    assert out.shape == (3, 1, 32) and attn.probs.shape[2] == x.shape[1]

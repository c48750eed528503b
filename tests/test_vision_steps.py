"""VisionEncoder: the ViT's forward pass in public steps (embed with a mask token, blocks with extra tokens under a
key-padding mask, gradient checkpointing), its initialisation and its weight loading."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from vlpt.config import VisionConfig
from vlpt.errors import VlptError
from vlpt.models.vision import PatchProjection, VisionEncoder, build_vit, load_vit_weights

torch.set_num_threads(min(2, torch.get_num_threads()))


def cfg(size: int = 32, **kw) -> VisionConfig:
    return VisionConfig(**{**dict(image_size=size, patch_size=8, width=32, depth=3, heads=2), **kw})


def old_build(c: VisionConfig) -> VisionTransformer:
    """How `build_vit` made the model before VisionEncoder: the reference for the seed's draws."""
    vit = VisionTransformer(img_size=c.image_size, patch_size=c.patch_size, embed_dim=c.width, depth=c.depth,
                            num_heads=c.heads, mlp_ratio=c.mlp_ratio, drop_path_rate=c.drop_path, num_classes=0,
                            global_pool="")
    vit.patch_embed.proj = PatchProjection.like(vit.patch_embed.proj)
    return vit


@pytest.mark.parametrize("mask_token", [False, True])
def test_seed_draws_the_same_weights_under_the_same_names(mask_token):
    torch.manual_seed(0)
    ref = old_build(cfg()).state_dict()
    after_ref = torch.rand(3)
    torch.manual_seed(0)
    vit = build_vit(cfg(), mask_token=mask_token)
    state = vit.state_dict()
    assert isinstance(vit, VisionEncoder) and isinstance(vit.patch_embed.proj, PatchProjection)
    assert state.keys() - ref.keys() == ({"mask_token"} if mask_token else set()) and ref.keys() <= state.keys()
    for k, v in ref.items():
        assert torch.equal(state[k], v), k
    if mask_token:
        assert vit.mask_token.shape == (1, 1, 32) and 0.005 < vit.mask_token.std().item() < 0.05
    else:
        assert vit.mask_token is None and torch.equal(torch.rand(3), after_ref)  # no further draw


def test_grid_and_num_patches():
    vit = build_vit(cfg(32))
    assert vit.grid == (4, 4) and vit.num_patches == 16


def test_steps_equal_timm_forward_features():
    torch.manual_seed(1)
    vit = build_vit(cfg()).eval()
    image = torch.randn(2, 3, 32, 32)
    theirs = VisionTransformer.forward_features(vit, image)
    assert torch.equal(vit.norm(vit.run_blocks(vit.embed(image))), theirs)
    assert torch.equal(vit.forward_features(image), theirs)
    assert torch.equal(vit(image), theirs)
    # blocks in two slices are the blocks at once
    x = vit.embed(image)
    assert torch.equal(vit.run_blocks(vit.run_blocks(x, 0, 1), 1), vit.run_blocks(x))


def test_patch_mask_swaps_in_the_mask_token_only():
    torch.manual_seed(2)
    vit = build_vit(cfg(), mask_token=True).eval()
    image = torch.randn(2, 3, 32, 32)
    patch_mask = torch.rand(2, 16) < 0.5
    patch_mask[0, 0], patch_mask[0, 1] = True, False
    plain, masked = vit.embed(image), vit.embed(image, patch_mask)
    keep = torch.cat([torch.zeros(2, 1, dtype=torch.bool), patch_mask], 1)  # [CLS] never masked
    assert torch.equal(masked[~keep], plain[~keep])
    expected = (vit.mask_token + vit.pos_embed[:, 1:]).expand(2, -1, -1)[patch_mask]
    torch.testing.assert_close(masked[keep], expected, rtol=0, atol=1e-6)
    # the formula MaskVLM used: bitwise the same
    x = vit.patch_embed(image)
    w = patch_mask[..., None].to(x.dtype)
    x = x * (1 - w) + vit.mask_token * w
    x = torch.cat([vit.cls_token.expand(2, -1, -1), x], 1) + vit.pos_embed
    assert torch.equal(masked, x)
    assert torch.equal(vit.forward_features(image, patch_mask), vit.norm(vit.run_blocks(masked)))
    # an all-False mask changes nothing
    assert torch.equal(vit.embed(image, torch.zeros(2, 16, dtype=torch.bool)), plain)


def test_patch_mask_without_mask_token_errors():
    vit = build_vit(cfg())
    with pytest.raises(ValueError, match="mask_token=True"):
        vit.embed(torch.randn(1, 3, 32, 32), torch.zeros(1, 16, dtype=torch.bool))


@pytest.mark.parametrize("mask_dtype", [torch.long, torch.bool])
def test_padded_extra_tokens_do_not_reach_image_tokens(mask_dtype):
    torch.manual_seed(3)
    vit = build_vit(cfg()).eval()
    x = vit.embed(torch.randn(2, 3, 32, 32))
    extra = torch.randn(2, 5, 32)
    extra_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).to(mask_dtype)
    image, text = vit.run_blocks(x, 1, extra=extra, extra_mask=extra_mask)
    assert image.shape == x.shape and text.shape == extra.shape
    changed = extra.clone()
    changed[0, 3:] = 10 * torch.randn(2, 32)
    image2, text2 = vit.run_blocks(x, 1, extra=changed, extra_mask=extra_mask)
    assert torch.equal(image2, image)
    assert torch.equal(text2[0, :3], text[0, :3]) and torch.equal(text2[1], text[1])
    # a real extra token does reach the image tokens, and so does padding without the mask
    real = extra.clone()
    real[0, 1] = 5 * torch.randn(32)  # not a constant shift, which the blocks' LayerNorm removes
    assert (vit.run_blocks(x, 1, extra=real, extra_mask=extra_mask)[0] - image)[0].abs().max() > 1e-3
    assert (vit.run_blocks(x, 1, extra=changed)[0] - vit.run_blocks(x, 1, extra=extra)[0])[0].abs().max() > 1e-3
    # all-real extra_mask = no mask
    ones = torch.ones(2, 5, dtype=mask_dtype)
    torch.testing.assert_close(vit.run_blocks(x, 1, extra=extra, extra_mask=ones)[0],
                               vit.run_blocks(x, 1, extra=extra)[0], rtol=0, atol=1e-6)


def test_grad_checkpointing_same_outputs_and_gradients():
    torch.manual_seed(4)
    vit = build_vit(cfg(drop_path=0.0), mask_token=True).train()
    image = torch.randn(2, 3, 32, 32)
    patch_mask = torch.rand(2, 16) < 0.4
    extra = torch.randn(2, 4, 32, requires_grad=True)
    extra_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])

    def run():
        vit.zero_grad(set_to_none=True)
        extra.grad = None
        x = vit.forward_features(image, patch_mask)
        image_out, extra_out = vit.run_blocks(vit.embed(image, patch_mask), 2, extra=extra, extra_mask=extra_mask)
        (x.square().sum() + image_out.sin().sum() + extra_out.cos().sum()).backward()
        return [x, image_out, extra_out], {n: p.grad.clone() for n, p in vit.named_parameters()}, extra.grad.clone()

    outs, grads, extra_grad = run()
    vit.set_grad_checkpointing(True)
    assert vit.grad_checkpointing
    outs2, grads2, extra_grad2 = run()
    for a, b in zip(outs, outs2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert grads.keys() == grads2.keys() and grads["mask_token"].abs().sum() > 0
    for n in grads:
        torch.testing.assert_close(grads2[n], grads[n], rtol=1e-6, atol=1e-7, msg=n)
    torch.testing.assert_close(extra_grad2, extra_grad, rtol=1e-6, atol=1e-7)


# --- weight loading --------------------------------------------------------------------------------------------------

def save_source(tmp_path, suffix: str) -> tuple[VisionTransformer, str]:
    torch.manual_seed(5)
    source = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=7)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state}, path)
    return source, str(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("mask_token", [False, True])
def test_load_resamples_pos_embed_and_copies_the_rest(tmp_path, suffix, mask_token):
    source, path = save_source(tmp_path, suffix)
    torch.manual_seed(6)
    vit = build_vit(cfg(64), mask_token=mask_token)
    token_before = None if vit.mask_token is None else vit.mask_token.detach().clone()
    load_vit_weights(vit, path)
    assert vit.pos_embed.shape == (1, 1 + 64, 32) and source.pos_embed.shape == (1, 1 + 16, 32)
    assert torch.equal(vit.pos_embed[0, 0], source.pos_embed[0, 0])  # [CLS] position kept
    # the 8 x 8 grid interpolates the 4 x 4 one: its mean stays close, it is not left at init
    assert (vit.pos_embed[0, 1:].mean(0) - source.pos_embed[0, 1:].mean(0)).abs().max() < 0.02
    theirs = source.state_dict()
    for k, v in vit.state_dict().items():
        if k not in ("pos_embed", "mask_token"):
            assert torch.equal(v, theirs[k]), k
    if mask_token:
        assert torch.equal(vit.mask_token, token_before)
    assert vit.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 65, 32)


def test_load_wrong_file_names_missing_unexpected_and_shapes(tmp_path):
    source = build_vit(cfg(depth=2))
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    state["blocks.0.extra.weight"] = torch.zeros(3)
    state["cls_token"] = torch.zeros(1, 1, 16)
    path = tmp_path / "wrong.safetensors"
    save_file(state, str(path))
    with pytest.raises(VlptError, match="do not match") as info:
        load_vit_weights(build_vit(cfg(depth=3)), path)
    message = str(info.value)
    assert "12 missing: blocks.2." in message and "1 unexpected: blocks.0.extra.weight" in message
    assert "1 of another shape: cls_token (1, 1, 16) != (1, 1, 32)" in message

"""MaskVLM: region masking, [MASK]-only text masking, the masked L1 and MLM losses, cross-modal conditioning of both
reconstructions, the element-wise-product ITM head, retrieval on a checkpoint and a short training run."""
import json

import pytest
import torch

from helpers import TINY
from vlpt import methods
from vlpt.config import load_config
from vlpt.data.masking import IGNORE, mask_image_regions, mask_tokens
from vlpt.objectives.masked_image import mim_loss, patchify, unpatchify
from vlpt.objectives.masked_language import mlm_loss

VOCAB = 40


def _tiny_maskvlm(*over):
    cfg = load_config("configs/pretrain/maskvlm_tiny.yaml", [
        *TINY, "method.maskvlm.image_cross_layers=1", "method.maskvlm.decoder_layers=1", "method.maskvlm.region=16",
        *over])
    torch.manual_seed(0)
    return methods.build(cfg, VOCAB).eval(), cfg


def _batch(b=4, length=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (b, length), generator=gen)
    ids[:, 0], ids[:, -1] = 2, 3
    mlm_ids, mlm_labels = mask_tokens(ids, 0.3, 4, VOCAB, [0, 1, 2, 3, 4], gen, mask_only=True)
    return {"image": torch.randn(b, 3, 32, 32, generator=gen), "text_ids": ids, "text_mask": torch.ones_like(ids),
            "image_id": torch.arange(b), "mlm_ids": mlm_ids, "mlm_labels": mlm_labels}


# --- masking -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_region_masks_are_whole_regions_at_an_exact_ratio(seed):
    gen = torch.Generator().manual_seed(seed)
    mask = mask_image_regions(16, (14, 14), 2, 0.6, gen)  # 224 px / 16 px patches, 32 px regions: 7 x 7 regions
    assert mask.shape == (16, 196) and mask.dtype == torch.bool
    grid = mask.view(16, 7, 2, 7, 2)
    assert (grid == grid[:, :, :1, :, :1]).all()  # each 2 x 2 group of patches is masked or kept together
    assert (grid[:, :, 0, :, 0].sum((1, 2)) == round(0.6 * 49)).all()  # exactly 29 of 49 regions per image
    assert not (mask == mask[:1]).all()  # images differ
    again = mask_image_regions(16, (14, 14), 2, 0.6, torch.Generator().manual_seed(seed))
    assert torch.equal(mask, again)


def test_region_masks_reject_a_grid_the_regions_do_not_tile():
    with pytest.raises(ValueError):
        mask_image_regions(2, (5, 5), 2, 0.5)


def test_text_masking_uses_only_mask_and_skips_special_and_padding():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (64, 32), generator=gen)
    ids[:, 0], ids[:, 20], ids[:, 21:] = 2, 3, 0
    masked, labels = mask_tokens(ids, 0.3, 4, 1000, [0, 1, 2, 3, 4], torch.Generator().manual_seed(1), mask_only=True)
    picked = labels != IGNORE
    assert (masked[picked] == 4).all()                   # every picked token is [MASK]: no random, no kept
    assert torch.equal(masked[~picked], ids[~picked])     # nothing else changes
    assert torch.equal(labels[picked], ids[picked])
    assert not picked[:, 0].any() and not picked[:, 20:].any()  # [CLS], [SEP], padding never picked
    assert abs(picked.float().sum().item() / (64 * 19) - 0.3) < 0.03


# --- losses --------------------------------------------------------------------------------------------------------
def test_mim_loss_is_l1_over_masked_pixels_only():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 16, 48, generator=gen), torch.randn(2, 16, 48, generator=gen)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :4], mask[1, 8:14] = True, True
    loss = mim_loss(pred, target, mask)
    assert torch.allclose(loss, (pred - target).abs()[mask].mean())
    changed_pred, changed_target = pred.clone(), target.clone()
    changed_pred[~mask] += 5.0
    changed_target[~mask] -= 3.0
    assert torch.equal(mim_loss(changed_pred, changed_target, mask), loss)
    image = torch.randn(2, 3, 16, 16, generator=gen)
    assert torch.equal(unpatchify(patchify(image, 4), 4, (4, 4)), image)
    assert torch.equal(patchify(image, 4)[1, 5], image[1, :, 4:8, 4:8].permute(1, 2, 0).reshape(-1))


def test_mlm_loss_ignores_unmasked_tokens():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=gen)
    labels = torch.full((2, 6), IGNORE)
    labels[0, 1], labels[1, 4] = 3, 7
    loss = mlm_loss(logits, labels)
    changed = logits.clone()
    changed[labels == IGNORE] = torch.randn_like(changed[labels == IGNORE])
    assert torch.equal(mlm_loss(changed, labels), loss)


# --- the model -----------------------------------------------------------------------------------------------------
def test_forward_losses_and_deterministic_masks():
    model, _ = _tiny_maskvlm()
    batch = _batch()
    out = model(batch, step=3)
    assert set(out) == {"itc", "itm", "mlm", "mim"} and all(torch.isfinite(v) for v in out.values())
    mask = model.image_mask(4, 3, "cpu")
    assert torch.equal(mask, model.image_mask(4, 3, "cpu"))
    assert (mask.sum(1) == 2 * 4).all()          # 16 patches in 4 regions of 2 x 2; round(0.6 * 4) = 2 regions
    assert not torch.equal(mask, model.image_mask(4, 4, "cpu"))  # a new step draws new masks
    sub, _ = _tiny_maskvlm("method.losses=[itc,mim]")
    assert set(sub(batch, 3)) == {"itc", "mim"}


def test_reconstruction_depends_on_the_text_and_mlm_on_the_image():
    model, _ = _tiny_maskvlm()
    batch, other = _batch(seed=0), _batch(seed=1)
    mask, masked_ids = model.image_mask(4, 0, "cpu"), batch["mlm_ids"]
    with torch.no_grad():
        masked_tokens = model.encode_image(batch["image"], patch_mask=mask)[0]
        hidden = model.encode_text(batch["text_ids"], batch["text_mask"])[0]
        hidden_other = model.encode_text(other["text_ids"], other["text_mask"])[0]
        recon = model.reconstruct(masked_tokens, hidden, batch["text_mask"])
        assert not torch.allclose(recon, model.reconstruct(masked_tokens, hidden_other, batch["text_mask"]))
        image_tokens = model.encode_image(batch["image"])[0]
        other_tokens = model.encode_image(other["image"])[0]
        logits = model.mlm_logits(image_tokens, masked_ids, batch["text_mask"])
        assert not torch.allclose(logits, model.mlm_logits(other_tokens, masked_ids, batch["text_mask"]))
        # the mask token reaches the ViT: masking changes the image tokens
        assert not torch.allclose(masked_tokens, image_tokens)


def test_masked_patches_are_predicted_without_their_pixels():
    """MIM in `forward` (Eq. 1, phi_im(I_m, T)): with the step's mask fixed, changing the pixels inside masked patches
    leaves every prediction unchanged (only the target moves), while changing visible pixels changes the predictions
    at the masked patches."""
    model, _ = _tiny_maskvlm()
    batch, step = _batch(), 5
    mask = model.image_mask(4, step, "cpu")                                   # what `forward` draws at this step
    assert mask.any(1).all() and (~mask).any(1).all()
    in_masked = unpatchify(mask[..., None].expand(-1, -1, 8 * 8 * 3).float(), 8, (4, 4)).bool()  # (B,3,32,32)
    noise = 3 * torch.randn(batch["image"].shape, generator=torch.Generator().manual_seed(9))
    predictions = []
    handle = model.to_pixels.register_forward_hook(lambda m, inputs, out: predictions.append(out))
    with torch.no_grad():
        out = model(batch, step)
        changed_masked = model({**batch, "image": batch["image"] + noise * in_masked}, step)
        model({**batch, "image": batch["image"] + noise * ~in_masked}, step)
    handle.remove()
    assert len(predictions) == 3                                               # one reconstruction per forward
    plain, masked_changed, visible_changed = predictions
    assert torch.equal(masked_changed, plain)
    assert changed_masked["mim"] != out["mim"]                                 # the target is the true pixels
    assert (visible_changed - plain)[mask].abs().amax() > 1e-3


def test_itm_logits_are_the_head_on_the_product_of_both_cross_encoders():
    """Eq. 3 computed here from the layers themselves: the image cross-encoder's [CLS] (image tokens attending to the
    text, padding masked), projected to the text width, times the mean over unpadded tokens of the text
    cross-encoder's output, into the ITM head. The logits follow the image cross-encoder's weights, which the text
    side never reads."""
    model, cfg = _tiny_maskvlm("model.vision.width=48", "model.vision.heads=2")  # widths differ: projected
    assert cfg.model.text.pool == "mean"
    batch = _batch()
    mask = batch["text_mask"].clone()
    mask[0, 6:], mask[2, 4:] = 0, 0                                            # padded captions
    with torch.no_grad():
        tokens = model.encode_image(batch["image"])[0]
        hidden = model.encode_text(batch["text_ids"], mask)[0]
        image = tokens
        for layer in model.backbone.image_fusion.layers:                     # g_im: no mask on image queries
            image = layer(image, None, hidden, mask)
        text = hidden
        for layer in model.backbone.fusion.layers:                           # g_txt: text queries, image context
            text = layer(text, mask, tokens)
        weights = mask[..., None].float()
        pooled = (text * weights).sum(1) / weights.sum(1)
        proj = model.backbone.itm_image_proj
        expected = model.itm_head((image[:, 0] @ proj.weight.t() + proj.bias) * pooled)
        logits = model.itm_logits(tokens, hidden, mask)
        assert logits.shape == (4, 2)
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
        for p in model.backbone.image_fusion.parameters():                  # only the image cross-encoder changes
            p.add_(0.1 * torch.randn_like(p))
        assert not torch.allclose(model.itm_logits(tokens, hidden, mask), logits, atol=1e-3)
        assert torch.equal(model.fuse(tokens, hidden, mask), text)            # the text side is untouched


def test_both_masking_conditions_mlm_on_the_masked_image():
    one, _ = _tiny_maskvlm()
    both, _ = _tiny_maskvlm("method.maskvlm.masking=both")
    both.load_state_dict(one.state_dict())
    batch = _batch()
    a, b = one(batch, 0), both(batch, 0)
    assert torch.allclose(a["itc"], b["itc"]) and not torch.allclose(a["mlm"], b["mlm"])
    assert not torch.equal(a["mim"], b["mim"])  # the text context is masked too (a small change at init)


def test_maskvlm_trains_logs_all_losses_and_evaluates_retrieval(shapes_data, tmp_path):
    from vlpt.engine.checkpoint import load_method
    from vlpt.engine.logging import read_metrics
    from vlpt.pretrain import pretrain as train
    from vlpt.tasks import retrieval

    cfg = load_config("configs/pretrain/maskvlm_tiny.yaml", [
        *TINY, f"data.root={shapes_data}", f"train.out={tmp_path}", "train.steps=3", "train.log_every=1",
        "method.maskvlm.image_cross_layers=1", "method.maskvlm.decoder_layers=1", "method.maskvlm.region=16"])
    rows = read_metrics(train(cfg))
    assert len(rows) == 3
    for row in rows:
        assert {"itc", "itm", "mlm", "mim"} <= set(row)
    model, cfg, tokenizer = load_method(tmp_path)
    metrics = retrieval.evaluate(model, shapes_data / "retrieval_test.json", shapes_data, tokenizer,
                                 image_size=cfg.model.vision.image_size, max_len=cfg.model.text.max_len, k=4,
                                 batch_size=8, device=torch.device("cpu"), num_workers=0)
    assert 0 <= metrics["r_mean"] <= 100
    from vlpt.cli import main

    main(["visualize", "reconstruction", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "recon.png"),
          "--n", "4", "--device", "cpu"])
    from PIL import Image
    picture = Image.open(tmp_path / "recon.png")
    assert picture.width >= 3 * 4 * 32 and picture.height >= 4 * 4 * 32  # 3 columns, 4 rows, each image 4x or more


def test_masked_l1_of_a_perfect_and_a_mean_colour_reconstruction(monkeypatch, shapes_data, tmp_path):
    """The L1 is taken over masked pixels only: a decoder that returns the true pixels scores 0."""
    from vlpt.data.tokenizer import Tokenizer
    from vlpt.objectives.masked_image import patchify
    from vlpt.viz import reconstruction

    tokenizer = Tokenizer(shapes_data / "vocab.txt")
    model = methods.build(_tiny_maskvlm()[1], tokenizer.vocab_size).eval()
    kwargs = dict(image_size=32, max_len=24, batch_size=5)
    truth = {}
    original_encode = model.encode_image

    def remember(image, teacher=False, patch_mask=None):
        truth["pixels"] = patchify(image, 8)
        return original_encode(image, teacher, patch_mask)

    monkeypatch.setattr(model, "encode_image", remember)
    monkeypatch.setattr(model, "reconstruct", lambda tokens, hidden, mask: truth["pixels"])
    l1 = reconstruction.masked_l1(model, tokenizer, shapes_data / "retrieval_test.json", shapes_data, **kwargs)
    assert l1["model"] == 0 and l1["mean_colour"] > 0.05
    # the picture's rows: the conditioning captions, in order, and the same L1 per image
    _, rows = reconstruction.save_reconstructions(model, tokenizer, shapes_data / "retrieval_test.json", shapes_data,
                                                  tmp_path / "recon.png", image_size=32, max_len=24, n=3)
    records = json.loads((shapes_data / "retrieval_test.json").read_text())[:3]
    assert [r["caption"] for r in rows] == [r["caption"][0] for r in records]
    assert all(r["l1"] == 0 and 0 < r["masked"] < r["patches"] == 16 for r in rows)

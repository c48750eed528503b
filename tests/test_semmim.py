"""SemMIM: no gradient reaches the momentum encoder or head, the [CLS] targets never see the text, text-guided masks
against random ones at an exact ratio, the key-padding mask of text in the ViT, PLM on suffix tokens only, Eq. 2 and
Eq. 3 against the formula, the second view from the data pipeline, the base preset, Table 4-7 keys and a short run."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import METHODS, TINY, pair_batch
from vlpt import methods
from vlpt.config import load_config
from vlpt.data.masking import sample_patches
from vlpt.objectives.agreement import cls_agreement_loss, patch_mim_loss
from vlpt.objectives.prefix_lm import split_caption, split_points

VOCAB = 40
PRESET = "configs/pretrain/semmim_tiny.yaml"
SMALL = [*TINY, *METHODS["semmim"].extra]  # DDP, FSDP, resume, compile, checkpointing: test_parallel.py


def _semmim(*over):
    cfg = load_config(PRESET, [*SMALL, *over])
    torch.manual_seed(0)
    return methods.build(cfg, VOCAB), cfg


def _batch(b=4, length=10, seed=0, pad=0):
    return pair_batch(VOCAB, b, length, seed, pad, views=True)


# --- the momentum encoder and heads --------------------------------------------------------------------------------
def test_momentum_encoder_and_head_get_no_gradient_and_follow_the_student():
    model, cfg = _semmim()
    out = model(_batch(), 3)
    assert set(model.losses) == {"itc", "itm", "mlm", "cls", "patch", "plm"} <= set(out)
    assert all(torch.isfinite(out[k]) for k in model.losses)
    sum(out[k] for k in model.losses).backward()
    assert {"backbone", "encoding_head", "text_to_vision"} <= set(model.teacher.copies)
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    assert model.encoding_head.last.grad.abs().sum() > 0 and model.backbone.vision.mask_token.grad.abs().sum() > 0
    assert model.decoder.layers[0].cross.key.weight.grad.abs().sum() > 0
    before = model.teacher["encoding_head"].last.clone()
    with torch.no_grad():
        model.encoding_head.last.add_(1.0)
    model.after_step(3)
    m = cfg.method.momentum
    assert torch.allclose(model.teacher["encoding_head"].last, m * before + (1 - m) * model.encoding_head.last)
    # the teacher centres moved by DINO's EMA of the batch mean, only when the step was applied
    assert model.centers["cls"].value.abs().sum() > 0 and model.centers["patch"].value.abs().sum() > 0


def test_encoding_head_is_dino_shaped_and_under_6m_parameters_at_vit_b():
    from vlpt.methods.semmim import EncodingHeadConfig
    from vlpt.models.heads import EncodingHead
    h = EncodingHeadConfig()
    head = EncodingHead(768, h.codes, h.hidden, h.bottleneck, h.layers)
    assert sum(p.numel() for p in head.parameters()) < 6_000_000  # l.285
    logits = head(torch.randn(3, 768))
    assert logits.shape == (3, 1024) and logits.abs().max() <= 1 + 1e-5  # weight-normalised last layer: cosines


# --- the [CLS] targets see no text --------------------------------------------------------------------------------
def _teacher_cls_inputs(model, batch):
    seen = []
    hook = model.teacher["encoding_head"].register_forward_hook(
        lambda mod, args, out: seen.append(out.clone()) if args[0].ndim == 2 else None)
    with torch.no_grad():
        model(batch, 0)
    hook.remove()
    return seen


@pytest.mark.parametrize("views", ["eq2", "prose"])
def test_cls_target_pass_is_bitwise_unchanged_by_the_text(views):
    model, _ = _semmim(f"method.semmim.views={views}")
    a, b = _batch(seed=0), _batch(seed=0)
    b["text_ids"] = _batch(seed=5)["text_ids"]
    b["mlm_ids"] = _batch(seed=5)["mlm_ids"]
    b["text_mask"][:, 6:] = 0  # another text and another length
    cls_a, cls_b = _teacher_cls_inputs(model, a), _teacher_cls_inputs(model, b)
    assert len(cls_a) == 1 and torch.equal(cls_a[0], cls_b[0])
    # ...while the patch targets, through the text-injected blocks, do depend on it
    hidden = model.teacher["backbone"].encode_text(a["text_ids"], a["text_mask"])
    other = model.teacher["backbone"].encode_text(b["text_ids"], b["text_mask"])
    with torch.no_grad():
        free_a, text_a = model.encode_image_text(a["image_view2"], None, hidden, a["text_mask"], teacher=True)
        free_b, text_b = model.encode_image_text(a["image_view2"], None, other, b["text_mask"], teacher=True)
    assert torch.equal(free_a, free_b) and not torch.allclose(text_a, text_b)


# --- masking -------------------------------------------------------------------------------------------------------
def test_gumbel_top_k_masks_exactly_the_ratio_and_follows_the_probabilities():
    gen = torch.Generator().manual_seed(0)
    logits = torch.zeros(2000, 10)
    logits[:, :3] = 2.0  # three patches e^2 times as likely as each other one
    for ratio in (0.1, 0.3, 0.45):
        mask = sample_patches(logits, ratio, gen)
        assert (mask.sum(1) == round(ratio * 10)).all()
    first = sample_patches(logits, 0.1, gen).float().mean(0)  # one draw: softmax(logits) itself
    assert torch.allclose(first, logits[0].softmax(0), atol=0.03)
    uniform = sample_patches(torch.zeros(2000, 10), 0.3, gen).float().mean(0)
    assert torch.allclose(uniform, torch.full((10,), 0.3), atol=0.04)


def test_text_guided_masks_pick_higher_similarity_patches_than_random_masks():
    model, cfg = _semmim("method.semmim.mask_ratio=0.25")
    n, d = model.backbone.vision.num_patches, cfg.method.embed_dim
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(64, n, cfg.model.vision.width, generator=gen)
    text = F.normalize(torch.randn(64, d, generator=gen), dim=-1)
    with torch.no_grad():  # a hand-made case: the text is patch 0's feature, plus a little of patch 1's
        feats = F.normalize(model.teacher["vision_proj"](tokens), dim=-1)
        text = F.normalize(feats[:, 0] + 0.5 * feats[:, 1], dim=-1)
    sim = torch.einsum("bnd,bd->bn", feats, text)
    guided = model.draw_patch_mask(tokens, text, step=0)
    random = model.draw_patch_mask(tokens, text, step=0, masking="random")
    k = round(0.25 * n)
    assert (guided.sum(1) == k).all() and (random.sum(1) == k).all()
    mean = lambda m: ((sim * m).sum() / m.sum()).item()  # noqa: E731
    assert mean(guided) > mean(random) + 0.1
    assert guided[:, 0].float().mean() > 0.9 and random[:, 0].float().mean() < 0.6


# --- text in the ViT ----------------------------------------------------------------------------------------------
def test_padded_text_tokens_do_not_change_patch_outputs():
    model, cfg = _semmim()
    model.eval()
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 32, 32, generator=gen)
    text = torch.randn(2, 5, cfg.model.text.width, generator=gen)
    mask = torch.ones(2, 5, dtype=torch.long)
    padded = torch.cat([text, 100 * torch.randn(2, 3, cfg.model.text.width, generator=gen)], 1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], 1)
    patch_mask = torch.zeros(2, 16, dtype=torch.bool)
    patch_mask[:, :5] = True
    with torch.no_grad():
        _, short = model.encode_image_text(image, patch_mask, text, mask)
        _, long = model.encode_image_text(image, patch_mask, padded, padded_mask)
        _, unmasked = model.encode_image_text(image, patch_mask, padded, torch.ones_like(padded_mask))
    assert torch.allclose(short, long, atol=1e-5)
    assert not torch.allclose(short, unmasked, atol=1e-3)  # without the key-padding mask the padding would leak


def test_text_enters_only_the_last_n_blocks():
    model, cfg = _semmim("method.semmim.text_layers=1")
    vit = model.backbone.vision
    calls = []
    hooks = [blk.register_forward_hook(lambda mod, args, out, i=i: calls.append((i, args[0].shape[1])))
             for i, blk in enumerate(vit.blocks)]
    text = torch.randn(2, 7, cfg.model.text.width)
    with torch.no_grad():
        model.encode_image_text(torch.randn(2, 3, 32, 32), None, text, torch.ones(2, 7), free=False)
    for h in hooks:
        h.remove()
    assert calls == [(0, 17), (1, 17 + 7)]  # 1 + 16 image tokens; the text joins block 1 of 2 only


# --- prefix language modeling ------------------------------------------------------------------------------------
def test_caption_splits_into_prefix_and_suffix():
    ids = torch.tensor([[2, 10, 11, 12, 3, 0, 0], [2, 20, 3, 0, 0, 0, 0], [2, 30, 31, 32, 33, 34, 3]])
    mask = (ids != 0).long()
    words = split_points(mask, "ratio", 0.5)
    assert words.tolist() == [1, 0, 2]
    prefix, prefix_mask, suffix, suffix_mask = split_caption(ids, mask, words)
    assert prefix.tolist() == [[2, 10, 3, 0, 0, 0, 0], [2, 3, 0, 0, 0, 0, 0], [2, 30, 31, 3, 0, 0, 0]]
    assert suffix.tolist() == [[2, 11, 12, 3, 0, 0, 0], [2, 20, 3, 0, 0, 0, 0], [2, 32, 33, 34, 3, 0, 0]]
    assert torch.equal(prefix_mask, (prefix != 0).long()) and torch.equal(suffix_mask, (suffix != 0).long())
    random = split_points(mask, "random", 0.0, torch.tensor([0.99, 0.5, 0.0]))
    assert random.tolist() == [2, 0, 0]  # at most k - 1 words: the suffix keeps one


def test_plm_loss_is_the_cross_entropy_of_the_suffix_tokens_only():
    model, _ = _semmim("method.semmim.plm.split=ratio", "method.semmim.plm.prefix_ratio=0.5")
    batch = _batch(pad=2)
    from vlpt.methods import steps
    f = steps.features(model, batch)
    loss = model.plm(f, batch, 0)
    ids, mask = batch["text_ids"], batch["text_mask"]
    prefix, prefix_mask, suffix, suffix_mask = split_caption(ids, mask, split_points(mask, "ratio", 0.5))
    context = model.fuse(f.image_tokens, model.backbone.encode_text(prefix, prefix_mask), prefix_mask)
    logits = model.decoder(suffix, suffix_mask, context, prefix_mask)
    terms = []
    for b in range(len(ids)):
        n, k = int(mask[b].sum()), int(split_points(mask, "ratio", 0.5)[b])
        targets = ids[b, 1 + k:n]  # the suffix words and [SEP]: the caption after its prefix
        terms.append(F.cross_entropy(logits[b, :len(targets)], targets, reduction="sum"))
        assert torch.equal(suffix[b, 1:1 + len(targets)], targets)
    count = sum(int(mask[b].sum()) - 1 - int(split_points(mask, "ratio", 0.5)[b]) for b in range(len(ids)))
    assert torch.allclose(loss, sum(terms) / count, atol=1e-5)


# --- the objectives against their formulas -----------------------------------------------------------------------
def test_eq2_and_eq3_against_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    s, t, c = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen), torch.randn(1, 8, generator=gen)
    direct = -(((t - c) / 0.04).softmax(-1) * (s / 0.1).log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(cls_agreement_loss(s, t, c, 0.1, 0.04), direct)
    sp, tp = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    ce = -((tp / 0.04).softmax(-1) * (sp / 0.1).log_softmax(-1)).sum(-1)
    assert torch.allclose(patch_mim_loss(sp, tp, mask, None, 0.1, 0.04), ce[mask].mean())


# --- data, presets, ablations ------------------------------------------------------------------------------------
def test_the_pipeline_provides_a_second_augmented_view(shapes_data, tmp_path):
    from vlpt.data.loader import load_pairs, train_loader
    from vlpt.data.tokenizer import tokenizer_for
    cfg = load_config(PRESET, [*SMALL, f"data.root={shapes_data}", f"train.out={tmp_path}"])
    needs = methods.registry.get("semmim").batch_needs(cfg.method)
    assert needs == {"mlm", "image_view2"}
    data = load_pairs(shapes_data / "pretrain.json")
    tokenizer = tokenizer_for(cfg, (r["caption"] for r in data), tmp_path)
    first = next(iter(train_loader(cfg, data, tokenizer, needs)))
    again = next(iter(train_loader(cfg, data, tokenizer, needs)))
    assert first["image_view2"].shape == first["image"].shape
    assert not torch.equal(first["image_view2"], first["image"]) and torch.equal(first["image_view2"],
                                                                                  again["image_view2"])
    assert "image_view2" not in next(iter(train_loader(cfg, data, tokenizer, {"mlm"})))


def test_base_preset_is_the_papers():
    cfg = load_config("configs/pretrain/semmim_base.yaml")
    v, t, o, s = cfg.model.vision, cfg.model.text, cfg.optim, cfg.method.semmim
    assert (v.image_size, v.patch_size, v.width, v.depth) == (224, 16, 768, 12)  # l.135
    assert (t.text_layers, t.fusion_layers, s.plm.decoder_layers) == (6, 6, 12)
    assert (cfg.data.batch_size * 8, o.weight_decay, o.warmup_steps) == (1024, 0.02, 1000)
    assert (o.lr, o.module_lr, o.min_lr, o.module_min_lr) == (1e-4, {"backbone.vision": 1e-5}, 1e-6,
                                                              {"backbone.vision": 1e-6})
    assert (s.head.codes, s.mask_ratio, s.text_layers, s.masking, s.mim_target) == (1024, 0.3, 1, "text", "own")
    assert cfg.train.steps == math.ceil(5_100_000 / 1024) * 20  # 20 epochs of the 4M set's 5.1M pairs (l.127)


@pytest.mark.parametrize("over", [["method.semmim.mim_target=pixels"], ["method.semmim.mim_target=tokens"],
                                  ["method.semmim.masking=random"], ["method.semmim.text_layers=0"],
                                  ["method.semmim.text_layers=2"], ["method.semmim.views=prose"],
                                  ["method.semmim.head.centering=shared"], ["method.losses=[itc,itm,mlm,plm]"]])
def test_ablation_keys_train(over):
    model, cfg = _semmim(*over)
    out = model(_batch(pad=1), 0)
    assert set(cfg.method.losses) <= set(out) and all(torch.isfinite(out[k]) for k in cfg.method.losses)
    sum(out[k] for k in cfg.method.losses).backward()
    if "patch" not in cfg.method.losses:
        assert model.may_leave_parameters_unused()


def test_semmim_trains_lowers_its_loss_and_serves_retrieval(shapes_data, tmp_path):
    from vlpt.engine.checkpoint import load_method
    from vlpt.engine.logging import read_metrics
    from vlpt.pretrain import pretrain as train
    from vlpt.tasks import retrieval

    cfg = load_config(PRESET, [*SMALL, f"data.root={shapes_data}", f"train.out={tmp_path}", "train.steps=24",
                               "train.log_every=4", "optim.lr=1e-3", "method.itm_easy_steps=0"])
    rows = read_metrics(train(cfg))
    names = ("itc", "mlm", "cls", "patch", "plm")
    first, last = rows[0], rows[-1]
    assert sum(last[n] for n in names) < sum(first[n] for n in names)
    assert last["plm"] < first["plm"] and last["patch"] < first["patch"]
    model, cfg, tokenizer = load_method(tmp_path)
    assert model.centers["cls"].value.abs().sum() > 0  # the centre came back with the checkpoint
    metrics = retrieval.evaluate(model, shapes_data / "retrieval_test.json", shapes_data, tokenizer,
                                 image_size=cfg.model.vision.image_size, max_len=cfg.model.text.max_len, k=4,
                                 batch_size=8, device=torch.device("cpu"), num_workers=0)
    assert 0 <= metrics["img_r1"] <= 100


def test_visualize_masking_draws_text_guided_and_random_masks(shapes_data, tmp_path, capsys):
    from vlpt.cli import main
    from vlpt.engine.checkpoint import load_method
    from vlpt.pretrain import pretrain as train
    from vlpt.viz.masking import masking_rows

    out = tmp_path / "run"
    train(load_config(PRESET, [*SMALL, f"data.root={shapes_data}", f"train.out={out}", "train.steps=1"]))
    main(["visualize", "masking", "--checkpoint", str(out), "--out", str(tmp_path / "m.png"), "--n", "3",
          "--device", "cpu"])
    assert (tmp_path / "m.png").stat().st_size > 0 and "text-guided" in capsys.readouterr().out
    model, cfg, tokenizer = load_method(out)
    rows = masking_rows(model, tokenizer, torch.randn(3, 3, 32, 32), ["a red circle", "a blue square", "a"],
                        cfg.model.text.max_len)
    k = round(cfg.method.semmim.mask_ratio * 16)
    assert rows["guided"].shape == rows["random"].shape == (3, 4, 4)
    assert (rows["guided"].flatten(1).sum(1) == k).all() and (rows["random"].flatten(1).sum(1) == k).all()


def test_compare_methods_runs_semmim_rows(shapes_data, tmp_path, capsys):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import compare_methods
    assert {"semmim", "semmim:no-mim", "semmim:pixels", "semmim:tokens", "semmim:random-mask", "semmim:ratio-0.15",
            "semmim:ratio-0.45", "semmim:text-none", "semmim:text-all"} <= set(compare_methods.ROWS)
    compare_methods.main(["--data", str(shapes_data), "--rows", "semmim", "semmim:tokens", "--steps", "2",
                          "--device", "cpu", "--out", str(tmp_path), *SMALL])
    out = capsys.readouterr().out
    assert "| semmim |" in out and "| semmim:tokens |" in out

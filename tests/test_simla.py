"""SIMLA: the single stream (text-only mode never reads cross-attention), pseudo-label keywords against a direct top-k,
the PSL loss against Eq. 8-9, MIM targets from a frozen tokenizer, BEiT block masks, the dVAE loader, pretrained BERT in
one stack, the momentum copy, and short runs through training, retrieval and Grad-CAM."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import METHODS, TINY, pair_batch
from vlpt import methods
from vlpt.config import load_config
from vlpt.data.masking import IGNORE, mask_image_blocks
from vlpt.errors import VlptError
from vlpt.models.visual_tokens import DVAEEncoder, PatchKMeans, VisualTokens, load_dvae_encoder
from vlpt.objectives.masked_language import mlm_loss
from vlpt.objectives.pseudo_label import keyword_positions, keyword_targets, psl_loss

VOCAB = 40
PRESET = "configs/pretrain/simla_tiny.yaml"
SMALL = [*TINY, *METHODS["simla"].extra]  # DDP, FSDP, resume, compile, checkpointing: test_parallel.py


def _simla(*over):
    cfg = load_config(PRESET, [*SMALL, *over])
    torch.manual_seed(0)
    return methods.build(cfg, VOCAB), cfg


def _batch(b=4, length=10, seed=0, pad=0):
    return pair_batch(VOCAB, b, length, seed, pad)


# --- the single stream -----------------------------------------------------------------------------------------------
def test_one_stack_with_cross_attention_in_every_layer_and_no_text_layers_of_its_own():
    model, cfg = _simla()
    stack = model.backbone.fusion.layers
    assert len(stack) == cfg.model.text.text_layers + cfg.model.text.fusion_layers
    assert all(layer.cross is not None for layer in stack) and len(model.backbone.text.layers) == 0
    assert model.backbone.blocks() == [*model.backbone.vision.blocks, *stack]


def test_text_only_mode_never_touches_cross_attention_weights():
    model, _ = _simla()
    batch = _batch(pad=2)
    hidden, feat = model.encode_text(batch["text_ids"], batch["text_mask"])
    feat.square().sum().backward()
    for layer in model.backbone.fusion.layers:
        assert all(p.grad is None or not p.grad.any() for p in layer.cross.parameters())
        assert layer.attention.query.weight.grad.abs().sum() > 0 and layer.fc1.weight.grad.abs().sum() > 0
    # and the multimodal pass does read them
    model.zero_grad(set_to_none=True)
    tokens, _ = model.encode_image(batch["image"])
    model.itm_logits(tokens, hidden.detach(), batch["text_mask"]).sum().backward()
    assert all(layer.cross.key.weight.grad.abs().sum() > 0 for layer in model.backbone.fusion.layers)


def test_text_hidden_is_what_fuse_reads_and_kv_reuse_gives_the_same_itm():
    model, _ = _simla()
    model.eval()
    batch = _batch()
    hidden, _ = model.encode_text(batch["text_ids"], batch["text_mask"])
    tokens, _ = model.encode_image(batch["image"])
    plain = model.itm_logits(tokens, hidden, batch["text_mask"])
    kv = model.backbone.context_kv(image_tokens=tokens)
    assert torch.allclose(model.itm_logits(None, hidden, batch["text_mask"], **kv), plain, atol=1e-5)
    from vlpt.methods.simla import grounding_layer_of
    assert [grounding_layer_of(d) for d in (12, 6, 4, 2)] == [7, 3, 2, 0]  # the 8th of 12 layers, scaled
    assert model.grounding_layer() == grounding_layer_of(len(model.backbone.fusion.layers))


def test_pretrained_bert_loads_every_layer_into_the_one_stack_and_its_mlm_head(minilm_mlm):
    from safetensors.torch import load_file

    bert = load_file(minilm_mlm / "model.safetensors")
    cfg = load_config(PRESET, [f"model.text.pretrained={minilm_mlm}", "model.text.width=384", "model.text.heads=12",
                               "model.text.intermediate=1536", "model.text.text_layers=3", "model.text.fusion_layers=3",
                               "method.simla.tokens.codes=16"])
    model = methods.build(cfg, bert["bert.embeddings.word_embeddings.weight"].shape[0])
    stack = model.backbone.fusion.layers
    assert len(stack) == 6
    for i in range(6):
        assert torch.equal(stack[i].attention.query.weight, bert[f"bert.encoder.layer.{i}.attention.self.query.weight"])
        assert torch.equal(stack[i].fc2.weight, bert[f"bert.encoder.layer.{i}.output.dense.weight"])
    assert torch.equal(model.backbone.text.embeddings.word.weight, bert["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(model.mlm_head.dense.weight, bert["cls.predictions.transform.dense.weight"])
    # the teacher starts as the loaded student
    assert torch.equal(model.teacher["backbone"].fusion.layers[5].fc2.weight, stack[5].fc2.weight)


# --- pseudo-label keywords -------------------------------------------------------------------------------------------
def _attention():
    """(2,2,6,6) probabilities whose [CLS] rows favour [CLS], [SEP] and padding most, then known words."""
    a = torch.full((2, 2, 6, 6), 0.01)
    # row 0, head 0: CLS .30, w1 .05, w2 .20, w3 .10, SEP .25 (length 5, position 5 is padding with .09)
    a[0, 0, 0] = torch.tensor([0.30, 0.05, 0.20, 0.10, 0.25, 0.09])
    a[0, 1, 0] = torch.tensor([0.30, 0.15, 0.02, 0.14, 0.38, 0.01])
    a[1, 0, 0] = torch.tensor([0.50, 0.10, 0.05, 0.07, 0.08, 0.20])  # full length: SEP at 5
    a[1, 1, 0] = torch.tensor([0.50, 0.02, 0.09, 0.08, 0.11, 0.20])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    return a, mask


def test_mean_keywords_are_the_direct_top_k_of_the_cls_row_without_special_tokens():
    a, mask = _attention()
    positions, valid = keyword_positions(a, mask, k=2, heads="mean")
    for b in range(2):
        row = a[b, :, 0].mean(0)
        length = int(mask[b].sum())
        words = list(range(1, length - 1))  # no [CLS] (0), [SEP] (length - 1), padding
        expected = sorted(words, key=lambda i: -row[i].item())[:2]
        assert positions[b].tolist() == expected and valid[b].all()
    assert positions.tolist() == [[3, 2], [4, 3]]  # means: w3 .12 > w2 .11 > w1 .10; w4 .095 > w3 .075


def test_vote_keywords_count_each_heads_top_k():
    a, mask = _attention()
    positions, valid = keyword_positions(a, mask, k=1, heads="vote")
    # k = 1, sample 0: head 0's top word is 2, head 1's is 1: one vote each, the mean breaks the tie (2: .11 > 1: .10);
    # sample 1: head 0 -> 1, head 1 -> 4, broken by the mean (4: .095 > 1: .06)
    assert positions[:, 0].tolist() == [2, 4] and valid.all()
    # k = 2, sample 0: heads {2, 3} and {1, 3}: 3 has two votes, then 2 (mean .11) before 1 (.10);
    # sample 1: heads {1, 4} and {4, 2}: 4 has two, then 2 (.07) before 1 (.06)
    positions, _ = keyword_positions(a, mask, k=2, heads="vote")
    assert positions.tolist() == [[3, 2], [4, 2]]


def test_short_captions_have_fewer_valid_keywords_and_targets_skip_them():
    a, mask = _attention()
    positions, valid = keyword_positions(a, mask, k=4, heads="mean")
    assert valid.sum(1).tolist() == [3, 4]
    ids = torch.tensor([[2, 7, 8, 9, 3, 0], [2, 10, 11, 12, 13, 3]])
    targets = keyword_targets(ids, positions, valid, VOCAB)
    assert targets[0].nonzero().flatten().tolist() == [7, 8, 9]
    assert targets[1].nonzero().flatten().tolist() == [10, 11, 12, 13]
    assert targets[:, [0, 2, 3]].sum() == 0  # [PAD], [CLS], [SEP] never a pseudo-label


def test_method_pseudo_labels_are_the_top_k_of_its_captured_last_layer_attention():
    from vlpt.models.text import capture_attention
    model, _ = _simla("method.simla.psl.heads=mean", "method.simla.psl.k=3")
    model.eval()
    batch = _batch(pad=3)
    ids, mask = batch["text_ids"], batch["text_mask"]
    tokens, _ = model.encode_image(batch["image"], teacher=True)
    positions, valid = model.pseudo_labels(tokens, ids, mask, teacher=True)
    backbone = model.teacher["backbone"]
    with capture_attention(backbone.fusion.layers[-1].attention) as (attention,):
        backbone.fuse(tokens, backbone.encode_text(ids, mask), mask)
    row = attention.probs[:, :, 0].mean(1)
    for b in range(len(ids)):
        length = int(mask[b].sum())
        expected = sorted(range(1, length - 1), key=lambda i: -row[b, i].item())[:3]
        assert positions[b].tolist() == expected and valid[b].all()
        assert not set(ids[b, positions[b]].tolist()) & {0, 2, 3}


def test_psl_loss_equals_eq8_and_eq9():
    gen = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(3, VOCAB, generator=gen), torch.randn(3, VOCAB, generator=gen)
    y = (torch.rand(3, VOCAB, generator=gen) < 0.1).float()

    def bce(p, target):  # -(1/V) sum_i target_i log sigma(p_i) + (1 - target_i) log(1 - sigma(p_i)), batch mean
        s = torch.sigmoid(p)
        return -(target * s.log() + (1 - target) * (1 - s).log()).sum(1).div(VOCAB).mean()

    assert torch.allclose(psl_loss(logits, y), bce(logits, y), atol=1e-6)
    alpha = 0.3
    eq9 = (1 - alpha) * bce(logits, y) + alpha * bce(logits, torch.sigmoid(teacher))
    assert torch.allclose(psl_loss(logits, y, teacher, alpha), eq9, atol=1e-6)


# --- MIM -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_block_masks_are_rectangles_up_to_the_ratio(seed):
    mask = mask_image_blocks(16, (14, 14), 0.4, torch.Generator().manual_seed(seed))
    assert mask.shape == (16, 196) and mask.dtype == torch.bool
    counts = mask.sum(1)
    assert (counts <= round(0.4 * 196)).all() and (counts >= 0.8 * 0.4 * 196).all()
    assert torch.equal(mask, mask_image_blocks(16, (14, 14), 0.4, torch.Generator().manual_seed(seed)))
    assert not (mask == mask[:1]).all()
    # blocks, not scattered patches: all but the last small fill-ins have a masked 4-neighbour
    grid = mask.view(16, 14, 14).float()
    neighbours = F.conv2d(grid[:, None], torch.tensor([[[[0., 1, 0], [1, 0, 1], [0, 1, 0]]]]), padding=1)[:, 0]
    assert ((neighbours > 0) & mask.view(16, 14, 14)).sum() >= 0.98 * mask.sum()


def _dvae_file(tmp_path, codes=16):
    torch.manual_seed(1)
    encoder = DVAEEncoder(hidden=8, blocks_per_group=1, vocab=codes)
    path = tmp_path / "encoder.pt"
    torch.save(encoder.state_dict(), path)
    return encoder, path


def test_mim_targets_come_from_the_frozen_tokenizer_and_no_gradient_reaches_it(tmp_path):
    reference, path = _dvae_file(tmp_path)
    model, _ = _simla("method.simla.tokens.source=dvae", f"method.simla.tokens.path={path}")
    batch = _batch()
    image = batch["image"]
    f = __import__("vlpt.methods.steps", fromlist=["features"]).features(model, batch)
    loss = model.mim(f, batch, step=5)
    tokenizer = model.visual_tokens.external(image.device)
    assert all(not p.requires_grad for p in tokenizer.parameters())
    # the targets: the dVAE's argmax on the image resized to 8 x the patch grid, as the loaded file computes it
    from vlpt.data.transforms import denormalize
    pixels = F.interpolate(denormalize(image), size=(32, 32), mode="bilinear", antialias=True).clamp(0, 1)
    direct = reference(pixels).argmax(1).flatten(1)
    assert torch.equal(model.visual_tokens(image), direct)
    patch_mask = model.block_mask(len(image), 5, image.device)
    logits = model.mim_logits(image, patch_mask, f.text_hidden, f.text_mask)
    with torch.no_grad():
        teacher = model.mim_logits(image, patch_mask, model.teacher["backbone"].encode_text(batch["text_ids"],
                                   f.text_mask), f.text_mask, teacher=True)
    expected = mlm_loss(logits, direct.masked_fill(~patch_mask, IGNORE), teacher, model.alpha(5), patch_mask.sum())
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert all(p.grad is None for p in tokenizer.parameters())
    assert model.mim_head.weight.grad.abs().sum() > 0 and model.backbone.vision.mask_token.grad.abs().sum() > 0
    assert "visual_tokens" not in "".join(model.state_dict())  # the dVAE is not saved in checkpoints


def test_mim_depends_on_the_caption():
    model, _ = _simla()
    batch = _batch()
    patch_mask = model.block_mask(4, 0, "cpu")
    hidden, _ = model.encode_text(batch["text_ids"], batch["text_mask"])
    a = model.mim_logits(batch["image"], patch_mask, hidden, batch["text_mask"])
    b = model.mim_logits(batch["image"], patch_mask, hidden.flip(0), batch["text_mask"])
    assert not torch.allclose(a, b)


def test_dvae_loader_round_trips_a_saved_random_encoder(tmp_path):
    encoder, path = _dvae_file(tmp_path)
    loaded = load_dvae_encoder(path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x), encoder(x)) and loaded(x).shape == (2, 16, 4, 4)


def test_dvae_loader_reads_the_dall_e_packages_encoder_and_its_pickle(tmp_path):
    dall_e = pytest.importorskip("dall_e")
    torch.manual_seed(0)
    theirs = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512, use_mixed_precision=False)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = theirs(dall_e.map_pixels(x))
    torch.save(theirs.state_dict(), tmp_path / "state.pt")
    torch.save(theirs, tmp_path / "encoder.pkl")  # the released file's form: a pickled module
    for name in ("state.pt", "encoder.pkl"):
        ours = load_dvae_encoder(tmp_path / name)
        assert ours.vocab == 512
        assert torch.allclose(ours(x), expected, atol=1e-5)


def test_dvae_loader_rejects_a_wrong_file_in_one_line(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    (tmp_path / "notes.txt").write_text("not weights")
    for name in ("other.pt", "notes.txt"):
        with pytest.raises(VlptError) as err:
            load_dvae_encoder(tmp_path / name)
        assert "is not a DALL-E dVAE encoder" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(VlptError, match="not found"):
        load_dvae_encoder(tmp_path / "missing.pkl")


def test_kmeans_tokens_are_the_nearest_centroid_and_fit_on_the_first_batch(tmp_path):
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(4, 3, 32, 32, generator=gen)
    tokens = VisualTokens("kmeans", "", 8, (4, 4), 8)
    first = tokens(image)
    assert bool(tokens.kmeans.fitted) and first.shape == (4, 16)
    from vlpt.objectives.masked_image import patchify
    distances = torch.cdist(patchify(image, 8), tokens.kmeans.codebook[None].expand(4, -1, -1))
    assert torch.equal(first, distances.argmin(-1))
    path = tokens.kmeans.save(tmp_path / "tok.safetensors")
    again = VisualTokens("kmeans", str(path), 8, (4, 4), 8)
    assert torch.equal(again(image), first)
    with pytest.raises(VlptError, match="16 codes"):
        VisualTokens("kmeans", str(path), 16, (4, 4), 8)(image)


# --- the momentum copy and training --------------------------------------------------------------------------------
def test_momentum_copy_gets_no_gradient_and_follows_the_student():
    model, _ = _simla()
    batch = _batch()
    out = model(batch, 3)
    assert set(out) == {"itc", "itm", "mlm", "mim", "psl"} and all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    teacher = list(model.teacher.parameters())
    assert {name.split(".")[0] for name in model.teacher.copies} >= {"mim_head", "concept_head"}
    assert all(not p.requires_grad and p.grad is None for p in teacher)
    assert model.concept_head.weight.grad.abs().sum() > 0
    before = model.teacher["concept_head"].weight.clone()
    with torch.no_grad():
        model.concept_head.weight.add_(1.0)
    model.after_step(0)
    m = model.cfg.method.momentum
    assert torch.allclose(model.teacher["concept_head"].weight, m * before + (1 - m) * model.concept_head.weight)


@pytest.mark.parametrize("losses", [["itm"], ["itm", "itc"], ["itm", "itc", "mlm"], ["itm", "itc", "mlm", "mim"]])
def test_table1_rows_compute_only_their_losses(losses):
    model, _ = _simla(f"method.losses=[{','.join(losses)}]")
    assert set(model(_batch(), 0)) == set(losses) and model.may_leave_parameters_unused()


def test_simla_trains_lowers_its_loss_and_serves_retrieval_and_gradcam(shapes_data, tmp_path):
    from vlpt.engine.checkpoint import load_method
    from vlpt.engine.logging import read_metrics
    from vlpt.pretrain import pretrain as train
    from vlpt.tasks import retrieval
    from vlpt.viz.gradcam import gradcam

    cfg = load_config(PRESET, [*SMALL, f"data.root={shapes_data}", f"train.out={tmp_path}", "train.steps=24",
                               "train.log_every=4", "optim.lr=1e-3", "method.itm_easy_steps=0"])
    rows = read_metrics(train(cfg))
    names = ("itc", "mlm", "mim", "psl")
    assert all(set(names) | {"itm"} <= set(r) for r in rows)
    first, last = rows[0], rows[-1]
    assert sum(last[n] for n in names) < sum(first[n] for n in names)
    assert last["mim"] < first["mim"] and last["psl"] < first["psl"]
    model, cfg, tokenizer = load_method(tmp_path)
    assert bool(model.visual_tokens.kmeans.fitted)  # the first batch's codebook came back with the checkpoint
    metrics = retrieval.evaluate(model, shapes_data / "retrieval_test.json", shapes_data, tokenizer,
                                 image_size=cfg.model.vision.image_size, max_len=cfg.model.text.max_len, k=4,
                                 batch_size=8, device=torch.device("cpu"), num_workers=0)
    assert 0 <= metrics["img_r1"] <= 100
    ids, mask = tokenizer(["a red circle"], cfg.model.text.max_len)
    image = torch.randn(1, 3, 32, 32)
    cams = gradcam(model, model.backbone.encode_image(image), model.backbone.encode_text(ids, mask), mask,
                   model.grounding_layer())
    assert cams.shape == (1, ids.shape[1], 4, 4) and math.isfinite(cams.sum().item())


def test_visualize_pseudo_labels_draws_keywords_from_the_caption(shapes_data, tmp_path, capsys):
    from vlpt.cli import main
    from vlpt.engine.checkpoint import load_method
    from vlpt.pretrain import pretrain as train
    from vlpt.viz.pseudo_labels import pseudo_label_rows

    out = tmp_path / "run"
    train(load_config(PRESET, [*SMALL, f"data.root={shapes_data}", f"train.out={out}", "train.steps=1"]))
    main(["visualize", "pseudo-labels", "--checkpoint", str(out), "--out", str(tmp_path / "pl.png"), "--n", "3",
          "--device", "cpu", "--gradcam"])
    assert (tmp_path / "pl.png").stat().st_size > 0 and "keywords" in capsys.readouterr().out
    model, cfg, tokenizer = load_method(out)
    captions = ["a small red circle at the top", "a blue square"]
    rows = pseudo_label_rows(model, tokenizer, torch.randn(2, 3, 32, 32), captions, cfg.model.text.max_len)
    for row, caption in zip(rows, captions):
        assert 1 <= len(row["keywords"]) <= 4 and all(w in caption.split() for w in row["keywords"])
        assert len(row["predicted"]) == 5 and not {"[CLS]", "[SEP]", "[PAD]"} & {w for w, _ in row["predicted"]}
    from vlpt.viz.pseudo_labels import concept_gradcam
    cams = concept_gradcam(model, torch.randn(2, 3, 32, 32), torch.tensor([rows[0]["predicted_ids"][0]] * 2))
    assert cams.shape == (2, 4, 4) and (cams >= 0).all() and cams.amax() <= 1 + 1e-6
    assert all(p.grad is None for p in model.parameters())  # the map takes the input's gradient only


def test_compare_methods_runs_table1_rows(shapes_data, tmp_path, capsys):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import compare_methods
    assert [r for r in compare_methods.ROWS if r.startswith("simla")][:5] == [
        "simla:itm", "simla:itm+itc", "simla:itm+itc+mlm", "simla:itm+itc+mlm+mim", "simla"]
    compare_methods.main(["--data", str(shapes_data), "--rows", "simla:itm", "simla", "--steps", "2",
                          "--device", "cpu", "--out", str(tmp_path), *SMALL])
    out = capsys.readouterr().out
    assert "| simla:itm |" in out and "| simla |" in out


def test_tokenizer_train_image_writes_a_codebook_the_preset_reads(shapes_data, tmp_path, capsys):
    from vlpt.cli import main
    path = tmp_path / "tok.safetensors"
    main(["tokenizer", "train-image", "--images", str(shapes_data / "pretrain.json"), "--out", str(path),
          "--codes", "16", "--patch", "8", "--image-size", "32", "--iterations", "5"])
    assert "16 codes" in capsys.readouterr().out
    model, _ = _simla(f"method.simla.tokens.path={path}")
    tokens = model.visual_tokens(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 16) and bool(model.visual_tokens.kmeans.fitted)
    saved = PatchKMeans(16, 8)
    saved.load(path)
    assert torch.equal(model.visual_tokens.kmeans.codebook, saved.codebook)


def test_base_preset_has_the_papers_settings():
    # SIMLA Sec. 2.5: 256 px crops + RandAugment without colour ops, batch 512, 30 epochs of the 4M (5.1M) pairs, AdamW
    # wd 0.02, lr 1e-4 cosine to 1e-5, momentum 0.995, queue 65,536, alpha 0 -> 0.4 over the first epoch; a 12-layer
    # stack on ViT-B/16; BEiT's 40 % masking, DALL-E's 8,192 visual tokens; PSL k = 4 (appendix 3)
    cfg = load_config("configs/pretrain/simla_base.yaml", [])
    v, t, m, o = cfg.model.vision, cfg.model.text, cfg.method, cfg.optim
    assert (v.image_size, v.patch_size, v.width, v.depth) == (256, 16, 768, 12) and cfg.data.augment
    assert t.text_layers + t.fusion_layers == 12 and t.width == 768
    assert cfg.data.batch_size * 8 == 512 and abs(cfg.train.steps - 30 * 9960) < 9960 / 4
    assert (o.lr, o.min_lr, o.weight_decay) == (1e-4, 1e-5, 0.02)
    assert (m.momentum, m.queue_size, m.alpha, m.alpha_warmup_steps) == (0.995, 65536, 0.4, 9960)
    assert m.losses == ["itc", "itm", "mlm", "mim", "psl"] and m.loss_weights == {}
    s = m.simla
    assert (s.mim_ratio, s.mim_min_block, s.tokens.source, s.tokens.codes, s.psl.k) == (0.4, 16, "dvae", 8192, 4)

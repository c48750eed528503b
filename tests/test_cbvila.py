"""CB-ViLA: the quantiser's look-up and gradients, Eq. 3's terms, MIM on codeword indices, the reversed fusion's
shared weights, the codebook warm-up, dead-codeword restarts, and a short training run with its codebook picture."""
import json

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY, cli_error, config
from vlpt import methods
from vlpt.cli import main
from vlpt.config import load_config
from vlpt.data.masking import mask_tokens
from vlpt.engine.logging import read_metrics
from vlpt.pretrain import pretrain as train
from vlpt.objectives.codebook import VectorQuantizer
from vlpt.objectives.masked_image import codeword_mim_loss, pixel_mse

VOCAB = 40
PRESET = "pretrain/cbvila_tiny.yaml"


def _model(*over):
    cfg = load_config(f"configs/{PRESET}", [*TINY, "method.codebook.size=32", "method.cbvila.warmup_steps=0", *over])
    torch.manual_seed(0)
    return methods.build(cfg, VOCAB), cfg


def _batch(b=4, length=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (b, length), generator=gen)
    ids[:, 0], ids[:, -1] = 2, 3
    mlm_ids, mlm_labels = mask_tokens(ids, 0.3, 4, VOCAB, [0, 1, 2, 3, 4], gen)
    return {"image": torch.randn(b, 3, 32, 32, generator=gen), "text_ids": ids, "text_mask": torch.ones_like(ids),
            "image_id": torch.arange(b), "mlm_ids": mlm_ids, "mlm_labels": mlm_labels}


# --- the quantiser (Eq. 1, 3) --------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["gumbel", "straight_through"])
def test_quantiser_returns_the_nearest_codeword(estimator):
    torch.manual_seed(0)
    vq = VectorQuantizer(50, 8, estimator)
    v = torch.randn(3, 7, 8)
    q = vq(v)
    nearest = torch.cdist(v.reshape(-1, 8), vq.codewords).argmin(-1).view(3, 7)
    assert torch.equal(q.indices, nearest)
    assert torch.allclose(q.tokens, vq.codewords[nearest], atol=1e-6)        # forward values are the codewords
    assert torch.allclose(q.frozen_tokens, vq.codewords[nearest], atol=1e-6)


def test_codebook_and_commitment_terms_match_eq3_and_move_only_their_own_side():
    torch.manual_seed(0)
    vq = VectorQuantizer(20, 6)
    v = torch.randn(10, 6, requires_grad=True)
    q = vq(v)
    expected = ((vq.codewords[q.indices] - v) ** 2).mean()
    assert torch.allclose(q.codebook, expected) and torch.allclose(q.commitment, expected)
    q.codebook.backward(retain_graph=True)
    assert v.grad is None and vq.codewords.grad.abs().sum() > 0               # sg[v]: only codewords move
    vq.codewords.grad = None
    q.commitment.backward()
    assert vq.codewords.grad is None and v.grad.abs().sum() > 0               # sg[c]: only the encoder moves


def test_gumbel_estimator_gives_encoder_and_codebook_a_gradient():
    torch.manual_seed(0)
    vq = VectorQuantizer(20, 6, "gumbel", temperature=1.0)
    v = torch.randn(10, 6, requires_grad=True)
    (vq(v).tokens * torch.randn(10, 6)).sum().backward()
    assert v.grad.abs().sum() > 0 and vq.codewords.grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_gumbel_gradient_is_the_soft_lookups_and_the_forward_the_nearest_codeword(temperature):
    """The straight-through gumbel estimator against an oracle written here: the forward value is the nearest
    codeword; the encoder outputs get the gradient of the soft look-up softmax((g - ||v - c||^2 / d) / temperature) C,
    g being the gumbel noise the quantiser draws (reproduced from the same seed); the codewords get the soft look-up's
    gradient through the probabilities plus the look-up's own term at the one-hot assignment (the value used
    forward). The sg[C] tokens MIM reads give the encoder the same gradient and the codewords none."""
    n, k, d = 10, 20, 6
    torch.manual_seed(0)
    vq = VectorQuantizer(k, d, "gumbel", temperature=temperature)
    v = torch.randn(n, d, requires_grad=True)
    weight = torch.randn(n, d)                                                  # dL/dz_q of L = <z_q, weight>
    torch.manual_seed(1)
    q = vq(v)
    (q.tokens * weight).sum().backward()

    torch.manual_seed(1)
    gumbel = -torch.empty(n, k).exponential_().log()                            # the quantiser's only draw
    v_ref = v.detach().clone().requires_grad_(True)
    c_ref = vq.codewords.detach().clone().requires_grad_(True)
    distance = ((v_ref[:, None, :] - c_ref[None]) ** 2).mean(-1)                # (n, K)
    soft = torch.softmax((gumbel - distance) / temperature, dim=-1)
    (soft @ c_ref * weight).sum().backward()                                    # the soft look-up
    hard = F.one_hot(distance.argmin(-1), k).float()

    torch.testing.assert_close(q.tokens.detach(), hard @ c_ref.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(v.grad, v_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(vq.codewords.grad, c_ref.grad + (hard - soft.detach()).t() @ weight,
                               rtol=1e-4, atol=1e-6)
    assert v.grad.abs().amax() > 1e-3 and (c_ref.grad - soft.detach().t() @ weight).abs().amax() > 1e-3

    encoder = v.grad.clone()
    v.grad = vq.codewords.grad = None
    (q.frozen_tokens * weight).sum().backward()
    assert vq.codewords.grad is None
    torch.testing.assert_close(v.grad, encoder, rtol=1e-5, atol=1e-7)


def test_straight_through_copies_the_gradient_to_the_encoder_and_none_to_the_codebook():
    torch.manual_seed(0)
    vq = VectorQuantizer(20, 6, "straight_through")
    v = torch.randn(10, 6, requires_grad=True)
    weight = torch.randn(10, 6)
    (vq(v).tokens * weight).sum().backward()
    assert torch.allclose(v.grad, weight) and vq.codewords.grad is None


def test_frozen_tokens_send_no_gradient_to_the_codebook():
    torch.manual_seed(0)
    vq = VectorQuantizer(20, 6, "gumbel")
    v = torch.randn(10, 6, requires_grad=True)
    vq(v).frozen_tokens.sum().backward()
    assert vq.codewords.grad is None and v.grad.abs().sum() > 0


def test_dead_codewords_are_restarted_from_candidates_and_used_ones_kept():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 3)
    vq.last_used.fill_(0)
    before = vq.codewords.detach().clone()
    candidates = torch.arange(12.0).view(4, 3)
    counts = torch.tensor([2, 0, 1, 0])
    assert vq.restart_dead(counts, candidates, step=5, dead_after=10) == 0    # nothing idle for 10 steps yet
    assert torch.equal(vq.codewords.detach(), before) and vq.last_used.tolist() == [5, 0, 5, 0]
    assert vq.restart_dead(torch.tensor([1, 0, 0, 0]), candidates, step=10, dead_after=10) == 2
    assert torch.equal(vq.codewords[[1, 3]].detach(), candidates[[1, 3]])   # idle since step 0: replaced
    assert torch.equal(vq.codewords[[0, 2]].detach(), before[[0, 2]])       # used at step 10 and 5: kept
    assert vq.last_used.tolist() == [10, 10, 5, 10]


# --- objectives ----------------------------------------------------------------------------------------------------
def test_codeword_mim_loss_is_cross_entropy_over_masked_tokens_only():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 7), torch.randint(7, (2, 5))
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]]).bool()
    expected = F.cross_entropy(logits[mask], targets[mask])
    assert torch.allclose(codeword_mim_loss(logits, targets, mask), expected)
    targets2 = targets.clone()
    targets2[~mask] = (targets2[~mask] + 1) % 7                               # unmasked targets do not matter
    assert torch.allclose(codeword_mim_loss(logits, targets2, mask), expected)


def test_pixel_loss_is_the_mean_squared_error():
    pred, target = torch.zeros(2, 3, 4), torch.full((2, 3, 4), 2.0)
    assert pixel_mse(pred, target).item() == pytest.approx(4.0)


# --- the method ----------------------------------------------------------------------------------------------------
def test_reversed_fusion_is_the_fusion_encoder_itself():
    model, cfg = _model()
    albef = methods.build(load_config("configs/pretrain/albef_tiny.yaml", [*TINY, "method.losses=[itc,itm,mlm]"]),
                          VOCAB)
    extra = {n for n, _ in model.named_parameters()} - {n for n, _ in albef.named_parameters()}
    assert {n.split(".")[0] for n in extra} == {"quantizer", "code_position", "mask_token", "to_pixels", "mim_head"}
    out = model(_batch(), 0)
    out["pixel"].backward()
    cross = model.backbone.fusion.layers[0].cross
    assert cross.query.weight.grad.abs().sum() > 0 and cross.key.weight.grad.abs().sum() > 0  # image queries, text keys
    tokens = torch.randn(2, 16, cfg.model.text.width)
    text, mask = torch.randn(2, 5, cfg.model.text.width), torch.ones(2, 5, dtype=torch.long)
    before = model.decode(tokens, text, mask)
    with torch.no_grad():
        model.backbone.fusion.layers[0].cross.value.weight.mul_(2)                      # the weights ITM and MLM use
    assert not torch.allclose(model.decode(tokens, text, mask), before)


def test_mim_trains_the_encoders_but_not_the_codebook():
    model, _ = _model("method.losses=[itc,itm,mlm,pixel,codebook,mim]")
    out = model(_batch(), 0)
    out["mim"].backward()
    assert model.quantizer.codewords.grad is None or model.quantizer.codewords.grad.abs().sum() == 0
    assert model.backbone.vision.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.mim_head.weight.grad.abs().sum() > 0
    model.zero_grad()
    model(_batch(), 0)["pixel"].backward()                                     # the pixel loss does move codewords
    assert model.quantizer.codewords.grad.abs().sum() > 0


def test_straight_through_pixel_loss_moves_no_codeword_and_the_commitment_reaches_the_encoder():
    """CB-ViLA with VQ-VAE's straight-through copy: the pixel loss's gradient passes to the encoder but never to the
    codewords (only the codebook term moves them), and beta * commitment sends the encoder a gradient proportional
    to beta."""
    def grads(loss_name, beta):
        model, _ = _model("method.cbvila.estimator=straight_through", f"method.cbvila.beta={beta}",
                          "method.losses=[itc,itm,mlm,pixel,codebook]")
        model(_batch(), 0)[loss_name].backward()
        vit = model.backbone.vision.blocks[0].mlp.fc2.weight.grad
        return model.quantizer.codewords.grad, None if vit is None else vit.clone()

    codewords, vit = grads("pixel", 0.25)
    assert codewords is None or codewords.abs().sum() == 0
    assert vit.abs().sum() > 0
    codewords, quarter = grads("codebook", 0.25)
    assert codewords.abs().sum() > 0                                            # ||sg[v] - c||^2 moves them
    _, half = grads("codebook", 0.5)
    _, none = grads("codebook", 0.0)
    assert quarter.abs().sum() > 0 and (none is None or none.abs().sum() == 0)  # the encoder's gradient is beta's
    torch.testing.assert_close(half, 2 * quarter, rtol=1e-4, atol=1e-9)


def test_codebook_warmup_switches_mim_and_mlm_on_at_the_configured_step():
    model, _ = _model("method.cbvila.warmup_steps=3")
    assert set(model(_batch(), 2)) >= {"itc", "itm", "pixel", "codebook"}
    assert not {"mim", "mlm"} & set(model(_batch(), 2))
    assert {"mim", "mlm"} <= set(model(_batch(), 3))


def test_unused_codewords_restart_from_encoder_outputs_after_a_step():
    model, _ = _model("method.cbvila.dead_after=1")
    batch = _batch()
    before = model.quantizer.codewords.detach().clone()
    model(batch, 0)
    used = model._restart[0] > 0
    model.after_step(0)
    outputs = model.quantize(model.encode_image(batch["image"])[0])[0].detach().flatten(0, 1)
    after = model.quantizer.codewords.detach()
    gap = (after[:, None] - outputs[None]).abs().amax(-1).min(-1).values
    assert 0 < used.sum() < len(used)
    assert (gap[~used] < 1e-6).all()                       # every codeword step 0 left unused is an encoder output
    assert torch.equal(after[used], before[used])         # the used ones are kept
    off, _ = _model("method.cbvila.dead_after=0")
    before = off.quantizer.codewords.detach().clone()
    off(batch, 0)
    off.after_step(0)
    assert torch.equal(off.quantizer.codewords.detach(), before)


def test_cbvila_trains_logs_codebook_health_and_draws_its_codebook(shapes_data, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = config(shapes_data, out, "train.steps=30", "train.log_every=5", "method.codebook.size=64",
                 "method.cbvila.warmup_steps=10", "method.cbvila.dead_after=5", "optim.lr=1e-3", preset=PRESET)
    train(cfg)
    rows = read_metrics(out)
    assert "mim" not in rows[0] and "mim" in rows[-1]                        # joined after the warm-up
    assert rows[-1]["pixel"] < rows[0]["pixel"]
    assert rows[-1]["codebook_usage"] >= 0.05 * 64                           # not collapsed
    main(["visualize", "codebook", "--checkpoint", str(out), "--out", str(tmp_path / "cb.png"), "--codewords", "4",
          "--patches", "5", "--device", "cpu"])
    assert (tmp_path / "cb.png").stat().st_size > 0
    assert "codewords in use" in capsys.readouterr().out
    main(["evaluate", "retrieval", "--checkpoint", str(out), "--num-workers", "0", "--device", "cpu",
          "--out", str(tmp_path / "m.json")])
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert 0 < metrics["codebook_used"] <= 64 and metrics["codebook_used_fraction"] == metrics["codebook_used"] / 64


def test_visualize_codebook_rejects_a_method_without_one(shapes_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(config(shapes_data, out, "train.steps=1"))
    message = cli_error(["visualize", "codebook", "--checkpoint", str(out), "--out", str(tmp_path / "cb.png"),
                         "--device", "cpu"], capsys)
    assert "has no codebook" in message and "cbvila" in message

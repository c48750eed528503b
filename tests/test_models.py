"""Model components: momentum teacher, BERT layers against Hugging Face (all-MiniLM-L6-v2), attention masking,
the ViT and its weight loading, and one ALBEF training step on a tiny configuration."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlpt.config import TextConfig, VisionConfig, load_config
from vlpt.data.masking import IGNORE, mask_tokens
from vlpt.errors import VlptError
from vlpt.models.momentum import MomentumTeacher
from vlpt.models.text import Attention, FusionEncoder, MLMHead, TextEncoder, load_bert_weights
from vlpt.models.vision import PatchProjection, build_vit, load_vit_weights

torch.set_num_threads(min(2, torch.get_num_threads()))


# --- momentum teacher ------------------------------------------------------------------------------------------------

class Owner(nn.Module):
    def __init__(self, m: float):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5))
        self.teacher = MomentumTeacher({"a": self.a, "b": self.b}, m)

    def forward(self, x):
        return self.b(self.a(x)), self.teacher["b"](self.teacher["a"](x))


def test_momentum_update_is_exact_ema():
    torch.manual_seed(0)
    m = 0.9
    owner = Owner(m)
    for name in ("a", "b"):  # teacher and student start equal; make them differ
        for p, t in zip(getattr(owner, name).parameters(), owner.teacher[name].parameters()):
            assert torch.equal(p, t) and p is not t
            with torch.no_grad():
                p.add_(torch.randn_like(p))
    for _ in range(2):
        old = {n: p.detach().double().clone() for n, p in owner.teacher.named_parameters()}
        student = {n: p.detach().double().clone() for n, p in owner.named_parameters() if not n.startswith("teacher")}
        owner.teacher.update()
        for name, p in owner.teacher.named_parameters():
            s = student[name.removeprefix("copies.")]
            torch.testing.assert_close(p.double(), m * old[name] + (1 - m) * s, rtol=0, atol=1e-6)
            assert not torch.equal(p.double(), old[name])
        for name, p in owner.named_parameters():  # students untouched
            if not name.startswith("teacher"):
                assert torch.equal(p.double(), student[name])


def test_teacher_gets_no_gradient_and_is_saved():
    owner = Owner(0.99)
    for p in owner.teacher.parameters():
        assert not p.requires_grad
    student_out, teacher_out = owner(torch.randn(6, 4))
    (student_out * teacher_out).sum().backward()
    for name, p in owner.named_parameters():
        if name.startswith("teacher"):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    keys = set(owner.state_dict())
    students = {k for k in keys if not k.startswith("teacher.")}
    assert {"a.weight", "a.bias", "b.0.weight", "b.1.weight"} <= students
    assert {f"teacher.copies.{k}" for k in students} == keys - students  # each saved once, under the teacher
    # a loaded state restores the teacher's own weights
    clone = Owner(0.99)
    clone.load_state_dict(owner.state_dict())
    for (n, p), q in zip(owner.teacher.named_parameters(), clone.teacher.parameters()):
        assert torch.equal(p, q), n


# --- BERT layers against Hugging Face --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_state(minilm) -> dict[str, torch.Tensor]:
    return load_file(minilm / "model.safetensors")


def minilm_cfg(**kw) -> TextConfig:
    base = dict(width=384, heads=12, intermediate=1536, text_layers=6, fusion_layers=0, max_len=32, dropout=0.0)
    return TextConfig(**{**base, **kw})


SENTENCES = ["A red circle left of a blue square.",
             "two small green triangles",
             "The quick brown fox jumps over the lazy dog, again and again and again, until it is tired and "
             "wants to sleep under the old oak tree beside the quiet river.",
             "hi"]


def test_text_encoder_matches_huggingface_bert(minilm):
    transformers = pytest.importorskip("transformers")
    from vlpt.data.tokenizer import Tokenizer
    tok = Tokenizer(minilm / "vocab.txt")
    ids, mask = tok(SENTENCES, 32)
    assert (mask == 0).any() and (mask[2] == 1).all()  # padded rows and one truncated row
    hf_tok = transformers.BertTokenizerFast.from_pretrained(minilm)
    hf_ids = hf_tok(SENTENCES, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    assert torch.equal(ids, hf_ids["input_ids"]) and torch.equal(mask, hf_ids["attention_mask"])

    text = TextEncoder(30522, minilm_cfg()).eval()
    loaded = load_bert_weights(minilm, text)
    assert len(loaded) == 6 * 16 + 5  # every layer tensor and the embeddings (3 tables + LayerNorm)
    bert = transformers.BertModel.from_pretrained(minilm, attn_implementation="eager",
                                                  add_pooling_layer=False).eval()
    with torch.no_grad():
        ours = text(ids, mask)
        theirs = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    diff = (ours - theirs).abs()[valid].max().item()
    assert diff < 1e-4, diff
    assert theirs.abs()[valid].mean() > 0.1  # a real comparison, not of zeros


def test_fusion_encoder_loads_upper_layers_and_keeps_cross_attention(minilm, minilm_state):
    torch.manual_seed(0)
    cfg = minilm_cfg(text_layers=3, fusion_layers=3)
    text, fusion = TextEncoder(30522, cfg), FusionEncoder(cfg, context_width=48)
    cross_before = {n: p.detach().clone() for n, p in fusion.named_parameters() if ".cross." in n}
    loaded = load_bert_weights(minilm, text, fusion)
    assert not any(".cross." in n for n in loaded)
    names = {"attention.query": "attention.self.query", "attention.key": "attention.self.key",
             "attention.value": "attention.self.value", "attention.out": "attention.output.dense",
             "attention.norm": "attention.output.LayerNorm", "fc1": "intermediate.dense",
             "fc2": "output.dense", "norm": "output.LayerNorm"}
    for offset, encoder in ((0, text), (3, fusion)):
        for i in range(3):
            for ours, hf in names.items():
                for p in ("weight", "bias"):
                    got = encoder.get_parameter(f"layers.{i}.{ours}.{p}")
                    assert torch.equal(got, minilm_state[f"encoder.layer.{offset + i}.{hf}.{p}"]), (offset, i, ours)
    assert torch.equal(text.embeddings.word.weight, minilm_state["embeddings.word_embeddings.weight"])
    for n, p in fusion.named_parameters():
        if ".cross." in n:
            assert torch.equal(p, cross_before[n]), n
    cross = fusion.layers[0].cross
    assert cross.key.weight.shape == (384, 48)
    assert 0.015 < cross.query.weight.std().item() < 0.025 and (cross.query.bias == 0).all()  # BERT init


def test_load_bert_weights_with_too_many_layers_names_missing_key(minilm):
    cfg = minilm_cfg(text_layers=4, fusion_layers=3)
    with pytest.raises(VlptError, match=r"encoder\.layer\.6\.attention\.self\.query\.weight"):
        load_bert_weights(minilm, TextEncoder(30522, cfg), FusionEncoder(cfg, 384))
    with pytest.raises(VlptError, match=r"encoder\.layer\.6\."):
        load_bert_weights(minilm, TextEncoder(30522, minilm_cfg(text_layers=7)))


def test_mlm_head_loads_from_bert_for_masked_lm(minilm, minilm_mlm):
    transformers = pytest.importorskip("transformers")
    from vlpt.data.tokenizer import Tokenizer
    ids, mask = Tokenizer(minilm / "vocab.txt")(SENTENCES, 32)
    cfg = minilm_cfg()
    text, fusion, head = TextEncoder(30522, cfg).eval(), FusionEncoder(cfg, 384), MLMHead(384, 30522)
    loaded = load_bert_weights(minilm_mlm, text, fusion, head)
    assert [n for n in loaded if n.startswith("mlm_head.")] == [
        "mlm_head.bias", "mlm_head.dense.bias", "mlm_head.dense.weight", "mlm_head.norm.bias", "mlm_head.norm.weight"]
    assert len(loaded) == 6 * 16 + 5 + 5
    bert = transformers.BertForMaskedLM.from_pretrained(minilm_mlm, attn_implementation="eager").eval()
    with torch.no_grad():
        ours = head(text(ids, mask), text.embeddings.word.weight)
        theirs = bert(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    diff = (ours - theirs).abs()[valid].max().item()
    assert diff < 1e-4, diff
    assert theirs[valid].std() > 1.0  # the random head gives logits far from a zero-bias, unit-norm head's


def test_mlm_head_from_a_folder_without_one_warns_and_stays(minilm):
    cfg = minilm_cfg(text_layers=3, fusion_layers=3)
    text, fusion, head = TextEncoder(30522, cfg), FusionEncoder(cfg, 384), MLMHead(384, 30522)
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    with pytest.warns(UserWarning, match="MLM head stays freshly initialised"):
        loaded = load_bert_weights(minilm, text, fusion, head)
    assert loaded == load_bert_weights(minilm, text, fusion) and not any(n.startswith("mlm_head") for n in loaded)
    for n, p in head.named_parameters():
        assert torch.equal(p, before[n]), n


def hf_folder_like(source: Path, folder: Path, config: dict | None = None,
                   weights: dict[str, torch.Tensor] | None = None) -> Path:
    """A copy of a Hugging Face folder with config.json entries and the weights replaced."""
    import json
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**json.loads((source / "config.json").read_text()),
                                                    **(config or {})}))
    if weights is None:
        (folder / "model.safetensors").symlink_to(source / "model.safetensors")
    else:
        save_file(weights, str(folder / "model.safetensors"))
    return folder


def test_mlm_head_bias_under_the_decoder_name_and_incomplete_heads(minilm_mlm, tmp_path):
    state = load_file(minilm_mlm / "model.safetensors")
    cfg = minilm_cfg()
    head = MLMHead(384, 30522)
    renamed = {("cls.predictions.decoder.bias" if k == "cls.predictions.bias" else k): v for k, v in state.items()}
    loaded = load_bert_weights(hf_folder_like(minilm_mlm, tmp_path / "old", weights=renamed),
                               TextEncoder(30522, cfg), None, head)
    assert "mlm_head.bias" in loaded and torch.equal(head.bias, state["cls.predictions.bias"])
    partial = {k: v for k, v in state.items() if k != "cls.predictions.transform.dense.bias"}
    with pytest.raises(VlptError, match=r"cls\.predictions\.transform\.dense\.bias"):
        load_bert_weights(hf_folder_like(minilm_mlm, tmp_path / "partial", weights=partial),
                          TextEncoder(30522, cfg), None, MLMHead(384, 30522))


def test_mlm_head_needs_gelu(minilm_mlm, tmp_path):
    folder = hf_folder_like(minilm_mlm, tmp_path / "relu", config={"hidden_act": "relu"})
    with pytest.raises(VlptError, match="hidden_act='relu'"):
        load_bert_weights(folder, TextEncoder(30522, minilm_cfg()), None, MLMHead(384, 30522))


def test_load_bert_weights_errors_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_bert_weights(tmp_path, TextEncoder(10, TextConfig(width=8, heads=2, intermediate=16, text_layers=1)))


# --- attention masking -----------------------------------------------------------------------------------------------

def tiny_text_cfg(**kw) -> TextConfig:
    return TextConfig(**{**dict(width=16, heads=4, intermediate=32, text_layers=2, fusion_layers=2), **kw})


def test_padded_keys_do_not_influence_valid_positions():
    torch.manual_seed(0)
    attn = Attention(16, 4, 0.0).eval()
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    y = attn(x, mask=mask)
    x2 = x.clone()
    x2[0, 4:] = 10 * torch.randn(2, 16)
    y2 = attn(x2, mask=mask)
    torch.testing.assert_close(y2[0, :4], y[0, :4], rtol=0, atol=1e-6)
    torch.testing.assert_close(y2[1], y[1], rtol=0, atol=0)
    # without the mask the same change does reach the valid positions
    assert (attn(x2) - attn(x))[0, :4].abs().max() > 1e-3


def test_padded_tokens_do_not_influence_text_encoder_or_fusion():
    torch.manual_seed(1)
    cfg = tiny_text_cfg()
    text, fusion = TextEncoder(50, cfg).eval(), FusionEncoder(cfg, context_width=24).eval()
    ids = torch.randint(5, 50, (2, 7))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    image = torch.randn(2, 5, 24)
    image_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    h = text(ids, mask)
    f = fusion(h, mask, image, image_mask)
    ids2 = ids.clone()
    ids2[0, 5:] = torch.tensor([7, 9])
    image2 = image.clone()
    image2[0, 3:] = torch.randn(2, 24) * 5
    h2 = text(ids2, mask)
    f2 = fusion(h2, mask, image2, image_mask)
    torch.testing.assert_close(h2[0, :5], h[0, :5], rtol=0, atol=1e-5)
    torch.testing.assert_close(f2[0, :5], f[0, :5], rtol=0, atol=1e-5)
    assert (h2[0, 5:] - h[0, 5:]).abs().max() > 1e-3
    # a valid context token does matter
    image3 = image.clone()
    image3[0, 0] += 5
    assert (fusion(h, mask, image3, image_mask) - f)[0, :5].abs().max() > 1e-3


@pytest.mark.parametrize("with_mask", [False, True])
def test_causal_attention_ignores_future_tokens(with_mask):
    torch.manual_seed(2)
    attn = Attention(16, 4, 0.0).eval()
    x = torch.randn(2, 6, 16)
    mask = torch.ones(2, 6, dtype=torch.long) if with_mask else None
    if with_mask:
        mask[1, 5] = 0
    y = attn(x, mask=mask, causal=True)
    for i in range(5):
        x2 = x.clone()
        x2[:, i + 1:] = torch.randn(2, 5 - i, 16) * 5
        y2 = attn(x2, mask=mask, causal=True)
        torch.testing.assert_close(y2[:, :i + 1], y[:, :i + 1], rtol=0, atol=1e-6)
        assert (y2[:, i + 1:] - y[:, i + 1:]).abs().max() > 1e-3
        # the bidirectional output at i does depend on later tokens
        assert (attn(x2, mask=mask)[:, i] - attn(x, mask=mask)[:, i]).abs().max() > 1e-3


def test_causal_text_encoder_prefix_invariance():
    torch.manual_seed(3)
    text = TextEncoder(40, tiny_text_cfg()).eval()
    ids = torch.randint(5, 40, (2, 8))
    mask = torch.ones_like(ids)
    y = text(ids, mask, causal=True)
    ids2 = ids.clone()
    ids2[:, 4:] = (ids[:, 4:] + 3) % 40
    torch.testing.assert_close(text(ids2, mask, causal=True)[:, :4], y[:, :4], rtol=0, atol=1e-6)


# --- ViT -------------------------------------------------------------------------------------------------------------

def vit_cfg(size: int, **kw) -> VisionConfig:
    return VisionConfig(**{**dict(image_size=size, patch_size=8, width=32, depth=1, heads=2), **kw})


def test_vit_returns_cls_and_patch_tokens():
    vit = build_vit(vit_cfg(32)).eval()
    out = vit.forward_features(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1 + 16, 32)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("size", [(32, 32), (36, 27)])  # 36 x 27: a remainder the convolution drops
def test_patch_projection_is_the_patch_convolution(size):
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 6, 8, 8)
    proj = PatchProjection.like(conv)
    assert proj.state_dict().keys() == conv.state_dict().keys()
    x = torch.randn(2, 3, *size)
    y_conv, y_proj = conv(x), proj(x)
    assert y_proj.shape == y_conv.shape == (2, 6, size[0] // 8, size[1] // 8)
    torch.testing.assert_close(y_proj, y_conv)
    g = torch.randn_like(y_conv)
    torch.testing.assert_close(torch.autograd.grad(y_proj, proj.weight, g)[0],
                               torch.autograd.grad(y_conv, conv.weight, g)[0])
    assert isinstance(build_vit(vit_cfg(32)).patch_embed.proj, PatchProjection)
    with pytest.raises(ValueError, match="not a patch embedding"):
        PatchProjection.like(nn.Conv2d(3, 6, 8, 4))


@pytest.mark.parametrize("source_classes", [0, 10])
def test_load_vit_weights_resamples_position_embeddings(tmp_path, source_classes):
    torch.manual_seed(4)
    from timm.models.vision_transformer import VisionTransformer
    source = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                               num_classes=source_classes)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    assert source.pos_embed.shape == (1, 1 + 4, 32)

    vit = build_vit(vit_cfg(32, pretrained=str(path)))
    assert vit.pos_embed.shape == (1, 1 + 16, 32)
    torch.testing.assert_close(vit.pos_embed[0, 0], source.pos_embed[0, 0])  # [CLS] position kept
    assert torch.equal(vit.patch_embed.proj.weight, source.patch_embed.proj.weight)
    assert torch.equal(vit.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert torch.equal(vit.cls_token, source.cls_token)
    # the resampled grid interpolates the source grid: its mean stays close, it is not left at init
    grid = vit.pos_embed[0, 1:]
    assert (grid.mean(0) - source.pos_embed[0, 1:].mean(0)).abs().max() < 0.02
    assert vit.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 17, 32)


def test_load_vit_weights_missing_file_names_it(tmp_path):
    missing = tmp_path / "nowhere" / "vit_b16.safetensors"
    with pytest.raises(FileNotFoundError, match="vit_b16.safetensors"):
        load_vit_weights(build_vit(vit_cfg(32)), missing)


def test_load_vit_weights_wrong_architecture_errors(tmp_path):
    source = build_vit(vit_cfg(32, depth=2))
    path = tmp_path / "deep.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    with pytest.raises(VlptError, match="do not match"):
        load_vit_weights(build_vit(vit_cfg(32, depth=1)), path)


# --- ALBEF -----------------------------------------------------------------------------------------------------------

VOCAB = 60
TINY = ["model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.width=32", "model.vision.depth=1",
        "model.vision.heads=2", "model.text.width=32", "model.text.heads=2", "model.text.intermediate=64",
        "model.text.text_layers=1", "model.text.fusion_layers=1", "model.text.max_len=10",
        "method.queue_size=64", "method.embed_dim=16", "method.alpha=0.4"]


def albef_batch(b: int = 4, l: int = 10, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (b, l), generator=gen)
    lengths = torch.tensor([l, l - 3, 5, l - 1])[:b]
    mask = (torch.arange(l)[None] < lengths[:, None]).long()
    ids[:, 0] = 2
    ids[torch.arange(b), lengths - 1] = 3
    ids[mask == 0] = 0
    mlm_ids, labels = mask_tokens(ids, 0.5, 4, VOCAB, [0, 1, 2, 3, 4], generator=gen)
    assert (labels != IGNORE).any()
    return dict(image=torch.randn(b, 3, 32, 32, generator=gen), text_ids=ids, text_mask=mask,
                image_id=torch.arange(100, 100 + b), mlm_ids=mlm_ids, mlm_labels=labels)


@pytest.fixture(scope="module")
def albef():
    from vlpt import methods
    torch.manual_seed(0)
    return methods.build(load_config(overrides=TINY), VOCAB)


def test_albef_step_losses_gradients_and_queues(albef):
    model = albef
    model.train()
    model.zero_grad(set_to_none=True)
    batch = albef_batch()
    assert model.queues.ptr.item() == 0
    out = model(batch, step=0)
    assert set(out) == {"itc", "itm", "mlm"}
    for name, loss in out.items():
        assert loss.dim() == 0 and torch.isfinite(loss), name
    # an untrained model: ITM near log 2, MLM near log V, ITC near log(B + queue)
    assert 0.3 < out["itm"].item() < 1.5
    assert 0.5 * torch.log(torch.tensor(float(VOCAB))) < out["mlm"] < 2 * torch.log(torch.tensor(float(VOCAB)))
    sum(out.values()).backward()

    def has_grad(p):
        return p.grad is not None and p.grad.abs().sum() > 0

    for part in ("backbone.vision", "backbone.text", "backbone.fusion", "vision_proj", "text_proj", "itm_head", "mlm_head"):
        assert any(has_grad(p) for p in model.get_submodule(part).parameters()), part
    assert has_grad(model.backbone.vision.patch_embed.proj.weight)
    assert has_grad(model.backbone.text.embeddings.word.weight)
    assert has_grad(model.backbone.fusion.layers[0].cross.query.weight)
    assert has_grad(model.backbone.fusion.layers[0].attention.query.weight)
    assert has_grad(model.mlm_head.dense.weight)
    assert has_grad(model.temp)
    for name, p in model.teacher.named_parameters():
        assert not p.requires_grad and p.grad is None, name

    # the queue took the teacher's features of this batch (teacher == student before any update)
    assert model.queues.ptr.item() == 4
    assert model.queues.ids[:4].tolist() == batch["image_id"].tolist()
    assert (model.queues.ids[4:] == -1).all()
    with torch.no_grad():
        _, teacher_image = model.encode_image(batch["image"], teacher=True)
        _, teacher_text = model.encode_text(batch["text_ids"], batch["text_mask"], teacher=True)
    torch.testing.assert_close(model.queues.image[:4], teacher_image)
    torch.testing.assert_close(model.queues.text[:4], teacher_text)

    # a second step: the same images are now in the queue as well (multi-positive rows); pointer advances again
    out2 = model(albef_batch(seed=1), step=1)
    assert all(torch.isfinite(v) for v in out2.values())
    assert model.queues.ptr.item() == 8


def test_caption_and_masked_copy_share_one_text_encoder_call(albef):
    """steps.features encodes the caption and its masked copy in one call (student and teacher): the word-embedding
    lookup runs twice per step, not four times, and each half's states equal a call of its own."""
    from vlpt.methods import steps
    model = albef.eval()
    batch = albef_batch()
    calls = []
    hooks = [m.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
             for m in (model.backbone.text.embeddings.word, model.teacher["backbone"].text.embeddings.word)]
    try:
        with torch.no_grad():
            f = steps.features(model, batch)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [8, 8]  # 4 captions + their 4 masked copies, once for the student, once for the teacher
    with torch.no_grad():
        hidden, feat = model.encode_text(batch["text_ids"], batch["text_mask"])
        masked = model.backbone.encode_text(batch["mlm_ids"], batch["text_mask"])
        teacher_masked = model.teacher["backbone"].encode_text(batch["mlm_ids"], batch["text_mask"])
    torch.testing.assert_close(f.text_hidden, hidden)
    torch.testing.assert_close(f.text_feat, feat)
    torch.testing.assert_close(f.mlm_hidden, masked)
    torch.testing.assert_close(f.teacher_mlm_hidden, teacher_masked)
    without = {k: v for k, v in batch.items() if k not in ("mlm_ids", "mlm_labels")}
    with torch.no_grad():
        assert steps.features(model, without).mlm_hidden is None
    model.train()


def test_albef_teacher_follows_student_after_step(albef):
    model = albef
    m = model.cfg.method.momentum
    with torch.no_grad():
        model.text_proj.weight.add_(1.0)
    before = model.teacher["text_proj"].weight.detach().clone()
    model.after_step(0)
    torch.testing.assert_close(model.teacher["text_proj"].weight, m * before + (1 - m) * model.text_proj.weight,
                               rtol=0, atol=1e-6)
    assert any(k.startswith("teacher.copies.backbone.fusion.") for k in model.state_dict())
    assert "queues.ptr" in model.state_dict()


def test_itc_and_mlm_soft_targets_come_from_the_momentum_teacher(monkeypatch):
    """ALBEF Eq. 6-7: the distillation targets are the teacher's. Perturbing one part of the teacher moves the soft
    targets that part feeds (its image or text projection: ITC's; its MLM head, fusion or ViT: MLM's, the teacher's
    MLM reading the teacher's image tokens), and the losses with them, while every student output stays put."""
    from vlpt import methods
    from vlpt.methods import steps

    torch.manual_seed(0)
    model = methods.build(load_config(overrides=TINY), VOCAB).eval()
    assert model.alpha(10) == pytest.approx(0.4)
    seen = {}
    alignment_loss, mlm_loss = steps.alignment_loss, steps.mlm_loss

    def record_itc(*args, **kwargs):
        seen.update(image=args[0], text=args[1], teacher_image=args[7], teacher_text=args[8])
        return alignment_loss(*args, **kwargs)

    def record_mlm(*args, **kwargs):
        seen.update(logits=args[0], teacher_logits=args[2])
        return mlm_loss(*args, **kwargs)

    monkeypatch.setattr(steps, "alignment_loss", record_itc)
    monkeypatch.setattr(steps, "mlm_loss", record_mlm)
    batch, queues = albef_batch(), {k: v.clone() for k, v in model.queues.state_dict().items()}

    def run() -> dict:
        model.queues.load_state_dict(queues)  # each forward pushes: start every run from the same queues
        seen.clear()
        with torch.no_grad():
            out = model(batch, step=10)
        return {**seen, "itc": out["itc"], "mlm": out["mlm"]}

    before = run()
    student = ("image", "text", "logits")
    itc_targets, mlm_targets = ("teacher_image", "teacher_text"), ("teacher_logits",)
    for part, moved in [(lambda t: t["vision_proj"], {"teacher_image"}),
                        (lambda t: t["text_proj"], {"teacher_text"}),
                        (lambda t: t["mlm_head"], {"teacher_logits"}),
                        (lambda t: t["backbone"].fusion, {"teacher_logits"}),
                        (lambda t: t["backbone"].vision, {"teacher_image", "teacher_logits"})]:
        saved = {k: v.clone() for k, v in model.teacher.state_dict().items()}
        with torch.no_grad():
            for p in part(model.teacher).parameters():
                p.add_(0.5 * torch.randn_like(p))
        after = run()
        model.teacher.load_state_dict(saved)
        for name in student:
            assert torch.equal(after[name], before[name]), (moved, name)
        for name in (*itc_targets, *mlm_targets):
            assert torch.equal(after[name], before[name]) != (name in moved), (moved, name)
        if moved & set(itc_targets):
            assert not torch.equal(after["itc"], before["itc"]), moved
        if moved & set(mlm_targets):
            assert not torch.equal(after["mlm"], before["mlm"]), moved
        else:
            assert torch.equal(after["mlm"], before["mlm"]), moved


def test_albef_loss_subset_and_alpha_warmup():
    from vlpt import methods
    torch.manual_seed(1)
    cfg = load_config(overrides=TINY + ["method.losses=[itc]", "method.alpha_warmup_steps=10"])
    model = methods.build(cfg, VOCAB)
    out = model(albef_batch(), step=3)
    assert set(out) == {"itc"}
    assert model.alpha(0) == 0.0
    assert model.alpha(5) == pytest.approx(0.2)
    assert model.alpha(100) == pytest.approx(0.4)


def test_unknown_method_suggests_nearest():
    from vlpt import methods
    with pytest.raises(ValueError, match="albef"):
        methods.build(load_config(overrides=TINY + ["method.name=albf"]), VOCAB)

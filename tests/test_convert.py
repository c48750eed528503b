"""`vlpt convert albef`: tiny checkpoints in ALBEF's released layouts (pre-training, retrieval, VQA), converted through
the command line, give the ITC similarities, ITM scores, MLM logits and fused states of a reference forward pass
written here with plain torch ops on the original tensors (timm's ViT for the image side); ALBEF's preprocessing
(bicubic resize, CLIP statistics, pre_caption, BERT's tokenizer) is reproduced by vlpt's retrieval path."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torchvision import transforms as T
from transformers import BertTokenizer

import vlpt.cli
from helpers import cli_error
from vlpt.data.tokenizer import Tokenizer, albef_caption
from vlpt.engine.checkpoint import load_method, open_checkpoint, read_meta, resolve
from vlpt.tasks.retrieval import encode_split, itc_logits

V_WIDTH, PATCH, IMAGE, DEPTH = 24, 8, 32, 2             # ViT: 4 x 4 patches of 8 px
T_WIDTH, INTER, LAYERS, FUSION = 32, 64, 4, 2           # BERT: layers 0, 1 text-only, 2, 3 with cross-attention
HEADS, EMBED, QUEUE, POSITIONS = 2, 16, 8, 512
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", "!", "a", "the", "red", "blue", "ball", "dog",
         "runs", "on", "grass", "two", "cats", "sleep", "in", "sun", "its", "big", "##s"]
HEADS_FLAGS = ["--vision-heads", str(HEADS), "--text-heads", str(HEADS)]
# ALBEF's normalisation (its dataset/__init__.py) and captions as its pre_caption cleans them.
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CAPTIONS = {"A red ball, on the grass!": "a red ball on the grass", "The DOG runs.": "the dog runs",
            "Two cats sleep in the sun...": "two cats sleep in the sun", "It's a big-blue ball": "its a big blue ball"}


def albef_state(layout: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the names and shapes of ALBEF's `layout` model ("pretrain", "retrieval", "vqa")."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return 0.3 * torch.randn(*shape, generator=gen)

    def linear(out: dict, name: str, n_out: int, n_in: int) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = rand(n_out, n_in), rand(n_out)

    def norm(out: dict, name: str, width: int) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = 1 + rand(width), rand(width)

    state: dict[str, torch.Tensor] = {}
    for m in ("", "_m"):
        v = f"visual_encoder{m}."
        state[v + "cls_token"] = rand(1, 1, V_WIDTH)
        state[v + "pos_embed"] = rand(1, 1 + (IMAGE // PATCH) ** 2, V_WIDTH)
        state[v + "patch_embed.proj.weight"] = rand(V_WIDTH, 3, PATCH, PATCH)
        state[v + "patch_embed.proj.bias"] = rand(V_WIDTH)
        for i in range(DEPTH):
            b = f"{v}blocks.{i}."
            norm(state, b + "norm1", V_WIDTH)
            linear(state, b + "attn.qkv", 3 * V_WIDTH, V_WIDTH)
            linear(state, b + "attn.proj", V_WIDTH, V_WIDTH)
            norm(state, b + "norm2", V_WIDTH)
            linear(state, b + "mlp.fc1", 4 * V_WIDTH, V_WIDTH)
            linear(state, b + "mlp.fc2", V_WIDTH, 4 * V_WIDTH)
        norm(state, v + "norm", V_WIDTH)
        t = f"text_encoder{m}." + ("bert." if layout == "pretrain" else "")
        state[t + "embeddings.word_embeddings.weight"] = rand(len(WORDS), T_WIDTH)
        state[t + "embeddings.position_embeddings.weight"] = rand(POSITIONS, T_WIDTH)
        state[t + "embeddings.token_type_embeddings.weight"] = rand(2, T_WIDTH)
        state[t + "embeddings.position_ids"] = torch.arange(POSITIONS)[None]
        norm(state, t + "embeddings.LayerNorm", T_WIDTH)
        for i in range(LAYERS):
            layer = f"{t}encoder.layer.{i}."
            for attention in ("attention", "crossattention") if i >= FUSION else ("attention",):
                kv_width = V_WIDTH if attention == "crossattention" else T_WIDTH
                linear(state, f"{layer}{attention}.self.query", T_WIDTH, T_WIDTH)
                linear(state, f"{layer}{attention}.self.key", T_WIDTH, kv_width)
                linear(state, f"{layer}{attention}.self.value", T_WIDTH, kv_width)
                linear(state, f"{layer}{attention}.output.dense", T_WIDTH, T_WIDTH)
                norm(state, f"{layer}{attention}.output.LayerNorm", T_WIDTH)
            linear(state, layer + "intermediate.dense", INTER, T_WIDTH)
            linear(state, layer + "output.dense", T_WIDTH, INTER)
            norm(state, layer + "output.LayerNorm", T_WIDTH)
        if layout == "pretrain":  # BertForMaskedLM's head, its decoder tied to the word embeddings
            head = f"text_encoder{m}.cls.predictions."
            linear(state, head + "transform.dense", T_WIDTH, T_WIDTH)
            norm(state, head + "transform.LayerNorm", T_WIDTH)
            state[head + "bias"] = rand(len(WORDS))
            state[head + "decoder.weight"] = state[t + "embeddings.word_embeddings.weight"]
            state[head + "decoder.bias"] = state[head + "bias"]
        if layout == "vqa":  # the answer decoder: no place in vlpt's ALBEF
            linear(state, f"text_decoder{m}.bert.encoder.layer.0.output.dense", T_WIDTH, INTER)
            linear(state, f"text_decoder{m}.bert.encoder.layer.1.output.dense", T_WIDTH, INTER)
            state[f"text_decoder{m}.cls.predictions.bias"] = rand(len(WORDS))
        else:
            linear(state, f"vision_proj{m}", EMBED, V_WIDTH)
            linear(state, f"text_proj{m}", EMBED, T_WIDTH)
    if layout != "vqa":
        linear(state, "itm_head", 2, T_WIDTH)
        state["temp"] = torch.tensor(0.05)
        state["image_queue"] = F.normalize(rand(EMBED, QUEUE), dim=0)
        state["text_queue"] = F.normalize(rand(EMBED, QUEUE), dim=0)
        state["queue_ptr"] = torch.tensor([3])
    if layout == "retrieval":
        state["idx_queue"] = torch.tensor([[5, 6, 7, -100, -100, -100, -100, -100]])
    return state


# --- the reference: ALBEF's forward pass, written out -----------------------------------------------------------------
def vit(state: dict, module: str) -> VisionTransformer:
    """timm's ViT holding `module`'s tensors (the names must be timm's: strict loading)."""
    model = VisionTransformer(img_size=IMAGE, patch_size=PATCH, embed_dim=V_WIDTH, depth=DEPTH, num_heads=HEADS,
                              num_classes=0, global_pool="")
    model.load_state_dict({k[len(module) + 1:]: v for k, v in state.items() if k.startswith(module + ".")})
    return model.eval()


def lin(x, s, name):
    return F.linear(x, s[f"{name}.weight"], s[f"{name}.bias"])


def layer_norm(x, s, name):
    return F.layer_norm(x, x.shape[-1:], s[f"{name}.weight"], s[f"{name}.bias"], eps=1e-12)


def bert_attention(s, name, x, context, bias):
    """BERT's attention with its post-norm residual output."""
    def split(t):
        return t.view(t.shape[0], t.shape[1], HEADS, -1).transpose(1, 2)
    q, k, v = split(lin(x, s, f"{name}.self.query")), split(lin(context, s, f"{name}.self.key")), \
        split(lin(context, s, f"{name}.self.value"))
    probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias).softmax(-1)
    h = (probs @ v).transpose(1, 2).flatten(2)
    return layer_norm(x + lin(h, s, f"{name}.output.dense"), s, f"{name}.output.LayerNorm")


def bert(s, root, x, mask, layers, image=None):
    """BERT layers `layers` over states x; cross-attention to the image tokens when given (ALBEF's mode 'fusion')."""
    bias = (1.0 - mask[:, None, None, :].float()) * -10000.0  # ALBEF's extended attention mask
    for i in layers:
        name = f"{root}encoder.layer.{i}"
        x = bert_attention(s, f"{name}.attention", x, x, bias)
        if image is not None:
            x = bert_attention(s, f"{name}.crossattention", x, image, 0.0)
        h = F.gelu(lin(x, s, f"{name}.intermediate.dense"))
        x = layer_norm(x + lin(h, s, f"{name}.output.dense"), s, f"{name}.output.LayerNorm")
    return x


def reference(s: dict, image: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, m: str = "") -> dict:
    """ALBEF on images and texts: ITC similarities (I,T); given as many of each, for each pair (image i, text i) the
    fused states, ITM and MLM logits."""
    root = f"text_encoder{m}.bert." if f"text_encoder{m}.bert.embeddings.position_ids" in s else f"text_encoder{m}."
    tokens = vit(s, f"visual_encoder{m}").forward_features(image)
    e = f"{root}embeddings."
    x = s[e + "word_embeddings.weight"][ids] + s[e + "position_embeddings.weight"][:ids.shape[1]] \
        + s[e + "token_type_embeddings.weight"][0]
    text = bert(s, root, layer_norm(x, s, e + "LayerNorm"), mask, range(FUSION))
    out = {}
    if f"vision_proj{m}.weight" in s:
        image_feat = F.normalize(lin(tokens[:, 0], s, f"vision_proj{m}"), dim=-1)
        text_feat = F.normalize(lin(text[:, 0], s, f"text_proj{m}"), dim=-1)
        out["itc"] = image_feat @ text_feat.t() / s["temp"]
    if len(image) != len(ids):
        return out
    out["fused"] = fused = bert(s, root, text, mask, range(FUSION, LAYERS), tokens)
    if "itm_head.weight" in s:
        out["itm"] = lin(fused[:, 0], s, "itm_head")
    head = f"text_encoder{m}.cls.predictions."
    if head + "bias" in s:
        h = layer_norm(F.gelu(lin(fused, s, head + "transform.dense")), s, head + "transform.LayerNorm")
        out["mlm"] = h @ s[e + "word_embeddings.weight"].t() + s[head + "bias"]
    return out


# --- fixtures ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("".join(w + "\n" for w in WORDS))
    return path


def save_albef(path, state: dict, config: dict | None = None):
    """ALBEF's checkpoint file: {"model": state dict, "config": ..., "epoch": ...}; returns the state dict."""
    torch.save({"model": state, "config": config or {}, "epoch": 4}, path)
    return state


def convert(capsys, file, out, vocab, *flags) -> str:
    capsys.readouterr()
    vlpt.cli.main(["convert", "albef", str(file), "--out", str(out), "--vocab", str(vocab), *HEADS_FLAGS, *flags])
    return capsys.readouterr().out


def close(a, b):
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_pretrain_checkpoint_gives_albef_itc_itm_and_mlm(tmp_path, vocab, capsys):
    state = save_albef(tmp_path / "ALBEF.pth", albef_state("pretrain"), {"k_test": 3, "momentum": 0.99, "alpha": 0.3})
    printed = convert(capsys, tmp_path / "ALBEF.pth", tmp_path / "run", vocab)
    assert "with no place" not in printed, printed  # every ALBEF tensor found its place (or is derived)
    assert "1 weights not in the file, initialised as a new model's:\n  queues.ids" in printed, printed
    model, cfg, tokenizer = load_method(tmp_path / "run")
    v, t = cfg.model.vision, cfg.model.text
    assert (v.image_size, v.patch_size, v.width, v.depth, v.mlp_ratio) == (IMAGE, PATCH, V_WIDTH, DEPTH, 4.0)
    assert (t.width, t.intermediate, t.text_layers, t.fusion_layers, t.pool) == (T_WIDTH, INTER, FUSION, 2, "cls")
    assert (cfg.method.embed_dim, cfg.method.queue_size, cfg.method.momentum, cfg.method.alpha) == (EMBED, QUEUE, 0.99,
                                                                                                    0.3)
    assert (cfg.eval.k, t.preprocess, read_meta(resolve(tmp_path / "run"))["method"]) == (3, "albef", "albef")

    torch.manual_seed(0)
    image = torch.randn(3, 3, IMAGE, IMAGE)
    ids, mask = tokenizer(["a red ball on the grass", "the dog runs", "two cats"], 30)
    with torch.no_grad():
        ref, ref_m = reference(state, image, ids, mask), reference(state, image, ids, mask, "_m")
        tokens, image_feat = model.encode_image(image)
        hidden, text_feat = model.encode_text(ids, mask)
        assert close(image_feat @ text_feat.t() / model.temperature(), ref["itc"])
        assert close(model.itm_logits(tokens, hidden, mask), ref["itm"])
        assert close(model.mlm_logits(tokens, ids, mask), ref["mlm"])
        _, image_m = model.encode_image(image, teacher=True)  # the teacher from the _m modules
        _, text_m = model.encode_text(ids, mask, teacher=True)
        assert close(image_m @ text_m.t() / model.temperature(), ref_m["itc"])
        assert close(model.mlm_logits(model.encode_image(image, teacher=True)[0], ids, mask, teacher=True),
                     ref_m["mlm"])
    assert torch.equal(model.queues.image, state["image_queue"].t()) and int(model.queues.ptr) == 3
    assert not close(ref["itc"], ref_m["itc"])  # student and teacher differ: each read from its own tensors


def test_retrieval_checkpoint_evaluates_with_albef_preprocessing(tmp_path, vocab, capsys):
    """vlpt's retrieval path (image files, raw captions) reproduces ALBEF's: bicubic resize to 32 px, CLIP's
    statistics, pre_caption, BERT's uncased WordPiece (transformers' BertTokenizer here)."""
    state = save_albef(tmp_path / "coco.pth", albef_state("retrieval"), {"k_test": 2})
    data = tmp_path / "data"
    data.mkdir()
    gen = torch.Generator().manual_seed(1)
    names = []
    for i, (h, w) in enumerate([(40, 52), (61, 35)]):
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(data / f"img{i}.png")
        names.append(f"img{i}.png")
    raw = list(CAPTIONS)
    (data / "retrieval_test.json").write_text(json.dumps([{"image": names[0], "caption": raw[:2]},
                                                          {"image": names[1], "caption": raw[2:]}]))
    printed = convert(capsys, tmp_path / "coco.pth", tmp_path / "run", vocab)
    assert "MLM" not in printed and "mlm_head.dense.weight" in printed  # ALBEF's retrieval model has no MLM head
    path, cfg, tokenizer = open_checkpoint(tmp_path / "run")
    model, _, _ = load_method(tmp_path / "run")
    assert model.queues.ids[:3].tolist() == [5, 6, 7]

    with torch.no_grad():
        enc = encode_split(model, [data / n for n in names], raw, tokenizer, cfg.model.vision.image_size,
                           cfg.model.text.max_len, 8, "cpu", progress=False)
        albef_image = T.Compose([T.Resize((IMAGE, IMAGE), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                                 T.Normalize(MEAN, STD)])
        image = torch.stack([albef_image(Image.open(data / n).convert("RGB")) for n in names])
        text = BertTokenizer(str(vocab), do_lower_case=True)(list(CAPTIONS.values()), padding="longest",
                                                              truncation=True, max_length=30, return_tensors="pt")
        ref = reference(state, image, text.input_ids, text.attention_mask)
        assert close(itc_logits(model, enc), ref["itc"])
        pairs = torch.cartesian_prod(torch.arange(2), torch.arange(4))  # every (image, text) pair
        ref_pairs = reference(state, image[pairs[:, 0]], text.input_ids[pairs[:, 1]], text.attention_mask[pairs[:, 1]])
        scores = model.itm_logits(enc["image_tokens"][pairs[:, 0]], enc["text_hidden"][pairs[:, 1]],
                                  enc["text_mask"][pairs[:, 1]])
        assert close(scores, ref_pairs["itm"])

    capsys.readouterr()
    vlpt.cli.main(["evaluate", "retrieval", "--checkpoint", str(tmp_path / "run"), "--data", str(data),
                   "--num-workers", "0", "--device", "cpu", "--out", str(tmp_path / "metrics.json")])
    assert "retrieval (itm)" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["k"], metrics["images"], metrics["texts"]) == (2, 2, 4)


def test_vqa_checkpoint_maps_its_encoders_and_reports_the_decoder(tmp_path, vocab, capsys):
    """ALBEF's VQA model trained without distillation: no momentum modules, no ITC or ITM heads, a decoder."""
    state = save_albef(tmp_path / "vqa.pth", {k: v for k, v in albef_state("vqa").items() if "_m." not in k})
    printed = convert(capsys, tmp_path / "vqa.pth", tmp_path / "run", vocab)
    decoder = sorted(k for k in state if k.startswith("text_decoder"))
    assert "5 ALBEF weights with no place in vlpt's ALBEF, not converted:\n" \
           "  text_decoder.bert.encoder.layer.N.output.dense.bias (x2)\n" \
           "  text_decoder.bert.encoder.layer.N.output.dense.weight (x2)\n" \
           "  text_decoder.cls.predictions.bias\n" in printed, printed
    assert read_meta(resolve(tmp_path / "run"))["converted"]["unplaced"] == decoder
    initialised = printed.split("initialised as a new model's:\n")[1].split(":\n")[0]
    assert all(f"  {key}\n" in initialised for key in ("itm_head.weight", "temp", "vision_proj.weight",
                                                       "teacher.copies.vision_proj.weight", "queues.image"))
    copied = printed.split("copied from the student:\n")[1]
    assert "  teacher.copies.backbone.fusion.layers.N.cross.key.weight (x2)\n" in copied
    model, _, tokenizer = load_method(tmp_path / "run")
    torch.manual_seed(0)
    image = torch.randn(2, 3, IMAGE, IMAGE)
    ids, mask = tokenizer(["a red ball", "the dog runs on the grass"], 30)
    with torch.no_grad():
        ref = reference(state, image, ids, mask)
        tokens, _ = model.encode_image(image)
        hidden, _ = model.encode_text(ids, mask)
        assert close(model.fuse(tokens, hidden, mask), ref["fused"])
        assert close(model.fuse(model.encode_image(image, teacher=True)[0],  # the teacher: a copy of the student
                                model.encode_text(ids, mask, teacher=True)[0], mask, teacher=True), ref["fused"])


def test_albef_caption_rule(vocab):
    """ALBEF's pre_caption on hand-worked cases; the tokenizer applies it with `model.text.preprocess=albef`."""
    assert albef_caption("It's a \"quoted\" (thing)*#:;~?") == "its a quoted thing"
    # a single tab is no run of whitespace: it stays, as in ALBEF
    assert albef_caption("  Two dogs -- playing/fighting  on the\tbeach.\n") == \
        "two dogs playing fighting on the\tbeach"
    assert albef_caption("<person> waves at <PERSON>") == "person waves at person"
    assert albef_caption(" ".join(f"w{i}" for i in range(40))) == " ".join(f"w{i}" for i in range(30))
    for raw, clean in CAPTIONS.items():
        assert albef_caption(raw) == clean
    albef, plain = Tokenizer(vocab, "albef"), Tokenizer(vocab)
    raw = list(CAPTIONS)
    assert torch.equal(albef(raw, 30)[0], plain(list(CAPTIONS.values()), 30)[0])
    assert not torch.equal(albef(raw, 30)[0], plain(raw, 30)[0])


def test_files_that_are_not_albef_checkpoints_fail_in_one_line(tmp_path, vocab, capsys):
    def error(file, *flags, vocab_flag=True):
        argv = ["convert", "albef", str(file), "--out", str(tmp_path / "run"), *flags]
        return cli_error(argv + (["--vocab", str(vocab)] if vocab_flag else []), capsys)

    assert "ALBEF checkpoint not found" in error(tmp_path / "missing.pth", *HEADS_FLAGS)
    (tmp_path / "text.pth").write_text("not a checkpoint\n")
    assert "is not a checkpoint torch.save wrote" in error(tmp_path / "text.pth", *HEADS_FLAGS)
    save_albef(tmp_path / "ALBEF.pth", albef_state("pretrain"))
    whole = (tmp_path / "ALBEF.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[:len(whole) // 2])
    assert "is not a checkpoint torch.save wrote" in error(tmp_path / "cut.pth", *HEADS_FLAGS)
    torch.save([1, 2], tmp_path / "list.pth")
    assert "is not in ALBEF's layout" in error(tmp_path / "list.pth", *HEADS_FLAGS)
    torch.save({"model": {"encoder.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    assert "has no visual_encoder.* weights" in error(tmp_path / "other.pth", *HEADS_FLAGS)
    torch.save({"model": albef_state("retrieval"), "args": argparse.Namespace(lr=1)}, tmp_path / "code.pth")
    assert "argparse.Namespace" in error(tmp_path / "code.pth", *HEADS_FLAGS)
    assert "--vision-heads" in error(tmp_path / "ALBEF.pth")  # 12 heads do not divide the width 24
    assert "--vocab" in error(tmp_path / "ALBEF.pth", *HEADS_FLAGS, vocab_flag=False)  # no vocab.txt beside it
    (tmp_path / "short.txt").write_text("".join(w + "\n" for w in WORDS[:-1]))
    assert f"has {len(WORDS) - 1} tokens, the checkpoint's word embeddings {len(WORDS)}" in \
        cli_error(["convert", "albef", str(tmp_path / "ALBEF.pth"), "--out", str(tmp_path / "run"), "--vocab",
                   str(tmp_path / "short.txt"), *HEADS_FLAGS], capsys)
    assert not (tmp_path / "run").exists()  # nothing written by a refused conversion

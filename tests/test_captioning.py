"""Captioning: the prompt outside the loss, label smoothing, scores through pycocoevalcap against hand-checkable
cases, SemMIM's pretrained decoder over the fused image, and the finetune / evaluate path with its captions file."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from vlpt import methods
from vlpt.cli import main
from vlpt.engine import checkpoint
from vlpt.pretrain import pretrain
from vlpt.tasks import captioning
from helpers import METHODS, TINY, config


def test_a_prediction_equal_to_a_reference_scores_full_bleu_and_a_wrong_one_none():
    refs = [["a red star on the left", "one red star"], ["a blue circle at the top", "a blue circle"]]
    perfect = captioning.caption_scores(["a red star on the left", "a blue circle at the top"], refs)
    assert perfect["bleu1"] == pytest.approx(100, abs=0.01) and perfect["bleu4"] == pytest.approx(100, abs=0.01)
    assert perfect["rouge_l"] == pytest.approx(100, abs=0.01) and perfect["cider_bleu4"] == pytest.approx(
        perfect["cider"] + perfect["bleu4"], abs=0.02)
    wrong = captioning.caption_scores(["green squares everywhere today", "purple diamonds below everything"], refs)
    assert wrong["bleu1"] < 1 and wrong["cider"] < perfect["cider"] and wrong["meteor"] < perfect["meteor"]


def test_scores_equal_pycocoevalcap_called_directly_and_bleu1_its_formula():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    refs = [["a red star on the left", "one red star"], ["a blue circle at the top", "a blue circle"],
            ["two shapes a green square and a white diamond"]]
    predictions = ["a red star", "a blue circle on the right", "a green square and a diamond"]
    got = captioning.caption_scores(predictions, refs)
    gts = {i: r for i, r in enumerate(refs)}  # already lower case, no punctuation: PTB tokenisation changes nothing
    res = {i: [p] for i, p in enumerate(predictions)}
    bleu, _ = Bleu(4).compute_score(gts, res)
    direct = {**{f"bleu{n + 1}": b for n, b in enumerate(bleu)}, "meteor": Meteor().compute_score(gts, res)[0],
              "rouge_l": Rouge().compute_score(gts, res)[0], "cider": Cider().compute_score(gts, res)[0]}
    for key, value in direct.items():
        assert got[key] == pytest.approx(100 * value, abs=0.006), key
    # BLEU-1 of one short prediction: clipped unigram precision 2/2 times the brevity penalty exp(1 - 3/2) against the
    # closest reference length (3 words)
    short = captioning.caption_scores(["red star"], [refs[0]])
    assert short["bleu1"] == pytest.approx(100 * math.exp(1 - 3 / 2), abs=0.01)


def test_caption_loss_leaves_out_the_prompt_and_averages_the_caption_tokens(shapes_data, tmp_path):
    cfg = config(shapes_data, tmp_path, "task.name=caption")
    method = methods.build(cfg, 40)
    model = captioning.CaptionModel(method, layers=0, prompt_tokens=3, label_smoothing=0.0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    batch = {"image": torch.randn(2, 3, 32, 32, generator=gen), "text_ids": ids, "text_mask": mask}
    loss = model(batch, 0)["caption"]
    tokens = method.backbone.encode_image(batch["image"])
    logits = model.decoder(ids, mask, tokens)[:, :-1].log_softmax(-1)
    nll = -logits.gather(2, ids[:, 1:, None])[..., 0]        # target j predicts token j + 1
    keep = mask[:, 1:].clone()
    keep[:, :2] = 0                                           # tokens 1 and 2 are the prompt's (with [CLS]: 3)
    assert loss.item() == pytest.approx(((nll * keep).sum() / keep.sum()).item(), rel=1e-5)
    assert model.teacher is None and method.teacher is None


def test_a_task_made_decoder_is_among_the_blocks_and_checkpoints(shapes_data, tmp_path):
    """FSDP units, compile regions and gradient checkpointing reach the decoder a task makes from the fusion layers
    (each of its layers once among `blocks()`), as they reach the method's own blocks."""
    method = methods.build(config(shapes_data, tmp_path, "task.name=caption"), 40)
    model = captioning.CaptionModel(method, layers=0, prompt_tokens=3, label_smoothing=0.0)
    blocks = model.blocks()
    assert len({id(b) for b in blocks}) == len(blocks)
    assert all(any(b is layer for b in blocks) for layer in model.decoder.layers)
    assert len(blocks) == len(method.blocks()) + len(model.decoder.layers)
    model.set_grad_checkpointing(True)
    assert model.decoder.grad_checkpointing and method.backbone.fusion.grad_checkpointing


@pytest.fixture(scope="module")
def pretrained(shapes_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "albef"
    pretrain(config(shapes_data, out, "train.steps=4", "train.save_every=4"))
    return out


def test_semmim_captions_with_its_pretrained_decoder_over_the_fused_image(semmim_checkpoint, shapes_data):
    """SemMIM's captioner is its prefix-LM decoder, the module and weights pretraining saved (kept once, under the
    method's keys), cross-attending to the fusion encoder's states of the image and the empty prefix [CLS] [SEP]."""
    method, _, _ = checkpoint.load_method(semmim_checkpoint)
    _, cfg, tokenizer = checkpoint.open_checkpoint(semmim_checkpoint, task="caption")
    task = captioning.Captioning(cfg, tokenizer, torch.device("cpu"))
    model = task.build(method).eval()
    assert model.decoder is method.decoder and method.pretrained_decoder() is method.decoder
    saved = load_file(str(checkpoint.resolve(semmim_checkpoint) / checkpoint.WEIGHTS))
    pretrained = {k.removeprefix("decoder."): v for k, v in saved.items() if k.startswith("decoder.")}
    decoder = model.decoder.state_dict()
    assert pretrained.keys() == decoder.keys() and all(torch.equal(decoder[k], v) for k, v in pretrained.items())
    assert not any(k.startswith("decoder.") for k in model.state_dict())  # not a second copy beside method.decoder
    blocks = model.blocks()  # the pretrained decoder's layers once, as the method's
    assert len({id(b) for b in blocks}) == len(blocks) and model.own_decoder() == []
    assert all(any(b is layer for b in blocks) for layer in method.decoder.layers)

    image = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[tokenizer.cls_id, tokenizer.sep_id]] * 2)
    backbone, ones = method.backbone, torch.ones_like(ids)
    with torch.no_grad():
        fused = backbone.fuse(backbone.encode_image(image), backbone.encode_text(ids, ones), ones)
        torch.testing.assert_close(model.context(image), fused, rtol=0, atol=0)
    images, _ = captioning.references(shapes_data / "retrieval_test.json")
    captions = task.generate(model, images[:3])
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)


@pytest.mark.parametrize("method, extra", [("albef", []), ("semmim", ["task.baseline_images=0"])],
                         ids=["albef", "semmim"])
def test_captioning_finetunes_and_writes_its_captions(method, extra, shapes_data, tmp_path, request):
    """From ALBEF's checkpoint and, without the nearest-caption baseline (its scoring: seconds), from SemMIM's."""
    pretrained = request.getfixturevalue("pretrained" if method == "albef" else "semmim_checkpoint")
    model = [o for o in METHODS[method].extra if o.startswith("model.")]  # its method keys: from the checkpoint
    out = tmp_path / "cap"
    main(["finetune", "caption", "--config", "finetune/caption_tiny.yaml", "--checkpoint", str(pretrained), *TINY,
          *model, f"data.root={shapes_data}", f"train.out={out}", "train.steps=2", "train.eval_every=2",
          "train.save_every=2", "eval.batch_size=16", "task.max_len=4", "task.min_len=2", *extra])
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"bleu4", "meteor", "rouge_l", "cider", "val_cider_bleu4"} <= set(metrics)
    assert ({"nearest_cider", "nearest_bleu4"} <= set(metrics)) == (not extra)
    assert metrics["images"] == len(json.loads((shapes_data / "retrieval_test.json").read_text()))
    result = tmp_path / "eval" / "metrics.json"
    main(["evaluate", "caption", "--checkpoint", str(out), "--data", str(shapes_data), "--out", str(result),
          "--max-len", "4"])
    captions = json.loads((result.parent / "captions.json").read_text())
    assert len(captions) == metrics["images"] and all(isinstance(c, str) for c in captions.values())
    assert all(len(c.split()) <= 4 for c in captions.values())

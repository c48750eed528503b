"""The answer decoder (causal, tied head, initialised from the fusion layers or SemMIM's pretrained one, greedy and
beam search) and VQA on it:
weighted and distilled answer losses against their formulas, rank inference against a direct computation, the
finetune / evaluate path with its result file, and bad input."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vlpt import methods
from vlpt.cli import main
from vlpt.config import load_config
from vlpt.cli import find_config
from vlpt.data.annotations import AnnotationError
from vlpt.engine import checkpoint
from vlpt.models.decoder import Decoder
from vlpt.pretrain import pretrain
from vlpt.tasks import vqa
from helpers import METHODS, TINY, cli_error, config


def tiny_decoder(layers: int = 2, vocab: int = 30) -> Decoder:
    cfg = load_config(find_config("pretrain/albef_tiny.yaml"), TINY).model.text
    torch.manual_seed(0)
    return Decoder(vocab, cfg, context_width=24, layers=layers).eval()


def context(b: int = 3, m: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(b, m, dtype=torch.long)
    mask[0, 3:] = 0
    return torch.randn(b, m, 24, generator=gen), mask


def test_decoder_is_causal_its_head_tied_and_padding_of_the_context_ignored():
    d = tiny_decoder()
    ctx, mask = context()
    ids = torch.randint(5, 30, (3, 6))
    logits = d(ids, torch.ones_like(ids), ctx, mask)
    changed = ids.clone()
    changed[:, 4] = 7
    again = d(changed, torch.ones_like(ids), ctx, mask)
    assert torch.allclose(logits[:, :4], again[:, :4], atol=1e-6) and not torch.allclose(logits[:, 4:], again[:, 4:])
    ctx2 = ctx.clone()
    ctx2[0, 3:] = 100.0  # masked-out context of row 0
    assert torch.allclose(d(ids, torch.ones_like(ids), ctx2, mask)[0], logits[0], atol=1e-5)
    assert d.head(torch.zeros(1, 32), d.embeddings.word.weight).shape == (1, 30)
    losses, _ = d.token_losses(ids, torch.ones_like(ids), ctx, mask)
    losses.sum().backward()
    assert d.embeddings.word.weight.grad.abs().sum() > 0


def test_token_losses_match_cross_entropy_skip_padding_and_prompt_and_mix_the_teacher():
    d = tiny_decoder()
    ctx, mask = context()
    ids = torch.randint(5, 30, (3, 6))
    amask = torch.ones_like(ids)
    amask[1, 4:] = 0
    logits = d(ids, amask, ctx, mask)[:, :-1]
    ce = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")   # (B,5)
    keep = amask[:, 1:].float()
    losses, _ = d.token_losses(ids, amask, ctx, mask)
    assert torch.allclose(losses, (ce * keep).sum(1), atol=1e-5)
    prompt, _ = d.token_losses(ids, amask, ctx, mask, ignore_first=3)  # the first two targets are the prompt's
    assert torch.allclose(prompt, (ce * keep)[:, 2:].sum(1), atol=1e-5)
    teacher = torch.randn_like(logits)
    soft = -(teacher.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    mixed, _ = d.token_losses(ids, amask, ctx, mask, teacher_logits=teacher, alpha=0.4)
    assert torch.allclose(mixed, ((0.6 * ce + 0.4 * soft) * keep).sum(1), atol=1e-5)
    smooth, _ = d.token_losses(ids, amask, ctx, mask, label_smoothing=0.1)
    by_torch = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none", label_smoothing=0.1)
    assert torch.allclose(smooth, (by_torch * keep).sum(1), atol=1e-5)


def test_cached_decoding_equals_the_whole_sequence_forward_also_with_contexts_shared_by_beams():
    d = tiny_decoder()
    ctx, mask = context()
    ids = torch.randint(5, 30, (3, 6), generator=torch.Generator().manual_seed(2))
    whole = d(ids, torch.ones_like(ids), ctx, mask)
    cross_kv = [layer.cross.project_kv(ctx) for layer in d.layers]
    logits, cache = d.extend(ids[:, :2], None, cross_kv, mask)  # a two-token prefix, then one token a step
    steps = [logits]
    for t in range(2, 6):
        logits, cache = d.extend(ids[:, t:t + 1], cache, cross_kv, mask)
        steps.append(logits)
    assert cache[0][0].shape[2] == 6
    assert torch.allclose(torch.cat(steps, 1), whole, atol=1e-5)
    beams = ids.repeat_interleave(2, 0)  # two rows per context, the context's keys and values not repeated
    logits, cache = d.extend(beams[:, :3], None, cross_kv, mask)
    logits, _ = d.extend(beams[:, 3:4], cache, cross_kv, mask)
    assert torch.allclose(logits, whole[:, 3:4].repeat_interleave(2, 0), atol=1e-5)


def test_greedy_search_is_the_argmax_loop_and_beams_score_at_least_as_high():
    d = tiny_decoder()
    ctx, mask = context()
    start = torch.full((3, 1), 2)
    greedy, greedy_score = d.generate(ctx, mask, start, stop_id=3, max_new=5)
    seq = start
    for _ in range(5):  # the same thing by hand, without a stop token (none is chosen below, checked)
        seq = torch.cat([seq, d(seq, torch.ones_like(seq), ctx, mask)[:, -1].argmax(-1, keepdim=True)], 1)
    if not (greedy == 3).any():
        assert torch.equal(greedy, seq[:, 1:])
    beam, beam_score = d.generate(ctx, mask, start, stop_id=3, max_new=5, beams=4)
    assert (beam_score >= greedy_score - 1e-5).all()
    full = torch.cat([start, beam], 1)  # the returned score is the sequence's log-probability
    logp = d(full, torch.ones_like(full), ctx, mask)[:, :-1].log_softmax(-1).gather(2, full[:, 1:, None])[..., 0]
    stop_at = [(row == 3).nonzero()[0, 0].item() + 1 if (row == 3).any() else row.numel() for row in beam]
    by_hand = torch.stack([logp[i, :n].sum() for i, n in enumerate(stop_at)])
    assert torch.allclose(beam_score, by_hand, atol=1e-4)


def test_stop_token_ends_a_sequence_and_min_new_delays_it():
    d = tiny_decoder()
    with torch.no_grad():
        d.head.bias[3] = 50.0  # the stop token always wins
    ctx, mask = context()
    start = torch.full((3, 1), 2)
    out, _ = d.generate(ctx, mask, start, stop_id=3, max_new=6, beams=2, pad_id=0)
    assert out.shape[1] == 1 and (out[:, 0] == 3).all()
    out, _ = d.generate(ctx, mask, start, stop_id=3, max_new=6, beams=2, min_new=3, pad_id=0)
    assert out.shape[1] == 4 and (out[:, 3] == 3).all() and (out[:, :3] != 3).all()


def test_decoder_starts_as_a_copy_of_the_fusion_layers_embeddings_and_mlm_head(shapes_data, tmp_path):
    cfg = config(shapes_data, tmp_path)
    method = methods.build(cfg, 40)
    model = vqa.VQAModel(method, layers=0)
    d, backbone = model.decoder, method.backbone
    assert len(d.layers) == len(backbone.fusion.layers)
    for mine, theirs in zip(d.layers, backbone.fusion.layers):
        for (name, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), name
    assert torch.equal(d.embeddings.word.weight, backbone.text.embeddings.word.weight)
    assert torch.equal(d.head.dense.weight, method.mlm_head.dense.weight)
    assert d.embeddings.word.weight.data_ptr() != backbone.text.embeddings.word.weight.data_ptr()  # a copy
    assert model.teacher is not None and method.teacher is None  # the task's teacher replaces pretraining's


def test_a_single_streams_decoder_copies_the_top_fusion_layers_of_its_stack(shapes_data, tmp_path):
    cfg = config(shapes_data, tmp_path, "model.text.text_layers=2", preset="pretrain/simla_tiny.yaml")
    method = methods.build(cfg, 40)
    stack = method.backbone.fusion.layers
    d = vqa.VQAModel(method, layers=0).decoder
    assert len(stack) == 3 and len(d.layers) == cfg.model.text.fusion_layers == 1  # the top layer of 3, as ALBEF
    for (name, a), (_, b) in zip(d.layers[0].state_dict().items(), stack[-1].state_dict().items()):
        assert torch.equal(a, b), name


def test_semmim_answers_with_its_pretrained_decoder_over_the_fused_question(semmim_checkpoint):
    """SemMIM's answer decoder is its prefix-LM decoder (the question the prefix, the answer the suffix), kept once
    under the method's keys; the task's momentum copy starts as it."""
    method, _, _ = checkpoint.load_method(semmim_checkpoint)
    pretrained = {k: v.clone() for k, v in method.decoder.state_dict().items()}
    model = vqa.VQAModel(method, layers=0)
    assert model.decoder is method.decoder and not any(k.startswith("decoder.") for k in model.state_dict())
    teacher = model.teacher["decoder"].state_dict()
    assert teacher.keys() == pretrained.keys() and all(torch.equal(teacher[k], v) for k, v in pretrained.items())
    assert model.decoder.layers[0].cross.key.in_features == method.cfg.model.text.width  # over fused text states


def test_answer_loss_weighs_each_answer_by_its_share_over_the_questions(shapes_data, tmp_path):
    cfg = config(shapes_data, tmp_path, "method.alpha=0.0")
    method = methods.build(cfg, 40)
    model = vqa.VQAModel(method, layers=0)
    b = 2
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(b, 3, 32, 32, generator=gen), "text_ids": torch.randint(5, 40, (b, 6), generator=gen),
             "text_mask": torch.ones(b, 6, dtype=torch.long), "answer_ids": torch.randint(5, 40, (3, 4), generator=gen),
             "answer_mask": torch.ones(3, 4, dtype=torch.long), "answer_weight": torch.tensor([0.7, 0.3, 1.0]),
             "answer_owner": torch.tensor([0, 0, 1])}
    loss = model(batch, 0)["vqa"]
    q = model.question(batch)
    per = [model.decoder.token_losses(batch["answer_ids"][i:i + 1], batch["answer_mask"][i:i + 1],
                                      q[o:o + 1], batch["text_mask"][o:o + 1])[0] for i, o in enumerate([0, 0, 1])]
    assert loss.item() == pytest.approx(((0.7 * per[0] + 0.3 * per[1] + per[2]) / b).item(), rel=1e-5)


def test_rank_answers_rescores_the_first_token_top_k_by_whole_likelihood():
    d = tiny_decoder()
    ctx, mask = context()
    answers = torch.tensor([[2, 7, 3, 0], [2, 8, 9, 3], [2, 7, 11, 3], [2, 12, 3, 0]])
    amask = (answers != 0).long()
    best, probs = vqa.rank_answers(d, ctx, mask, answers, amask, k=3, start_id=2)
    assert probs.shape == (3, 3) and torch.allclose(probs.sum(1), torch.ones(3))
    for q in range(3):  # by hand: every answer's log-likelihood, the top 3 by first token, softmax over them
        ll = []
        for a in range(4):
            n = int(amask[a].sum())
            seq = answers[a:a + 1, :n]
            logp = d(seq, torch.ones_like(seq), ctx[q:q + 1], mask[q:q + 1])[0, :-1].log_softmax(-1)
            ll.append(logp.gather(1, seq[0, 1:, None]).sum())
        first = d(answers[:1, :1], torch.ones(1, 1, dtype=torch.long), ctx[q:q + 1], mask[q:q + 1])[0, 0].softmax(-1)
        top = first[answers[:, 1]].topk(3).indices
        expected = torch.stack([ll[i] for i in top.tolist()]).softmax(0)
        order = expected.argsort(descending=True)
        assert best[q].tolist() == top[order].tolist()
        assert torch.allclose(probs[q], expected[order], atol=1e-5)


def test_vqa_records_give_distinct_answers_with_shares_and_bad_ones_are_named(tmp_path):
    path = tmp_path / "vqa.json"
    path.write_text(json.dumps([{"image": "a.png", "question": "what colour", "question_id": 4,
                                 "answer": ["red"] * 7 + ["blue"] * 3}]))
    (r,) = vqa.read_vqa(path, train=True)
    assert r["answers"] == ["red", "blue"] and r["weights"] == pytest.approx([0.7, 0.3]) and r["caption"] == "what colour"
    path.write_text(json.dumps([{"image": "a.png", "question": "what", "answer": ["red"]}]))
    with pytest.raises(AnnotationError, match="record 0 has no 'question_id'"):
        vqa.read_vqa(path, train=True)
    path.write_text(json.dumps([{"image": "a.png", "question": "what", "question_id": 1, "answer": []}]))
    with pytest.raises(AnnotationError, match="no 'answer' to train on"):
        vqa.read_vqa(path, train=True)


@pytest.fixture(scope="module")
def pretrained(shapes_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "albef"
    pretrain(config(shapes_data, out, "train.steps=4", "train.save_every=4"))
    return out


@pytest.mark.parametrize("method, inference", [("albef", "rank"), ("albef", "generate"), ("semmim", "generate")])
def test_vqa_finetunes_evaluates_and_writes_a_complete_result_file(method, inference, shapes_data, tmp_path, request):
    """From ALBEF's checkpoint (both inferences) and SemMIM's (open-vocabulary generation, its paper's)."""
    pretrained = request.getfixturevalue("pretrained" if method == "albef" else "semmim_checkpoint")
    model = [o for o in METHODS[method].extra if o.startswith("model.")]  # its method keys: from the checkpoint
    out = tmp_path / "vqa"
    main(["finetune", "vqa", "--config", "finetune/vqa_tiny.yaml", "--checkpoint", str(pretrained), *TINY, *model,
          f"data.root={shapes_data}", f"train.out={out}", "train.steps=4", "train.eval_every=2", "train.save_every=2",
          "eval.batch_size=16", f"task.inference={inference}"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["inference"] == inference and 0 <= metrics["vqa_accuracy"] <= 100
    assert {"vqa_accuracy_colour", "vqa_accuracy_yes/no", "val_vqa_accuracy", "prior_baseline"} <= set(metrics)
    result = tmp_path / "eval" / "metrics.json"
    main(["evaluate", "vqa", "--checkpoint", str(out), "--data", str(shapes_data), "--out", str(result)])
    answers = json.loads((result.parent / "vqa_result.json").read_text())
    test = json.loads((shapes_data / "vqa_test.json").read_text())
    assert [a["question_id"] for a in answers] == [r["question_id"] for r in test]
    assert all(isinstance(a["answer"], str) for a in answers)


def test_vqa_on_a_checkpoint_without_its_decoder_names_what_to_run(pretrained, shapes_data, capsys):
    message = cli_error(["evaluate", "vqa", "--checkpoint", str(pretrained), "--data", str(shapes_data)], capsys)
    assert "no trained 'vqa' head" in message and "vlpt finetune vqa" in message


def test_bad_inference_mode_is_a_config_error(shapes_data, tmp_path, capsys):
    message = cli_error(["finetune", "vqa", "--config", "finetune/vqa_tiny.yaml", "--checkpoint", str(tmp_path),
                         "task.inference=beam"], capsys)
    assert "task.inference" in message and "rank, generate" in message


def test_vqa_decoder_attends_to_the_text_width_keeping_what_fits_of_the_fusion_layers(shapes_data, tmp_path):
    """Vision 48 wide, text 32: the answer decoder's cross-attention reads the fused question (32), so its keys and
    values stay fresh while everything else is the fusion layers' copy."""
    cfg = config(shapes_data, tmp_path, "model.vision.width=48", "model.vision.heads=3")
    method = methods.build(cfg, 40)
    model = vqa.VQAModel(method, layers=0)
    layer, fusion = model.decoder.layers[0], method.backbone.fusion.layers[0]
    assert layer.cross.key.in_features == 32 and fusion.cross.key.in_features == 48
    assert torch.equal(layer.cross.query.weight, fusion.cross.query.weight)
    assert torch.equal(layer.attention.key.weight, fusion.attention.key.weight)
    batch = {"image": torch.randn(2, 3, 32, 32), "text_ids": torch.randint(5, 40, (2, 6)),
             "text_mask": torch.ones(2, 6, dtype=torch.long), "answer_ids": torch.randint(5, 40, (2, 3)),
             "answer_mask": torch.ones(2, 3, dtype=torch.long), "answer_weight": torch.ones(2),
             "answer_owner": torch.tensor([0, 1])}
    assert torch.isfinite(model(batch, 0)["vqa"])

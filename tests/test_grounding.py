"""Grad-CAM against a direct computation, grounding's box scores and IoU by hand, proposals files, and the finetune /
evaluate path."""
from __future__ import annotations

import json

import pytest
import torch

from vlpt import methods
from vlpt.cli import main
from vlpt.pretrain import pretrain
from vlpt.tasks import grounding
from vlpt.viz.gradcam import caption_map, gradcam
from helpers import TINY, cli_error, config


@pytest.mark.parametrize("name", ["albef", "maskvlm"])
def test_gradcam_is_attention_times_positive_gradient_of_the_match_logit(shapes_data, tmp_path, name):
    preset = f"pretrain/{name}_tiny.yaml"
    model = methods.build(config(shapes_data, tmp_path, preset=preset), 40).eval()
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 32, 32, generator=gen)
    ids = torch.randint(5, 40, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    tokens, hidden = model.backbone.encode_image(image), model.backbone.encode_text(ids, mask)
    cams = gradcam(model, tokens, hidden, mask, layer=-1)
    grid = 32 // 8
    assert cams.shape == (2, 7, grid, grid) and (cams[1, 5:] == 0).all()
    # directly: the last fusion layer's cross-attention recomputed by hand in a forward hook, its probabilities a
    # tensor of our own whose gradient autograd gives
    cross = model.backbone.fusion.layers[-1].cross
    kept = {}

    def hook(module, args, output):
        x, context = args[0], args[1]
        q, k, v = (module._split(f(t)) for f, t in ((module.query, x), (module.key, context), (module.value, context)))
        kept["probs"] = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)  # no image padding here
        h = (kept["probs"] @ v).transpose(1, 2).flatten(2)
        return module.norm(x + module.out(h))

    handle = cross.register_forward_hook(hook)
    try:
        logit = model.itm_logits(tokens, hidden, mask)[:, 1]
    finally:
        handle.remove()
    probs = kept["probs"]
    grad = torch.autograd.grad(logit.sum(), probs)[0]
    direct = (probs * grad.clamp(min=0)).mean(1)[..., 1:] * mask[..., None]
    torch.testing.assert_close(cams, direct.view(2, 7, grid, grid), atol=1e-6, rtol=1e-4)
    average = caption_map(cams, mask)
    torch.testing.assert_close(average[1], cams[1, :5].mean(0))


def test_iou_and_box_score_by_hand():
    assert grounding.iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert grounding.iou([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)
    assert grounding.iou([0, 0, 10, 10], [20, 20, 5, 5]) == 0.0
    heat = torch.zeros(16, 16)
    heat[2:6, 4:8] = 1.0  # 16 hot pixels at x 4..7, y 2..5
    assert grounding.box_score(heat, [4, 2, 4, 4]) == pytest.approx(16 / 4)
    assert grounding.box_score(heat, [0, 0, 16, 16]) == pytest.approx(16 / 16)
    assert grounding.box_score(heat, [4, 2, 2, 2]) == pytest.approx(4 / 2)


@pytest.fixture(scope="module")
def pretrained(shapes_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "albef"
    pretrain(config(shapes_data, out, "train.steps=4", "train.save_every=4"))
    return out


def test_grounding_finetunes_and_reports_its_baselines_and_a_proposals_file_is_read(pretrained, shapes_data,
                                                                                    tmp_path, capsys):
    out = tmp_path / "gr"
    main(["finetune", "grounding", "--config", "finetune/grounding_tiny.yaml", "--checkpoint", str(pretrained), *TINY,
          f"data.root={shapes_data}", f"train.out={out}", "train.steps=2", "train.eval_every=2",
          "train.save_every=2", "eval.batch_size=16"])
    metrics = json.loads((out / "metrics.json").read_text())
    records = json.loads((shapes_data / "grounding_test.json").read_text())
    assert metrics["records"] == len(records) and metrics["upper_bound"] == 100.0  # every box is a proposal
    images = {r["image"] for r in records}
    # the random baseline by hand: per record, 1 / (boxes of its image), the boxes all disjoint shapes
    boxes = {i: {tuple(r["bbox"]) for r in records if r["image"] == i} for i in images}
    by_hand = 100 * sum(1 / len(boxes[r["image"]]) for r in records) / len(records)
    assert metrics["random_baseline"] == pytest.approx(by_hand, abs=0.01)
    # the same boxes as a proposals file give the same figures
    data = tmp_path / "data"
    import shutil
    shutil.copytree(shapes_data, data)
    (data / "props.json").write_text(json.dumps({i: [list(b) for b in sorted(boxes[i])] for i in images}))
    result = tmp_path / "eval.json"
    main(["evaluate", "grounding", "--checkpoint", str(out), "--data", str(data), "--out", str(result),
          "--proposals", "props.json"])
    again = json.loads(result.read_text())
    assert again["random_baseline"] == metrics["random_baseline"] and again["upper_bound"] == 100.0
    message = cli_error(["evaluate", "grounding", "--checkpoint", str(out), "--data", str(data), "--proposals",
                         "missing.json"], capsys)
    assert "proposals file not found" in message and "[[x, y, w, h]" in message
    message = cli_error(["evaluate", "grounding", "--checkpoint", str(out), "--data", str(data), "--layer", "7"], capsys)
    assert "fusion layer 7" in message and "has 1 layers" in message


def test_visualize_gradcam_writes_a_png_and_refuses_bad_input_in_one_line(pretrained, shapes_data, tmp_path, capsys):
    image = shapes_data / json.loads((shapes_data / "grounding_test.json").read_text())[0]["image"]
    out = tmp_path / "cam.png"
    main(["visualize", "gradcam", "--checkpoint", str(pretrained), "--image", str(image), "--text", "the red shape",
          "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "ITM match probability" in capsys.readouterr().out
    assert "has 1 layers" in cli_error(["visualize", "gradcam", "--checkpoint", str(pretrained), "--image", str(image),
                                        "--text", "red", "--layer", "3", "--out", str(out)], capsys)
    assert "--text is empty" in cli_error(["visualize", "gradcam", "--checkpoint", str(pretrained), "--image",
                                           str(image), "--text", " ", "--out", str(out)], capsys)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert "corrupt image" in cli_error(["visualize", "gradcam", "--checkpoint", str(pretrained), "--image", str(bad),
                                         "--text", "red", "--out", str(out)], capsys)

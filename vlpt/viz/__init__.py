"""Pictures of what a model learned; `registry` names them for `vlpt visualize`."""
from __future__ import annotations

from vlpt.viz.registry import Visualization, register, registry, require  # noqa: F401

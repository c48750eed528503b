"""Methods: a registry of name -> Method subclass with its config dataclass; the built-in ones register on first use."""
from __future__ import annotations

from vlpt.methods.base import Method, available, build, check, register, registry  # noqa: F401

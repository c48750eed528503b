"""Method registry: a name -> a Method subclass. Importing this package registers every built-in method."""
from __future__ import annotations

from vlpt.methods.base import Method, available, build, check, register  # noqa: F401
from vlpt.methods import albef, cbvila, codis, maskvlm  # noqa: F401,E402  (registers)

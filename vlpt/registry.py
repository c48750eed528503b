"""One registry kind for methods, tasks and visualisations: a name -> what builds it and its config dataclass.

`vlpt.methods`, `vlpt.tasks` and `vlpt.viz` each hold one; importing the package registers its built-in entries, and
a user's module can register more with the same decorator (the CLI and the config pick them up).
"""
from __future__ import annotations

import difflib
from typing import Any, Callable

from vlpt.errors import ConfigError


class Registry:
    def __init__(self, kind: str, load: Callable[[], Any] | None = None):
        self.kind, self._load, self._entries = kind, load, {}

    def register(self, name: str, config: type | None = None):
        """Decorator: `@methods.register("albef", ALBEFConfig)`; sets `.name` and `.config` on what it registers."""
        def wrap(obj):
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            obj.name = name
            if config is not None:
                obj.config = config
            self._entries[name] = obj
            return obj
        return wrap

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def _loaded(self) -> dict:
        if self._load is not None:
            self._load, load = None, self._load
            load()  # imports the built-in entries (they register themselves)
        return self._entries

    def names(self) -> list[str]:
        return sorted(self._loaded())

    def __contains__(self, name: str) -> bool:
        return name in self._loaded()

    def get(self, name: str):
        entries = self._loaded()
        if name not in entries:
            near = difflib.get_close_matches(name, entries, n=1)
            raise ConfigError(f"unknown {self.kind} '{name}'" + (f"; did you mean '{near[0]}'?" if near else "")
                              + f" (available: {', '.join(self.names())})")
        return entries[name]

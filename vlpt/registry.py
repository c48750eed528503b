"""One registry kind for methods, tasks and visualisations: a name -> what builds it and its config dataclass.

`vlpt.methods`, `vlpt.tasks` and `vlpt.viz` each hold one. On first use a registry imports every module of its
package, so a new built-in entry is a new file and nothing else; a user's module registers more with the same
decorator once imported (the CLI and the config pick them up).
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil

from vlpt.errors import ConfigError


class Registry:
    def __init__(self, kind: str, package: str = ""):
        self.kind, self._package, self._entries = kind, package, {}

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
        if self._package:  # import the package's modules once: the built-in entries register themselves
            package, self._package = importlib.import_module(self._package), ""
            for module in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{package.__name__}.{module.name}")
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

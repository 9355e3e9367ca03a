"""A registry of plug-ins: name -> declaration, filled by the modules of one package, each of which
calls `register` when imported. `discover` imports them all: the built-in ones first, in the order
the report shows them, then any other module of the package by name."""
from __future__ import annotations

import importlib
import pkgutil


class Registry(dict):
    def __init__(self, kind: str, package: str, path, builtin: tuple[str, ...]):
        super().__init__()
        self.kind, self.package, self.path, self.builtin = kind, package, path, builtin

    def register(self, item):
        if item.name in self and self[item.name] != item:
            raise ValueError(f"{self.kind} {item.name!r} is registered twice")
        self[item.name] = item
        return item

    def lookup(self, name: str):
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; allowed: {', '.join(self)}")
        return self[name]

    def discover(self) -> None:
        found = sorted(m.name for m in pkgutil.iter_modules(self.path) if not m.name.startswith("_"))
        for module in [*self.builtin, *(m for m in found if m not in self.builtin)]:
            importlib.import_module(f"{self.package}.{module}")

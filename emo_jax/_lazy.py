"""Module attributes loaded on first use (PEP 562), for the package facades."""
from __future__ import annotations

import importlib
from typing import Callable, Mapping


def lazy_exports(module_name: str, exports: Mapping[str, str],
                 namespace: Mapping[str, object]) -> tuple[Callable, Callable]:
  """(`__getattr__`, `__dir__`) for a module that re-exports `name -> defining module`."""

  def __getattr__(name: str):
    if name in exports:
      return getattr(importlib.import_module(exports[name]), name)
    raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

  def __dir__() -> list[str]:
    return sorted(set(namespace) | set(exports))

  return __getattr__, __dir__

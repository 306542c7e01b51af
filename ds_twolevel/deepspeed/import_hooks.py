"""Run a function right after a module is imported (or now, if it already is): how ds_twolevel wraps
DeepSpeed's engine and transformers' Trainer without importing either before the user does.

Example:
    >>> when_imported("transformers.trainer", lambda module: print(module.Trainer))
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any, Callable


class _InstallOnImport(importlib.abc.MetaPathFinder):
    """Runs ``then(module)`` right after ``module_name`` is imported (then removes itself)."""

    def __init__(self, module_name: str, then: Callable[[Any], None]) -> None:
        self.module_name, self.then = module_name, then

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.module_name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_install(module: Any) -> None:
            exec_module(module)
            self.then(module)

        spec.loader.exec_module = exec_and_install  # type: ignore[method-assign]
        return spec


def when_imported(module_name: str, then: Callable[[Any], None]) -> None:
    """``then(module)`` now if ``module_name`` is imported, else right after it is (once per module name)."""
    if module_name in sys.modules:
        then(sys.modules[module_name])
    elif not any(isinstance(f, _InstallOnImport) and f.module_name == module_name for f in sys.meta_path):
        sys.meta_path.insert(0, _InstallOnImport(module_name, then))

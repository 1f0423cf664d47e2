"""Pruning methods, one module each; importing this package registers all of them.

`names()` lists the registered names, `get(name, **hparams)` builds one.
"""
import importlib
import pkgutil

from .base import Context, Method, get, names, register

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Context", "Method", "get", "names", "register"]

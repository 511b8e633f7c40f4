"""Distillation methods: one module per loss term, registered by name.

Importing this package imports every module in it, and each registers its terms and
methods; adding a method is one file here.
"""

import importlib
import pkgutil

from rrd_fast.methods.base import (
    InitStage,
    LossTerm,
    MethodError,
    MethodSpec,
    NetInfo,
    TermContext,
    full_precision,
    get_method,
    list_methods,
    register_method,
    register_term,
)

_NOT_TERMS = {"base", "objective"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _NOT_TERMS:
        importlib.import_module(f"{__name__}.{_module.name}")
from rrd_fast.methods.objective import Objective  # noqa: E402

__all__ = [
    "InitStage", "full_precision", "LossTerm", "MethodError", "MethodSpec", "NetInfo", "Objective", "TermContext",
    "get_method", "list_methods", "register_method", "register_term",
]

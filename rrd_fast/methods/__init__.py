"""Distillation methods: one module per loss term, registered by name.

Importing this package registers every method.
"""

from rrd_fast.methods.base import (
    LossTerm,
    MethodError,
    MethodSpec,
    NetInfo,
    TermContext,
    get_method,
    list_methods,
    register_method,
    register_term,
)
from rrd_fast.methods import ce, kd, rrd  # noqa: F401,E402  (registration)
from rrd_fast.methods.objective import Objective  # noqa: E402

__all__ = [
    "LossTerm", "MethodError", "MethodSpec", "NetInfo", "Objective", "TermContext",
    "get_method", "list_methods", "register_method", "register_term",
]

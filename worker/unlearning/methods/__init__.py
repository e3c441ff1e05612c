"""The registry of unlearning methods: ``register(name)`` decorator, ``get_method(name)``.

Built-in methods live in one module each (``original``, ``ssd``, ``ia``, ``default``, ``retrain``
and the gradient baselines ``neggrad_plus``, ``orthograd``, ``gdr_gma``, ``uno``) and register
themselves when this package is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from worker.unlearning.methods.base import Method, MethodContext, MethodResult

__all__ = [
    "Method",
    "MethodContext",
    "MethodResult",
    "available_methods",
    "get_method",
    "register",
    "run_method",
]

_REGISTRY: dict[str, Method] = {}
_BUILTIN = ("original", "ssd", "ia", "default", "retrain", "neggrad_plus", "orthograd", "gdr_gma", "uno")


def register(name: str) -> Callable[[Method], Method]:
    """Register the decorated function as method ``name`` (a name may be registered once)."""

    def decorator(fn: Method) -> Method:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"unlearning method {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def _load_builtins() -> None:
    for module in _BUILTIN:
        full = f"{__name__}.{module}"
        try:
            importlib.import_module(full)
        except ModuleNotFoundError as exc:  # a built-in not written yet; anything else propagates
            if exc.name != full:
                raise


def get_method(name: str) -> Method:
    """The method registered as ``name``; KeyError ``unknown unlearning method`` otherwise."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown unlearning method {name!r} (known: {', '.join(available_methods())})")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def run_method(name: str, ctx: MethodContext) -> MethodResult:
    """Look ``name`` up and run it on ``ctx``."""
    return get_method(name)(ctx)


_load_builtins()

"""The registry of unlearning methods, peft-style: name → settings class → run function.

One declaration per method::

    @register("ssd", config=SSDConfig, needs=Needs(full_importance=ssd_method_settings))
    def ssd_method(ctx: MethodContext) -> MethodResult: ...

``config`` is the pydantic class of the method's own block ``settings[name]`` (its JSON Schema is
what the API validates with: ``worker.unlearning.methods.schemas``); ``needs`` is what the engine
provides or computes ahead for it (:class:`Needs`). Built-in methods live in one module each
(``original``, ``ssd``, ``ia``, ``default``, ``retrain`` and the gradient baselines
``neggrad_plus``, ``orthograd``, ``gdr_gma``, ``uno``) and register themselves when this package is
imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from worker.unlearning.methods.base import Method, MethodContext, MethodResult, MethodSpec, Needs

__all__ = [
    "Method",
    "MethodContext",
    "MethodResult",
    "MethodSpec",
    "Needs",
    "available_methods",
    "get_method",
    "get_spec",
    "register",
    "run_method",
    "specs",
    "unregister",
]

_REGISTRY: dict[str, MethodSpec] = {}
_BUILTIN = ("original", "ssd", "ia", "default", "retrain", "neggrad_plus", "orthograd", "gdr_gma", "uno")


def register(
    name: str, *, config: type | None = None, needs: Needs | None = None
) -> Callable[[Method], Method]:
    """Register the decorated function as method ``name`` with its settings class and needs (a
    name may be registered once)."""

    def decorator(fn: Method) -> Method:
        if name in _REGISTRY and _REGISTRY[name].run is not fn:
            raise ValueError(f"unlearning method {name!r} is already registered")
        _REGISTRY[name] = MethodSpec(name=name, run=fn, config=config, needs=needs or Needs())
        return fn

    return decorator


def unregister(name: str) -> None:
    """Remove method ``name`` (tests register throwaway methods)."""
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    for module in _BUILTIN:
        full = f"{__name__}.{module}"
        try:
            importlib.import_module(full)
        except ModuleNotFoundError as exc:  # a built-in not written yet; anything else propagates
            if exc.name != full:
                raise


def get_spec(name: str) -> MethodSpec:
    """The spec registered as ``name``; KeyError ``unknown unlearning method`` otherwise."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown unlearning method {name!r} (known: {', '.join(available_methods())})")
    return _REGISTRY[name]


def get_method(name: str) -> Method:
    """The run function of method ``name`` (see :func:`get_spec`)."""
    return get_spec(name).run


def specs() -> list[MethodSpec]:
    """Every registered method, in registration order."""
    return list(_REGISTRY.values())


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def run_method(name: str, ctx: MethodContext) -> MethodResult:
    """Look ``name`` up, check that ``ctx`` has what it needs, and run it."""
    spec = get_spec(name)
    spec.check(ctx)
    return spec.run(ctx)


_load_builtins()

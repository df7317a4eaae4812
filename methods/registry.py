"""Name -> adapter registry, in the manner of timm's `create_model`.

A method module decorates its adapter class (or a factory function) with `@register("name")`. Every
factory takes `dim` (the code dimension D of the encoder's output) and `codebook_size` (K) plus its own
keyword options; `create_method` checks option names before building, so a typo is an error, not a default.
"""
from __future__ import annotations

import inspect
from typing import Callable

from methods.base import Quantizer

_REGISTRY: dict[str, Callable[..., Quantizer]] = {}


class MethodError(ValueError):
    """A user-caused error in choosing or configuring a method; its message names the fix."""


def register(name: str):
    def add(factory: Callable[..., Quantizer]) -> Callable[..., Quantizer]:
        if name in _REGISTRY:
            raise RuntimeError(f"method {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return add


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_options(name: str) -> dict[str, object]:
    """The options a method takes, with their defaults (dim and codebook_size excluded)."""
    params = inspect.signature(_get(name)).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.name not in ("self", "dim", "codebook_size") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


def create_method(name: str, *, dim: int, codebook_size: int, **options) -> Quantizer:
    factory = _get(name)
    known = method_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise MethodError(
            f"method {name!r} has no option {', '.join(unknown)}; its options are: "
            + (", ".join(f"{k}={v!r}" for k, v in known.items()) or "none")
        )
    return factory(dim=dim, codebook_size=codebook_size, **options)


def _get(name: str) -> Callable[..., Quantizer]:
    if name not in _REGISTRY:
        raise MethodError(f"unknown method {name!r}; valid methods: {', '.join(list_methods())}")
    return _REGISTRY[name]

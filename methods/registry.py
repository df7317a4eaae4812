"""Name -> adapter registry, in the manner of timm's `create_model`.

A method module decorates its adapter class (or a factory function) with `@register("name")`. Every
factory takes `dim` (the code dimension D of the encoder's output) and `codebook_size` (K) plus its own
keyword options, each annotated with its type; `create_method` checks option names before building, so a typo
is an error, not a default.

Everything the harness shows about a method comes from here too: `palette_slot` fixes its colour in every
figure (two methods claiming one slot is an error at import time; a method that claims none gets a free slot,
see `palette_slots`), `reference=True` marks the one method that comparisons are quoted against by default, and
`version` (1 unless raised) enters the run id, so a change to a method's definition never reuses old records.
`search_space` lists a few candidate values of the method's own defining knobs (commitment weight, EMA decay,
entropy weight, MQ's outer learning rate and rate, ...): a tuning study (bench/study.py) gives every method the
same number of trials drawn from its space crossed with the autoencoder's learning rate.

Each adapter spells out its own options in its own signature, even where several methods share the same loss
weights (ste, simvq, affine, cvq, ...): the signature is the option table, so those few repeated lines are
deliberate, as are the flag lists of the adapters built on vector-quantize-pytorch (every behaviour flag named).

Modules are discovered: `methods/__init__.py` imports every module of this package, and every module named by
an entry point of the group `vq_bench.methods` (a method living in another installed package).
"""
from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Callable

from methods.base import Quantizer

PALETTE_SIZE = 60  # matplotlib's tab20, tab20b and tab20c one after another


class MethodError(ValueError):
    """A user-caused error in choosing or configuring a method; its message names the fix."""


@dataclass(frozen=True)
class MethodEntry:
    name: str
    factory: Callable[..., Quantizer]
    palette_slot: int | None  # position in the report's palette; None: the first free one, see palette_slots
    reference: bool  # the default reference of paired comparisons and speed ratios
    module: str
    version: int  # raised when the method's definition changes, so records of the old definition are not reused
    search_space: dict  # option -> candidate values, for equal-budget tuning studies (bench/study.py)


_REGISTRY: dict[str, MethodEntry] = {}


def register(name: str, *, palette_slot: int | None = None, reference: bool = False, version: int = 1,
             search_space: dict | None = None):
    def add(factory: Callable[..., Quantizer]) -> Callable[..., Quantizer]:
        if name in _REGISTRY:
            raise RuntimeError(f"method {name!r} registered twice ({_REGISTRY[name].module} and {factory.__module__})")
        if palette_slot is not None:
            if not 0 <= palette_slot < PALETTE_SIZE:
                raise RuntimeError(f"method {name!r}: palette_slot must be in [0, {PALETTE_SIZE}), got {palette_slot}")
            taken = [e.name for e in _REGISTRY.values() if e.palette_slot == palette_slot]
            if taken:
                raise RuntimeError(f"method {name!r}: palette slot {palette_slot} is already {taken[0]!r}'s")
        if reference and reference_method() is not None:
            raise RuntimeError(f"method {name!r}: {reference_method()!r} is already the reference method")
        space = {key: tuple(values) for key, values in (search_space or {}).items()}
        options = {p.name for p in inspect.signature(factory).parameters.values()} - {"self", "dim", "codebook_size"}
        for key, values in space.items():
            if key not in options:
                raise RuntimeError(f"method {name!r}: search_space names {key!r}, which is not one of its options "
                                   f"({', '.join(sorted(options))})")
            if len(values) < 2:
                raise RuntimeError(f"method {name!r}: search_space[{key!r}] needs at least two candidate values")
        _REGISTRY[name] = MethodEntry(name, factory, palette_slot, reference, factory.__module__, version, space)
        return factory

    return add


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_entry(name: str) -> MethodEntry:
    if name not in _REGISTRY:
        raise MethodError(f"unknown method {name!r}; valid methods: {', '.join(list_methods())}")
    return _REGISTRY[name]


def method_version(name: str) -> int:
    """The method's definition version (1 for a name no registration knows: a record of a removed method)."""
    return _REGISTRY[name].version if name in _REGISTRY else 1


def search_space(name: str) -> dict[str, tuple]:
    """The candidate values of the method's own defining knobs, declared beside its registration ({} if none)."""
    return dict(method_entry(name).search_space)


def reference_method() -> str | None:
    """The registered method that comparisons are quoted against by default (`ste`)."""
    return next((e.name for e in _REGISTRY.values() if e.reference), None)


def palette_slots(extra: typing.Iterable[str] = ()) -> dict[str, int]:
    """A palette position for every registered method and every name in `extra` (a record of a method no longer
    registered), distinct by construction: claimed slots first, then the other registered methods by name over
    the free slots, then the extra names by name. A registered method's slot never depends on `extra`. Cycles
    only past 60 names."""
    slots = {e.name: e.palette_slot for e in _REGISTRY.values() if e.palette_slot is not None}
    free = [s for s in range(PALETTE_SIZE) if s not in slots.values()]
    unclaimed = sorted(set(_REGISTRY) - set(slots)) + sorted(set(extra) - set(_REGISTRY))
    for i, name in enumerate(unclaimed):
        slots[name] = free[i % len(free)]
    return slots


def _signature(name: str) -> list[inspect.Parameter]:
    params = inspect.signature(method_entry(name).factory).parameters.values()
    return [p for p in params
            if p.name not in ("self", "dim", "codebook_size") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def method_options(name: str) -> dict[str, object]:
    """The options a method takes, with their defaults (dim and codebook_size excluded)."""
    return {p.name: p.default for p in _signature(name)}


def method_option_types(name: str) -> dict[str, object]:
    """The options' annotated types (`float`, `int | None`, `tuple[int, ...]`), for parsing and checking."""
    factory = method_entry(name).factory
    hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    return {p.name: hints.get(p.name, typing.Any) for p in _signature(name)}


def check_option_names(name: str, options) -> None:
    """A MethodError naming the method's options when `options` holds a name it does not take."""
    known = method_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise MethodError(
            f"method {name!r} has no option {', '.join(unknown)}; its options are: "
            + (", ".join(f"{k}={v!r}" for k, v in known.items()) or "none")
        )


def create_method(name: str, *, dim: int, codebook_size: int, **options) -> Quantizer:
    check_option_names(name, options)
    return method_entry(name).factory(dim=dim, codebook_size=codebook_size, **options)

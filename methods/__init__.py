"""Quantizer adapters, one module per method family, registered by name.

    from methods import create_method, list_methods
    quantizer = create_method("ste", dim=64, codebook_size=512)

Every module of this package is imported here, so a new method is one module with one `@register`; methods in
other installed packages register through the entry-point group `vq_bench.methods`.
"""
import importlib
import importlib.metadata
import pkgutil

from methods.base import QuantizerOutput, Quantizer, StepResult, TrainContext, standard_step
from methods.registry import (MethodError, check_option_names, create_method, list_methods, method_entry, method_option_types,
                              method_options, method_version, palette_slots, reference_method, register,
                              search_space)

_CONTRACT = {"base", "registry"}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _CONTRACT):
    importlib.import_module(f"{__name__}.{_module}")
for _entry in importlib.metadata.entry_points(group="vq_bench.methods"):
    _entry.load()

__all__ = [
    "Quantizer", "QuantizerOutput", "StepResult", "TrainContext", "standard_step",
    "MethodError", "check_option_names", "create_method", "list_methods", "method_entry", "method_option_types", "method_options",
    "method_version", "palette_slots", "reference_method", "register", "search_space",
]

"""Quantizer adapters, one module per method family, registered by name.

    from methods import create_method, list_methods
    quantizer = create_method("ste", dim=64, codebook_size=512)
"""
from methods.base import QuantizerOutput, Quantizer, StepResult, TrainContext, standard_step
from methods.registry import MethodError, create_method, list_methods, method_options, register

# importing a family registers its methods
from methods import affine, cosine, cvq, ema, fsq, gumbel, lfq, mq, rotation, simvq, ste  # noqa: E402,F401

__all__ = [
    "Quantizer", "QuantizerOutput", "StepResult", "TrainContext", "standard_step",
    "MethodError", "create_method", "list_methods", "method_options", "register",
]

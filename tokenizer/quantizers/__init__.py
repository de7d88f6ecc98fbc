"""Quantizers behind one interface: ``build_quantizer(QuantizerConfig(kind=...))``.

Importing a quantizer module registers its kind (``registry.register_quantizer``); the imports below are
the registration of every shipped kind. A new kind is one module plus one line here.
"""

from .base import (
    Quantizer,
    QuantizerConfig,
    QuantizerConfigError,
    QuantizerOutput,
    SingleCodebookQuantizer,
    build_quantizer,
)
from .registry import Capabilities, QuantizerSpec, register_quantizer, registered_kinds, spec_of

# registration: one import per kind
from .vq import VQQuantizer
from .ema import EMAQuantizer
from .gumbel import GumbelQuantizer
from .adaptive import AdaptiveQuantizer
from .fsq import FSQuantizer
from .lfq import LFQuantizer
from .simvq import SimVQuantizer

KINDS = registered_kinds()

__all__ = [
    "KINDS",
    "AdaptiveQuantizer",
    "Capabilities",
    "EMAQuantizer",
    "FSQuantizer",
    "GumbelQuantizer",
    "LFQuantizer",
    "Quantizer",
    "QuantizerConfig",
    "QuantizerConfigError",
    "QuantizerOutput",
    "QuantizerSpec",
    "SimVQuantizer",
    "SingleCodebookQuantizer",
    "VQQuantizer",
    "build_quantizer",
    "register_quantizer",
    "registered_kinds",
    "spec_of",
]

"""Quantizers behind one interface: ``build_quantizer(QuantizerConfig(kind=...))``."""

from .adaptive import AdaptiveQuantizer
from .base import (
    KINDS,
    Quantizer,
    QuantizerConfig,
    QuantizerConfigError,
    QuantizerOutput,
    SingleCodebookQuantizer,
    build_quantizer,
)
from .ema import EMAQuantizer
from .gumbel import GumbelQuantizer
from .vq import VQQuantizer

__all__ = [
    "KINDS",
    "AdaptiveQuantizer",
    "EMAQuantizer",
    "GumbelQuantizer",
    "Quantizer",
    "QuantizerConfig",
    "QuantizerConfigError",
    "QuantizerOutput",
    "SingleCodebookQuantizer",
    "VQQuantizer",
    "build_quantizer",
]

"""The quantizer registry: each kind registers its class, the config fields it reads and what it can do.

A quantizer module declares everything about its kind next to its class: its config and its capabilities::

    @dataclass
    class FSQConfig(QuantizerConfig):
        kind: str = "fsq"
        levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])

        def check(self, fail): ...  # the kind's own validation

    @register_quantizer("fsq", config=FSQConfig,
                        capabilities=Capabilities(learned_codebook=False, kmeans_init=False, dead_code_reset=False))
    class FSQuantizer(Quantizer): ...

and ``tokenizer/quantizers/__init__.py`` imports the module (that import is the registration; a kind defined
elsewhere registers itself the same way). Nothing else names kinds: ``QuantizerConfig(kind=...)`` and config
files build the kind's config class, ``build_quantizer`` looks the class up here, and trainers, the model, the
prior and the diagnostics read the capability flags instead of comparing kind names.

This module imports nothing from the quantizer package, so ``base.py`` can use it without an import cycle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

@dataclass(frozen=True)
class Capabilities:
    """What a kind can do; read by the trainer, the model, the prior and the diagnostics.

    ``learned_codebook``: its codes are learned state (parameters or EMA buffers). False for an implicit,
    fixed code set (``fsq``'s level grid, ``lfq``'s corners of the hypercube): no k-means, no dead codes,
    and the mean distance over *all* codes is a constant of the grid, so it is not reported.
    ``kmeans_init``: the code of an input is its nearest codebook entry, so k-means centres are codes it
    will use: ``schedule.init=kmeans`` and deferred quantization's k-means step apply.
    ``dead_code_reset``: ``dead_code_threshold > 0`` re-seeds unused codes from recent inputs.
    ``codebook_selection``: several codebooks chosen per selection unit (a joint vocabulary, a selector
    whose gradient the trainer logs, ``analyse(force=i)`` for the per-branch diagnostics).
    """

    learned_codebook: bool = True
    kmeans_init: bool = True
    dead_code_reset: bool = True
    codebook_selection: bool = False

    def deferred(self) -> str | None:
        """What deferred quantization does at the end of its continuous phase, or None where it is undefined.

        ``"kmeans"``: k-means on the trained encoder's outputs initialises the codebook, then quantized
        training. ``"switch"``: an implicit code set has nothing to initialise; the continuous phase trains
        through ``Quantizer.continuous`` and quantization is switched on. None: a learned codebook that
        k-means cannot initialise (``gumbel``), so deferring would only start from a random codebook later.
        """
        if self.kmeans_init:
            return "kmeans"
        if not self.learned_codebook:
            return "switch"
        return None


@dataclass(frozen=True)
class QuantizerSpec:
    """One registered kind: its class, its config class (and so the fields it reads), its capabilities."""

    name: str
    cls: type
    config: type
    capabilities: Capabilities

    @property
    def fields(self) -> frozenset[str]:
        """The config fields the kind reads besides ``kind``."""
        return frozenset(f.name for f in dataclasses.fields(self.config) if f.name != "kind")


_REGISTRY: dict[str, QuantizerSpec] = {}


def register_quantizer(name: str, *, config: type, capabilities: Capabilities) -> Callable[[type], type]:
    """Class decorator: register ``cls`` as quantizer kind ``name`` with its config dataclass ``config`` (a
    ``QuantizerConfig`` subclass whose ``kind`` default is ``name``). The spec is also set on the class as
    ``cls.spec``."""

    def decorator(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"quantizer kind {name!r} is already registered by {_REGISTRY[name].cls.__name__}")
        kind_default = next((f.default for f in dataclasses.fields(config) if f.name == "kind"), None)
        if kind_default != name:
            raise ValueError(f"{config.__name__}.kind must default to {name!r} (got {kind_default!r})")
        spec = QuantizerSpec(name, cls, config, capabilities)
        _REGISTRY[name] = spec
        cls.spec = spec
        return cls

    return decorator


def registered_kinds() -> tuple[str, ...]:
    """Names of every registered kind, in registration order."""
    return tuple(_REGISTRY)


def spec_of(kind: str) -> QuantizerSpec | None:
    """The registration of ``kind`` (None when no such kind is registered)."""
    return _REGISTRY.get(kind)


def kinds_using(field: str) -> list[str]:
    """The registered kinds that read config field ``field`` (for error messages)."""
    return [name for name, spec in _REGISTRY.items() if field in spec.fields]

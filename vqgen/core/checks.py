"""Values no config may hold, refused before any work: the checks ``vqgen.core.config`` applies to every field.

- YAML with a key written twice in one mapping (PyYAML silently keeps the last one);
- integers with more digits than Python converts (a YAML or override value) or outside 64 bits;
- non-finite floats (``nan``, ``inf``) in any float field: learning rates, guidance scales, temperatures, ...;
- seeds (every field named ``seed`` or ``*_seed``) outside ``[0, 2**32)``, which NumPy and Accelerate accept;
- strings with a ``/``-separated part longer than a file name may be, or longer than a path may be.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

INT_LIMIT = 2**63  # |value| must be below: torch and NumPy hold integers in 64 bits
SEED_LIMIT = 2**32
NAME_MAX = 255
PATH_MAX = 4096


def _error(message: str) -> Exception:
    from .config import ConfigError  # config imports this module

    return ConfigError(message)


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a key written twice."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # left for SafeLoader to reject
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found the key {key!r} twice (first on line {seen[key] + 1}); a later one would silently replace "
                    "the earlier one: keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, UniqueKeyLoader.construct_mapping)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys and integers too long to convert.

    Raises ``yaml.YAMLError`` for both (callers already turn it into one line naming the file or override).
    """
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ValueError as err:  # int() of a number with more than sys.get_int_max_str_digits() digits
        raise yaml.YAMLError(f"a number is too long ({' '.join(str(err).split())[:120]})") from None


def check_float(value: float, key: str) -> float:
    """``value`` when it is finite (``ConfigError`` naming ``key`` otherwise)."""
    if not math.isfinite(value):
        raise _error(f"config key '{key}' must be a finite number, got {value}")
    return value


def _is_seed(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last == "seed" or last.endswith("_seed")


def check_int(value: int, key: str) -> int:
    """``value`` when it fits 64 bits (and, for a seed, ``[0, 2**32)``)."""
    if _is_seed(key) and not 0 <= value < SEED_LIMIT:
        raise _error(f"config key '{key}' is a seed: give an integer in [0, 2**32), got "
                              f"{_short(value)}")
    if not -INT_LIMIT < value < INT_LIMIT:
        raise _error(f"config key '{key}' is {_short(value)}, too large; give an integer below 2**63")
    return value


def check_str(value: str, key: str) -> str:
    """``value`` when no ``/``-separated part of it is longer than a file name may be."""
    size = len(value.encode(errors="replace"))
    if size > PATH_MAX:
        raise _error(f"config key '{key}' is {size} bytes long, more than a path may be ({PATH_MAX})")
    for part in value.split("/"):
        if len(part.encode(errors="replace")) > NAME_MAX:
            raise _error(f"config key '{key}' has a name of {len(part.encode(errors='replace'))} bytes "
                                  f"({part[:24]}...), more than a file name may be ({NAME_MAX})")
    return value


def _short(value: int) -> str:
    """A number as text, or its size when it is too long to print."""
    return str(value) if abs(value) < 10**30 else f"a number of {value.bit_length()} bits"

"""Checks of the evaluation caches before they are used (a cache is rebuilt rather than trusted when damaged).

Caches live in ``$VQGEN_CACHE`` (``~/.cache/vqgen``) and are copied between people like run folders, so every
entry is read as untrusted data: safetensors and JSON only, and checked for the shapes the code will use.
``cached_model_problem`` checks a cached feature extractor (classifier or contrastive backbone),
``reference_problem`` a cached set of real-image features; each returns why the entry cannot be used, or None.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from vqgen.core.errors import UserError
from vqgen.core.io import check_safetensors

_ARCHITECTURE_KEYS = {"channels", "image_size", "head_sizes", "width", "feature_dim"}


def warn_rebuild(path: Path, problem: str) -> None:
    """One line saying that a damaged cache entry is built again."""
    print(f"warning: the cached {path} is unusable ({problem}); building it again", file=sys.stderr)


def cached_model_problem(model_dir: Path, key: str, cfg, build) -> str | None:
    """Why the cached extractor in ``model_dir`` cannot be used, or None.

    ``meta.json`` must be the entry's (its ``cache_key``), with an ``architecture`` of the configured width and
    feature size; ``model.safetensors`` must have a sound header whose tensors are exactly those of that
    architecture (``build(**architecture)`` on the meta device, so nothing is allocated).
    """
    weights, meta_path = model_dir / "model.safetensors", model_dir / "meta.json"
    if not weights.is_file() or not meta_path.is_file():
        return "missing files"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return f"meta.json is not JSON ({type(err).__name__})"
    arch = meta.get("architecture") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or meta.get("cache_key") != key or not isinstance(arch, dict):
        return "meta.json is not this entry's"
    if set(arch) != _ARCHITECTURE_KEYS or not all(isinstance(arch[k], int) and 0 < arch[k] <= 4096
                                                  for k in _ARCHITECTURE_KEYS - {"head_sizes"}):
        return "meta.json describes another architecture"
    heads = arch["head_sizes"]
    if not isinstance(heads, list) or not all(isinstance(n, int) and 0 < n <= 100_000 for n in heads):
        return "meta.json describes another architecture"
    named = meta.get("heads", [])
    if not isinstance(named, list) or not all(isinstance(h, list) and len(h) == 2 and isinstance(h[0], str)
                                              for h in named) or [h[1] for h in named] != heads[:len(named)]:
        return "meta.json names heads the architecture does not have"
    if any(getattr(cfg, k, arch[k]) != arch[k] for k in ("width", "feature_dim")):
        return "meta.json describes another width or feature size than the configuration"
    try:
        header = check_safetensors(weights)
    except UserError as err:
        return str(err)
    with torch.device("meta"):
        expected = {k: (list(v.shape), v.dtype) for k, v in build(**arch).state_dict().items()}
    found = {k: v.get("shape") for k, v in header.items() if k != "__metadata__"}
    if set(found) != set(expected) or any(found[k] != expected[k][0] for k in expected):
        return "its tensors do not fit the architecture in meta.json"
    if any(header[k].get("dtype") != "F32" for k in expected):
        return "its tensors are not float32"
    return None


def reference_problem(path: Path) -> str | None:
    """Why the cached real-image statistics at ``path`` cannot be used, or None (``mu`` (F,) and ``sigma`` (F, F),
    ``features`` (N, F) when present (N may be 0), every floating tensor finite)."""
    from vqgen.core.io import load_safetensors

    try:
        tensors = load_safetensors(path)
    except UserError as err:
        return str(err)
    features, mu, sigma = (tensors.get(k) for k in ("features", "mu", "sigma"))
    if mu is None or sigma is None or mu.dim() != 1 or not mu.is_floating_point():
        return "it does not hold the statistics mu and sigma"
    dim = mu.shape[0]
    if tuple(sigma.shape) != (dim, dim) or (features is not None and (features.dim() != 2 or features.shape[1] != dim)):
        return "mu, sigma and the features do not fit together"
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point()):
        return "it holds values that are not finite"
    return None

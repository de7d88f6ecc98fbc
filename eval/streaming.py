"""Features of large image sets, one batch at a time: FID statistics over every image plus the features of a
seeded subset for the k-NN metrics and KID (whose cost grows with the square of the count).

A protocol scores 50,000 samples against a whole training split; holding their images (9.8 GB at 256 px for
50,000) or float64 features (0.8 GB per 50,000 Inception vectors) is not needed: :class:`FeatureStream` keeps
a :class:`~eval.fid.RunningStatistics` and the rows of a subset chosen before the pass by
:func:`subset_indices`.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from .fid import FeatureSpace, RunningStatistics
from .progress import progress

__all__ = ["FeatureStream", "stream_features", "subset_indices"]


def subset_indices(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """``min(k, n)`` distinct indices of ``range(n)``, sorted; all of them when ``k >= n`` (seeded otherwise).

    A random subset, not the first ``k``: image folders and training splits are often sorted by class.
    """
    if k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


class FeatureStream:
    """Statistics of every feature row seen, plus the rows whose position is in ``keep``."""

    def __init__(self, keep: torch.Tensor):
        self.stats = RunningStatistics()
        self._keep = keep.long()
        self._kept: list[torch.Tensor] = []
        self.seen = 0

    def update(self, features: torch.Tensor) -> None:
        """Add the next batch of features (B, F), in order."""
        b = features.shape[0]
        self.stats.update(features)
        lo, hi = torch.searchsorted(self._keep, torch.tensor([self.seen, self.seen + b]))
        if hi > lo:
            self._kept.append(features[self._keep[lo:hi] - self.seen].double().cpu())
        self.seen += b

    def tensors(self) -> dict[str, torch.Tensor]:
        """``mu`` (F,), ``sigma`` (F, F), ``features`` (subset, F) and ``count`` (1,): what a reference cache holds."""
        stats = self.stats.statistics()
        features = torch.cat(self._kept) if self._kept else torch.zeros(0, stats["mu"].shape[0], dtype=torch.float64)
        return {"mu": torch.from_numpy(np.ascontiguousarray(stats["mu"])),
                "sigma": torch.from_numpy(np.ascontiguousarray(stats["sigma"])),
                "features": features, "count": torch.tensor([self.seen], dtype=torch.long)}


def stream_features(space: FeatureSpace, batches: Iterable[torch.Tensor], total: int, keep: int, seed: int = 0,
                    desc: str = "features") -> dict[str, torch.Tensor]:
    """Feature statistics of ``total`` uint8 images (batches (B, 3, H, W)) and the features of ``keep`` of them.

    Returns :meth:`FeatureStream.tensors`; a progress bar titled ``desc`` counts the images.
    """
    stream = FeatureStream(subset_indices(total, keep, seed))
    with progress(total=total, desc=desc, unit="img") as bar:
        for batch in batches:
            batch = batch[: total - stream.seen]
            if batch.shape[0] == 0:
                break
            stream.update(space.extract_batch(batch)["features"])
            bar.update(int(batch.shape[0]))
            if stream.seen >= total:
                break
    return stream.tensors()

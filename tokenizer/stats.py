"""Codebook statistics: usage and perplexity over many batches, mean code distance, selection histogram.

Everything stays on the device and returns tensors, so calling these in a training step adds no host
synchronisation; convert with ``float()`` when logging.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from vqgen.core.distributed import all_reduce_
from .layout import codebook_of
from .search import DEFAULT_CHUNK_ELEMENTS


def code_counts(indices: torch.Tensor, num_codes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """How often each code occurs in ``indices`` (any shape) -> (num_codes,) via index_add (no sync)."""
    flat = indices.reshape(-1)
    return torch.zeros(num_codes, dtype=dtype, device=flat.device).index_add_(
        0, flat, torch.ones(flat.shape[0], dtype=dtype, device=flat.device)
    )


def perplexity_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the distribution ``counts / counts.sum()``; 0-dim tensor (1 when counts are all 0)."""
    p = counts / counts.sum().clamp_min(1e-12)
    return torch.exp(-torch.special.xlogy(p, p).sum())


def batch_stats(indices: torch.Tensor, num_codes: int) -> dict[str, torch.Tensor]:
    """``perplexity`` and ``usage`` (fraction of codes used at least once) of one batch of code ids.

    O(M) in the M ids besides zeroing the count vector, never O(K) arithmetic over the K codes (large
    implicit codebooks have far more codes than a batch has ids): with ``c`` the counts,
    ``sum_k c_k log c_k = sum_i log c[id_i]`` and the number of distinct ids is ``sum_i 1 / c[id_i]``, so
    ``perplexity = exp(log M - mean_i log c[id_i])`` and ``usage = round(sum_i 1 / c[id_i]) / K``.
    """
    flat = indices.reshape(-1)
    m = flat.shape[0]
    if m == 0:
        return {"perplexity": torch.ones((), device=flat.device), "usage": torch.zeros((), device=flat.device)}
    per_id = code_counts(flat, num_codes)[flat]  # (M,) how often each id's code occurs in the batch
    perplexity = torch.exp(math.log(m) - per_id.log().mean())
    return {"perplexity": perplexity, "usage": per_id.reciprocal().sum().round() / num_codes}


class CodeUsage:
    """Accumulates code counts over many batches; perplexity and usage are independent of batch size.

    ``update(indices)`` adds a batch (bincount-like via index_add on the indices' device, no host sync);
    under data parallelism call ``all_reduce()`` once before reading to sum the counts of every process.
    """

    def __init__(self, num_codes: int, device: torch.device | str | None = None):
        if num_codes < 1:
            raise ValueError(f"CodeUsage needs num_codes >= 1, got {num_codes}")
        self.num_codes = num_codes
        self.counts = torch.zeros(num_codes, dtype=torch.float64, device=device)

    def update(self, indices: torch.Tensor) -> None:
        """Add the code ids ``indices`` (any shape, int64 in [0, num_codes))."""
        if self.counts.device != indices.device:
            # first batch decides the device when none was given
            self.counts = self.counts.to(indices.device)
        self.counts += code_counts(indices, self.num_codes, dtype=torch.float64)

    def reset(self) -> None:
        """Forget all counts."""
        self.counts.zero_()

    def all_reduce(self) -> "CodeUsage":
        """Sum the counts over all processes (in place; call once per accumulation). Returns self."""
        all_reduce_(self.counts)
        return self

    @property
    def total(self) -> torch.Tensor:
        """Number of code ids seen, 0-dim tensor."""
        return self.counts.sum()

    def histogram(self) -> torch.Tensor:
        """(num_codes,) fraction of all ids that were each code (zeros before any update)."""
        return self.counts / self.total.clamp_min(1.0)

    def perplexity(self) -> torch.Tensor:
        """exp(entropy) of the accumulated code distribution (1 .. num_codes)."""
        return perplexity_from_counts(self.counts)

    def usage(self) -> torch.Tensor:
        """Fraction of codes used at least once."""
        return (self.counts > 0).double().mean()

    def selection_histogram(self, codebook_sizes: Sequence[int]) -> torch.Tensor:
        """For joint ids of several codebooks: (len(codebook_sizes),) fraction of ids in each codebook."""
        if sum(codebook_sizes) != self.num_codes:
            raise ValueError(f"codebook_sizes sum to {sum(codebook_sizes)}, but this CodeUsage has {self.num_codes} codes")
        per_codebook = torch.stack([part.sum() for part in self.counts.split(list(codebook_sizes))])
        return per_codebook / per_codebook.sum().clamp_min(1.0)


def selection_histogram(indices: torch.Tensor, codebook_sizes: Sequence[int]) -> torch.Tensor:
    """Fraction of joint ids ``indices`` (any shape) falling in each codebook -> (len(codebook_sizes),).

    Codebook i owns the ids [offset_i, offset_i + N_i) with offsets the running sum of ``codebook_sizes``.
    """
    which = codebook_of(indices.reshape(-1), codebook_sizes)  # (M,) codebook of each id
    counts = code_counts(which, len(codebook_sizes))
    return counts / counts.sum().clamp_min(1.0)


@torch.no_grad()
def code_distance(codes: torch.Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """Mean pairwise Euclidean distance between the rows of ``codes`` (K, D), zero diagonal included.

    Same value as ``torch.cdist(codes, codes).mean()`` (the papers' diagnostic) but computed in float64
    blocks of at most ``chunk_elements`` distances, so K = 65536 never holds a K x K matrix. For D = 1 the
    exact O(K log K) formula over the sorted values is used.
    """
    if codes.dim() != 2 or codes.shape[0] < 1:
        raise ValueError(f"code_distance expects a (K, D) codebook, got shape {tuple(codes.shape)}")
    codes = codes.detach().double()
    k = codes.shape[0]
    if codes.shape[1] == 1:
        # sum_{i,j} |x_i - x_j| = 2 * sum_i x_(i) * (2i - K + 1) for the sorted values x_(0) <= ... <= x_(K-1)
        values = codes.reshape(-1).sort().values
        weights = 2.0 * torch.arange(k, device=codes.device, dtype=codes.dtype) - (k - 1)
        return 2.0 * (values * weights).sum() / (k * k)
    rows = max(1, chunk_elements // k)
    total = codes.new_zeros(())
    for start in range(0, k, rows):
        total += torch.cdist(codes[start : start + rows], codes).sum()
    return total / (k * k)


@torch.no_grad()
def live_code_distance(codes: torch.Tensor, counts: torch.Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """Usage-weighted mean pairwise distance among the codes actually used: ``sum_ij p_i p_j ||e_i - e_j||``.

    ``codes`` (K, D), ``counts`` (K,) how often each code was used (any non-negative weights), ``p`` their
    normalisation. Unused codes have ``p = 0`` and do not count, so dead codes (which keep their initial
    value, or drift towards the origin under EMA) cannot inflate or deflate it, unlike ``code_distance``.
    Returns a 0-dim float64 tensor (0 when at most one code is used). Exact: float64 blocks of at most
    ``chunk_elements`` distances over the used codes; for D = 1 an O(K log K) formula over sorted values.
    """
    if codes.dim() != 2 or counts.shape != codes.shape[:1]:
        raise ValueError(f"live_code_distance expects codes (K, D) and counts (K,), got {tuple(codes.shape)} and "
                         f"{tuple(counts.shape)}")
    used = counts > 0
    p = counts[used].double()
    e = codes[used].detach().double()
    if p.numel() < 2:
        return torch.zeros((), dtype=torch.float64, device=codes.device)
    p = p / p.sum()
    if e.shape[1] == 1:
        # sorted x: sum_ij p_i p_j |x_i - x_j| = 2 sum_j p_j (x_j P_j - S_j), P_j / S_j = sums of p / p x below j
        x, order = e.reshape(-1).sort()
        w = p[order]
        below_p = torch.cumsum(w, 0) - w
        below_px = torch.cumsum(w * x, 0) - w * x
        return 2.0 * (w * (x * below_p - below_px)).sum()
    rows = max(1, chunk_elements // e.shape[0])
    total = e.new_zeros(())
    for start in range(0, e.shape[0], rows):
        block = torch.cdist(e[start : start + rows], e)  # (rows, K_used)
        total += (p[start : start + rows, None] * block * p[None, :]).sum()
    return total

"""k-means in torch: k-means++ seeding + Lloyd iterations, chunked, on any device; no sklearn.

Used to initialise codebooks (deferred quantization's phase 2). ``distributed_kmeans`` gathers the vectors
of every process, runs once on rank 0 and broadcasts, so every replica ends with the same codebook.
"""

from __future__ import annotations

import math

import torch

from vqgen.core.distributed import all_gather_cat, broadcast_, rank
from .search import DEFAULT_CHUNK_ELEMENTS, nearest

# One center per round (exact k-means++) up to this many centers; beyond it each round draws several
# centers from the same D^2 distribution, so k = 65536 takes 256 rounds instead of 65536.
MAX_SEEDING_ROUNDS = 256


def _min_sq_dist(x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """Squared distance from every row of ``x`` (M, D) (squared norms ``x_sq`` (M,)) to its nearest row of
    ``centers`` (C, D) -> (M,)."""
    c_sq = centers.square().sum(dim=1)  # (C,)
    rows = max(1, chunk_elements // max(centers.shape[0], 1))
    out = torch.empty_like(x_sq)
    for start in range(0, x.shape[0], rows):
        block = torch.addmm(c_sq, x[start : start + rows], centers.t(), alpha=-2.0)  # (rows, C)
        out[start : start + rows] = (block.min(dim=1).values + x_sq[start : start + rows]).clamp_min(0.0)
        del block  # one block alive at a time
    return out


def kmeans_plus_plus(
    x: torch.Tensor, k: int, generator: torch.Generator, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> torch.Tensor:
    """k-means++ seeding: (M, D) -> (k, D) centers drawn from the data with probability ~ D(x)^2.

    With k > MAX_SEEDING_ROUNDS several centers are drawn per round (without replacement). When there are
    fewer distinct points than k, the remaining centers repeat data points (Lloyd leaves them empty).
    """
    m = x.shape[0]
    first = torch.randint(m, (1,), generator=generator, device=x.device)
    centers = [x[first]]  # list of (b, D)
    x_sq = x.square().sum(dim=1)  # (M,)
    d2 = _min_sq_dist(x, x_sq, centers[0], chunk_elements)  # (M,)
    chosen = 1
    rounds_left = min(k - 1, MAX_SEEDING_ROUNDS)
    while chosen < k:
        b = math.ceil((k - chosen) / rounds_left)
        rounds_left = max(rounds_left - 1, 1)
        total = d2.sum()
        # Zero everywhere (all points already centers): fall back to uniform sampling.
        weights = d2 if float(total) > 0 else torch.ones_like(d2)
        # A tiny floor keeps every point eligible so that drawing b > (#points with d2 > 0) stays possible.
        weights = weights + weights.sum() * 1e-12 / m + 1e-30
        picked = torch.multinomial(weights, b, replacement=b > m, generator=generator)  # (b,)
        new = x[picked]  # (b, D)
        centers.append(new)
        d2 = torch.minimum(d2, _min_sq_dist(x, x_sq, new, chunk_elements))
        chosen += b
    return torch.cat(centers)[:k]


@torch.no_grad()
def kmeans(
    x: torch.Tensor, k: int, iters: int = 10, seed: int = 0, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> torch.Tensor:
    """Cluster ``x`` (M, D) into ``k`` centers -> (k, D) float32, deterministic for a given ``seed``.

    Lloyd iterations use the chunked nearest-code search (binary search when D = 1) and index_add for the
    cluster sums; a cluster that becomes empty keeps its previous center.
    """
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"kmeans needs a non-empty (M, D) tensor of vectors, got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"kmeans needs k >= 1, got {k}")
    if iters < 0:
        raise ValueError(f"kmeans needs iters >= 0, got {iters}")
    x = x.detach().float()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    with torch.autocast(device_type=x.device.type, enabled=False):  # distances need float32
        centers = kmeans_plus_plus(x, k, generator, chunk_elements)  # (k, D)
        ones = torch.ones(x.shape[0], device=x.device)
        for _ in range(iters):
            assign = nearest(x, centers, chunk_elements)  # (M,)
            sums = torch.zeros_like(centers).index_add_(0, assign, x)  # (k, D)
            counts = torch.zeros(k, device=x.device).index_add_(0, assign, ones)  # (k,)
            centers = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1.0)[:, None], centers)
    return centers


@torch.no_grad()
def distributed_kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """``kmeans`` on the vectors of all processes: gathered, computed on rank 0, broadcast -> (k, D).

    Without a process group this is plain ``kmeans``. Every process must call it (collectives).
    """
    gathered = all_gather_cat(x.detach().float().contiguous())  # (sum_r M_r, D)
    if rank() == 0:
        centers = kmeans(gathered, k, iters, seed)
    else:
        centers = torch.empty(k, x.shape[1], device=x.device, dtype=torch.float32)
    return broadcast_(centers, src=0)

"""Diversity and shrinkage diagnostics: code usage, code spread, token histograms, mode coverage.

All functions are pure (tensors in, numbers out). Logarithms are natural (nats): perplexity is
``exp(entropy)``, KL and Jensen-Shannon divergences are in nats (JS is at most ln 2).
"""

from __future__ import annotations

import math

import torch

from vqgen.tokenizer.layout import CodebookLayout

__all__ = [
    "LatentMoments",
    "code_histogram",
    "effective_rank",
    "histogram_divergence",
    "mean_pairwise_distance",
    "mode_coverage",
    "perplexity",
    "selection_histogram",
    "spread_stats",
    "token_statistics",
    "usage",
]


def code_histogram(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Counts (num_codes,) int64 of code ids in ``indices`` (any shape). Sum histograms to merge batches."""
    flat = indices.reshape(-1).long().cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_codes):
        raise ValueError(f"code ids must lie in [0, {num_codes}); got [{int(flat.min())}, {int(flat.max())}]")
    return torch.bincount(flat, minlength=num_codes)


def _probs(counts: torch.Tensor) -> torch.Tensor:
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        raise ValueError("the histogram is empty")
    return counts / total


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of a histogram: the effective number of codes used (1 .. number of bins)."""
    p = _probs(counts)
    nz = p[p > 0]
    return float(torch.exp(-(nz * nz.log()).sum()))


def usage(counts: torch.Tensor) -> float:
    """Fraction of bins with at least one count."""
    return float((counts > 0).double().mean())


def histogram_divergence(p_counts: torch.Tensor, q_counts: torch.Tensor, eps: float = 1e-8) -> dict[str, float]:
    """KL(p || q) and Jensen-Shannon between two histograms over the same bins (nats).

    KL is infinite where p has mass and q has none; ``eps`` is added to every bin of both before
    normalising so that the number stays finite (and large) in that case. JS needs no smoothing.
    """
    if p_counts.shape != q_counts.shape:
        raise ValueError(f"histograms differ in bins: {tuple(p_counts.shape)} vs {tuple(q_counts.shape)}")
    p, q = _probs(p_counts), _probs(q_counts)
    ps, qs = _probs(p + eps), _probs(q + eps)
    kl = float((ps * (ps / qs).log()).sum())
    m = (p + q) / 2

    def _kl0(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mask = a > 0  # where a > 0, m > 0 too
        return (a[mask] * (a[mask] / b[mask]).log()).sum()

    js = float((_kl0(p, m) + _kl0(q, m)) / 2)
    return {"kl": kl, "js": js}


def mean_pairwise_distance(codes: torch.Tensor, chunk: int = 2048, max_codes: int = 8192, seed: int = 0) -> float:
    """``cdist(codes, codes).mean()`` (diagonal zeros included, as the deferred-quantization paper does).

    Computed in row chunks; above ``max_codes`` codes it is estimated on a seeded random subset of that
    many codes (an unbiased estimate of the off-diagonal mean, rescaled to include the diagonal).
    """
    codes = codes.detach().double()
    n = codes.shape[0]
    if n < 2:
        return 0.0
    if n > max_codes:
        g = torch.Generator().manual_seed(seed)
        sub = codes[torch.randperm(n, generator=g)[:max_codes].to(codes.device)]
        total = sum(float(torch.cdist(rows, sub).sum()) for rows in sub.split(chunk))
        off_diag_mean = total / (max_codes * (max_codes - 1))
        return off_diag_mean * (n - 1) / n
    total = sum(float(torch.cdist(rows, codes).sum()) for rows in codes.split(chunk))
    return total / (n * n)


class LatentMoments:
    """Running mean and covariance of vectors (..., D), in float64, merged over batches."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, z: torch.Tensor) -> None:
        """Add vectors ``z`` (..., D)."""
        flat = z.detach().reshape(-1, z.shape[-1]).double().cpu()  # (M, D)
        self.n += flat.shape[0]
        self.sum += flat.sum(0)
        self.outer += flat.T @ flat

    def covariance(self) -> torch.Tensor:
        """(D, D) sample covariance of everything seen."""
        if self.n < 2:
            raise ValueError("covariance needs at least two vectors")
        mean = self.sum / self.n
        return (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)


def effective_rank(cov: torch.Tensor) -> float:
    """exp(entropy) of the normalised eigenvalues of a covariance (Roy & Vetterli 2007): 1 .. D."""
    eig = torch.linalg.eigvalsh(cov.double()).clamp(min=0)
    if eig.sum() <= 0:
        return 0.0
    p = eig / eig.sum()
    nz = p[p > 0]
    return float(torch.exp(-(nz * nz.log()).sum()))


def spread_stats(codes: torch.Tensor, latent_cov: torch.Tensor) -> dict[str, float]:
    """How widely the codes (K, D) spread compared with the encoder outputs (covariance (D, D)).

    ``trace_ratio`` = tr cov(codes) / tr cov(z_e): ~1 when the codebook spans the latents, << 1 under
    token representation shrinkage. Effective ranks say how many directions each uses.
    """
    codes = codes.detach().double().cpu()
    code_cov = torch.cov(codes.T) if codes.shape[0] > 1 else torch.zeros_like(latent_cov, dtype=torch.float64)
    code_cov = code_cov.reshape(latent_cov.shape)  # D = 1 gives a 0-d covariance
    lat_trace = float(torch.trace(latent_cov.double()))
    return {
        "trace_ratio": float(torch.trace(code_cov)) / lat_trace if lat_trace > 0 else float("nan"),
        "code_trace": float(torch.trace(code_cov)),
        "latent_trace": lat_trace,
        "effective_rank_codes": effective_rank(code_cov),
        "effective_rank_latents": effective_rank(latent_cov),
    }


def selection_histogram(indices: torch.Tensor, layout: CodebookLayout) -> torch.Tensor:
    """For joint ids of a tokenizer with several codebooks: how many tokens came from each, (K,) int64."""
    flat = indices.reshape(-1).long().cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= layout.num_codes):
        raise ValueError(f"joint ids must lie in [0, {layout.num_codes})")
    return layout.selection_counts(flat)


def token_statistics(sample_counts: torch.Tensor, data_counts: torch.Tensor) -> dict[str, float]:
    """Compare code histograms of generated tokens and data tokens (same vocabulary)."""
    div = histogram_divergence(sample_counts, data_counts)
    return {
        "token_perplexity": perplexity(sample_counts),
        "token_usage": usage(sample_counts),
        "data_token_perplexity": perplexity(data_counts),
        "data_token_usage": usage(data_counts),
        "token_kl_samples_to_data": div["kl"],
        "token_js": div["js"],
    }


def mode_coverage(sample_modes: torch.Tensor, data_modes: torch.Tensor, sizes: list[int],
                  names: list[str] | None = None) -> dict:
    """Which modes (classes, or factor combinations) the samples hit, compared with the data.

    Args:
        sample_modes: (N, F) int, per sample the class of each of F factors (F = 1 for plain labels).
        data_modes: (M, F) int, the same for the data.
        sizes: classes per factor; a mode is one combination, ``prod(sizes)`` in all.
    Returns:
        ``modes_total``, ``modes_in_data``, ``modes_hit`` (sample modes that also occur in the data),
        ``mode_coverage`` = modes_hit / modes_in_data, ``kl_samples_to_data`` and ``js`` between the
        two mode histograms, and ``per_factor`` with the same numbers for each factor alone.
    """
    names = names or [f"factor{i}" for i in range(len(sizes))]
    sample_modes, data_modes = sample_modes.long().cpu(), data_modes.long().cpu()
    if sample_modes.dim() == 1:
        sample_modes, data_modes = sample_modes[:, None], data_modes.reshape(-1, 1)
    if sample_modes.shape[1] != len(sizes) or data_modes.shape[1] != len(sizes):
        raise ValueError(f"mode arrays need {len(sizes)} columns (one per factor)")

    def joint(m: torch.Tensor) -> torch.Tensor:  # mixed-radix index of each row's combination
        idx = torch.zeros(m.shape[0], dtype=torch.long)
        for col, size in enumerate(sizes):
            idx = idx * size + m[:, col]
        return idx

    def summary(s: torch.Tensor, d: torch.Tensor, total: int) -> dict:
        hs, hd = code_histogram(s, total), code_histogram(d, total)
        in_data = hd > 0
        hit = (hs > 0) & in_data
        div = histogram_divergence(hs, hd)
        return {
            "modes_total": total,
            "modes_in_data": int(in_data.sum()),
            "modes_hit": int(hit.sum()),
            "mode_coverage": float(hit.sum()) / max(int(in_data.sum()), 1),
            "kl_samples_to_data": div["kl"],
            "js": div["js"],
        }

    out = summary(joint(sample_modes), joint(data_modes), math.prod(sizes))
    if len(sizes) > 1:
        out["per_factor"] = {
            name: summary(sample_modes[:, i], data_modes[:, i], size) for i, (name, size) in enumerate(zip(names, sizes))
        }
    return out

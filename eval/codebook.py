"""Codebook metrics over a split that measure what they claim, for one codebook or a ladder of them.

One function, :func:`codebook_metrics`, used by the tokenizer trainer's summary (validation split, every
process) and by the studies (test split):

- ``recon_mse`` (on [0, 1] images) and ``psnr`` (mean of per-image PSNR), from the same pass;
- per codebook: ``usage`` (fraction of its codes that reached the decoder at least once) and
  ``perplexity``; for a ladder the arm's ``usage`` is the selection-weighted mean of the per-codebook
  usages, never the usage of the joint vocabulary (which divides by every codebook's codes at once);
- ``perplexity`` over the joint ids (the effective number of distinct tokens, comparable across arms);
- ``live_code_distance``: the usage-weighted mean pairwise distance among the codes actually used, and
  ``live_code_distance_ratio``: that distance over the mean pairwise distance of the vectors the codebook
  quantizes (1: the used codes spread like the data; << 1: token representation shrinkage). For a ladder
  both are selection-weighted means over codebooks (each codebook in its own D_i space);
- ``code_distance``: the papers' ``cdist(codebook, codebook).mean()`` over all codes (dead ones too); None
  for an implicit codebook (``fsq``, ``lfq``), where all codes are a fixed grid and that mean is a constant
  of the configuration, not a measurement. Usage, perplexity and the live distance are defined for every
  kind: an implicit code is its grid point (``Quantizer.code_vectors``), compared with the inputs in the
  same space (``Quantizer.continuous``: ``fsq``'s bounded values, ``lfq``'s tanh);
- for a ladder: ``selection`` (share of the latent values coming from each codebook), ``selection_entropy``
  (nats, of the units' choices over the split: 0 when every image picks the same codebook) and, with
  ``oracle=True``, the MSE of every branch forced for all units (``branch_mse``), the per-image best branch
  (``oracle_mse``) and how often each branch is best (``oracle_choice``).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from vqgen.tokenizer.model import VQVAE
from vqgen.tokenizer.stats import code_distance, live_code_distance, perplexity_from_counts

__all__ = ["all_code_distance", "codebook_metrics", "tokenizer_details"]


@torch.no_grad()
def tokenizer_details(model: VQVAE, images: torch.Tensor, force: int | None = None) -> dict:
    """One eval-mode pass of ``images`` (B, C, H, W) in [-1, 1] through the tokenizer.

    Returns ``recon`` (B, C, H, W), ``z_e`` (B, h, w, D), ``ids`` (B, h, w, K_cb) every codebook's local
    code id at each position, ``share`` (B, h, w, K_cb) how much of each position's vector comes from each
    codebook, and ``unit_choice`` (B, U) the codebook chosen by each selection unit (zeros for a single
    codebook). ``force=i`` makes a ladder use codebook i everywhere.
    """
    was_training = model.training
    model.eval()
    try:
        z_e = model.encode_latents(images)  # (B, h, w, D)
        details = model.quantizer.analyse(z_e, force)
        quantized = details.pop("quantized")
        details["recon"] = model.decode_latents(quantized)
        details["z_e"] = z_e
        return details
    finally:
        model.train(was_training)


def _per_image_mse(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(B,) MSE on the [0, 1] scale of the clamped reconstruction."""
    return ((recon.clamp(-1, 1).double() - images.double()) / 2).square().flatten(1).mean(1)


def _codebook_inputs(model: VQVAE, z_e: torch.Tensor) -> list[torch.Tensor]:
    """The vectors each codebook quantizes, flattened, in the space of its codes: [(M, D_i)]."""
    return model.quantizer.codebook_inputs(z_e.reshape(-1, z_e.shape[-1]).float())


def _live_distance(model: VQVAE, codebook: int, counts: torch.Tensor) -> float:
    """Usage-weighted mean distance among the used codes of one codebook (only those are looked up)."""
    used = (counts > 0).nonzero().squeeze(1)  # (n,)
    return float(live_code_distance(model.quantizer.code_vectors(codebook, used), counts[used]))


def all_code_distance(model: VQVAE, max_codes: int | None = None) -> float | None:
    """The papers' mean pairwise distance over all codes; for a ladder the code-count-weighted mean.

    None for an implicit codebook (a fixed grid: the value is a constant of the configuration). With
    ``max_codes`` a larger codebook is estimated on an evenly strided subset of its codes (the exact value
    costs K^2 distances).
    """
    q = model.quantizer
    if not q.capabilities.learned_codebook:
        return None
    books = q.codebooks()
    sizes = [b.shape[0] for b in books]
    if max_codes:
        books = [b[:: -(-b.shape[0] // max_codes)] for b in books]
    return float(sum(float(code_distance(b)) * n for b, n in zip(books, sizes)) / sum(sizes))


@torch.no_grad()
def codebook_metrics(
    model: VQVAE,
    batches: Iterable[torch.Tensor],
    gather: Callable | None = None,
    oracle: bool = False,
    max_inputs: int = 4096,
) -> dict:
    """Metrics (see the module docstring) over image ``batches`` (each (B, C, H, W) in [-1, 1]).

    ``gather`` merges per-batch tensors across processes (e.g. ``accelerator.gather_for_metrics`` on a
    tuple); without it the batches are this process's only. The reference spread of each codebook's inputs
    uses the first ``max_inputs`` vectors seen by this process.
    """
    q = model.quantizer
    sizes = [int(n) for n in q.codebook_sizes]
    k = len(sizes)
    device = next(model.parameters()).device
    counts = [torch.zeros(n, dtype=torch.float64, device=device) for n in sizes]  # share-weighted, per codebook
    joint = torch.zeros(sum(sizes), dtype=torch.float64, device=device)
    offsets = [sum(sizes[:i]) for i in range(k)]
    unit_hist = torch.zeros(k, dtype=torch.float64, device=device)
    errors, branch_errors = [], []
    inputs: list[list[torch.Tensor]] = [[] for _ in range(k)]
    seen_inputs = 0
    for images in batches:
        images = images.to(device)
        d = tokenizer_details(model, images)
        err = _per_image_mse(d["recon"], images)  # (B,)
        parts = [err, d["ids"], d["share"], d["unit_choice"]]
        if oracle:
            forced = [_per_image_mse(tokenizer_details(model, images, force=i)["recon"], images) for i in range(k)]
            parts.append(torch.stack(forced, dim=1))  # (B, K_cb)
        if gather is not None:
            parts = list(gather(tuple(parts)))
        err, ids, share, choice = parts[:4]
        errors.append(err.double().cpu())
        if oracle:
            branch_errors.append(parts[4].double().cpu())
        ids, share = ids.reshape(-1, k), share.reshape(-1, k).double()  # (M, K_cb)
        for i in range(k):
            counts[i].index_add_(0, ids[:, i], share[:, i])
            joint.index_add_(0, ids[:, i] + offsets[i], share[:, i])
        unit_hist += torch.bincount(choice.reshape(-1), minlength=k).double()
        if seen_inputs < max_inputs:
            for i, x in enumerate(_codebook_inputs(model, d["z_e"])):
                inputs[i].append(x[: max_inputs - seen_inputs].double())
            seen_inputs += min(d["z_e"][..., 0].numel(), max_inputs - seen_inputs)

    mse = torch.cat(errors)
    selection = torch.stack([c.sum() for c in counts])
    selection = selection / selection.sum().clamp_min(1e-12)  # (K_cb,)
    usage_i = [float((c > 0).double().mean()) for c in counts]
    live, ratio = [], []
    for i in range(k):
        sample = torch.cat(inputs[i]) if inputs[i] else torch.zeros(0, 1, dtype=torch.float64)
        live.append(_live_distance(model, i, counts[i]))
        spread = float(live_code_distance(sample, sample.new_ones(sample.shape[0], dtype=torch.float64))) if len(sample) else 0.0
        ratio.append(live[-1] / spread if spread > 0 else float("nan"))
    sel = selection.cpu().tolist()
    weighted = lambda values: float(sum(s * v for s, v in zip(sel, values)))  # noqa: E731
    result = {
        "recon_mse": float(mse.mean()),
        "psnr": float((-10 * torch.log10(mse.clamp_min(1e-10))).mean()),
        "perplexity": float(perplexity_from_counts(joint)),
        "usage": weighted(usage_i),
        "live_code_distance": weighted(live),
        "live_code_distance_ratio": weighted(ratio),
        # the papers' diagnostic over all codes; for a ladder the code-count-weighted mean over codebooks
        "code_distance": all_code_distance(model),
        "num_images": int(mse.numel()),
    }
    if k > 1:
        p = unit_hist / unit_hist.sum().clamp_min(1.0)
        result.update(
            selection=sel,
            selection_entropy=float(-torch.special.xlogy(p, p).sum()),
            usage_per_codebook=usage_i,
            perplexity_per_codebook=[float(perplexity_from_counts(c)) for c in counts],
            live_code_distance_per_codebook=live,
            live_code_distance_ratio_per_codebook=ratio,
        )
    if oracle:
        branch = torch.cat(branch_errors)  # (N, K_cb)
        best = branch.min(dim=1)
        result.update(
            branch_mse=branch.mean(0).tolist(),
            oracle_mse=float(best.values.mean()),
            oracle_choice=(torch.bincount(best.indices, minlength=k).double() / branch.shape[0]).tolist(),
        )
    return result

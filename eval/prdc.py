"""Precision, recall, density and coverage of generated samples in a feature space (k-NN manifolds).

Real features ``real`` (M, F) define k-NN balls: ball i has centre ``real[i]`` and radius the distance to
its k-th nearest other real point. Following Naeem et al. 2020 ("Reliable fidelity and diversity metrics
for generative models"), with ``fake`` (N, F):

- precision: fraction of fake points inside at least one real ball (Kynkaanniemi et al. 2019);
- recall: fraction of real points inside at least one *fake* ball (fake k-NN radii);
- density: ``1/(kN) * sum_j #{i : fake_j in ball_i}`` (how many real balls contain each sample, /k;
  ~1 for a sample distribution equal to the data, can exceed 1);
- coverage: fraction of real balls that contain at least one fake point.

Membership is strict (``d < r``), as in the authors' code. Every pairwise-distance matrix is built in row
chunks, so memory is ``chunk x max(M, N)`` rather than ``M x N``.

Precision and recall are also available from torch-fidelity (``prc_features_to_metric``, membership
``d <= r``); ``eval.fid.fidelity_metrics`` reports that version, and this module supplies density and
coverage, which torch-fidelity does not have.
"""

from __future__ import annotations

import torch

__all__ = ["knn_radii", "prdc"]


def _check_features(name: str, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(x) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (num_points, feature_dim), got {getattr(x, 'shape', type(x))}")
    return x.double()


def knn_radii(features: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest *other* point.

    Args:
        features: (M, F) points.
        k: neighbourhood size; needs ``M > k``.
        chunk: rows of the distance matrix computed at once.
    Returns:
        (M,) float64 radii.
    """
    features = _check_features("features", features)
    if k < 1 or features.shape[0] <= k:
        raise ValueError(f"k-NN radii need k >= 1 and more than k={k} points, got {features.shape[0]} points")
    radii = []
    for rows in features.split(chunk):
        d = torch.cdist(rows, features)  # (chunk, M); each row holds its own 0 distance
        # k+1-th smallest skips the point itself (distance 0).
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 5, chunk: int = 1024) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` (N, F) relative to ``real`` (M, F).

    Returns a dict with float values under ``precision``, ``recall``, ``density``, ``coverage``.
    """
    real = _check_features("real", real)
    fake = _check_features("fake", fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    real_r = knn_radii(real, k, chunk)  # (M,)
    fake_r = knn_radii(fake, k, chunk)  # (N,)

    # Pass over fake rows: per fake point, how many real balls contain it (precision, density).
    balls_per_fake = []
    for rows in fake.split(chunk):
        d = torch.cdist(rows, real)  # (chunk, M)
        balls_per_fake.append((d < real_r[None, :]).sum(dim=1))
    balls_per_fake = torch.cat(balls_per_fake).double()  # (N,)

    # Pass over real rows: is each real point in some fake ball (recall); is its own ball hit (coverage).
    in_fake_ball, covered = [], []
    for rows, radii in zip(real.split(chunk), real_r.split(chunk)):
        d = torch.cdist(rows, fake)  # (chunk, N)
        in_fake_ball.append((d < fake_r[None, :]).any(dim=1))
        covered.append(d.min(dim=1).values < radii)
    in_fake_ball = torch.cat(in_fake_ball).double()
    covered = torch.cat(covered).double()

    return {
        "precision": float((balls_per_fake > 0).double().mean()),
        "recall": float(in_fake_ball.mean()),
        "density": float(balls_per_fake.mean() / k),
        "coverage": float(covered.mean()),
    }

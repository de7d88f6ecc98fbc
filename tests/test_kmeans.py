"""k-means: recovery of separated clusters, determinism, edge cases, distributed wrapper without a group."""

from __future__ import annotations

import pytest
import torch

from vqgen.tokenizer.kmeans import MAX_SEEDING_ROUNDS, distributed_kmeans, kmeans


def blobs(k: int, dim: int, per: int = 40, spread: float = 0.05, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, dim, generator=gen) * 10
    data = centers[:, None] + spread * torch.randn(k, per, dim, generator=gen)
    return centers, data.reshape(-1, dim)


@pytest.mark.parametrize("dim", [1, 2, 16])
def test_kmeans_recovers_well_separated_clusters(dim):
    centers, data = blobs(6, dim)
    found = kmeans(data, 6, iters=10, seed=0)
    assert found.shape == (6, dim)
    # every true center has a found center close by, and vice versa (a one-to-one match)
    dist = torch.cdist(centers, found, compute_mode="donot_use_mm_for_euclid_dist")
    assert float(dist.min(dim=1).values.max()) < 0.1
    assert float(dist.min(dim=0).values.max()) < 0.1


def test_kmeans_is_deterministic_for_a_seed():
    _, data = blobs(5, 4, spread=3.0)
    assert torch.equal(kmeans(data, 7, seed=3), kmeans(data, 7, seed=3))
    assert not torch.equal(kmeans(data, 7, iters=0, seed=3), kmeans(data, 7, iters=0, seed=4))


def test_kmeans_with_more_centers_than_points_repeats_data_points():
    data = torch.randn(5, 3)
    found = kmeans(data, 12, iters=3)
    assert found.shape == (12, 3)
    assert bool((torch.cdist(found, data).min(dim=1).values < 1e-4).all())
    assert torch.unique(found, dim=0).shape[0] == 5


def test_kmeans_many_centers_draws_several_per_round():
    k = MAX_SEEDING_ROUNDS + 44
    data = torch.randn(3000, 2)
    found = kmeans(data, k, iters=2, seed=0)
    assert found.shape == (k, 2)
    assert torch.unique(found, dim=0).shape[0] == k  # no duplicate centers when points are plentiful
    assert bool(torch.isfinite(found).all())


def test_kmeans_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"\(M, D\)"):
        kmeans(torch.randn(10), 2)
    with pytest.raises(ValueError, match="k >= 1"):
        kmeans(torch.randn(10, 2), 0)


def test_distributed_kmeans_without_a_process_group_is_kmeans():
    _, data = blobs(4, 3)
    torch.testing.assert_close(distributed_kmeans(data, 4, iters=5, seed=1), kmeans(data, 4, iters=5, seed=1))

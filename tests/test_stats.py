"""Code statistics: batch-size independence, known values, chunked code distance, distributed no-ops."""

from __future__ import annotations

import math

import pytest
import torch

from vqgen.core.distributed import all_gather_cat, all_reduce_, broadcast_, is_dist
from vqgen.tokenizer.quantizers import QuantizerConfig, build_quantizer
from vqgen.tokenizer.stats import (
    CodeUsage,
    batch_stats,
    code_distance,
    live_code_distance,
    perplexity_from_counts,
    selection_histogram,
)


def test_code_usage_is_independent_of_batch_size():
    gen = torch.Generator().manual_seed(0)
    ids = torch.multinomial(torch.rand(50, generator=gen) ** 3, 1000, replacement=True, generator=gen)
    results = []
    for batch in (7, 64, 1000):
        usage = CodeUsage(50)
        for chunk in ids.split(batch):
            usage.update(chunk)
        results.append((usage.perplexity(), usage.usage(), usage.histogram()))
    for perplexity, used, hist in results[1:]:
        torch.testing.assert_close(perplexity, results[0][0])
        torch.testing.assert_close(used, results[0][1])
        torch.testing.assert_close(hist, results[0][2])
    # the many-batch value differs from a single small batch's value
    assert not math.isclose(float(batch_stats(ids[:7], 50)["perplexity"]), float(results[0][0]), rel_tol=1e-3)


def test_perplexity_and_usage_known_values():
    uniform = CodeUsage(8)
    uniform.update(torch.arange(8).repeat(3))
    assert math.isclose(float(uniform.perplexity()), 8.0, rel_tol=1e-9)
    assert float(uniform.usage()) == 1.0
    single = CodeUsage(8)
    single.update(torch.full((2, 5), 3))
    assert math.isclose(float(single.perplexity()), 1.0)
    assert float(single.usage()) == 1 / 8
    stats = batch_stats(torch.tensor([0, 0, 1, 1]), 4)
    assert math.isclose(float(stats["perplexity"]), 2.0, rel_tol=1e-6) and float(stats["usage"]) == 0.5
    single.reset()
    assert float(single.total) == 0.0
    with pytest.raises(ValueError, match="num_codes"):
        CodeUsage(0)


def test_quantizer_batch_stats_agree_with_code_usage():
    q = build_quantizer(QuantizerConfig(kind="ema", codebook_size=16, dim=4)).eval()
    out = q(torch.randn(8, 3, 3, 4))
    usage = CodeUsage(16)
    usage.update(out.indices)
    torch.testing.assert_close(out.stats["perplexity"].double(), usage.perplexity(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.stats["usage"].double(), usage.usage())


@pytest.mark.parametrize("dim", [1, 3])
def test_code_distance_matches_cdist_mean_with_chunks(dim):
    codes = torch.randn(37, dim, dtype=torch.float64)
    expected = torch.cdist(codes, codes, compute_mode="donot_use_mm_for_euclid_dist").mean()
    for chunk in (37, 100, 2**24):  # one row per block, two rows, all at once
        torch.testing.assert_close(code_distance(codes, chunk_elements=chunk), expected)


def test_selection_histograms_of_joint_ids():
    sizes = [2, 4, 8]  # ids 0-1, 2-5, 6-13
    ids = torch.tensor([0, 1, 2, 5, 6, 13, 13, 13])
    torch.testing.assert_close(selection_histogram(ids, sizes), torch.tensor([0.25, 0.25, 0.5]))
    usage = CodeUsage(14)
    usage.update(ids[:3])
    usage.update(ids[3:])
    torch.testing.assert_close(usage.selection_histogram(sizes), torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="sum to"):
        usage.selection_histogram([2, 4])


def test_adaptive_selection_stat_matches_the_chosen_codebooks():
    cfg = QuantizerConfig(kind="adaptive", dim=8, capacity=32, ladder_dims=[8, 4, 2, 1], selector_heads=2)
    q = build_quantizer(cfg).eval()
    out = q(torch.randn(10, 2, 2, 8))
    torch.testing.assert_close(out.stats["selection"], selection_histogram(out.indices, q.codebook_sizes))


def test_distributed_helpers_are_no_ops_without_a_process_group():
    assert not is_dist()
    t = torch.arange(6.0).reshape(3, 2)
    assert all_reduce_(t) is t and broadcast_(t) is t and all_gather_cat(t) is t
    assert torch.equal(t, torch.arange(6.0).reshape(3, 2))


@pytest.mark.parametrize("dim", [1, 3])
def test_live_code_distance_is_usage_weighted_and_ignores_unused_codes(dim):
    torch.manual_seed(0)
    codes = torch.randn(12, dim)
    counts = torch.tensor([5.0, 0, 1, 0, 0, 3, 0, 2, 0, 0, 0, 1])
    p = counts / counts.sum()
    brute = (p[:, None] * p[None, :] * torch.cdist(codes.double(), codes.double())).sum()
    torch.testing.assert_close(live_code_distance(codes, counts), brute.double())
    moved = codes.clone()
    moved[counts == 0] = 1e6  # a dead code anywhere, e.g. blown up or decayed to the origin
    torch.testing.assert_close(live_code_distance(moved, counts), brute.double())
    assert float(code_distance(moved)) > 1e5  # the papers' all-code mean is dominated by it
    # chunking does not change the value
    torch.testing.assert_close(live_code_distance(codes, counts, chunk_elements=7), brute.double())
    # one code in use: no spread at all
    assert float(live_code_distance(codes, torch.eye(12)[3])) == 0.0


@pytest.mark.parametrize("num_codes", [3, 50, 64000])
def test_batch_stats_equal_the_histogram_formulas(num_codes):
    ids = torch.multinomial(torch.rand(num_codes) ** 3, 4096, replacement=True)
    counts = torch.bincount(ids, minlength=num_codes).double()
    stats = batch_stats(ids.reshape(64, 64), num_codes)
    torch.testing.assert_close(stats["perplexity"].double(), perplexity_from_counts(counts), rtol=1e-5, atol=0)
    assert float(stats["usage"]) == pytest.approx(float((counts > 0).double().mean()), rel=1e-6)

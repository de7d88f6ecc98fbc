"""Property tests of the quantizers: round trips, the EMA formula, the adaptive ladder, schedules, errors."""

from __future__ import annotations

import dataclasses
import math

import re

import pytest
import torch
import torch.nn.functional as F

from vqgen.core.config import ConfigError, from_dict
from vqgen.tokenizer.quantizers import (
    AdaptiveQuantizer,
    KINDS,
    QuantizerConfig,
    QuantizerConfigError,
    build_quantizer,
)
from vqgen.tokenizer.search import nearest_code, nearest_scalar

DIM = 8
# the tiny settings of each kind (a config holds only the fields its kind reads)
TINY = {
    "vq": dict(codebook_size=16, dim=DIM),
    "ema": dict(codebook_size=16, dim=DIM),
    "gumbel": dict(codebook_size=16, dim=DIM),
    "adaptive": dict(dim=DIM, capacity=32, ladder_dims=[8, 4, 2, 1], selector_heads=2),
    "fsq": dict(dim=3, levels=[5, 4, 3]),
    "lfq": dict(dim=4, codebook_size=16),
    "simvq": dict(codebook_size=16, dim=DIM),
}


def make(kind: str, **changes) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_quantizer(QuantizerConfig(kind=kind, **{**TINY[kind], **changes}))


VARIANTS = [
    pytest.param("vq", {}, id="vq"),
    pytest.param("vq", {"cosine": True}, id="vq-cosine"),
    pytest.param("vq", {"rotation_trick": True}, id="vq-rotation"),
    pytest.param("ema", {}, id="ema"),
    pytest.param("ema", {"rotation_trick": True}, id="ema-rotation"),
    pytest.param("gumbel", {}, id="gumbel"),
    pytest.param("gumbel", {"straight_through": True}, id="gumbel-hard"),
    pytest.param("adaptive", {}, id="adaptive-image"),
    pytest.param("adaptive", {"granularity": "position"}, id="adaptive-position"),
    pytest.param("fsq", {}, id="fsq"),
    pytest.param("lfq", {}, id="lfq"),
    pytest.param("simvq", {}, id="simvq"),
    pytest.param("simvq", {"rotation_trick": True}, id="simvq-rotation"),
]


@pytest.mark.parametrize("kind,changes", VARIANTS)
def test_codes_equal_lookup_of_indices_at_eval(kind, changes):
    q = make(kind, **changes)
    z = torch.randn(3, 4, 5, q.dim)
    q.train()
    q(z)  # one training step first, so updated state is what gets looked up
    q.eval()
    out = q(z)
    assert out.indices.shape == (3, 4, 5) and out.indices.dtype == torch.int64
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < q.codebook_size
    torch.testing.assert_close(q.lookup(out.indices), out.quantized, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,changes", VARIANTS)
def test_training_forward_outputs_and_gradients(kind, changes):
    q = make(kind, **changes).train()
    z = torch.randn(2, 3, 3, q.dim, requires_grad=True)
    out = q(z)
    assert out.quantized.shape == z.shape
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert {"perplexity", "usage"} <= set(out.stats)
    assert all(isinstance(v, torch.Tensor) for v in out.stats.values())
    assert 1.0 <= float(out.stats["perplexity"]) <= q.codebook_size
    (out.quantized.square().mean() + out.loss).backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_input_width_raises_clear_error(kind):
    q = make(kind)
    with pytest.raises(ValueError, match="quantizer.dim"):
        q(torch.randn(2, 3, q.dim + 1))


def test_nearest_code_matches_brute_force_with_any_chunking():
    x, codes = torch.randn(300, 5), torch.randn(70, 5)
    expected = torch.cdist(x, codes).argmin(dim=1)
    for chunk in (70, 700, 2**24):  # one row per chunk, 10 rows, everything at once
        assert torch.equal(nearest_code(x, codes, chunk_elements=chunk), expected)


def test_nearest_scalar_binary_search_matches_brute_force():
    x = torch.randn(1000) * 3
    codes = torch.randn(257, 1)
    expected = (x[:, None] - codes[:, 0][None]).abs().argmin(dim=1)
    assert torch.equal(nearest_scalar(x, codes), expected)
    # values beyond both ends map to the extreme codes
    assert torch.equal(nearest_scalar(torch.tensor([-1e6, 1e6]), codes), torch.stack([codes.argmin(), codes.argmax()]))


def test_ema_update_equals_the_formula():
    cfg = QuantizerConfig(kind="ema", codebook_size=6, dim=3, decay=0.9, eps=1e-3)
    q = build_quantizer(cfg).train()
    embed0, n0, m0 = q.embed.clone(), q.cluster_size.clone() * torch.rand(6), q.embed_avg.clone() * 2
    q.cluster_size.copy_(n0)
    q.embed_avg.copy_(m0)
    z = torch.randn(50, 3)
    out = q(z)
    assign = torch.cdist(z, embed0).argmin(dim=1)
    assert torch.equal(out.indices, assign)
    onehot = F.one_hot(assign, 6).float()  # (M, K) dense reference
    n_k = 0.9 * n0 + 0.1 * onehot.sum(0)
    m_k = 0.9 * m0 + 0.1 * onehot.t() @ z
    total = n_k.sum()
    smoothed = (n_k + 1e-3) / (total + 6 * 1e-3) * total
    torch.testing.assert_close(q.cluster_size, n_k)
    torch.testing.assert_close(q.embed_avg, m_k)
    torch.testing.assert_close(q.embed, m_k / smoothed[:, None])
    # the output was quantized with the codebook from before the update; only commitment loss
    torch.testing.assert_close(out.quantized, embed0[assign])
    torch.testing.assert_close(out.loss, 0.25 * F.mse_loss(z, embed0[assign]))


def test_ema_is_frozen_at_eval():
    q = make("ema").eval()
    before = q.embed.clone()
    q(torch.randn(4, DIM))
    assert torch.equal(q.embed, before)


def test_vq_loss_has_codebook_and_commitment_terms_in_the_right_places():
    q = make("vq", beta=0.25).train()
    z = torch.randn(10, DIM, requires_grad=True)
    out = q(z)
    out.loss.backward()
    codes = q.codebook.detach()[out.indices]
    # commitment term beta * ||z - sg(e)||^2 is the only one reaching the encoder
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z.detach() - codes) / z.numel())
    # codebook term ||sg(z) - e||^2 (weight 1) pulls the codes
    expected = torch.zeros_like(q.codebook).index_add_(0, out.indices, 2 * (codes - z.detach()) / z.numel())
    torch.testing.assert_close(q.codebook.grad, expected)


def test_adaptive_ladder_has_equal_capacity_and_joint_offsets():
    q = make("adaptive", capacity=64, ladder_dims=[16, 8, 4, 2, 1])
    assert isinstance(q, AdaptiveQuantizer)
    assert [cb.shape for cb in q.codebooks()] == [(4, 16), (8, 8), (16, 4), (32, 2), (64, 1)]
    assert all(n * d == 64 for n, d in (cb.shape for cb in q.codebooks()))
    assert q.codebook_sizes == [4, 8, 16, 32, 64]
    assert q.codebook_offsets == [0, 4, 12, 28, 60] and q.codebook_size == 124
    default = QuantizerConfig(kind="adaptive").ladder()
    assert default[0] == (512, 128) and default[-1] == (65536, 1) and all(n * d == 65536 for n, d in default)


def test_adaptive_lookup_maps_every_joint_id_to_its_own_codebook():
    q = make("adaptive").eval()
    ids = torch.tensor([[0, 3, 4, 11], [12, 27, 28, 59]])  # first/last code of each codebook
    codes = q.lookup(ids)
    for flat_pos, joint in enumerate(ids.reshape(-1).tolist()):
        i = max(j for j, off in enumerate(q.codebook_offsets) if off <= joint)
        local = joint - q.codebook_offsets[i]
        expected = q.proj_out[i](q.quantizers[i].embed[local])
        torch.testing.assert_close(codes.reshape(-1, DIM)[flat_pos], expected)


@pytest.mark.parametrize("training", [True, False])
def test_adaptive_image_granularity_uses_one_codebook_per_image(training):
    q = make("adaptive").train(training)
    out = q(torch.randn(6, 4, 4, DIM))
    which = q.codebook_of(out.indices).reshape(6, -1)  # (B, L)
    assert torch.equal(which, which[:, :1].expand_as(which))
    torch.testing.assert_close(out.stats["selection"].sum(), torch.tensor(1.0))
    assert out.stats["selection"].shape == (4,)


def test_adaptive_training_updates_every_codebook_and_trains_the_selector():
    q = make("adaptive").train()
    before = [vq.cluster_size.clone() for vq in q.quantizers]
    z = torch.randn(4, 3, 3, DIM, requires_grad=True)
    out = q(z)
    (out.quantized.square().mean() + out.loss).backward()
    assert all(not torch.equal(b, vq.cluster_size) for b, vq in zip(before, q.quantizers))
    assert q.query.weight.grad is not None and float(q.query.weight.grad.abs().sum()) > 0
    assert q.keys.grad is not None and float(q.keys.grad.abs().sum()) > 0
    assert int(q.num_steps) == 0  # the schedule counts optimizer steps: only step_schedule() moves it
    q.step_schedule()
    assert int(q.num_steps) == 1


def test_gumbel_eval_is_deterministic_and_training_is_not():
    q = make("gumbel", codebook_size=64)
    z = torch.randn(8, 4, DIM)
    q.eval()
    a, b = q(z), q(z)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.quantized, b.quantized)
    assert torch.equal(a.indices, q.proj(z).argmax(dim=-1))
    q.train()
    torch.manual_seed(1)
    c = q(z)
    torch.manual_seed(2)
    d = q(z)
    assert not torch.equal(c.quantized, d.quantized)


def test_gumbel_tau_schedule_is_exponential_and_restored_from_state():
    q = make("gumbel", tau_start=1.0, tau_end=1 / 16, tau_anneal_steps=10)
    assert math.isclose(float(q.tau()), 1.0)
    q.train()
    for _ in range(5):
        out = q(torch.randn(2, DIM))
        q(torch.randn(2, DIM))  # a second forward in the same step (e.g. accumulation) does not count
        q.step_schedule()
    assert int(q.num_steps) == 5
    assert math.isclose(float(q.tau()), 0.25, rel_tol=1e-5)  # halfway: sqrt(1 * 1/16)
    assert math.isclose(float(out.stats["tau"]), (1 / 16) ** 0.4, rel_tol=1e-5)  # tau used at step 4
    other = make("gumbel", tau_start=1.0, tau_end=1 / 16, tau_anneal_steps=10)
    other.load_state_dict(q.state_dict())
    assert math.isclose(float(other.tau()), 0.25, rel_tol=1e-5)
    q.num_steps.fill_(100)
    assert math.isclose(float(q.tau()), 1 / 16, rel_tol=1e-5)


def test_adaptive_tau_schedule_is_linear():
    q = make("adaptive", selector_tau_start=2e4, selector_tau_end=1.0, selector_tau_steps=20000)
    assert math.isclose(float(q.tau()), 2e4)
    q.num_steps.fill_(10000)
    assert math.isclose(float(q.tau()), (2e4 + 1) / 2, rel_tol=1e-6)
    q.num_steps.fill_(30000)
    assert math.isclose(float(q.tau()), 1.0)


@pytest.mark.parametrize("kind", ["vq", "ema", "gumbel", "simvq"])
def test_init_codebook_places_codes_on_separated_clusters(kind):
    torch.manual_seed(0)
    centers = torch.eye(DIM)[:4] * 10  # 4 far-apart clusters
    data = (centers[:, None] + 0.01 * torch.randn(4, 50, DIM)).reshape(-1, DIM)
    q = make(kind, codebook_size=4)
    q.init_codebook(data)
    dist = torch.cdist(centers, q.codebooks()[0])
    assert float(dist.min(dim=1).values.max()) < 0.1
    q.eval()
    out = q(centers)
    assert out.indices.unique().numel() == 4  # each cluster gets its own code
    with pytest.raises(ValueError, match="init_codebook expects"):
        q.init_codebook(torch.randn(10, DIM + 1))


def test_adaptive_init_codebook_runs_kmeans_in_every_projected_space():
    q = make("adaptive")
    vectors = torch.randn(400, DIM)
    q.init_codebook(vectors)
    for p_in, vq in zip(q.proj_in, q.quantizers):
        projected = p_in(vectors).detach()
        # every code is a mean of projected vectors: inside their bounding box
        assert bool((vq.embed >= projected.min(0).values - 1e-5).all())
        assert bool((vq.embed <= projected.max(0).values + 1e-5).all())
        torch.testing.assert_close(vq.embed_avg, vq.embed)


@pytest.mark.parametrize("kind", ["vq", "ema", "gumbel"])
def test_dead_codes_are_reseeded_from_recent_inputs(kind):
    q = make(kind, codebook_size=8, dead_code_threshold=0.5, dead_code_window=3, decay=0.5).train()
    q.init_codebook(torch.randn(64, DIM))
    # all inputs sit at one point: few codes are used, the others die (EMA usage 0.5**3 < 0.5)
    z = torch.full((32, DIM), 3.0) + 0.001 * torch.randn(32, DIM)
    used = torch.zeros(8, dtype=torch.bool)
    for _ in range(3):
        used[q(z).indices] = True
    codes = q.codebooks()[0]
    reseeded = (codes[:, None] == z[None]).all(dim=-1).any(dim=1)  # codes equal to some input row
    assert int(used.sum()) <= 2
    assert torch.equal(reseeded, ~used)
    assert bool((q.usage_counts() >= 0.5 - 1e-6).all())


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"kind": "rvq"}, "unknown kind"),
        ({"kind": "adaptive", "capacity": 64, "ladder_dims": [16, 3]}, "does not divide capacity"),
        ({"kind": "adaptive", "ladder_dims": []}, "at least one"),
        ({"kind": "adaptive", "ladder_dims": [8, 8]}, "must not repeat"),
        ({"codebook_size": 0}, "codebook_size"),
        ({"kind": "gumbel", "tau_start": 0.5, "tau_end": 1.0}, "must not exceed"),
        ({"kind": "adaptive", "selector_tau_start": 1.0, "selector_tau_end": 2.0}, "must not exceed"),
        ({"kind": "gumbel", "tau_end": 0.0}, "must be > 0"),
        ({"kind": "ema", "cosine": True}, r"cosine=true is not an option of kind 'ema'.*kind that reads it \(vq\)"),
        ({"kind": "gumbel", "rotation_trick": True}, "rotation_trick=true is not an option of kind 'gumbel'"),
        ({"kind": "vq", "capacity": 1024}, "capacity=1024 is not an option of kind 'vq'"),
        ({"kind": "fsq", "dim": 4, "levels": [8, 5, 5, 5], "codebook_size": 1000}, "codebook_size=1000 is not an option"),
        ({"kind": "fsq", "dim": 64, "levels": [8, 5, 5, 5]}, r"dim \(64\) must equal len\(levels\) \(4\); set dim=4"),
        ({"kind": "fsq", "dim": 2, "levels": [2, 5]}, ">= 3 values"),
        ({"kind": "fsq", "dim": 3, "levels": [128, 128, 128]}, "at most"),
        ({"kind": "lfq", "dim": 10, "codebook_size": 512}, "codebook_size must be 1024"),
        ({"kind": "lfq", "dim": 4, "codebook_size": 16, "entropy_temperature": 0.0}, "entropy_temperature > 0"),
        ({"kind": "simvq", "dead_code_threshold": 1.0}, "dead_code_threshold=1.0 is not an option of kind 'simvq'"),
        ({"kind": "ema", "levels": [5, 5]}, "levels=\\[5, 5\\] is not an option of kind 'ema'.*\\(fsq\\)"),
        ({"kind": "vq", "cosine": True, "dim": 1}, "dim >= 2"),
        ({"decay": 1.0}, "decay"),
        ({"kind": "adaptive", "granularity": "channel"}, "granularity"),
        ({"kind": "adaptive", "dim": 6, "selector_heads": 4}, "selector_heads"),
        ({"dead_code_threshold": -1.0}, "dead_code_threshold"),
        ({"dead_code_window": 0}, "dead_code_window"),
    ],
)
def test_bad_configurations_raise_one_clear_error(changes, match):
    # what users of YAML / key=value configs get: one ConfigError (a ValueError) naming the field
    with pytest.raises(ConfigError, match=match):
        from_dict(QuantizerConfig, changes)
    try:  # from Python: a field of another kind is not even an argument of the kind's config class
        cfg = QuantizerConfig(**changes)
    except TypeError as err:
        assert "unexpected keyword argument" in str(err)
        return
    except QuantizerConfigError as err:
        assert re.search(match, str(err))
        return
    with pytest.raises(QuantizerConfigError, match=match):
        build_quantizer(cfg)


def test_hard_gumbel_softmax_is_one_hot_with_soft_gradients():
    from vqgen.tokenizer.quantizers.gumbel import gumbel_softmax

    logits = torch.randn(20, 6, requires_grad=True)
    y = gumbel_softmax(logits, torch.tensor(0.5), hard=True)
    # one-hot up to float rounding of the straight-through sum one_hot + soft - sg(soft)
    torch.testing.assert_close(y.detach(), F.one_hot(y.detach().argmax(dim=-1), 6).float(), atol=1e-6, rtol=0)
    (y * torch.randn(20, 6)).sum().backward()
    assert float(logits.grad.abs().sum()) > 0


# ------------------------------------------------------------------ the authors' selector (faithful option)
FAITHFUL = dict(dim=16, capacity=32, ladder_dims=[8, 4, 2, 1], selector_heads=2, selector_logits="attention_probs",
                granularity="view", selector_eval_noise=True, projection="conv")


def _reference_attention_probs(q: AdaptiveQuantizer, units: torch.Tensor) -> torch.Tensor:
    """Head-averaged softmax attention of each unit (B, U, C) over the codebook keys, from the equations:
    per head h, a_j = softmax_j((W_q^h x + b_q^h) . (W_k^h e_j + b_k^h) / sqrt(d_h)); p_j = mean_h a_j."""
    c, heads = q.dim, q.config.selector_heads
    w, b = q.attention.in_proj_weight, q.attention.in_proj_bias
    query = units @ w[:c].T + b[:c]  # (B, U, C)
    keys = q.keys @ w[c : 2 * c].T + b[c : 2 * c]  # (K, C)
    dh = c // heads
    probs = []
    for h in range(heads):
        s = query[..., h * dh : (h + 1) * dh] @ keys[:, h * dh : (h + 1) * dh].T / math.sqrt(dh)  # (B, U, K)
        probs.append(s.softmax(dim=-1))
    return torch.stack(probs).mean(0)


def test_faithful_selector_matches_the_authors_equations():
    q = make("adaptive", **FAITHFUL).eval()
    b, h, w, c = 3, 4, 4, 16
    z = torch.randn(b, h, w, c)
    # the authors' unit: rows of h.view(-1, C) over the NCHW latent, i.e. C consecutive values of (C, h, w)
    rows = z.permute(0, 3, 1, 2).reshape(b, h * w * c // c, c)  # (B, U=L, C); with C = L each row is one channel
    expected = _reference_attention_probs(q, rows)
    got = q.selector_logits(z.reshape(b, h * w, c)).detach()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert float(got.min()) >= 0 and float(got.max()) <= 1  # probabilities passed on as logits

    # output: each row takes its chosen codebook's back-projection (3x3 conv of the codes on the grid)
    details = q.analyse(z)
    choice = details["unit_choice"]  # (B, U)
    branch = []
    for i, (p_in, vq, conv) in enumerate(zip(q.proj_in, q.quantizers, q.proj_out)):
        codes = vq.lookup(nearest_code(p_in(z.reshape(-1, c)), vq.embed)).reshape(b, h, w, -1)
        branch.append(conv(codes.permute(0, 3, 1, 2)).reshape(b, -1, c))  # NCHW memory cut into rows (B, U, C)
    mixed = torch.stack(branch, dim=-1).gather(-1, choice[:, :, None, None].expand(b, h * w, c, 1))[..., 0]
    expected_out = mixed.reshape(b, c, h, w).permute(0, 2, 3, 1)
    torch.testing.assert_close(details["quantized"], expected_out, atol=1e-5, rtol=1e-5)


def test_faithful_selection_is_a_gumbel_draw_at_eval_with_the_probabilities_as_logits():
    q = make("adaptive", **FAITHFUL).eval()
    z = torch.randn(1, 4, 4, 16)
    probs = q.selector_logits(z.reshape(1, 16, 16)).detach()[0]  # (U, K)
    torch.manual_seed(0)
    draws = torch.stack([q.analyse(z)["unit_choice"][0] for _ in range(400)])  # (400, U)
    freq = F.one_hot(draws, 4).double().mean(0)  # (U, K)
    # Gumbel-max: P(j) = softmax(logits)_j; with logits in [0, 1] no codebook gets more than e / (e + K - 1)
    torch.testing.assert_close(freq, probs.double().softmax(-1), atol=0.1, rtol=0)
    assert float(probs.softmax(-1).max()) <= math.e / (math.e + 3) + 1e-6


def test_view_granularity_share_counts_channels_per_position():
    q = make("adaptive", **{**FAITHFUL, "selector_eval_noise": False}).eval()
    z = torch.randn(2, 2, 4, 16)  # L = 8 positions, C = 16: every row holds two channels
    details = q.analyse(z)
    share = details["share"]  # (B, h, w, K)
    torch.testing.assert_close(share.sum(-1), torch.ones(2, 2, 4))
    choice = details["unit_choice"]  # (B, 8)
    # channel ch at position p sits at offset ch * 8 + p of (C, L): row (ch * 8 + p) // 16
    rows = (torch.arange(16)[:, None] * 8 + torch.arange(8)[None]) // 16  # (C, L)
    expected = F.one_hot(choice[:, rows], 4).float().mean(1)  # (B, L, K)
    torch.testing.assert_close(share.reshape(2, 8, 4), expected)


def test_relative_dead_code_threshold_means_the_same_for_any_codebook_size():
    """dead_code_relative: the threshold is a fraction of the uniform share sum(counts) / K, so a code used a tenth
    as often as the others is dead in a codebook of 8 and of 64 alike; live codes are left alone."""
    for size in (8, 64):
        q = make("ema", codebook_size=size, dead_code_threshold=0.25, dead_code_relative=True, dead_code_window=1)
        q.train()
        counts = torch.full((size,), 10.0)
        counts[:2] = 1.0  # two rarely used codes: below 0.25 x the uniform share (about 10)
        q.cluster_size.copy_(counts)
        before = q.embed.clone()
        level = q.dead_code_level(q.usage_counts())
        assert level == pytest.approx(0.25 * float(counts.sum()) / size)
        assert q.reset_dead_codes(torch.randn(16, DIM)) == 2
        assert not torch.equal(q.embed[:2], before[:2]) and torch.equal(q.embed[2:], before[2:])
        assert q.cluster_size[:2].tolist() == pytest.approx([level, level])  # re-seeded codes start at the level


def test_adaptive_resets_dead_codes_in_every_branch():
    """Each codebook of the ladder re-seeds its own dead codes from the inputs in its own projected space."""
    q = make("adaptive", capacity=64, ladder_dims=[8, 4, 2], dead_code_threshold=0.5, dead_code_relative=True,
             dead_code_window=2, decay=0.5)
    q.init_codebook(torch.randn(256, DIM))
    q.train()
    z = torch.full((4, 5, DIM), 2.0) + 0.01 * torch.randn(4, 5, DIM)  # one cluster: most codes go unused
    for _ in range(2):
        q(z)
    for p_in, vq in zip(q.proj_in, q.quantizers):
        projected = p_in(z.reshape(-1, DIM)).detach()
        reseeded = (vq.embed[:, None] == projected[None]).all(-1).any(1)
        assert vq._resets == 1 and int(reseeded.sum()) >= vq.config.codebook_size // 2

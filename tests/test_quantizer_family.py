"""FSQ, LFQ, SimVQ and the rotation trick against their papers' equations; the registry; the four end to end."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vqgen.eval.codebook import codebook_metrics
from vqgen.pipelines.cli import main as vqgen
from vqgen.pipelines.train_tokenizer import TokenizerRunConfig, train_tokenizer
from vqgen.prior.model import Prior
from vqgen.prior.vocab import TokenVocab
from safetensors.torch import load_file
from vqgen.core.config import ConfigError, from_dict, load_config
from vqgen.tokenizer.model import ModelConfig, VQVAE
from vqgen.tokenizer.quantizers import (
    KINDS,
    Capabilities,
    Quantizer,
    QuantizerConfig,
    QuantizerConfigError,
    QuantizerOutput,
    build_quantizer,
    register_quantizer,
    spec_of,
)
from vqgen.tokenizer.quantizers import registry
from vqgen.tokenizer.quantizers.base import rotation_trick, straight_through
from vqgen.tokenizer.quantizers.lfq import lfq_entropies
from vqgen.tokenizer.stats import batch_stats, live_code_distance

REPO = Path(__file__).resolve().parents[1]


def build(**settings) -> Quantizer:
    torch.manual_seed(0)
    return build_quantizer(QuantizerConfig(**settings))


# ------------------------------------------------------------------------------------------------ FSQ
def test_fsq_codes_lie_on_the_level_grid_and_ids_are_mixed_radix():
    levels = [8, 5, 4, 3]  # even and odd levels
    q = build(kind="fsq", dim=4, levels=levels).eval()
    z = torch.randn(4096, 4) * 3
    out = q(z)
    widths = [lv // 2 for lv in levels]
    for i, (lv, w) in enumerate(zip(levels, widths)):
        grid = torch.tensor([(k - w) / w for k in range(lv)])  # the L_i values of channel i, in [-1, 1]
        values = out.quantized[:, i].unique()
        torch.testing.assert_close(values, grid)  # on the grid, and every level is reached
    digits = torch.round(out.quantized * torch.tensor(widths, dtype=torch.float32)).long() + torch.tensor(widths)
    basis = torch.tensor([1, 8, 40, 160])  # prod of the levels before each channel
    assert torch.equal(out.indices, (digits * basis).sum(-1))
    assert torch.equal(q.lookup(out.indices), out.quantized)
    grid = q.codebooks()[0]
    assert grid.shape == (math.prod(levels), 4) and q.codebook_size == 480
    assert torch.unique(grid, dim=0).shape[0] == 480  # every id names its own grid point
    assert float(out.loss) == 0.0


@pytest.mark.parametrize("kind,settings", [("fsq", dict(dim=6, levels=[8, 8, 8, 5, 5, 5])),
                                            ("lfq", dict(dim=14, codebook_size=2**14)),
                                            ("simvq", dict(codebook_size=4096, dim=8))])
def test_ids_are_exact_under_autocast(kind, settings):
    q = build(kind=kind, **settings).eval()
    z = torch.randn(2000, q.dim) * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = q(z)
    assert torch.equal(low.indices, q(z).indices)  # bf16 would round ids above 256


def test_fsq_bound_is_centred_and_gradient_passes_through_rounding():
    q = build(kind="fsq", dim=3, levels=[8, 5, 4])
    torch.testing.assert_close(q.bound(torch.zeros(1, 3)), torch.zeros(1, 3), atol=1e-6, rtol=0)
    z = torch.randn(50, 3, requires_grad=True)
    out = q.train()(z)
    out.quantized.sum().backward()
    t = torch.tanh(z.detach() + q._shift)
    expected = q._half_l * (1 - t.square()) / q._width  # d(bound(z) / w)/dz, rounding passed straight through
    torch.testing.assert_close(z.grad, expected)
    # the continuous phase sees what rounding acts on, on the codes' scale
    cont = q.continuous(z.detach())
    torch.testing.assert_close(torch.round(cont * q._width) / q._width, out.quantized.detach())


# ------------------------------------------------------------------------------------------------ LFQ
def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(-1)


@pytest.mark.parametrize("spread", ["random", "independent-bits"])
def test_lfq_entropies_match_a_brute_force_over_all_codes(spread):
    d, temperature = 3, 0.5
    q = build(kind="lfq", dim=d, codebook_size=2**d, entropy_temperature=temperature, beta=0.25,
              entropy_weight=0.1, entropy_gamma=1.0)
    codes = q.codebooks()[0]  # (8, 3) every sign pattern
    torch.manual_seed(1)
    z = torch.randn(64, d) if spread == "random" else codes * 0.3  # the latter: bits independent over the batch
    soft = (-torch.cdist(z, codes).square() / temperature).softmax(dim=-1)  # (M, 2^D) soft assignment
    per_sample_bf = _entropy(soft).mean()
    joint_bf = _entropy(soft.mean(0))  # H(E_z p): the exact codebook entropy
    bit_mean = torch.stack([soft.mean(0)[codes[:, i] > 0].sum() for i in range(d)])  # (D,) P(bit d = +1)
    product = torch.stack([torch.where(c > 0, bit_mean, 1 - bit_mean).prod() for c in codes])  # (2^D,)
    per_sample, codebook = lfq_entropies(z, temperature)
    torch.testing.assert_close(per_sample, per_sample_bf, atol=1e-5, rtol=1e-5)  # exact: p factorises per z
    torch.testing.assert_close(codebook, _entropy(product), atol=1e-5, rtol=1e-5)  # entropy of the marginals
    assert float(codebook) >= float(joint_bf) - 1e-6  # an upper bound of the joint entropy ...
    if spread == "independent-bits":
        torch.testing.assert_close(codebook, joint_bf, atol=1e-5, rtol=1e-5)  # ... equal when bits are independent
    out = q.train()(z)
    expected = 0.25 * F.mse_loss(z, torch.where(z >= 0, 1.0, -1.0)) + 0.1 * (per_sample_bf - 1.0 * codebook)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def test_lfq_ids_are_the_sign_bits_and_round_trip():
    q = build(kind="lfq", dim=4, codebook_size=16).eval()
    codes = q.lookup(torch.arange(16))  # (16, 4)
    assert torch.equal(codes[1], torch.tensor([-1.0, -1.0, -1.0, 1.0]))  # dimension 0 is the most significant bit
    assert torch.equal(q(codes * 0.7).indices, torch.arange(16))
    z = torch.randn(2, 5, 4)
    out = q(z)
    assert torch.equal(out.quantized, torch.where(z >= 0, 1.0, -1.0)) and torch.equal(q.lookup(out.indices), out.quantized)


# ------------------------------------------------------------------------------------------------ SimVQ
def test_simvq_codebook_is_frozen_and_the_map_learned():
    q = build(kind="simvq", codebook_size=16, dim=8, beta=0.25).train()
    assert [name for name, _ in q.named_parameters()] == ["map"]  # the codebook is a buffer: no gradient
    assert not q.frozen.requires_grad and "frozen" in q.state_dict()
    frozen0, codes0 = q.frozen.clone(), q.codebooks()[0].clone()
    z = torch.randn(32, 8)
    out = q(z)
    out.loss.backward()
    # codebook term ||sg(z) - C_k W||^2 reaches W: dL/dW = C_idx^T 2 (q - z) / numel; commitment does not
    c = q.frozen[out.indices]
    torch.testing.assert_close(q.map.grad, c.T @ (2 * (c @ q.map.detach() - z) / z.numel()))
    torch.optim.SGD(q.parameters(), lr=0.5).step()
    assert torch.equal(q.frozen, frozen0)
    moved = (q.codebooks()[0] - codes0).norm(dim=1) > 0
    assert bool(moved.all()) and out.indices.unique().numel() < 16  # unused codes move too: one shared map


def test_simvq_kmeans_sets_the_frozen_codebook_and_resets_the_map():
    q = build(kind="simvq", codebook_size=4, dim=8)
    q.map.data.mul_(3.0)
    data = torch.eye(8)[:4].repeat_interleave(20, 0) * 10 + 0.01 * torch.randn(80, 8)
    q.init_codebook(data)
    assert torch.equal(q.map.data, torch.eye(8))
    torch.testing.assert_close(q.codebooks()[0], q.frozen)
    assert float(torch.cdist(torch.eye(8)[:4] * 10, q.frozen).min(1).values.max()) < 0.1


# ------------------------------------------------------------------------------------------------ rotation trick
def _rotation(e: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The paper's R (D, D) and lambda for one pair of vectors."""
    e_hat, q_hat = e / e.norm(), q / q.norm()
    r = (e_hat + q_hat) / (e_hat + q_hat).norm()
    eye = torch.eye(e.shape[0], dtype=e.dtype)
    return eye - 2 * torch.outer(r, r) + 2 * torch.outer(q_hat, e_hat), float(q.norm() / e.norm())


def test_rotation_trick_forward_is_straight_through_and_gradient_the_closed_form():
    torch.manual_seed(0)
    x, q, g = (torch.randn(6, 5, dtype=torch.float64) for _ in range(3))
    x.requires_grad_(True)
    out = rotation_trick(x, q)
    assert torch.equal(out, straight_through(x, q)) and torch.equal(out, q)
    out.backward(g)
    for i in range(6):
        rot, lam = _rotation(x.detach()[i], q[i])
        torch.testing.assert_close(rot.T @ rot, torch.eye(5, dtype=torch.float64))  # a rotation ...
        torch.testing.assert_close(lam * rot @ x.detach()[i], q[i])  # ... that, rescaled, takes x to q
        torch.testing.assert_close(x.grad[i], lam * rot.T @ g[i])
    # by hand in 2-D: x = (1, 0), q = (0, 2): R turns by +90 degrees, lambda = 2, so g = (1, 0) becomes (0, -2)
    x2 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    rotation_trick(x2, torch.tensor([[0.0, 2.0]])).backward(torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(x2.grad, torch.tensor([[0.0, -2.0]]))


@pytest.mark.parametrize("kind", ["vq", "ema", "simvq"])
def test_rotation_trick_option_keeps_the_forward_and_rotates_the_encoder_gradient(kind):
    settings = dict(kind=kind, codebook_size=16, dim=8)
    plain, rotated = build(**settings).train(), build(**settings, rotation_trick=True).train()
    z = torch.randn(40, 8)
    upstream = torch.randn(40, 8)
    grads, outs = [], []
    for q in (plain, rotated):
        zz = z.clone().requires_grad_(True)
        out = q(zz)
        (out.quantized * upstream).sum().backward()
        grads.append(zz.grad)
        outs.append(out)
    assert torch.equal(outs[0].quantized, outs[1].quantized) and torch.equal(outs[0].indices, outs[1].indices)
    torch.testing.assert_close(grads[0], upstream)  # straight-through copies the gradient
    codes = outs[1].quantized.detach()
    expected = torch.stack([(lambda r, lam: lam * r.T @ g)(*_rotation(e, c)) for e, c, g in zip(z, codes, upstream)])
    torch.testing.assert_close(grads[1], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("gradient", ["straight_through", "rotation", "rotation_no_rescale", "rescale_no_rotation"])
def test_rotation_diagnostic_splits_the_trick_into_rotation_and_rescale(benchmark_script, gradient):
    """benchmarks/rotation_deferred.py's variants: inside its probe a VQ layer's encoder gradient is g, lambda R^T g,
    R^T g or lambda g; the probe records |x|, cos(x, q) and lambda per training step and restores the library."""
    diagnostic = benchmark_script("rotation_deferred")
    import vqgen.tokenizer.quantizers.base as quantizer_base

    before = (quantizer_base.rotation_trick, quantizer_base.straight_through)
    layer = build(kind="vq", codebook_size=16, dim=8, rotation_trick=gradient != "straight_through").train()
    z, upstream = torch.randn(40, 8), torch.randn(40, 8)
    with diagnostic.Probe(gradient) as probe:
        zz = z.clone().requires_grad_(True)
        out = layer(zz)
        (out.quantized * upstream).sum().backward()
    assert (quantizer_base.rotation_trick, quantizer_base.straight_through) == before
    codes = out.quantized.detach()
    pairs = [_rotation(e, c) for e, c in zip(z, codes)]
    expected = {"straight_through": [g for g in upstream],
                "rotation": [lam * r.T @ g for (r, lam), g in zip(pairs, upstream)],
                "rotation_no_rescale": [r.T @ g for (r, _), g in zip(pairs, upstream)],
                "rescale_no_rotation": [lam * g for (_, lam), g in zip(pairs, upstream)]}[gradient]
    torch.testing.assert_close(zz.grad, torch.stack(expected), atol=1e-5, rtol=1e-4)
    (x_norm, cos, lam), = probe.rows
    assert x_norm == pytest.approx(float(z.norm(dim=-1).mean()))
    assert cos == pytest.approx(float(torch.nn.functional.cosine_similarity(z, codes, dim=-1).mean()))
    assert lam == pytest.approx(sum(lam for _, lam in pairs) / len(pairs))


# ------------------------------------------------------------------------------------------------ registry
def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, list):
        return [3]
    return f"{value}x"


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_a_kind_does_not_read_is_rejected(kind):
    """Each kind's config class holds its own fields; another kind's field is refused with a message naming the
    kinds that read it, unless it holds that field's default (then it says nothing and is dropped)."""
    own = spec_of(kind).fields
    foreign = {f.name: f for k in KINDS for f in dataclasses.fields(spec_of(k).config) if f.name not in own}
    foreign.pop("kind")
    assert foreign  # every kind lacks some other kind's option
    for name, f in foreign.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        with pytest.raises(ConfigError, match=f"{name}=.* is not an option of kind '{kind}'.*kind that reads it"):
            from_dict(QuantizerConfig, {"kind": kind, name: _changed(default)})
        cfg = from_dict(QuantizerConfig, {"kind": kind, **TINY_SETTINGS.get(kind, {}), name: default})
        assert type(cfg) is spec_of(kind).config and not hasattr(cfg, name)


TINY_SETTINGS = {"fsq": {"dim": 4}, "lfq": {"dim": 9}, "adaptive": {"dim": 8, "capacity": 32, "ladder_dims": [8, 4],
                                                                     "selector_heads": 2}}


def test_capabilities_say_what_deferred_quantization_means():
    deferred = {kind: spec_of(kind).capabilities.deferred() for kind in KINDS}
    assert deferred == {"vq": "kmeans", "ema": "kmeans", "gumbel": None, "adaptive": "kmeans", "fsq": "switch",
                        "lfq": "switch", "simvq": "kmeans"}
    assert [k for k in KINDS if spec_of(k).capabilities.codebook_selection] == ["adaptive"]
    assert [k for k in KINDS if not spec_of(k).capabilities.learned_codebook] == ["fsq", "lfq"]


def test_impossible_schedules_are_rejected_with_one_message(tmp_path):
    tiny = REPO / "configs" / "tokenizer" / "tiny_fsq.yaml"
    with pytest.raises(ConfigError, match="schedule.init=kmeans .*kind=fsq cannot use: its codes are a fixed grid"):
        load_config(TokenizerRunConfig, tiny, ["schedule.init=kmeans"])
    load_config(TokenizerRunConfig, tiny, ["schedule.mode=deferred", "schedule.ae_steps=2"])  # the switch
    with pytest.raises(ConfigError, match="schedule.mode=deferred .*kind=gumbel"):
        load_config(TokenizerRunConfig, REPO / "configs" / "tokenizer" / "tiny.yaml",
                    ["model.quantizer.kind=gumbel", "schedule.mode=deferred", "schedule.ae_steps=2"])
    with pytest.raises(QuantizerConfigError, match="nothing to k-means-initialise"):
        build(kind="lfq", dim=4, codebook_size=16).init_codebook(torch.randn(10, 4))


@dataclasses.dataclass
class SignConfig(QuantizerConfig):
    """A toy kind with an option of its own: the sign of each channel, scaled."""

    kind: str = "sign"
    scale: float = 1.0

    def check(self, fail) -> None:
        if self.scale <= 0:
            fail(f"scale must be > 0, got {self.scale}")


class SignQuantizer(Quantizer):
    codebook_sizes = property(lambda self: [2**self.dim])

    def forward(self, z):
        flat = self._flatten(z)
        bits = (flat >= 0).long()
        q = (bits.float() * 2 - 1) * self.config.scale
        idx = (bits * 2 ** torch.arange(self.dim - 1, -1, -1)).sum(-1)
        return QuantizerOutput(straight_through(flat, q).reshape(z.shape), idx.reshape(z.shape[:-1]),
                               (flat - q).square().mean(), batch_stats(idx, 2**self.dim))

    def lookup(self, indices):
        return (((indices.unsqueeze(-1) >> torch.arange(self.dim - 1, -1, -1)) & 1).float() * 2 - 1) * self.config.scale

    def codebooks(self):
        return [self.lookup(torch.arange(2**self.dim))]


def test_a_new_kind_with_its_own_option_is_one_config_class_and_its_registration(monkeypatch, tmp_path):
    """What adding a quantizer takes: its config dataclass, its class, one @register_quantizer; YAML overrides,
    validation, training, saving and loading, the prior's vocabulary and the diagnostics follow."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # forgotten after this test
    register_quantizer("sign", config=SignConfig, capabilities=Capabilities(
        learned_codebook=False, kmeans_init=False, dead_code_reset=False))(SignQuantizer)

    with pytest.raises(ConfigError, match="codebook_size=16 is not an option of kind 'sign'"):
        from_dict(QuantizerConfig, {"kind": "sign", "dim": 3, "codebook_size": 16})
    with pytest.raises(ConfigError, match="scale must be > 0"):
        from_dict(QuantizerConfig, {"kind": "sign", "dim": 3, "scale": -1.0})
    with pytest.raises(ConfigError, match="scale=2.0 is not an option of kind 'ema'.*\\(sign\\)"):
        from_dict(QuantizerConfig, {"kind": "ema", "scale": 2.0})
    cfg = load_config(TokenizerRunConfig, REPO / "configs" / "tokenizer" / "tiny.yaml", [
        f"output_dir={tmp_path}", "model.quantizer.kind=sign", "model.quantizer.dim=3", "model.quantizer.scale=0.5",
        "model.quantizer.codebook_size=512", "schedule.mode=deferred", "schedule.ae_steps=2", "train.steps=4"])
    assert isinstance(cfg.model.quantizer, SignConfig) and cfg.model.quantizer.scale == 0.5
    summary = train_tokenizer(cfg)  # continuous phase, the switch, quantized steps
    assert summary["kind"] == "sign" and summary["perplexity"] > 0
    model = VQVAE.from_pretrained(tmp_path / "model")
    assert isinstance(model.quantizer, SignQuantizer) and model.quantizer.config.scale == 0.5
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ids = model.encode(x)
    assert model.layout().num_codes == 8 and model.layout().kind == "sign"
    assert model.decode(ids).shape == x.shape
    assert set(model.quantizer.lookup(ids).unique().tolist()) <= {-0.5, 0.5}
    vocab = TokenVocab.from_layout(model.layout())
    assert vocab.encode(ids).shape == (2, 1 + 16)
    metrics = codebook_metrics(model, [x])
    assert metrics["code_distance"] is None and metrics["usage"] > 0


# ------------------------------------------------------------------------------------------------ diagnostics
def test_implicit_codebook_diagnostics_are_over_the_used_grid_points():
    torch.manual_seed(0)  # the weights too: whatever ran before must not decide how many grid points are used
    model = VQVAE(ModelConfig(image_size=16, hidden=16, res_hidden=8, num_res_layers=1,
                              quantizer=QuantizerConfig(kind="fsq", dim=3, levels=[5, 4, 3])))
    with torch.no_grad():
        model.pre_quant.weight.mul_(20)  # spread the latents over the grid
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    metrics = codebook_metrics(model, [images[:3], images[3:]])
    ids = model.encode(images).reshape(-1)
    counts = torch.bincount(ids, minlength=60).double()
    assert metrics["usage"] == pytest.approx(float((counts > 0).double().mean()))
    p = counts / counts.sum()
    assert metrics["perplexity"] == pytest.approx(float(torch.exp(-torch.special.xlogy(p, p).sum())), rel=1e-6)
    expected = live_code_distance(model.quantizer.codebooks()[0], counts)  # brute force over the whole grid
    assert metrics["live_code_distance"] == pytest.approx(float(expected), rel=1e-6) and metrics["live_code_distance"] > 0
    assert metrics["code_distance"] is None  # all codes: a constant of the grid, not reported
    assert 0 < metrics["live_code_distance_ratio"] < 10


# ------------------------------------------------------------------------------------------------ end to end
FAMILY = {
    "fsq": ["tokenizer.model.quantizer.kind=fsq", "tokenizer.model.quantizer.codebook_size=512",
            "tokenizer.model.quantizer.dim=3", "tokenizer.model.quantizer.levels=[5,4,3]"],
    "lfq": ["tokenizer.model.quantizer.kind=lfq", "tokenizer.model.quantizer.dim=4"],  # 16 = 2 ** 4 codes
    "simvq": ["tokenizer.model.quantizer.kind=simvq"],
    "vq-rotation": ["tokenizer.model.quantizer.kind=vq", "tokenizer.model.quantizer.rotation_trick=true"],
}


@pytest.mark.parametrize("variant", list(FAMILY))
def test_tokenizer_prior_samples_and_report_for_each_new_quantizer(tmp_path, monkeypatch, variant):
    """tiny experiment (deferred: the switch for fsq/lfq, k-means for simvq/vq): tokens, prior, samples, report."""
    monkeypatch.setenv("VQGEN_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert vqgen(["run", "--config", str(REPO / "configs" / "experiments" / "tiny.yaml"), f"output_dir={run}",
                  *FAMILY[variant]]) == 0
    kind = variant.split("-")[0]
    model = VQVAE.from_pretrained(run / "tokenizer" / "model")
    layout = model.layout()
    tokens_meta = json.loads((run / "tokens" / "meta.json").read_text())
    assert tokens_meta["layout"] == layout.to_dict() and layout.kind == kind
    prior = Prior.from_pretrained(run / "prior" / "model")
    assert prior.vocab.num_codes == layout.num_codes == model.quantizer.codebook_size
    samples = load_file(str(run / "samples" / "tokens.safetensors"))["tokens"]
    assert samples.shape[1:] == layout.grid and 0 <= int(samples.min()) and int(samples.max()) < layout.num_codes
    report = json.loads((run / "report.json").read_text())
    assert report["tokenizer"]["quantizer"] == kind
    assert (report["tokenizer"]["code_distance"] is None) == (kind in ("fsq", "lfq"))
    assert report["generation"]["token_perplexity"] >= 1.0
    summary = json.loads((run / "tokenizer" / "summary.json").read_text())
    assert summary["kind"] == kind and summary["live_code_distance"] is not None
    phases = [json.loads(line)["phase"] for line in (run / "tokenizer" / "metrics.jsonl").read_text().splitlines()]
    assert phases[0] == "ae" and phases[-1] == "quantize"  # deferred for every kind of the family


def test_tiny_configs_of_each_kind_train_from_the_command_line(tmp_path, monkeypatch):
    from vqgen.pipelines.train_tokenizer import main as train_main

    monkeypatch.setenv("VQGEN_NO_PROGRESS", "1")
    runs = [(f"tiny_{k}.yaml", []) for k in ("fsq", "lfq", "simvq")]
    runs.append(("tiny.yaml", ["model.quantizer.rotation_trick=true"]))
    for name, extra in runs:
        out = tmp_path / name.replace(".yaml", "")
        summary = train_main(["--config", str(REPO / "configs" / "tokenizer" / name), "--output-dir", str(out), *extra])
        assert summary["steps"] == 5 and math.isfinite(summary["recon_mse"]), name
        assert (out / "model" / "model.safetensors").is_file()


def test_layouts_of_token_folders_written_before_the_layout_are_read(tmp_path):
    from vqgen.prior.data import token_layout

    old = {"vocab_info": {"kind": "adaptive", "codebook_size": 12, "codebook_sizes": [4, 8],
                          "codebook_offsets": [0, 4], "granularity": "image", "grid": [2, 2], "image_size": 8,
                          "channels": 3}}
    layout = token_layout(old)
    assert layout.per_image_codebook and layout.codebook_offsets == (0, 4) and layout.grid == (2, 2)
    vocab = TokenVocab.from_layout(layout, num_classes=3, class_conditional=True)
    assert vocab.vocab_size == 12 + 1 + 3 + 1 + 2  # codes, BOS, classes, null class, codebook tokens

"""Study tooling: codebook metrics over a split (single codebook, ladder, oracle) and the verdict rules."""

from __future__ import annotations

import math

import pytest
import torch

from vqgen.eval.codebook import codebook_metrics, tokenizer_details
from vqgen.eval.studies import combine_verdicts, compare_arms, default_margin, fragile, holm, summarize, verdict
from vqgen.tokenizer.model import ModelConfig, VQVAE
from vqgen.tokenizer.quantizers import QuantizerConfig, spec_of


def tiny_model(**quantizer) -> VQVAE:
    torch.manual_seed(0)
    settings = {"kind": "ema", "dim": 8, **quantizer}
    if "codebook_size" in spec_of(settings["kind"]).fields:  # a ladder's sizes come from capacity and widths
        settings.setdefault("codebook_size", 16)
    q = QuantizerConfig(**settings)
    return VQVAE(ModelConfig(image_size=16, in_channels=3, hidden=16, res_hidden=8, num_res_layers=1, downsample=4,
                             quantizer=q)).eval()


def batches(n: int = 3, b: int = 5):
    g = torch.Generator().manual_seed(1)
    return [torch.rand(b, 3, 16, 16, generator=g) * 2 - 1 for _ in range(n)]


def test_single_codebook_metrics_match_a_direct_computation():
    model = tiny_model()
    data = batches()
    with torch.no_grad():  # codes on the encoder outputs, so that several are in use
        model.quantizer.init_codebook(model.encode_latents(torch.cat(data)).reshape(-1, 8))
    m = codebook_metrics(model, data)
    images = torch.cat(data)
    with torch.no_grad():
        out = model(images)
    mse = ((out.recon.clamp(-1, 1) - images) / 2).square().flatten(1).mean(1).double()
    assert math.isclose(m["recon_mse"], float(mse.mean()), rel_tol=1e-5)
    counts = torch.bincount(out.quant.indices.reshape(-1), minlength=16)
    assert math.isclose(m["usage"], float((counts > 0).double().mean()))
    assert m["num_images"] == 15 and "selection" not in m
    assert 0 < m["live_code_distance_ratio"] < 10


@pytest.mark.parametrize("granularity", ["image", "view"])
def test_ladder_metrics_per_codebook_and_oracle(granularity):
    model = tiny_model(kind="adaptive", capacity=32, ladder_dims=[8, 4, 2], selector_heads=2, granularity=granularity)
    data = batches()
    m = codebook_metrics(model, data, oracle=True)
    assert len(m["usage_per_codebook"]) == 3 and len(m["selection"]) == 3
    assert math.isclose(sum(m["selection"]), 1.0, rel_tol=1e-6)
    # the arm's usage is the selection-weighted mean of per-codebook usages, not usage of the joint vocabulary
    assert math.isclose(m["usage"], sum(s * u for s, u in zip(m["selection"], m["usage_per_codebook"])), rel_tol=1e-9)
    assert 0 <= m["selection_entropy"] <= math.log(3) + 1e-9
    # the oracle picks, per image, the best of the forced branches
    images = torch.cat(data)
    forced = torch.stack([((tokenizer_details(model, images, force=i)["recon"].clamp(-1, 1) - images) / 2)
                          .square().flatten(1).mean(1) for i in range(3)], dim=1)
    torch.testing.assert_close(torch.tensor(m["branch_mse"], dtype=torch.float64), forced.mean(0).double(), rtol=1e-5, atol=1e-8)
    assert math.isclose(m["oracle_mse"], float(forced.min(1).values.mean()), rel_tol=1e-5)
    if granularity == "image":  # one codebook per image: the chosen MSE is one of the branches, >= the oracle
        assert m["recon_mse"] >= m["oracle_mse"] - 1e-9


def test_summarize_and_verdict_rules():
    s = summarize([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and math.isclose(s["std"], 1.0) and s["values"] == [1.0, 2.0, 3.0]
    better = compare_arms([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], lower_is_better=True, margin=0.1)
    assert better["verdict"] == "reproduces" and better["effect"] > 0 and better["p"] < 0.05
    worse = compare_arms([2.0, 2.1, 1.9], [1.0, 1.1, 0.9], lower_is_better=True, margin=0.1)
    assert worse["verdict"] == "does not reproduce" and worse["effect"] < 0
    # a precisely measured absence of an effect is not "inconclusive"
    same = compare_arms([1.000, 1.001, 0.999], [1.0005, 0.9995, 1.0], lower_is_better=True,
                        margin=default_margin([1.0], fraction=False))
    assert same["verdict"] == "does not reproduce" and same["p"] > 0.05
    noisy = compare_arms([1.0, 3.0, 0.5], [2.0, 0.5, 2.5], lower_is_better=True, margin=0.05)
    assert noisy["verdict"] == "inconclusive"
    assert compare_arms([1.0], [2.0, 2.1], True, 0.1)["verdict"] == "inconclusive"  # one seed: no test
    assert default_margin([0.3, 0.5], fraction=True) == 0.05
    assert combine_verdicts(["reproduces", "reproduces"]) == "reproduces"
    # symmetric: one decisive data set next to an inconclusive one decides nothing, in either direction
    assert combine_verdicts(["does not reproduce", "inconclusive"]) == "inconclusive"
    assert combine_verdicts(["reproduces", "inconclusive"]) == "inconclusive"
    assert combine_verdicts(["does not reproduce", "does not reproduce"]) == "does not reproduce"
    assert combine_verdicts(["reproduces", "does not reproduce"]) == "inconclusive"


def test_holm_adjustment_and_verdicts_at_the_adjusted_p():
    # sorted 0.005, 0.01, 0.03, 0.04 of m = 4: 4 x 0.005, 3 x 0.01, max(2 x 0.03, ...), max(1 x 0.04, 0.06)
    assert holm([0.01, 0.04, None, 0.03, 0.005]) == pytest.approx([0.03, 0.06, None, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1, never below the raw p
    assert holm([]) == [] and holm([None]) == [None]
    result = compare_arms([1.0, 1.1, 0.9], [1.3, 1.4, 1.2], lower_is_better=True, margin=0.01)
    assert result["verdict"] == "reproduces" and 0.005 < result["p"] < 0.05
    assert verdict(result, min(1.0, 10 * result["p"])) == "inconclusive"  # significant alone, not in a family of 10
    # significant only just (adjusted p in [0.01, 0.05)): flagged for more seeds; settled or not significant: not
    assert fragile(0.035) and fragile(0.01) and not fragile(0.05) and not fragile(0.004) and not fragile(None)


def test_study_plan_same_budget_for_every_arm_and_a_command_that_reruns_it(benchmark_script):
    reproduce = benchmark_script("reproduce")
    args = reproduce.parse_args(["--study", "deferred", "--dataset", "mnist", "--tokenizer-steps", "100",
                                 "--override", "evaluate.k=3"])
    assert reproduce.study_command(args, "deferred", "mnist") == (
        "python benchmarks/reproduce.py --study deferred --dataset mnist --tokenizer-steps 100 --override evaluate.k=3")
    args = reproduce.parse_args(["--generation-arms", "", "--prior-steps", "9", "--seeds", "0,1"])
    assert reproduce.study_command(args, "adaptive", "cifar10").endswith("--dataset cifar10 --seeds 0,1")
    assert reproduce.study_command(args, "deferred", "mnist").endswith("--seeds 0,1 --generation-arms '' --prior-steps 9")
    args = reproduce.parse_args(["--study", "deferred", "--dataset", "mnist", "--tokenizer-steps", "100",
                                 "--override", "evaluate.k=3"])
    runs = reproduce.study_runs(args, "deferred", "mnist")
    assert {r["arm"] for r in runs} == {"early_random", "early_kmeans", "early_deadcode", "deferred", "deferred_soft",
                                        "deferred_deadcode"}
    assert sorted(r["seed"] for r in runs) == sorted(list(range(8)) * 6) and len({r["dir"] for r in runs}) == 48
    # generation: the four arms of the claim, every seed (8 on MNIST)
    assert sorted((r["arm"], r["seed"]) for r in runs if r["generation"]) == [
        (a, s) for a in ("deferred", "deferred_deadcode", "early_deadcode", "early_kmeans") for s in range(8)]
    for r in runs:
        assert "tokenizer.train.steps=100" in r["overrides"] and r["overrides"][-1] == "evaluate.k=3"
        ae = [int(o.split("=")[1]) for o in r["overrides"] if o.startswith("tokenizer.schedule.ae_steps=")]
        assert (0 < ae[-1] < 100) if r["arm"].startswith("deferred") else not ae


def test_deferred_claims_from_seed_values_and_unmeasured_ones_said_so(benchmark_script):
    reproduce = benchmark_script("reproduce")

    def arm(name, **metrics):
        return {"arm": name, "metrics": {k: {"values": v} for k, v in metrics.items()}}

    study = {"study": "deferred", "dataset": "mnist", "arms": [
        arm("early_random", recon_mse=[3.0, 3.1, 3.2], perplexity=[9.0, 10.0, 11.0], live_code_distance_ratio=[1.0, 1.01, 0.99]),
        arm("early_kmeans", recon_mse=[3.0, 3.1, 2.9], perplexity=[14.0, 15.0, 13.0], live_code_distance_ratio=[1.0, 1.01, 0.99]),
        arm("early_deadcode", recon_mse=[2.0, 2.01, 1.99], perplexity=[400.0, 401.0, 402.0]),
        arm("deferred", recon_mse=[2.0, 2.02, 1.98], perplexity=[300.0, 310.0, 305.0], live_code_distance_ratio=[1.0, 1.01, 0.99]),
    ]}
    found = reproduce.claims([study])

    def verdict(words):
        (claim,) = [c for c in found if words in c["claim"]]
        return claim["verdict"]

    assert verdict("fewer codes in use") == "reproduces"
    assert verdict("spread less") == "does not reproduce"  # the same ratio in every arm
    assert verdict("reconstructs better than early quantization (test MSE)") == "reproduces"
    # equal MSE (within the margin) and fewer codes than dead-code reset: judged separately, neither a win
    assert verdict("reconstructs better than early quantization with dead-code reset") == "does not reproduce"
    assert verdict("uses more codes than early quantization with dead-code reset") == "does not reproduce"
    generation = [c for c in found if "generate" in c["claim"]]
    assert len(generation) == 4 and all(c["verdict"] == "inconclusive" and c["evidence"].startswith("not measured")
                                        for c in generation)
    # one family for the study: every test's p is Holm-adjusted over all of them, never below the raw p
    tests = [t for c in found for t in c["tests"]]
    assert len(tests) == 8 and all(t["p_adjusted"] >= t["p"] for t in tests)
    assert all("Holm p=" in c["evidence"] for c in found if c["tests"])
    # the flag follows the adjusted p: set exactly where a held verdict's Holm p lies in [0.01, 0.05)
    for c in found:
        expected = any(0.01 <= t["p_adjusted"] < 0.05 and t["verdict"] != "inconclusive" for t in c["tests"])
        assert c.get("fragile", False) == expected
        assert ("fragile:" in c["evidence"]) == any(0.01 <= t["p_adjusted"] < 0.05 for t in c["tests"])
    # a 0.9 gain against a spread of 0.3 with 3 seeds: reproduces, but only just (Holm p ~0.02)
    study = {"study": "deferred", "dataset": "mnist", "arms": [
        arm("early_kmeans", recon_mse=[3.0, 3.3, 2.7]), arm("deferred", recon_mse=[2.1, 2.4, 1.8])]}
    (claim,) = [c for c in reproduce.claims([study]) if c["tests"]]
    assert claim["verdict"] == "reproduces" and claim["fragile"] and "more seeds wanted" in claim["evidence"]


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_faithful_tau_schedule_spans_the_quantized_phase_at_any_budget(benchmark_script, dataset):
    """The authors' tau = (20000 - m) + 1 counts quantized steps m: every annealing arm's schedule must end with
    the quantized phase (it used to be scaled to all steps, so tau stopped at 2,001 instead of ~2)."""
    reproduce = benchmark_script("reproduce")
    for steps in (2000, 300):
        args = reproduce.parse_args(["--tokenizer-steps", str(steps)])
        annealing = 0
        for run in reproduce.study_runs(args, "adaptive", dataset):
            from vqgen.pipelines.run import load_experiment

            cfg = load_experiment(run["config"], run["overrides"]).tokenizer
            q = cfg.model.quantizer
            if q.kind != "adaptive" or q.selector_tau_start == q.selector_tau_end:
                continue
            annealing += 1
            assert q.selector_tau_steps == cfg.train.steps - cfg.schedule.ae_steps, run["name"]
            assert (q.selector_tau_start, q.selector_tau_end) == (20001, 1)
        assert annealing == 2 * {"mnist": 5, "cifar10": 3}[dataset]  # adaptive_faithful and _scores, every seed


def test_commits_that_differ_in_study_sweeps_only_count_as_one_code(benchmark_script, tmp_path):
    """Adding seeds to a pinned study is a new commit; its runs and the earlier ones are one code exactly when git
    shows no change between the commits outside study sweeps, tests and prose."""
    import subprocess

    reproduce = benchmark_script("reproduce")

    def commit(path: str, text: str) -> str:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
        git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
        subprocess.run(git + ["add", "-A"], check=True, capture_output=True)
        subprocess.run(git + ["commit", "-qm", path], check=True, capture_output=True)
        return subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout[:12]

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True, capture_output=True)
    pinned = commit("tokenizer/model.py", "x = 1\n")
    more_seeds = commit("configs/experiments/study_deferred_mnist.yaml", "seeds: [0, 1, 2, 3]\n")
    prose = commit("docs/results/notes.md", "more seeds\n")
    test = commit("tests/test_studies.py", "assert True\n")  # a test that follows the sweep: no code either
    assert reproduce.same_code_commits([pinned, more_seeds, prose, test], tmp_path) == test  # the newest reruns all
    assert reproduce.same_code_commits([prose, pinned], tmp_path) == prose  # in any order
    changed_code = commit("tokenizer/model.py", "x = 2\n")
    assert reproduce.same_code_commits([pinned, changed_code], tmp_path) is None
    other_config = commit("configs/experiments/mnist_ema_early.yaml", "lr: 1\n")  # an arm's settings: not neutral
    assert reproduce.same_code_commits([changed_code, other_config], tmp_path) is None
    assert reproduce.same_code_commits([pinned + "+dirty", more_seeds], tmp_path) is None
    assert reproduce.same_code_commits(["0123456789ab", pinned], tmp_path) is None  # a commit git does not know
    assert reproduce.same_code_commits([pinned], tmp_path) is None  # one commit needs no rule

"""End-to-end test of ``pipelines.evaluate`` on a tiny hand-built run folder (untrained tokenizer, fake
metrics and samples in the documented layout), with the offline extractor and a private cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from vqgen.eval.report import format_value
from vqgen.pipelines.evaluate import EvalConfig, evaluate_run, main
from vqgen.core.config import to_dict
from vqgen.tokenizer.data import DataConfig
from vqgen.tokenizer.model import ModelConfig, VQVAE, tokenizer_fingerprint
from vqgen.tokenizer.quantizers import QuantizerConfig

TINY_DATA = DataConfig(image_size=16, num_train=192, num_validation=0, num_test=48)
FAST = ["num_images=40", "batch_size=16", "kid_subsets=5", "kid_subset_size=10", "k=3", "device=cpu",
        "classifier.width=8", "classifier.feature_dim=16", "classifier.max_steps=20", "classifier.batch_size=32",
        "contrastive.width=8", "contrastive.feature_dim=16", "contrastive.projection_dim=8", "contrastive.steps=10",
        "contrastive.batch_size=32"]
REQUIRED = [
    "tokenizer.recon_mse", "tokenizer.psnr", "tokenizer.ssim", "tokenizer.perplexity", "tokenizer.usage",
    "tokenizer.code_distance", "tokenizer.rfid", "generation.fid", "generation.kid", "generation.precision",
    "generation.recall", "generation.density", "generation.coverage", "generation.mode_coverage",
    "generation.token_perplexity", "feature_extractor.name", "feature_extractor.weights_sha256",
]


# a private VQGEN_CACHE (tests/conftest.py) for the classifier and reference features of these tests
pytestmark = pytest.mark.usefixtures("cache")


def make_run(root: Path, kind: str = "ema", num_samples: int = 24) -> Path:
    """An untrained tiny tokenizer, a fake metrics.jsonl and fake samples in the pipelines' layout."""
    torch.manual_seed(0)
    if kind == "adaptive":
        quant = QuantizerConfig(kind="adaptive", dim=8, capacity=64, ladder_dims=[8, 4, 2, 1], selector_heads=2)
    else:
        quant = QuantizerConfig(kind=kind, codebook_size=32, dim=8)
    model = VQVAE(ModelConfig(image_size=16, in_channels=3, hidden=16, res_hidden=8, num_res_layers=1, downsample=4,
                              quantizer=quant))
    tok = root / "tokenizer"
    model.save_pretrained(tok / "model")
    (tok / "config.yaml").write_text(yaml.safe_dump({"data": to_dict(TINY_DATA)}))
    with open(tok / "metrics.jsonl", "w") as f:
        for step in range(10, 210, 10):
            quantized = step > 50  # deferred: continuous first, then quantized
            record = {"step": step, "loss": 1.0 / step, "recon_mse": 0.5 / step,
                      "perplexity": 5 + step / 20 if quantized else None, "usage": min(1.0, step / 200) if quantized else None,
                      "code_distance": 1 + step / 100, "phase": "quantize" if quantized else "continuous"}
            if kind == "adaptive" and quantized:
                record["selection"] = [0.4, 0.3, 0.2, 0.1]
                record["tau"] = 100.0 / step
            f.write(json.dumps(record) + "\n")
    samples = root / "samples"
    (samples / "images").mkdir(parents=True)
    tokens = torch.randint(0, model.quantizer.codebook_size, (num_samples, 4, 4), generator=torch.Generator().manual_seed(1))
    images = ((model.decode(tokens).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(samples / "images" / f"{i:05d}.png")
    save_file({"tokens": tokens, "labels": torch.full((num_samples,), -1)}, str(samples / "tokens.safetensors"))
    meta = {"num_samples": num_samples, "sampling": {"num_samples": num_samples, "seed": 0},
            "tokenizer": {"fingerprint": tokenizer_fingerprint(tok / "model")}}
    (samples / "meta.json").write_text(json.dumps(meta))
    return root


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def test_report_of_a_tiny_run(tmp_path):
    run = make_run(tmp_path / "run")
    report = main(["--run", str(run), *FAST])
    on_disk = json.loads((run / "report.json").read_text())
    assert on_disk["tokenizer"]["psnr"] == pytest.approx(report["tokenizer"]["psnr"])
    for key in REQUIRED:
        value = _get(on_disk, key)
        assert value is not None, key
        if isinstance(value, float):
            assert math.isfinite(value), key
    assert on_disk["tokenizer"]["num_images"] == 40
    assert on_disk["generation"]["num_samples"] == 24
    assert 0.0 <= on_disk["generation"]["mode_coverage"] <= 1.0
    assert on_disk["generation"]["modes"]["modes_total"] == 4 * 6 * 9 * 2
    assert on_disk["feature_extractor"]["name"] == "offline"
    assert on_disk["feature_extractor"]["num_real_images"] == 40
    assert len(on_disk["feature_extractor"]["weights_sha256"]) == 64
    assert 0 < on_disk["codebook"]["spread"]["trace_ratio"] < float("inf")
    html = (run / "report.html").read_text()
    pngs = [run / "report_files" / n for n in ("grid.png", "tokenizer_curves.png", "code_usage.png",
                                               "projection.png", "per_image.png")]
    for png in pngs:
        assert png.is_file() and png.stat().st_size > 1000
        assert f"report_files/{png.name}" in html
    assert "offline" in (run / "report.md").read_text()

    # Every feature space by name, the primary one included; its numbers are the ones above.
    spaces = on_disk["feature_spaces"]
    assert list(spaces) == ["offline", "contrastive"]
    assert spaces["offline"]["rfid"] == on_disk["tokenizer"]["rfid"]
    assert spaces["offline"]["generation"]["fid"] == on_disk["generation"]["fid"]
    assert spaces["offline"]["feature_extractor"] == on_disk["feature_extractor"]
    label_free = spaces["contrastive"]
    assert label_free["feature_extractor"]["label_free"] and not spaces["offline"]["feature_extractor"]["label_free"]
    assert label_free["feature_extractor"]["torch_fidelity_name"] == "vqgen-contrastive"
    assert 0.0 <= label_free["feature_extractor"]["knn_accuracy"] <= 1.0
    assert label_free["feature_extractor"]["weights_sha256"] != on_disk["feature_extractor"]["weights_sha256"]
    assert set(label_free["generation"]) == {"fid", "kid", "precision", "recall", "density", "coverage"}
    assert all(math.isfinite(v) for v in [label_free["rfid"], *label_free["generation"].values()])
    md = (run / "report.md").read_text()
    assert "## feature spaces" in md and "| metric | offline | contrastive |" in md
    # 40 images: every FID-type number carries its caveat, first on the page
    assert {("handful", "rFID"), ("handful", "FID/KID")} <= {(c["code"], c["metric"]) for c in on_disk["caveats"]}
    assert html.index('class="caveats"') < html.index("<h2>summary</h2>")
    fids = [format_value(spaces[name]["generation"]["fid"]) for name in ("offline", "contrastive")]
    assert f"| generation.fid | {fids[0]} | {fids[1]} |" in md
    assert "label-free" in (run / "report.html").read_text()

    # A second evaluation reuses the cached reference features and gives the same numbers.
    again = evaluate_run(run, EvalConfig(num_images=40, batch_size=8, kid_subsets=5, kid_subset_size=10, k=3,
                                         device="cpu", classifier=_classifier(), contrastive=_contrastive()))
    assert again["feature_extractor"]["reference_cache_hit"]
    assert again["tokenizer"]["rfid"] == pytest.approx(report["tokenizer"]["rfid"], rel=1e-6)
    assert again["generation"]["fid"] == pytest.approx(report["generation"]["fid"], rel=1e-6)


def _classifier():
    from vqgen.eval.features import ClassifierConfig

    return ClassifierConfig(width=8, feature_dim=16, max_steps=20, batch_size=32)


def _contrastive():
    from vqgen.eval.contrastive import ContrastiveConfig

    return ContrastiveConfig(width=8, feature_dim=16, projection_dim=8, steps=10, batch_size=32)


def test_adaptive_run_without_samples_and_comparison(tmp_path):
    adaptive = make_run(tmp_path / "adaptive", kind="adaptive")
    fixed = make_run(tmp_path / "fixed", kind="ema")
    for path in (fixed / "samples").rglob("*"):
        if path.is_file():
            path.unlink()
    report = main(["--run", str(fixed), *FAST])
    assert report["generation"]["fid"] is None and any("no samples" in n for n in report["notes"])

    adaptive_report = main(["--run", str(adaptive), *FAST])
    fractions = adaptive_report["codebook"]["selection_fractions"]
    assert len(fractions) == 4 and sum(fractions) == pytest.approx(1.0)
    assert (adaptive / "report_files" / "selection.png").is_file()

    out = tmp_path / "compare"
    comparison = main(["--run", str(fixed), "--run", str(adaptive), "--output", str(out), *FAST])
    assert set(comparison["table"]["tokenizer.psnr"]) == {"fixed", "adaptive"}
    assert comparison["table"]["generation.fid"]["fixed"] is None
    assert comparison["table"]["generation.mode_coverage"]["adaptive"] is not None
    assert comparison["fid_comparable"]
    assert comparison["table"]["feature_spaces.contrastive.generation.fid"]["fixed"] is None
    assert comparison["table"]["feature_spaces.contrastive.generation.recall"]["adaptive"] is not None
    assert "feature_spaces.offline.rfid" not in comparison["table"]  # the primary space's rows are above
    assert (out / "comparison.html").is_file() and (out / "comparison_files" / "curves.png").is_file()


def test_label_free_space_as_the_primary_one(tmp_path):
    run = make_run(tmp_path / "run")
    report = main(["--run", str(run), *FAST, "extractor=contrastive"])
    assert report["feature_extractor"]["name"] == "contrastive" and report["feature_extractor"]["label_free"]
    assert list(report["feature_spaces"]) == ["contrastive"]  # the default extra space is the primary one
    assert report["generation"]["fid"] == report["feature_spaces"]["contrastive"]["generation"]["fid"]
    assert report["generation"]["mode_coverage"] is None and any("mode coverage" in n for n in report["notes"])
    both = main(["--run", str(run), *FAST, "extractor=contrastive", "extra_extractors=[offline]"])
    assert list(both["feature_spaces"]) == ["contrastive", "offline"]
    assert both["tokenizer"]["rfid"] == pytest.approx(report["tokenizer"]["rfid"])
    assert both["feature_extractor"]["reference_cache_hit"]
    only = main(["--run", str(run), *FAST, "extra_extractors=[]"])
    assert list(only["feature_spaces"]) == ["offline"]


def test_bad_run_folder_exits_with_one_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--run", str(tmp_path), *FAST])
    assert exc.value.code == 2
    assert "is not a run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--run", str(tmp_path), "extractor=clip"])
    assert "extractor" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--run", str(tmp_path), "extra_extractors=[clip]"])
    assert "extra_extractors has 'clip'" in capsys.readouterr().err


@pytest.mark.parametrize("kind,dim", [("vq", 1), ("gumbel", 8)])
def test_codebook_report_and_projection_for_other_quantizers(tmp_path, kind, dim):
    from vqgen.eval.plots import plot_projection
    from vqgen.eval.reconstruction import tokenizer_pass
    from vqgen.pipelines.evaluate import codebook_report

    torch.manual_seed(0)
    model = VQVAE(ModelConfig(image_size=16, in_channels=3, hidden=16, res_hidden=8, num_res_layers=1, downsample=4,
                              quantizer=QuantizerConfig(kind=kind, codebook_size=16, dim=dim)))
    batches = [{"image": torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1} for i in range(2)]
    data = tokenizer_pass(model, batches, max_images=10)
    assert data.meter.summary()["num_images"] == 10 and int(data.code_counts.sum()) == 10 * 16
    tok, cb, codes, code_ids = codebook_report(model, data)
    assert codes.shape == (16, dim) and torch.equal(code_ids, torch.arange(16))
    assert tok["code_distance"] == pytest.approx(float(torch.cdist(codes, codes).mean()), rel=1e-6)
    assert cb["spread"]["trace_ratio"] > 0 and "selection_fractions" not in cb
    path = plot_projection(data.latent_sample, codes, data.code_counts, tmp_path / "projection.png")
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("kind,settings", [("fsq", dict(dim=3, levels=[5, 4, 3])), ("lfq", dict(dim=4, codebook_size=16))])
def test_codebook_report_of_an_implicit_codebook_covers_the_used_codes(tmp_path, kind, settings):
    from vqgen.eval.reconstruction import tokenizer_pass
    from vqgen.pipelines.evaluate import codebook_report

    torch.manual_seed(0)
    model = VQVAE(ModelConfig(image_size=16, in_channels=3, hidden=16, res_hidden=8, num_res_layers=1, downsample=4,
                              quantizer=QuantizerConfig(kind=kind, **settings)))
    batches = [{"image": torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1} for i in range(2)]
    data = tokenizer_pass(model, batches)
    tok, cb, codes, code_ids = codebook_report(model, data)
    assert torch.equal(code_ids, (data.code_counts > 0).nonzero().squeeze(1))  # the used grid points only
    assert torch.equal(codes.float(), model.quantizer.lookup(code_ids))
    assert tok["code_distance"] is None and cb["code_distance_per_codebook"] == [None]
    assert cb["spread_over"] == "used codes" and tok["quantizer"] == kind
    # the latents are compared in the codes' space: every value within the codes' range [-1, 1]
    assert float(data.latent_sample.abs().max()) <= 1.0

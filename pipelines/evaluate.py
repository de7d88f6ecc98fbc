"""Evaluate a run: reconstruction, FID-type metrics, diversity and shrinkage, as ``report.json`` + ``report.html``.

    python -m vqgen.pipelines.evaluate --run RUN                        # writes RUN/report.{json,md,html}
    python -m vqgen.pipelines.evaluate --run RUN_A --run RUN_B --output DIR   # plus DIR/comparison.{json,md,html}
    python -m vqgen.pipelines.evaluate --run RUN --extractor inception --weights-path pt_inception.pth
    python -m vqgen.pipelines.evaluate --run RUN extractor=contrastive extra_extractors=[offline]
    python -m vqgen.pipelines.evaluate --tokenizer runs/tok --samples runs/samples --output runs/eval
    python -m vqgen.pipelines.evaluate --run RUN --protocol inception-50k --reference VIRTUAL_imagenet256_labeled.npz
    python -m vqgen.pipelines.evaluate --images DIR_OR_NPZ --reference DATASET_OR_NPZ --output DIR

FID-type metrics are computed in the primary feature space (``extractor``; its numbers keep their places,
``tokenizer.rfid``, ``generation.fid``, ...) and in every space of ``extra_extractors`` (by default also the
label-free ``contrastive`` one); ``report["feature_spaces"][NAME]`` holds each space's extractor
description, ``rfid`` and ``generation`` numbers, the primary included.

A run folder holds ``tokenizer/`` (``model/``, ``config.yaml``, ``metrics.jsonl``) and optionally
``prior/metrics.jsonl`` and ``samples/`` (``tokens.safetensors``, ``images/*.png``, ``meta.json``). Data
tokens are re-encoded from the evaluation split (one pass gives reconstructions, codes and encoder outputs).
Plots go to ``report_files/`` beside the report. Everything else is in the ``eval`` library. A named
``protocol`` and ``--images`` are evaluated by :mod:`vqgen.pipelines.score` (streamed, comparable with papers'
numbers); every report carries its ``caveats`` (:mod:`vqgen.eval.caveats`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from vqgen.eval.contrastive import ContrastiveConfig
from vqgen.eval.diversity import (
    code_histogram,
    mean_pairwise_distance,
    mode_coverage,
    perplexity,
    selection_histogram,
    spread_stats,
    token_statistics,
    usage,
)
from vqgen.eval.features import ClassifierConfig
from vqgen.eval.progress import progress
from vqgen.eval.fid import (
    EXTRACTORS,
    FeatureExtractorError,
    FeatureSpace,
    cached_reference,
    fidelity_metrics,
    images_to_uint8,
    load_feature_space,
    reference_key,
)
from vqgen.eval.caveats import report_caveats
from vqgen.eval.protocols import get_protocol
from vqgen.eval.plots import (
    plot_code_usage,
    plot_comparison,
    plot_per_image,
    plot_projection,
    plot_selection,
    plot_stage_curves,
    save_grids,
)
from vqgen.eval.reconstruction import SplitPass, tokenizer_pass
from vqgen.eval.report import write_comparison, write_report
from vqgen.core.records import file_inputs, make_record
from vqgen.pipelines.common import check_output_dir, entry_point, parse_cli
from vqgen.pipelines.manifest import verify_samples
from vqgen.core.config import from_dict, read_yaml
from vqgen.core.errors import UserError
from vqgen.core.provenance import provenance
from vqgen.core.files import owns_folder
from vqgen.core.io import file_fingerprint, load_json, load_safetensors
from vqgen.tokenizer.data import SPLITS, DataConfig, build_dataset, make_dataloader
from vqgen.tokenizer.model import VQVAE, tokenizer_fingerprint


class EvalError(UserError, ValueError):
    """The run folder or the evaluation settings are unusable; the message says what to change."""


@dataclasses.dataclass
class EvalConfig:
    """Settings of ``pipelines.evaluate`` (YAML / ``key=value`` like every stage)."""

    # Primary feature space: "offline" (classifier trained on the data's labels, cached) | "contrastive"
    # (label-free self-supervised backbone, cached) | "inception" (standard FID).
    extractor: str = "offline"
    # Also evaluated, each under report["feature_spaces"][name] (the primary is never repeated; [] for none).
    extra_extractors: list[str] = dataclasses.field(default_factory=lambda: ["contrastive"])
    weights_path: str | None = None  # primary extractor's weights; None: cached / downloaded ones
    split: str = "test"  # real images: reconstructed, and the reference for FID
    num_images: int = 5000  # at most this many real images and this many samples
    batch_size: int = 100
    device: str = "auto"  # "auto": cuda when available
    k: int = 5  # neighbourhood for precision / recall / density / coverage
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    max_latents: int = 20000  # encoder outputs kept for the 2-D projection plot
    grid_images: int = 10
    classifier: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    contrastive: ContrastiveConfig = dataclasses.field(default_factory=ContrastiveConfig)
    # A named protocol (vqgen.eval.protocols: inception-50k | fd-dinov2 | rfid-val) fixes the extractor, the
    # counts and the references, so its numbers compare with papers'; None: the settings above.
    protocol: str | None = None
    reference: str | None = None  # samples' reference: an ADM-style .npz or a data set (None: the run's data)
    reference_split: str | None = None  # split of a reference data set (None: the protocol's, else `split`)
    inception_weights: str | None = None  # torch-fidelity's Inception file (checked against its sha256)
    dinov2_weights: str | None = None  # folder / model.safetensors / hub id (None: facebook/dinov2-large)
    allow_unknown_weights: bool = False  # protocols: accept extractor weights that are not the published file
    knn_images: int = 10000  # protocols and --images: KID / precision / recall / density / coverage subset

    def validate(self) -> None:
        """Reject settings that cannot work, naming the key."""
        if self.protocol is not None:
            protocol = get_protocol(self.protocol)
            fixed = {"extractor": (self.extractor, ("offline", protocol.extractor)),
                     "extra_extractors": (self.extra_extractors, ([], ["contrastive"])),
                     "split": (self.split, ("test",)), "num_images": (self.num_images, (5000,)),
                     "k": (self.k, (5, protocol.k)), "knn_images": (self.knn_images, (10000, protocol.knn_images))}
            for key, (value, allowed) in fixed.items():
                if value not in allowed:
                    raise ValueError(f"protocol={self.protocol} fixes the extractor, the splits and the image counts; "
                                     f"remove {key}={value!r} (or drop protocol to choose them yourself)")
        if self.reference_split is not None and self.reference_split not in SPLITS:
            raise ValueError(f"reference_split={self.reference_split!r}; choose one of {', '.join(SPLITS)}")
        if self.knn_images <= self.k:
            raise ValueError(f"knn_images={self.knn_images} must be larger than k={self.k}")
        if self.extractor not in EXTRACTORS:
            raise ValueError(f"extractor={self.extractor!r}; choose one of {', '.join(EXTRACTORS)}")
        unknown = [e for e in self.extra_extractors if e not in EXTRACTORS]
        if unknown:
            raise ValueError(f"extra_extractors has {unknown[0]!r}; choose among {', '.join(EXTRACTORS)}")
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r}; choose one of {', '.join(SPLITS)}")
        if self.batch_size < 1 or self.k < 1 or self.kid_subsets < 1:
            raise ValueError("batch_size, k and kid_subsets must be >= 1")
        if self.num_images <= self.k:
            raise ValueError(f"num_images={self.num_images} leaves too few images: precision, recall, density and "
                             f"coverage compare each image with its k={self.k} nearest neighbours, so num_images "
                             f"must be larger than k; raise num_images or lower k")

    def feature_spaces(self) -> list[str]:
        """The feature spaces to evaluate: the primary first, then the extra ones, each once."""
        return list(dict.fromkeys([self.extractor, *self.extra_extractors]))


# Generation metrics repeated for every feature space under report["feature_spaces"][name]["generation"].
SPACE_GENERATION_KEYS = ("fid", "kid", "precision", "recall", "density", "coverage")


def weights_for(name: str, cfg: EvalConfig) -> str | None:
    """The weights option of feature space ``name``: its own key, else ``weights_path`` for the primary one."""
    own = {"inception": cfg.inception_weights, "dinov2": cfg.dinov2_weights}.get(name)
    primary = name == (get_protocol(cfg.protocol).extractor if cfg.protocol else cfg.extractor)
    if own is not None and primary and cfg.weights_path is not None and cfg.weights_path != own:
        raise EvalError(f"weights_path={cfg.weights_path} and {name}_weights={own} name two files for one "
                        "extractor; give one of them")
    return own if own is not None else (cfg.weights_path if primary else None)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def read_jsonl(path: Path) -> list[dict]:
    """Records of a ``metrics.jsonl`` (empty list when the file is missing)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_samples(samples_dir: Path, max_images: int, model: VQVAE, batch_size: int) -> dict | None:
    """Sampled tokens (N, h, w), labels (N,) and uint8 images (N, 3, H, W) of a run, or None.

    Images come from ``images/*.png`` when present (what the sampler wrote), else from decoding tokens.
    """
    token_file = samples_dir / "tokens.safetensors"
    if not token_file.is_file():
        return None
    data = load_safetensors(token_file)
    tokens = data["tokens"][:max_images].long()
    labels = data.get("labels", torch.full((tokens.shape[0],), -1))[:max_images].long()
    pngs = sorted((samples_dir / "images").glob("*.png"))[:max_images]
    if pngs:
        arrays = [torch.from_numpy(np.array(Image.open(p).convert("RGB")))
                  for p in progress(pngs, desc="read the samples", unit="img")]
        images = torch.stack(arrays).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8
    else:
        device = next(model.parameters()).device
        decoded = [model.decode(t.to(device)).clamp(-1, 1).cpu() for t in tokens.split(batch_size)]
        images = images_to_uint8(torch.cat(decoded))
    meta_path = samples_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return {"tokens": tokens, "labels": labels, "images": images, "meta": meta}


def _predicted_modes(space: FeatureSpace, logits: torch.Tensor) -> torch.Tensor:
    """Per image the argmax class of each classifier head, (N, heads)."""
    parts = logits.split([n for _, n in space.heads], dim=-1)
    return torch.stack([p.argmax(-1) for p in parts], dim=-1)


def codebook_report(model: VQVAE, data: SplitPass) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    """Codebook statistics over the split.

    Returns (tokenizer entries, codebook entries, codes (n, D) in the space of ``data``'s latents, their
    joint ids (n,)). For a learned codebook every code is looked up; for an implicit one (``fsq``, ``lfq``: a
    fixed grid) only the codes the split used, and the all-code distance is None (a constant of the grid).
    """
    q = model.quantizer
    layout = model.layout()
    device = next(model.parameters()).device
    learned = q.capabilities.learned_codebook
    code_ids = torch.arange(layout.num_codes) if learned else (data.code_counts > 0).nonzero().squeeze(1)
    with torch.no_grad():
        # Code ids looked up into the space of the encoder outputs (B=1, n) -> (n, D); for the adaptive
        # ladder these are the back-projected codes of every codebook.
        codes = q.lookup(code_ids.to(device)[None])[0].double().cpu()
    if learned:
        books = q.codebooks()
        per_book = [mean_pairwise_distance(b) for b in books]
        # Code-count-weighted mean over codebooks, as the training logs compute it.
        distance = sum(d * n for d, n in zip(per_book, layout.codebook_sizes)) / layout.num_codes
    else:
        per_book, distance = [None] * layout.num_codebooks, None
    tok = {
        "perplexity": perplexity(data.code_counts),
        "usage": usage(data.code_counts),
        "code_distance": distance,
        "codebook_size": layout.num_codes,
        "quantizer": layout.kind,
    }
    cb = {
        "code_distance_per_codebook": per_book,
        "codebook_sizes": list(layout.codebook_sizes),
        "dead_codes": int((data.code_counts == 0).sum()),
        # implicit codebooks: the spread of the used grid points (all of them would describe the grid alone)
        "spread": spread_stats(codes, data.latents.covariance()),
        "spread_over": "all codes" if learned else "used codes",
    }
    if layout.num_codebooks > 1:
        sel = selection_histogram(data.indices, layout)
        cb["selection_fractions"] = (sel.double() / sel.sum()).tolist()
        cb["selection_counts"] = sel.tolist()
    return tok, cb, codes, code_ids


def _report_folder(run_dir, cfg=None, out_dir=None, **_) -> tuple[Path, str]:
    """Where ``evaluate_run`` writes, and what kind of vqgen folder that is (the run folder, or a report folder)."""
    if out_dir is None or Path(out_dir).resolve() == Path(run_dir).resolve():
        return Path(run_dir), "run"
    return Path(out_dir), "report"


def _prior_fingerprint(run: Path) -> str | None:
    """sha256 of the run's prior weights (None when the run has no prior)."""
    weights = run / "prior" / "model" / "model.safetensors"
    return file_fingerprint(weights) if weights.is_file() else None


@owns_folder(lambda *args, **kwargs: _report_folder(*args, **kwargs)[0],
             lambda *args, **kwargs: _report_folder(*args, **kwargs)[1],
             what=lambda *args, **kwargs: "--run" if _report_folder(*args, **kwargs)[1] == "run" else "--output")
def evaluate_run(run_dir: str | Path, cfg: EvalConfig | None = None, out_dir: str | Path | None = None, *,
                 tokenizer_dir: str | Path | None = None, samples_dir: str | Path | None = None) -> dict:
    """Evaluate the run in ``run_dir``; write ``report.{json,md,html}`` and plots into ``out_dir`` (default:
    the run folder). Returns the report dict.

    ``tokenizer_dir`` / ``samples_dir`` replace ``RUN/tokenizer`` / ``RUN/samples`` (stage-wise folders such as
    ``runs/tok`` and ``runs/samples``). With ``cfg.protocol`` the evaluation is the protocol's
    (:func:`vqgen.pipelines.score.evaluate_protocol`).
    """
    cfg = cfg or EvalConfig()
    cfg.validate()
    run = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else run / "tokenizer"
    if samples_dir is not None:
        samples_dir = Path(samples_dir)
    elif tokenizer_dir is None:
        samples_dir = run / "samples"
    if not (tok_dir / "model").is_dir() or not (tok_dir / "config.yaml").is_file():
        if tokenizer_dir is not None:
            raise EvalError(f"{tok_dir} is not a tokenizer folder: it needs model/ and config.yaml (written by "
                            "pipelines.train_tokenizer --output-dir)")
        raise EvalError(f"{run} is not a run folder: it needs tokenizer/model/ and tokenizer/config.yaml "
                        "(written by pipelines.train_tokenizer --output-dir RUN/tokenizer)")
    if cfg.protocol is not None:
        from vqgen.pipelines.score import evaluate_protocol

        if samples_dir is not None:  # exactly what the sampler wrote for this tokenizer (and this run's prior)
            verify_samples(samples_dir, tokenizer_fingerprint(tok_dir / "model"),
                           _prior_fingerprint(run) if tokenizer_dir is None else None)
        return evaluate_protocol(tok_dir, samples_dir, cfg, out)
    for key in ("reference", "reference_split"):
        if getattr(cfg, key) is not None:
            raise EvalError(f"{key} applies to a protocol (--protocol NAME) or to --images; this evaluation compares "
                            f"with the {cfg.split} split (split=...)")
    device = _device(cfg.device)
    timing: dict[str, float] = {}
    notes: list[str] = []

    t = time.perf_counter()
    model = VQVAE.from_pretrained(tok_dir / "model", map_location=device)
    # the samples are exactly what the sampler wrote for this run's tokenizer and prior (refused before any work)
    sampled = None if samples_dir is None else verify_samples(
        samples_dir, tokenizer_fingerprint(tok_dir / "model"), _prior_fingerprint(run) if tokenizer_dir is None else None,
        model.config.image_size)
    if sampled is not None and sampled["verified"] == "legacy":
        notes.append("the samples were written by an older vqgen without a manifest: checked by their names, count, "
                     "image size and fingerprints, not by their hashes")
    data_cfg = from_dict(DataConfig, read_yaml(tok_dir / "config.yaml").get("data") or {}, prefix="data.")
    dataset = build_dataset(data_cfg, cfg.split)
    n = min(cfg.num_images, len(dataset))
    if n <= cfg.k:
        raise EvalError(f"split {cfg.split!r} has {len(dataset)} images; the k-NN metrics need more than k={cfg.k} "
                        "(use another split= or a smaller k=)")
    loader = make_dataloader(torch.utils.data.Subset(dataset, range(n)), batch_size=cfg.batch_size, shuffle=False)
    batches = progress(loader, desc=f"reconstruct the {cfg.split} split", unit="batch")
    data = tokenizer_pass(model, batches, device, n, cfg.max_latents)
    timing["tokenizer_pass"] = time.perf_counter() - t

    t = time.perf_counter()
    data_fingerprint = getattr(dataset, "fingerprint", json.dumps(dataclasses.asdict(data_cfg), sort_keys=True))
    spaces = {name: _reference_and_rfid(name, cfg, data_cfg, data, data_fingerprint, n, device)
              for name in cfg.feature_spaces()}
    primary = spaces[cfg.extractor]
    space, ref, rec = primary.space, primary.ref, primary.rec
    timing["features_and_rfid"] = time.perf_counter() - t

    recon = data.meter.summary()
    tok_stats, cb_stats, codes, code_ids = codebook_report(model, data)
    tokenizer = {
        "recon_mse": recon["mse"], "psnr": recon["psnr"], "ssim": recon["ssim"], **tok_stats,
        "rfid": rec["fid"], "rkid": rec["kid"], "num_images": recon["num_images"],
    }

    t = time.perf_counter()
    samples = None if samples_dir is None else load_samples(samples_dir, cfg.num_images, model, cfg.batch_size)
    generation = {key: None for key in ("fid", "kid", "precision", "recall", "density", "coverage",
                                        "mode_coverage", "token_perplexity")}
    sample_counts = None
    if samples is None:
        notes.append(f"no samples in {samples_dir}: generation metrics are n/a" if samples_dir is not None else
                     "no samples folder was given (--samples): generation metrics are n/a")
    else:
        if samples["images"].shape[0] <= cfg.k:
            raise EvalError(f"{samples_dir} has {samples['images'].shape[0]} samples; the k-NN metrics need "
                            f"more than k={cfg.k} (sample more images or lower k=)")
        if sampled is not None:
            generation["sampling"] = sampled["sampling"]  # cfg scale, temperature, top-k/p, seed, count
        for evaluated in spaces.values():
            evaluated.generate(samples["images"], cfg)
        fake, gen = primary.fake, primary.gen
        sample_counts = code_histogram(samples["tokens"], tok_stats["codebook_size"])
        generation.update({k: gen[k] for k in ("fid", "kid", "precision", "recall", "density", "coverage")})
        generation["kid_std"] = gen["kid_std"]
        generation.update(token_statistics(sample_counts, data.code_counts))
        generation["num_samples"] = int(samples["images"].shape[0])
        if space.heads and space.info.get("task") != "rotation":
            modes = mode_coverage(_predicted_modes(space, fake["logits"]), _predicted_modes(space, ref["logits"]),
                                  [s for _, s in space.heads], [h for h, _ in space.heads])
            generation["mode_coverage"] = modes["mode_coverage"]
            generation["modes"] = modes
            head_names = [h for h, _ in space.heads]
            conditional = samples["labels"] >= 0
            if "label" in head_names and conditional.any():
                pred = _predicted_modes(space, fake["logits"])[:, head_names.index("label")]
                generation["conditional_accuracy"] = float((pred[conditional] == samples["labels"][conditional])
                                                           .double().mean())
        else:
            notes.append("mode coverage needs a classifier with classes (offline extractor on labelled data)")
    timing["generation"] = time.perf_counter() - t

    t = time.perf_counter()
    figures = _figures(out / "report_files", tok_dir, model, data, codes, code_ids, samples, sample_counts, cfg)
    timing["plots"] = time.perf_counter() - t

    if space.name == "offline":
        notes.append("FID/KID here use the offline classifier's features, not Inception: compare only with "
                     "reports that name the same feature_extractor.weights_sha256")
    if "contrastive" in spaces:
        notes.append("feature_spaces.contrastive: FID/KID/PRDC in a label-free space (a self-supervised backbone "
                     "trained on this data set's images without labels), not Inception: compare only with "
                     "reports that name the same weights_sha256")
    feature_spaces = {name: evaluated.report(samples) for name, evaluated in spaces.items()}
    report = {
        "run": str(run.resolve()),
        "split": cfg.split,
        "tokenizer": tokenizer,
        "codebook": cb_stats,
        "generation": generation,
        "feature_extractor": dict(feature_spaces[cfg.extractor]["feature_extractor"]),
        "feature_spaces": feature_spaces,
        "timing_seconds": {k: round(v, 3) for k, v in timing.items()},
        "notes": notes,
        "provenance": provenance(),
    }
    report["caveats"] = report_caveats(report)
    write_report(report, figures, out, title=f"vqgen report: {run.resolve().name}")
    return report


@dataclasses.dataclass
class _EvaluatedSpace:
    """One feature space of a report: the extractor, the real split's (cached) features, reconstruction
    metrics, and after :meth:`generate` the samples' features and metrics."""

    space: FeatureSpace
    ref: dict[str, torch.Tensor]
    reference_cache_hit: bool
    num_reconstructions: int
    rec: dict
    fake: dict[str, torch.Tensor] | None = None
    gen: dict | None = None

    def generate(self, images: torch.Tensor, cfg: EvalConfig) -> None:
        """Features of the sampled uint8 images (N, 3, H, W) and their metrics against the real split."""
        self.fake = self.space.extract(images, cfg.batch_size, desc=f"{self.space.name} features: samples")
        self.gen = _against_reference(self.ref, self.fake["features"], cfg)

    def report(self, samples: dict | None) -> dict:
        """``report["feature_spaces"][name]``: extractor description, rfid / rkid, generation metrics."""
        return {
            "feature_extractor": {**self.space.describe(), "num_real_images": int(len(self.ref["features"])),
                                  "feature_dim": int(self.ref["features"].shape[1]),
                                  "num_reconstructions": self.num_reconstructions,
                                  "num_samples": None if samples is None else int(samples["images"].shape[0]),
                                  "reference_cache_hit": self.reference_cache_hit},
            "rfid": self.rec["fid"],
            "rkid": self.rec["kid"],
            "generation": None if self.gen is None else {k: self.gen[k] for k in SPACE_GENERATION_KEYS},
        }


def _against_reference(ref: dict[str, torch.Tensor], features: torch.Tensor, cfg: EvalConfig) -> dict:
    """FID, KID, precision/recall, density/coverage of ``features`` (N, F) against the real split's."""
    return fidelity_metrics(ref["features"], features, k=cfg.k, kid_subsets=cfg.kid_subsets,
                            kid_subset_size=cfg.kid_subset_size,
                            real_stats={"mu": ref["mu"].numpy(), "sigma": ref["sigma"].numpy()})


def _reference_and_rfid(name: str, cfg: EvalConfig, data_cfg: DataConfig, data: SplitPass, data_fingerprint: str,
                        n: int, device: torch.device) -> _EvaluatedSpace:
    """Build feature space ``name``, get the real split's features (cached) and the reconstructions' metrics."""
    space = load_feature_space(name, data_cfg=data_cfg, weights_path=weights_for(name, cfg),
                               classifier=cfg.classifier, contrastive=cfg.contrastive, device=str(device))
    key = reference_key(data_fingerprint, cfg.split, space, n)
    ref, was_cached = cached_reference(key, lambda: space.extract(data.real, cfg.batch_size,
                                                                  desc=f"{name} features: {cfg.split} split"))
    recon = space.extract(data.recon, cfg.batch_size, desc=f"{name} features: reconstructions")["features"]  # (N, F)
    return _EvaluatedSpace(space, ref, was_cached, int(len(recon)), _against_reference(ref, recon, cfg))


def _figures(fig_dir: Path, tok_dir: Path, model: VQVAE, data: SplitPass, codes: torch.Tensor, code_ids: torch.Tensor,
             samples: dict | None, sample_counts: torch.Tensor | None, cfg: EvalConfig) -> dict[str, Path]:
    """All plots of a run report, by caption."""
    figures: dict[str, Path] = {}
    rows = {"real": data.real, "reconstructed": data.recon}
    if samples is not None:
        rows["sampled"] = samples["images"]
    figures["real vs reconstructed vs sampled"] = save_grids(rows, fig_dir / "grid.png", cfg.grid_images)
    curves = plot_stage_curves(tok_dir, fig_dir / "tokenizer_curves.png", "tokenizer training")
    if curves:
        figures["tokenizer training curves"] = curves
    prior_curves = plot_stage_curves(tok_dir.parent / "prior", fig_dir / "prior_curves.png", "prior training")
    if prior_curves:
        figures["prior training curves"] = prior_curves
    hists = {"data tokens": data.code_counts}
    if sample_counts is not None:
        hists["sampled tokens"] = sample_counts
    figures["code usage"] = plot_code_usage(hists, fig_dir / "code_usage.png")
    # Plot at most 4000 codes: every used one first (most frequent first), then unused ones.
    counts = data.code_counts[code_ids]
    order = torch.argsort(counts, descending=True)[:4000]
    figures["codes over encoder outputs"] = plot_projection(data.latent_sample, codes[order], counts[order],
                                                            fig_dir / "projection.png")
    layout = model.layout()
    if layout.num_codebooks > 1:
        sel = selection_histogram(data.indices, layout)
        labels = [f"N={s}, D={b.shape[1]}" for s, b in zip(layout.codebook_sizes, model.quantizer.codebooks())]
        figures["codebook selection"] = plot_selection(sel, labels, fig_dir / "selection.png")
    figures["per-image reconstruction quality"] = plot_per_image(data.meter.per_image, fig_dir / "per_image.png")
    return figures


@owns_folder(lambda run_dirs, out_dir, *args, **kwargs: out_dir, "report", what="--output")
def compare_runs(run_dirs: Sequence[str | Path], out_dir: str | Path, cfg: EvalConfig | None = None,
                 reuse: bool = True) -> dict:
    """Evaluate several runs (or reuse their ``report.json``) and write one comparison table with overlaid
    tokenizer training curves into ``out_dir``. Returns the comparison content."""
    out = Path(out_dir)
    reports, curves = {}, {}
    for run_dir in run_dirs:
        run = Path(run_dir)
        name = run.resolve().name
        while name in reports:  # two runs with the same folder name: keep both
            name += "'"
        existing = run / "report.json"
        reports[name] = load_json(existing) if reuse and existing.is_file() else evaluate_run(run, cfg)
        curves[name] = read_jsonl(run / "tokenizer" / "metrics.jsonl")
    figures = {}
    overlay = plot_comparison(curves, out / "comparison_files" / "curves.png")
    if overlay:
        figures["tokenizer training curves, overlaid"] = overlay
    write_comparison(reports, figures, out)
    return json.loads((out / "comparison.json").read_text())


def stage_record(cfg: EvalConfig, run: Path) -> dict:
    return make_record("evaluate", cfg, file_inputs({"tokenizer": run / "tokenizer" / "model" / "model.safetensors",
                                                     "samples": run / "samples" / "tokens.safetensors"}))


def stage_complete(cfg: EvalConfig, run: Path) -> bool:
    return (run / "report.json").is_file()


def run_stage(cfg: EvalConfig, run: Path) -> dict:
    return evaluate_run(run, cfg)


@entry_point(known=(FeatureExtractorError,))
def main(argv: Sequence[str] | None = None) -> dict:
    """CLI: ``--run DIR`` (repeat to compare), or ``--tokenizer DIR [--samples DIR]``, or ``--images DIR_OR_NPZ
    --reference DATASET_OR_NPZ``; ``--output DIR``; every ``EvalConfig`` field is a flag (``--protocol``,
    ``--extractor``, ``--num-images``, ``--reference``, ...) or a ``key=value`` override (``classifier.max_steps=500``)."""
    def paths(parser):
        parser.add_argument("--run", action="append", help="run folder; repeat to compare runs")
        parser.add_argument("--tokenizer", help="a tokenizer folder (train_tokenizer --output-dir), instead of --run")
        parser.add_argument("--samples", help="with --tokenizer: a samples folder (sample --output-dir)")
        parser.add_argument("--images", help="score a folder of images (or an ADM-style .npz) from any system, against "
                            "--reference (an ADM-style .npz, or a data set: synthetic, a hub name, an image folder, a "
                            "YAML file, a tokenizer or run folder)")
        parser.add_argument("--output", help="report folder (default: the run folder; required to compare runs and "
                            "with --tokenizer or --images)")
        parser.add_argument("--reevaluate", action="store_true",
                            help="comparison: evaluate even runs with a report.json")

    cfg, args = parse_cli(EvalConfig, argv, "Evaluate runs: reconstruction, FID, diversity and shrinkage.", paths)
    modes = [name for name, given in (("--run", args.run), ("--tokenizer", args.tokenizer), ("--images", args.images))
             if given]
    if len(modes) != 1:
        raise EvalError("give one of --run RUN, --tokenizer DIR [--samples DIR], or --images DIR --reference REF"
                        + (f" (got {' and '.join(modes)})" if modes else ""))
    if args.samples and not args.tokenizer:
        raise EvalError("--samples goes with --tokenizer (a run folder names its samples itself)")
    if args.images:
        reference = cfg.reference
        if not reference or not args.output:
            raise EvalError("--images needs --reference (an ADM .npz or a data set) and --output DIR for the report")
        from vqgen.pipelines.score import score_images

        check_output_dir(args.output, "--output")
        report = score_images(args.images, reference, dataclasses.replace(cfg, reference=None), args.output)
        print(f"wrote {Path(args.output) / 'report.json'} and {Path(args.output) / 'report.html'}")
        return report
    if args.tokenizer:
        if not args.output:
            raise EvalError("--tokenizer needs --output DIR for the report")
        for flag, folder in (("--tokenizer", args.tokenizer), ("--samples", args.samples)):
            if folder is not None and not Path(folder).is_dir():
                raise EvalError(f"{flag} {folder} is not a folder")
        check_output_dir(args.output, "--output")
        report = evaluate_run(args.output, cfg, args.output, tokenizer_dir=args.tokenizer, samples_dir=args.samples)
        print(f"wrote {Path(args.output) / 'report.json'} and {Path(args.output) / 'report.html'}")
        return report
    if len(args.run) > 1 and not args.output:
        raise EvalError("comparing several runs needs --output DIR for the comparison table")
    for run in args.run:  # before any work
        if not Path(run).is_dir():
            raise EvalError(f"--run {run} is not a folder; give a run folder (the output_dir of vqgen run)")
    check_output_dir(args.output or args.run[0], "--output" if args.output else "--run")
    if len(args.run) == 1:
        report = evaluate_run(args.run[0], cfg, args.output)
        where = Path(args.output or args.run[0])
        print(f"wrote {where / 'report.json'} and {where / 'report.html'}")
        return report
    result = compare_runs(args.run, args.output, cfg, reuse=not args.reevaluate)
    print(f"wrote {Path(args.output) / 'comparison.html'}")
    return result


if __name__ == "__main__":
    main()

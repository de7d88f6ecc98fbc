"""Streaming evaluation: a named protocol on a tokenizer (and its samples), and any images against a reference.

    python -m vqgen.pipelines.evaluate --run RUN --protocol inception-50k --reference VIRTUAL_imagenet256_labeled.npz
    python -m vqgen.pipelines.evaluate --tokenizer runs/tok --samples runs/samples --output runs/eval --protocol fd-dinov2
    python -m vqgen.pipelines.evaluate --images DIR_OR_NPZ --reference DATASET_OR_NPZ --output DIR

Everything here passes over the images once, a batch at a time (:mod:`eval.streaming`): FID statistics over
every image, the features of a seeded subset (``knn_images``) for KID / precision / recall / density /
coverage. Reference statistics are cached (``$VQGEN_CACHE/reference``) under a key made of the reference's
sha256 (``.npz``) or data set fingerprint and split, the extractor and its weights' sha256, and the counts.

A reference is an ADM-style ``.npz`` (its ``mu`` / ``sigma`` when they are Inception statistics and the
extractor is Inception; else its ``arr_0`` images, or a 2-D ``activations`` array) or a data set: ``synthetic``,
a hub name, an image folder, a YAML file with a ``data`` section, or a tokenizer / run folder (the data set it
was trained on).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch

from vqgen.core.config import from_dict, read_yaml
from vqgen.core.provenance import provenance
from vqgen.core.io import load_safetensors
from vqgen.eval.caveats import report_caveats
from vqgen.eval.diversity import code_histogram, perplexity, usage
from vqgen.eval.fid import (
    INCEPTION_NAME,
    FeatureSpace,
    cached_reference,
    fid_from_statistics,
    images_to_uint8,
    load_cached_reference,
    load_feature_space,
    neighbourhood_metrics,
    reference_key,
)
from vqgen.eval.image_sets import NpzBatch, image_files, iter_image_files
from vqgen.eval.plots import plot_code_usage, plot_per_image, save_grids
from vqgen.eval.progress import progress
from vqgen.eval.protocols import Protocol, get_protocol
from vqgen.eval.reconstruction import ReconstructionMeter
from vqgen.eval.report import write_report
from vqgen.eval.streaming import FeatureStream, stream_features, subset_indices
from vqgen.pipelines.evaluate import EvalConfig, EvalError, _device, weights_for
from vqgen.tokenizer.data import DataConfig, build_dataset, make_dataloader
from vqgen.tokenizer.model import VQVAE

__all__ = ["Reference", "evaluate_protocol", "parse_reference", "plan_for", "score_images"]

CACHE_FORMAT = 1  # part of every streamed reference's cache key
LARGE_SET = 10_000  # data sets of this many images are decoded by DataLoader workers


def plan_for(cfg: EvalConfig) -> Protocol:
    """The named protocol of ``cfg``, or one made of its own settings (``custom``) for ``--images``."""
    if cfg.protocol is not None:
        return get_protocol(cfg.protocol)
    return Protocol("custom", cfg.extractor, cfg.num_images, cfg.reference_split or cfg.split, None, None,
                    cfg.knn_images, cfg.k, f"as configured: extractor {cfg.extractor}, at most {cfg.num_images} images")


def open_space(plan: Protocol, cfg: EvalConfig, data_cfg: DataConfig | None, device: torch.device) -> FeatureSpace:
    """The protocol's feature extractor; a named protocol refuses weights other than the published file
    unless ``allow_unknown_weights``."""
    if plan.extractor in ("offline", "contrastive") and data_cfg is None:
        raise EvalError(f"the {plan.extractor} extractor is trained on a data set; give --reference a data set (not "
                        "an .npz), or use --protocol inception-50k / fd-dinov2")
    space = load_feature_space(plan.extractor, data_cfg=data_cfg, weights_path=weights_for(plan.extractor, cfg),
                               classifier=cfg.classifier, contrastive=cfg.contrastive, device=str(device))
    if plan.name != "custom" and space.info.get("weights_known") is False and not cfg.allow_unknown_weights:
        raise EvalError(f"protocol {plan.name} is defined with the published {plan.extractor} weights; "
                        f"{space.weights_path} (sha256 {space.weights_sha256[:16]}...) is another file: pass the "
                        "published one, or allow_unknown_weights=true (the report then says the numbers are not "
                        "comparable with papers')")
    return space


def feature_dim(space: FeatureSpace) -> int:
    """Width of the extractor's FID features (one small dummy batch through it)."""
    return int(space.extract_batch(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))["features"].shape[1])


# ------------------------------------------------------------------------------------------------ references


@dataclasses.dataclass
class Reference:
    """What samples are compared with: an ADM-style ``.npz`` or a split of a data set."""

    npz: NpzBatch | None = None
    data_cfg: DataConfig | None = None
    split: str | None = None
    text: str = ""

    def describe(self) -> dict:
        if self.npz is not None:
            return {"kind": "npz", **self.npz.describe()}
        data = {k: v for k, v in dataclasses.asdict(self.data_cfg).items() if v is not None}
        return {"kind": "data set", "given": self.text, "split": self.split, "data": data}


def _data_config_from(path: Path) -> DataConfig | None:
    """The data section of a YAML file, or of ``config.yaml`` in a tokenizer folder or run folder."""
    for candidate in (path, path / "config.yaml", path / "tokenizer" / "config.yaml"):
        if candidate.is_file() and candidate.suffix in (".yaml", ".yml"):
            raw = read_yaml(candidate) or {}
            section = raw.get("data") if isinstance(raw.get("data"), dict) else (
                raw.get("tokenizer", {}).get("data") if isinstance(raw.get("tokenizer"), dict) else None)
            return from_dict(DataConfig, section if section is not None else raw, prefix="data.")
    return None


def parse_reference(text: str, split: str, image_size: int) -> Reference:
    """``--reference``: an ``.npz``; ``synthetic``; a YAML file / tokenizer or run folder (their data set); an
    image folder; else a hub data set name. Data sets not described by a file are read at ``image_size``."""
    path = Path(text)
    if text.endswith(".npz"):
        return Reference(npz=NpzBatch.open(path), text=text)
    if text == "synthetic":
        return Reference(data_cfg=DataConfig(image_size=image_size), split=split, text=text)
    data_cfg = _data_config_from(path) if path.exists() else None
    if data_cfg is None and path.is_dir():
        data_cfg = DataConfig(source="hf", data_dir=str(path), image_size=image_size)
    if data_cfg is None:
        if path.suffix or path.is_absolute() or text.startswith("."):
            raise EvalError(f"--reference {text} does not exist; give an .npz, a data set folder or YAML, "
                            "'synthetic' or a hub data set name")
        data_cfg = DataConfig(source="hf", path=text, image_size=image_size)
    return Reference(data_cfg=data_cfg, split=split, text=text)


def _loader(dataset, n: int, batch_size: int):
    """The first ``n`` images of ``dataset`` in order; large sets are decoded by worker processes."""
    workers = min(8, max(0, (os.cpu_count() or 1) - 1)) if n >= LARGE_SET else 0
    return make_dataloader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size, shuffle=False,
                           num_workers=workers)


def _dataset_batches(dataset, n: int, batch_size: int):
    return (images_to_uint8(batch["image"]) for batch in _loader(dataset, n, batch_size))


def reference_tensors(space: FeatureSpace, ref: Reference, keep: int, batch_size: int,
                      ) -> tuple[dict[str, torch.Tensor], bool, dict]:
    """The reference's statistics (``mu``, ``sigma``, ``count``) and ``features`` of at most ``keep`` of its
    images, computed once and cached. Returns (tensors, cache hit, description for the report)."""
    described = ref.describe()
    meta = {"extractor": space.registry_name, "extractor_sha256": space.weights_sha256}
    if ref.npz is not None:
        npz = ref.npz
        stats = npz.statistics() if space.registry_name == INCEPTION_NAME else None
        activations_key = npz.activations_key()
        mode = "npz statistics" if stats is not None else "npz activations" if activations_key else "npz images"
        key = reference_key(npz.sha256, mode, space, keep) + f"-f{CACHE_FORMAT}"
        meta.update(source=str(npz.path), source_sha256=npz.sha256, mode=mode)

        def compute() -> dict[str, torch.Tensor]:
            if stats is not None:
                dim = feature_dim(space)
                if stats["mu"].shape[0] != dim:
                    raise EvalError(f"{npz.path} holds {stats['mu'].shape[0]}-d statistics, the extractor gives "
                                    f"{dim}-d features")
                n = min(keep, npz.num_images)
                features = stream_features(space, npz.iter_images(batch_size, n), n, n,
                                           desc="reference images (k-NN set)")["features"] if n else \
                    torch.zeros(0, dim, dtype=torch.float64)
                return {"mu": torch.from_numpy(stats["mu"]), "sigma": torch.from_numpy(stats["sigma"]),
                        "features": features, "count": torch.tensor([0], dtype=torch.long)}
            if activations_key is not None:
                acts = torch.from_numpy(npz.activations())
                stream = FeatureStream(subset_indices(len(acts), keep))
                stream.update(acts)
                return stream.tensors()
            return stream_features(space, npz.iter_images(batch_size), npz.num_images, keep,
                                   desc="reference features (once, cached)")

        tensors, hit = cached_reference(key, compute, metadata=meta)
        described["statistics"] = {"npz statistics": "the file's mu / sigma (whole data set, as ADM wrote them)",
                                   "npz activations": f"computed from the file's {activations_key} array",
                                   "npz images": "computed from the file's arr_0 images"}[mode]
        if stats is None and npz.statistics() is not None:
            described["note"] = "the file's mu / sigma are Inception statistics, so this extractor used its images"
    else:
        try:
            dataset = build_dataset(ref.data_cfg, ref.split)
        except (ValueError, FileNotFoundError, KeyError) as err:
            raise EvalError(f"reference {ref.text or 'data set'}: split {ref.split!r} cannot be read ({err})") from None
        n = len(dataset)
        if n < 2:
            raise EvalError(f"the reference split {ref.split!r} has {n} images; FID needs at least 2")
        fingerprint = getattr(dataset, "fingerprint", None) or str(described["data"])
        key = reference_key(fingerprint, ref.split, space, n) + f"-k{keep}-f{CACHE_FORMAT}"
        meta.update(source=f"{ref.text} split {ref.split}", source_fingerprint=fingerprint, num_images=n)
        tensors, hit = cached_reference(
            key, lambda: stream_features(space, _dataset_batches(dataset, n, batch_size), n, keep,
                                         desc=f"reference features: {ref.split} split (once, cached)"), metadata=meta)
        described["statistics"] = f"computed from every image of the {ref.split} split"
    count = int(tensors["count"][0])
    described.update(num_images=count or None, knn_images=int(tensors["features"].shape[0]), cache_key=key,
                     cache_hit=hit, extractor_sha256=space.weights_sha256)
    return tensors, hit, described


def _metrics(real: dict[str, torch.Tensor], fake: dict[str, torch.Tensor], cfg: EvalConfig, k: int) -> dict:
    """FID from the two sets' statistics; KID / precision / recall / density / coverage (``k`` neighbours) on
    their subsets."""
    out = {"fid": fid_from_statistics({"mu": real["mu"].numpy(), "sigma": real["sigma"].numpy()},
                                      {"mu": fake["mu"].numpy(), "sigma": fake["sigma"].numpy()})}
    a, b = real["features"], fake["features"]
    if min(len(a), len(b)) > k:
        near = neighbourhood_metrics(a, b, k=k, kid_subsets=cfg.kid_subsets, kid_subset_size=cfg.kid_subset_size)
        out.update({key: near[key] for key in ("kid", "kid_std", "precision", "recall", "density", "coverage")})
    else:
        out.update(dict.fromkeys(("kid", "kid_std", "precision", "recall", "density", "coverage")))
    return out


# ------------------------------------------------------------------------------------------------ image sources


@dataclasses.dataclass
class ImageSource:
    """Images to score: a folder of image files, an ADM-style ``.npz``, or sampled tokens to decode."""

    path: Path
    count: int
    kind: str
    files: list[Path] | None = None
    npz: NpzBatch | None = None
    tokens: torch.Tensor | None = None
    model: VQVAE | None = None

    def batches(self, batch_size: int):
        """uint8 batches (B, 3, H, W) of the first ``count`` images."""
        if self.files is not None:
            return iter_image_files(self.files[: self.count], batch_size)
        if self.npz is not None:
            return self.npz.iter_images(batch_size, self.count)
        return self._decoded(batch_size)

    def _decoded(self, batch_size: int):
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for chunk in self.tokens[: self.count].split(batch_size):
                yield images_to_uint8(self.model.decode(chunk.to(device)).clamp(-1, 1).cpu())

    def first(self, n: int) -> torch.Tensor:
        """The first ``n`` images, for the report's grid."""
        return next(iter(self.batches(max(n, 1))))[:n]

    def image_size(self) -> int:
        return int(self.first(1).shape[-1])

    def describe(self) -> dict:
        out = {"path": str(self.path.resolve()), "kind": self.kind, "num_images": self.count}
        if self.npz is not None:
            out["sha256"] = self.npz.sha256
        return out


def open_images(path: str | Path, limit: int | None = None, model: VQVAE | None = None) -> ImageSource:
    """``--images``: an ``.npz`` (``arr_0``), a folder of image files (or a samples folder with ``images/``), or
    a samples folder with only ``tokens.safetensors`` (decoded with ``model``)."""
    path = Path(path)
    if path.suffix == ".npz":
        npz = NpzBatch.open(path)
        return ImageSource(path, min(limit or npz.num_images, npz.num_images), "npz", npz=npz)
    tokens = path / "tokens.safetensors"
    if model is not None and tokens.is_file() and not any((path / "images").glob("*.png")):
        ids = load_safetensors(tokens)["tokens"].long()
        return ImageSource(path, min(limit or len(ids), len(ids)), "decoded tokens", tokens=ids, model=model)
    files = image_files(path)
    return ImageSource(path, min(limit or len(files), len(files)), "image files", files=files)


def _score(source: ImageSource, ref_tensors: dict, space: FeatureSpace, plan: Protocol, cfg: EvalConfig) -> dict:
    fake = stream_features(space, source.batches(cfg.batch_size), source.count, plan.knn_images, seed=1,
                           desc=f"{space.name} features of the scored images")
    gen = _metrics(ref_tensors, fake, cfg, plan.k)
    gen.update(num_samples=source.count, knn_images=int(fake["features"].shape[0]))
    return gen


def _space_entry(space: FeatureSpace, dim: int, hit: bool, ref_described: dict | None, gen: dict | None,
                 rec: dict | None, rec_counts: tuple[int, int] | None) -> dict:
    extractor = {**space.describe(), "feature_dim": dim}
    if ref_described is not None:
        extractor.update(num_reference_images=ref_described.get("num_images"), reference_cache_hit=hit)
    if gen is not None:
        extractor["num_samples"] = gen["num_samples"]
    if rec_counts is not None:
        extractor.update(num_reconstructions=rec_counts[0], num_recon_reference=rec_counts[1])
    return {"feature_extractor": extractor,
            "rfid": None if rec is None else rec["fid"], "rkid": None if rec is None else rec["kid"],
            "generation": None if gen is None else {k: gen[k] for k in ("fid", "kid", "precision", "recall",
                                                                          "density", "coverage")}}


def _protocol_entry(plan: Protocol, scored: int | None) -> tuple[dict, list[dict]]:
    entry = plan.describe()
    caveats = []
    if plan.name != "custom" and plan.num_samples and scored is not None:
        entry["num_samples_scored"] = scored
        if scored < plan.num_samples:
            caveats.append({"code": "protocol_count", "metric": "FID/KID",
                            "message": f"protocol {plan.name} scores {plan.num_samples:,} samples, these numbers come "
                                       f"from {scored:,}: not comparable with numbers reported under {plan.name}"})
    return entry, caveats


def _finish(report: dict, extra_caveats: list[dict], figures: dict, out: Path, title: str) -> dict:
    report["caveats"] = extra_caveats + report_caveats(report)
    report["provenance"] = provenance()
    write_report(report, figures, out, title=title)
    return report


# ------------------------------------------------------------------------------------------------ entry points


def score_images(images: str | Path, reference: str, cfg: EvalConfig, out_dir: str | Path) -> dict:
    """Score a folder (or ``.npz``) of images from any system against ``reference``; write ``report.*`` into
    ``out_dir``. Returns the report dict."""
    cfg.validate()
    plan = plan_for(cfg)
    if plan.num_samples == 0:
        raise EvalError(f"protocol {plan.name} scores no samples; --images needs inception-50k, fd-dinov2 or none")
    out, device, t0 = Path(out_dir), _device(cfg.device), time.perf_counter()
    source = open_images(images, plan.num_samples)
    ref = parse_reference(reference, cfg.reference_split or plan.reference_split, source.image_size())
    space = open_space(plan, cfg, ref.data_cfg, device)
    ref_tensors, hit, ref_described = reference_tensors(space, ref, plan.knn_images, cfg.batch_size)
    gen = _score(source, ref_tensors, space, plan, cfg)
    dim = int(ref_tensors["mu"].shape[0])
    protocol, caveats = _protocol_entry(plan, source.count)
    figures = {"scored images": save_grids({"scored": source.first(cfg.grid_images)}, out / "report_files" / "grid.png",
                                           cfg.grid_images)}
    report = {
        "images": source.describe(),
        "protocol": protocol,
        "reference": ref_described,
        "generation": gen,
        "feature_extractor": {**space.describe(), "feature_dim": dim},
        "feature_spaces": {space.name: _space_entry(space, dim, hit, ref_described, gen, None, None)},
        "timing_seconds": {"total": round(time.perf_counter() - t0, 3)},
        "notes": [],
    }
    return _finish(report, caveats, figures, out, f"vqgen report: {source.path.name} against {reference}")


@torch.no_grad()
def _reconstruction_pass(model: VQVAE, dataset, n: int, space: FeatureSpace, cfg: EvalConfig, keep: int,
                         real_needed: bool, grid: int):
    """One pass over ``n`` images: reconstruction errors, code counts, features of reconstructions (and of the
    originals when ``real_needed``), and the first ``grid`` images of each for the figure."""
    device = next(model.parameters()).device
    meter, counts = ReconstructionMeter(), torch.zeros(int(model.quantizer.codebook_size), dtype=torch.long)
    keep_idx = subset_indices(n, keep)
    recon_stream, real_stream = FeatureStream(keep_idx), FeatureStream(keep_idx)
    shown = {"real": [], "reconstructed": []}
    loader = _loader(dataset, n, cfg.batch_size)
    model.eval()
    for batch in progress(loader, desc=f"reconstruct and extract {space.name} features", unit="batch"):
        x = batch["image"].to(device)
        ids = model.encode(x)  # (B, h, w)
        recon = model.decode(ids).clamp(-1, 1)  # (B, C, H, W)
        meter.update(x, recon)
        counts += code_histogram(ids, counts.numel())
        real_u8, recon_u8 = images_to_uint8(x).cpu(), images_to_uint8(recon).cpu()
        recon_stream.update(space.extract_batch(recon_u8)["features"])
        if real_needed:
            real_stream.update(space.extract_batch(real_u8)["features"])
        if sum(len(t) for t in shown["real"]) < grid:
            shown["real"].append(real_u8[:grid])
            shown["reconstructed"].append(recon_u8[:grid])
    rows = {k: torch.cat(v)[:grid] for k, v in shown.items()}
    return meter, counts, recon_stream.tensors(), (real_stream.tensors() if real_needed else None), rows


def evaluate_protocol(tokenizer_dir: str | Path, samples_dir: str | Path | None, cfg: EvalConfig,
                      out_dir: str | Path) -> dict:
    """Evaluate a tokenizer (rFID on the validation split) and its samples under ``cfg.protocol``; write
    ``report.*`` into ``out_dir``. Returns the report dict."""
    cfg.validate()
    plan = get_protocol(cfg.protocol)
    tok_dir, out, device = Path(tokenizer_dir), Path(out_dir), _device(cfg.device)
    timing, notes = {}, []
    t = time.perf_counter()
    model = VQVAE.from_pretrained(tok_dir / "model", map_location=device)
    data_cfg = from_dict(DataConfig, read_yaml(tok_dir / "config.yaml").get("data") or {}, prefix="data.")
    space = open_space(plan, cfg, data_cfg, device)
    dim = feature_dim(space)
    timing["load"] = time.perf_counter() - t

    tokenizer, rec, rec_counts, rows, figures = None, None, None, {}, {}
    if plan.recon_split is not None:
        t = time.perf_counter()
        split = plan.recon_split
        try:
            dataset = build_dataset(data_cfg, split)
        except (ValueError, FileNotFoundError, KeyError):
            dataset = None
        if dataset is None or len(dataset) == 0:
            split = "test"
            dataset = build_dataset(data_cfg, split)
            notes.append(f"the data set has no {plan.recon_split} split: rFID used the {split} split")
        n = min(len(dataset), plan.recon_images or len(dataset))
        if n <= plan.k:
            raise EvalError(f"the {split} split has {n} images; rFID needs more than k={plan.k}")
        key = reference_key(dataset.fingerprint, split, space, n) + f"-k{plan.knn_images}-f{CACHE_FORMAT}"
        meta = {"extractor": space.registry_name, "extractor_sha256": space.weights_sha256,
                "source": f"{split} split", "source_fingerprint": dataset.fingerprint, "num_images": n}
        cached = load_cached_reference(key)
        hit = cached is not None
        meter, counts, recon_t, real_t, rows = _reconstruction_pass(model, dataset, n, space, cfg, plan.knn_images,
                                                                    cached is None, cfg.grid_images)
        if cached is None:
            cached, _ = cached_reference(key, lambda: real_t, metadata=meta)
        rec = _metrics(cached, recon_t, cfg, plan.k)
        rec_counts = (n, int(cached["count"][0]))
        summary = meter.summary()
        tokenizer = {"rfid": rec["fid"], "rkid": rec["kid"], "recon_mse": summary["mse"], "psnr": summary["psnr"],
                     "ssim": summary["ssim"], "usage": usage(counts), "perplexity": perplexity(counts),
                     "codebook_size": int(counts.numel()), "num_images": n, "split": split,
                     "reference_cache_hit": hit}
        figures["code usage"] = plot_code_usage({f"{split} tokens": counts}, out / "report_files" / "code_usage.png")
        figures["per-image reconstruction quality"] = plot_per_image(meter.per_image, out / "report_files" / "per_image.png")
        timing["rfid"] = time.perf_counter() - t

    gen, ref_described, hit, source = None, None, False, None
    if plan.num_samples and samples_dir is not None and Path(samples_dir).is_dir():
        t = time.perf_counter()
        source = open_images(samples_dir, plan.num_samples, model)
        ref_split = cfg.reference_split or plan.reference_split
        ref = parse_reference(cfg.reference, ref_split, source.image_size()) if cfg.reference else \
            Reference(data_cfg=data_cfg, split=ref_split, text="the tokenizer's data set")
        ref_tensors, hit, ref_described = reference_tensors(space, ref, plan.knn_images, cfg.batch_size)
        gen = _score(source, ref_tensors, space, plan, cfg)
        rows["sampled"] = source.first(cfg.grid_images)
        timing["generation"] = time.perf_counter() - t
    elif plan.num_samples:
        notes.append(f"no samples folder ({samples_dir}): generation metrics are n/a")
    if rows:
        figures = {"real vs reconstructed vs sampled": save_grids(rows, out / "report_files" / "grid.png",
                                                                  cfg.grid_images), **figures}

    protocol, caveats = _protocol_entry(plan, None if gen is None else gen["num_samples"])
    entry = _space_entry(space, dim, hit, ref_described, gen, rec, rec_counts)
    report = {
        "run": str(out.resolve()),
        "tokenizer_dir": str(tok_dir.resolve()),
        "protocol": protocol,
        "tokenizer": tokenizer,
        "generation": gen,
        "reference": ref_described,
        "feature_extractor": entry["feature_extractor"],
        "feature_spaces": {space.name: entry},
        "timing_seconds": {k: round(v, 3) for k, v in timing.items()},
        "notes": notes,
    }
    if source is not None:
        report["samples"] = source.describe()
    return _finish({k: v for k, v in report.items() if v is not None}, caveats, figures, out,
                   f"vqgen report ({plan.name}): {tok_dir.resolve().name}")


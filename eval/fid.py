"""FID, KID and precision/recall through torch-fidelity, as stages: images -> features -> statistics -> metric.

- :func:`load_feature_space` builds a torch-fidelity feature extractor from its registry: ``offline``
  (the cached classifier of :mod:`eval.features`, registered as ``vqgen-classifier``), ``contrastive``
  (the cached label-free backbone of :mod:`eval.contrastive`, registered as ``vqgen-contrastive``) or
  ``inception`` (torch-fidelity's ``inception-v3-compat``; downloads its weights on first use unless
  ``weights_path`` is given). The :class:`FeatureSpace` it returns names the extractor, the sha256 of its
  weights and whether it was trained without labels.
- :func:`fid_statistics`, :func:`fid_from_statistics`, :func:`kid`, :func:`precision_recall` are thin
  wrappers over torch-fidelity's own stage functions, so our numbers equal torch-fidelity's.
- :func:`fidelity_metrics` combines them with density/coverage (:mod:`eval.prdc`).
- :func:`cached_reference` caches features (and hence statistics) of a real split, keyed by data set
  fingerprint, split, extractor weights fingerprint and number of images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.utils import create_feature_extractor

from vqgen.core.io import atomic_path, file_fingerprint

from .caches import reference_problem, warn_rebuild
from .contrastive import CONTRASTIVE_EXTRACTOR_NAME, ContrastiveConfig, offline_contrastive
from .features import CLASSIFIER_EXTRACTOR_NAME, ClassifierConfig, cache_root, offline_classifier
from .prdc import prdc

__all__ = [
    "EXTRACTORS",
    "FeatureExtractorError",
    "FeatureSpace",
    "cached_reference",
    "fid_from_features",
    "fid_from_statistics",
    "fid_statistics",
    "fidelity_metrics",
    "images_to_uint8",
    "kid",
    "load_feature_space",
    "precision_recall",
]

EXTRACTORS = ("offline", "contrastive", "inception")
INCEPTION_NAME = "inception-v3-compat"


class FeatureExtractorError(ValueError):
    """The requested feature extractor cannot be built; the message says what to pass instead."""


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float in [-1, 1] -> (B, 3, H, W) uint8, the input torch-fidelity extractors expect.

    Grey images (C = 1) are repeated to 3 channels; values outside [-1, 1] are clamped.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1|3, H, W), got {tuple(images.shape)}")
    out = torch.round((images.detach().float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
    return out.expand(-1, 3, -1, -1).contiguous() if out.shape[1] == 1 else out


@dataclasses.dataclass
class FeatureSpace:
    """A built feature extractor plus what a report must say about it.

    ``extract(images_uint8)`` returns float64 ``features`` (N, F) and, for the offline classifier,
    ``logits`` (N, sum of head sizes); ``heads`` lists the classifier's (name, classes).
    """

    name: str  # "offline" | "contrastive" | "inception"
    registry_name: str  # name in torch-fidelity's registry
    extractor: torch.nn.Module
    weights_path: str
    weights_sha256: str
    heads: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)
    device: str = "cpu"

    @property
    def feature_layer(self) -> str:
        """The layer FID/KID/PRC use (torch-fidelity's default for this extractor)."""
        return self.extractor.get_default_feature_layer_for_metric("fid")

    def extract(self, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Features of uint8 images (N, 3, H, W) (a tensor, or an iterable of such batches)."""
        batches = images.split(batch_size) if torch.is_tensor(images) else images
        out: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for batch in batches:
                feats = self.extractor(batch.to(self.device))
                for key, value in self.extractor.convert_features_tuple_to_dict(feats).items():
                    out.setdefault(key, []).append(value.detach().double().cpu())
        if not out:
            raise ValueError("no images were given to extract features from")
        return {"features" if k == self.feature_layer else k: torch.cat(v) for k, v in out.items()}

    def describe(self) -> dict:
        """JSON-able description for reports: name, weights path and fingerprint, whether the extractor was
        trained without labels (``label_free``), accuracy where known."""
        return {
            "name": self.name,
            "torch_fidelity_name": self.registry_name,
            "feature_layer": self.feature_layer,
            "weights": self.weights_path,
            "weights_sha256": self.weights_sha256,
            **self.info,
        }


def _inception_weights(weights_path: str | None) -> Path:
    """Resolve the Inception weights file, failing clearly instead of hanging on a download."""
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FeatureExtractorError(
                f"Inception weights_path {path} does not exist; pass the path of torch-fidelity's "
                f"weights file ({URL_INCEPTION_V3.rsplit('/', 1)[-1]}) or use the offline extractor"
            )
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]
    if cached.is_file():
        return cached
    try:  # a short probe, so a machine without network fails in seconds rather than hanging
        socket.create_connection(("github.com", 443), timeout=5).close()
    except OSError:
        raise FeatureExtractorError(
            "Inception weights are not cached and there is no network to download them; pass weights_path "
            f"(a copy of {URL_INCEPTION_V3}) or use the offline extractor (extractor='offline')"
        ) from None
    torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, progress=False)
    return cached


def _cached_weights(extractor: str, weights_path: str | None, data_cfg, train) -> Path:
    """``weights_path`` when given (it must exist), else the cache's weights for ``data_cfg`` (``train()``)."""
    if weights_path is None:
        if data_cfg is None:
            raise FeatureExtractorError(f"the {extractor} extractor needs data_cfg (to train/cache it) or weights_path")
        return train()
    path = Path(weights_path)
    if not path.is_file():
        raise FeatureExtractorError(f"{extractor} extractor weights {path} do not exist; omit weights_path to train "
                                    "and cache them for the data set")
    return path


def load_feature_space(
    extractor: str = "offline",
    *,
    data_cfg=None,
    weights_path: str | None = None,
    classifier: ClassifierConfig | None = None,
    contrastive: ContrastiveConfig | None = None,
    device: str = "cpu",
) -> FeatureSpace:
    """Build the feature extractor ``extractor`` ("offline" | "contrastive" | "inception") on ``device``.

    ``offline`` / ``contrastive``: ``weights_path`` is a ``model.safetensors`` written by
    :func:`~eval.features.offline_classifier` / :func:`~eval.contrastive.offline_contrastive`; without it
    the one for ``data_cfg`` (and ``classifier`` / ``contrastive`` settings) is taken from the cache, trained
    there on first use. ``inception``: ``weights_path`` is torch-fidelity's Inception weights file; without
    it they are downloaded once (needs network).
    """
    if extractor not in EXTRACTORS:
        raise FeatureExtractorError(f"unknown feature extractor {extractor!r}; choose one of {', '.join(EXTRACTORS)}")
    heads: list[tuple[str, int]] = []
    info: dict = {}
    if extractor == "offline":
        path = _cached_weights(extractor, weights_path, data_cfg,
                               lambda: offline_classifier(data_cfg, classifier, device=device))
        registry_name = CLASSIFIER_EXTRACTOR_NAME
        module = create_feature_extractor(registry_name, ["features", "logits"], cuda=False,
                                          feature_extractor_weights_path=str(path), verbose=False)
        heads = list(module.heads)
        meta = module.meta
        info = {
            "kind": "offline classifier (not Inception: compare only runs with the same weights_sha256)",
            "label_free": False,
            "task": meta["task"],
            "heads": [list(h) for h in heads],
            "test_split": meta.get("test_split"),
            "test_accuracy": meta.get("test_accuracy"),
            **({"note": meta["note"]} if "note" in meta else {}),
        }
    elif extractor == "contrastive":
        path = _cached_weights(extractor, weights_path, data_cfg,
                               lambda: offline_contrastive(data_cfg, contrastive, device=device))
        registry_name = CONTRASTIVE_EXTRACTOR_NAME
        module = create_feature_extractor(registry_name, ["features"], cuda=False,
                                          feature_extractor_weights_path=str(path), verbose=False)
        meta = module.meta
        info = {
            "kind": ("self-supervised contrastive backbone (SimCLR NT-Xent on the train split's images, labels "
                     "never used; not Inception: compare only runs with the same weights_sha256)"),
            "label_free": True,
            "task": meta["task"],
            "knn_accuracy": meta.get("knn_accuracy"),
            "knn": meta.get("knn"),
            "train_seconds": meta.get("train_seconds"),
            **({"note": meta["note"]} if "note" in meta else {}),
        }
    else:
        path = _inception_weights(weights_path)
        registry_name = INCEPTION_NAME
        try:
            module = create_feature_extractor(registry_name, ["2048"], cuda=False,
                                              feature_extractor_weights_path=str(path), verbose=False)
        except (RuntimeError, KeyError) as err:
            raise FeatureExtractorError(f"{path} is not a torch-fidelity Inception weights file ({err})") from None
        info = {"kind": "InceptionV3 (torch-fidelity inception-v3-compat, pool3 2048-d): standard FID",
                "label_free": False}
    return FeatureSpace(
        name=extractor,
        registry_name=registry_name,
        extractor=module.to(device),
        weights_path=str(path),
        weights_sha256=file_fingerprint(path),
        heads=heads,
        info=info,
        device=str(device),
    )


def fid_statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """(N, F) features -> {"mu": (F,), "sigma": (F, F)} in float64 (torch-fidelity's stage)."""
    return fid_features_to_statistics(features.detach().double().cpu())


def fid_from_statistics(stats_1: dict, stats_2: dict) -> float:
    """Frechet distance between two Gaussians (torch-fidelity's stage)."""
    return float(fid_statistics_to_metric(stats_1, stats_2, verbose=False)[KEY_METRIC_FID])


def fid_from_features(features_1: torch.Tensor, features_2: torch.Tensor) -> float:
    """FID between two feature sets (N1, F), (N2, F)."""
    return fid_from_statistics(fid_statistics(features_1), fid_statistics(features_2))


def kid(features_1: torch.Tensor, features_2: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 2020) -> tuple[float, float]:
    """KID mean and std over random subsets (torch-fidelity's estimator; subset size capped by set sizes)."""
    size = min(subset_size, len(features_1), len(features_2))
    if size < 2:
        raise ValueError("KID needs at least 2 images in each set")
    out = kid_features_to_metric(features_1.double().cpu(), features_2.double().cpu(), kid_subsets=subsets,
                                 kid_subset_size=size, rng_seed=seed, verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def precision_recall(fake: torch.Tensor, real: torch.Tensor, k: int = 5) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) via torch-fidelity, k-NN with k neighbours."""
    out = prc_features_to_metric(fake.double().cpu(), real.double().cpu(), prc_neighborhood=k, prc_batch_size=4096,
                                 save_cpu_ram=True, verbose=False)
    return out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]


def fidelity_metrics(real: torch.Tensor, fake: torch.Tensor, *, k: int = 5, kid_subsets: int = 100,
                     kid_subset_size: int = 1000, real_stats: dict | None = None) -> dict[str, float]:
    """FID, KID (mean, std), precision, recall, density and coverage of ``fake`` against ``real`` features."""
    real_stats = real_stats or fid_statistics(real)
    kid_mean, kid_std = kid(real, fake, kid_subsets, kid_subset_size)
    precision, recall = precision_recall(fake, real, k)
    dc = prdc(real, fake, k=k)
    return {
        "fid": fid_from_statistics(real_stats, fid_statistics(fake)),
        "kid": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "density": dc["density"],
        "coverage": dc["coverage"],
        "num_real": int(len(real)),
        "num_fake": int(len(fake)),
        "k": k,
    }


def reference_key(dataset_fingerprint: str, split: str, space: FeatureSpace, num_images: int) -> str:
    """Cache key of a real split's features: changes whenever data, split, extractor weights or N change."""
    ident = [dataset_fingerprint, split, space.registry_name, space.weights_sha256, int(num_images)]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:24]


def cached_reference(key: str, compute: Callable[[], dict[str, torch.Tensor]],
                     cache_dir: str | Path | None = None) -> tuple[dict[str, torch.Tensor], bool]:
    """Load the tensors stored under ``key`` or compute and store them. Returns (tensors, was_cached).

    ``compute`` returns a dict of tensors (e.g. ``features``, ``logits``); the FID statistics follow from
    ``features`` and are stored alongside (``mu``, ``sigma``) for other tools.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "reference"
    path = root / f"{key}.safetensors"
    if path.is_file():  # read as untrusted data: damaged features are computed again
        problem = reference_problem(path)
        if problem is None:
            return load_file(str(path)), True
        warn_rebuild(path, problem)
    tensors = {k: v.contiguous() for k, v in compute().items()}
    stats = fid_statistics(tensors["features"])
    stored = {**tensors, "mu": torch.from_numpy(stats["mu"]), "sigma": torch.from_numpy(np.asarray(stats["sigma"]))}
    with atomic_path(path) as tmp:
        save_file(stored, str(tmp))
    return stored, False

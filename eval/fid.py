"""FID, KID and precision/recall through torch-fidelity, as stages: images -> features -> statistics -> metric.

- :func:`load_feature_space` builds a torch-fidelity feature extractor from its registry: ``offline``
  (the cached classifier of :mod:`eval.features`, registered as ``vqgen-classifier``), ``contrastive``
  (the cached label-free backbone of :mod:`eval.contrastive`, registered as ``vqgen-contrastive``),
  ``inception`` (torch-fidelity's ``inception-v3-compat``, built from weights vqgen checked against their
  published sha256 and loaded with ``torch.load(weights_only=True)``; downloaded once when there is a
  network and no ``weights_path``) or ``dinov2`` (DINOv2 ViT-L/14 through ``transformers``, registered as
  ``vqgen-dinov2``, see :mod:`eval.dinov2`). The :class:`FeatureSpace` it returns names the extractor, the
  sha256 of its weights, whether they are the published file, and whether it was trained without labels.
- :func:`fid_statistics`, :func:`fid_from_statistics`, :func:`kid`, :func:`precision_recall` are thin
  wrappers over torch-fidelity's own stage functions, so our numbers equal torch-fidelity's.
- :func:`fidelity_metrics` combines them with density/coverage (:mod:`eval.prdc`).
- :class:`RunningStatistics` accumulates the mean and covariance of features batch by batch, so 50,000
  images (or a whole training split) never have to be held at once.
- :func:`cached_reference` caches features (and hence statistics) of a real split, keyed by data set
  fingerprint, split, extractor weights fingerprint and number of images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
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

from vqgen.core.errors import UserError
from vqgen.core.io import atomic_path, file_fingerprint

from .caches import reference_problem, warn_rebuild
from .contrastive import CONTRASTIVE_EXTRACTOR_NAME, ContrastiveConfig, offline_contrastive
from .dinov2 import DINOV2_EXTRACTOR_NAME, resolve_dinov2_weights
from .features import CLASSIFIER_EXTRACTOR_NAME, ClassifierConfig, cache_root, offline_classifier
from .prdc import prdc
from .progress import progress
from .weights import DINOV2_VITL14, INCEPTION, load_torch_state_dict, read_verified

__all__ = [
    "EXTRACTORS",
    "FeatureExtractorError",
    "FeatureSpace",
    "RunningStatistics",
    "cached_reference",
    "fid_from_features",
    "fid_from_statistics",
    "fid_statistics",
    "fidelity_metrics",
    "images_to_uint8",
    "kid",
    "load_cached_reference",
    "load_feature_space",
    "neighbourhood_metrics",
    "precision_recall",
]

EXTRACTORS = ("offline", "contrastive", "inception", "dinov2")
INCEPTION_NAME = "inception-v3-compat"


class FeatureExtractorError(UserError, ValueError):
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

    def extract(self, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 256,
                desc: str | None = None) -> dict[str, torch.Tensor]:
        """Features of uint8 images (N, 3, H, W) (a tensor, or an iterable of such batches).

        ``desc`` shows a progress bar (counting images) with that title.
        """
        batches = images.split(batch_size) if torch.is_tensor(images) else images
        out: dict[str, list[torch.Tensor]] = {}
        total = int(images.shape[0]) if torch.is_tensor(images) else None
        with progress(total=total, desc=desc or "", unit="img", disable=desc is None) as bar:
            for batch in batches:
                for key, value in self.extract_batch(batch).items():
                    out.setdefault(key, []).append(value)
                bar.update(int(batch.shape[0]))
        if not out:
            raise ValueError("no images were given to extract features from")
        return {k: torch.cat(v) for k, v in out.items()}

    def extract_batch(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features (float64, on the CPU) of one uint8 batch (B, 3, H, W); the FID layer is ``features``."""
        with torch.no_grad():
            feats = self.extractor(batch.to(self.device))
        return {"features" if k == self.feature_layer else k: v.detach().double().cpu()
                for k, v in self.extractor.convert_features_tuple_to_dict(feats).items()}

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
    """Resolve the Inception weights file, failing clearly instead of hanging on a download.

    ``weights_path`` when given; else torch's hub cache (``$TORCH_HOME/hub/checkpoints``), downloaded there
    once when the file is missing and GitHub answers. The file is checked by :func:`inception_extractor`.
    """
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FeatureExtractorError(
                f"Inception weights_path {path} does not exist; download {INCEPTION.source} and pass "
                f"{INCEPTION.option}, or use the offline extractor"
            )
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION.filename
    if cached.is_file():
        return cached
    try:  # a short probe, so a machine without network fails in seconds rather than hanging
        socket.create_connection(("github.com", 443), timeout=5).close()
    except OSError:
        raise FeatureExtractorError(
            f"{INCEPTION.name} not found at {cached} and there is no network to download them; download "
            f"{INCEPTION.source} on a machine with network and pass {INCEPTION.option}"
        ) from None
    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cached) as tmp:
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(tmp), hash_prefix=INCEPTION.sha256[:8], progress=False)
    return cached


def inception_extractor(path: str | Path, device: str = "cpu"):
    """torch-fidelity's ``inception-v3-compat`` with the weights at ``path``, which must be the published file.

    The file is read once, its sha256 checked against :data:`eval.weights.INCEPTION`, and those bytes parsed
    with ``torch.load(weights_only=True)``; torch-fidelity (which unpickles with ``weights_only=False``) only
    sees a buffer that vqgen serialised itself from the verified tensors, never the file.
    """
    data, _ = read_verified(path, INCEPTION)
    state = load_torch_state_dict(data, path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        module = create_feature_extractor(INCEPTION_NAME, ["2048"], cuda=False, feature_extractor_weights_path=buffer,
                                          verbose=False)
    except (RuntimeError, KeyError) as err:
        raise FeatureExtractorError(f"{path} is not a torch-fidelity Inception weights file ({err})") from None
    return module.to(device)


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
    """Build the feature extractor ``extractor`` (one of :data:`EXTRACTORS`) on ``device``.

    ``offline`` / ``contrastive``: ``weights_path`` is a ``model.safetensors`` written by
    :func:`~eval.features.offline_classifier` / :func:`~eval.contrastive.offline_contrastive`; without it
    the one for ``data_cfg`` (and ``classifier`` / ``contrastive`` settings) is taken from the cache, trained
    there on first use. ``inception``: ``weights_path`` is torch-fidelity's Inception weights file (checked
    against its published sha256); without it they come from torch's hub cache or are downloaded once
    (needs network). ``dinov2``: a folder with ``config.json`` + ``model.safetensors``, that file, or a hub
    id (default ``facebook/dinov2-large``). ``info["weights_known"]`` says whether the weights are the
    published file of a standard extractor (Inception, DINOv2 ViT-L/14).
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
    elif extractor == "inception":
        path = _inception_weights(weights_path)
        registry_name = INCEPTION_NAME
        module = inception_extractor(path)
        info = {"kind": "InceptionV3 (torch-fidelity inception-v3-compat, pool3 2048-d): standard FID",
                "label_free": False, "weights_known": True, "published_source": INCEPTION.source}
    else:
        path = resolve_dinov2_weights(weights_path)
        registry_name = DINOV2_EXTRACTOR_NAME
        module = create_feature_extractor(registry_name, ["dinov2"], cuda=False,
                                          feature_extractor_weights_path=str(path), verbose=False)
        info = {"kind": (f"DINOv2 {'ViT-L/14' if module.vit_l14 else 'ViT (not L/14)'} class token after the "
                         f"final layer norm ({module.hidden_size}-d, 224 px, bicubic, ImageNet normalisation): "
                         "FD-DINOv2 as Stein et al. 2023"),
                "label_free": True, "weights_known": bool(module.known), "published_source": DINOV2_VITL14.source}
        if not module.known:
            info["note"] = ("these are not the published DINOv2 ViT-L/14 weights (facebook/dinov2-large): the "
                            "numbers are not FD-DINOv2 as papers report it")
    return FeatureSpace(
        name=extractor,
        registry_name=registry_name,
        extractor=module.to(device),
        weights_path=str(path),
        weights_sha256=getattr(module, "weights_sha256", None) or file_fingerprint(path),
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


def neighbourhood_metrics(real: torch.Tensor, fake: torch.Tensor, *, k: int = 5, kid_subsets: int = 100,
                          kid_subset_size: int = 1000) -> dict[str, float]:
    """KID (mean, std), precision, recall, density and coverage of ``fake`` against ``real`` features."""
    kid_mean, kid_std = kid(real, fake, kid_subsets, kid_subset_size)
    precision, recall = precision_recall(fake, real, k)
    dc = prdc(real, fake, k=k)
    return {"kid": kid_mean, "kid_std": kid_std, "precision": precision, "recall": recall,
            "density": dc["density"], "coverage": dc["coverage"], "k": k}


def fidelity_metrics(real: torch.Tensor, fake: torch.Tensor, *, k: int = 5, kid_subsets: int = 100,
                     kid_subset_size: int = 1000, real_stats: dict | None = None) -> dict[str, float]:
    """FID, KID (mean, std), precision, recall, density and coverage of ``fake`` against ``real`` features."""
    real_stats = real_stats or fid_statistics(real)
    near = neighbourhood_metrics(real, fake, k=k, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
    return {
        "fid": fid_from_statistics(real_stats, fid_statistics(fake)),
        **{key: near[key] for key in ("kid", "kid_std", "precision", "recall", "density", "coverage")},
        "num_real": int(len(real)),
        "num_fake": int(len(fake)),
        "k": k,
    }


class RunningStatistics:
    """Mean and covariance of features seen batch by batch (float64), as torch-fidelity computes them at once.

    The covariance is the unbiased one (``np.cov``'s, divided by N - 1). Each batch is centred on the mean of
    the first batch before its products are summed, so large feature values do not cancel catastrophically.
    """

    def __init__(self):
        self.count = 0
        self._shift: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features (B, F)."""
        x = features.detach().double().cpu()
        if x.dim() != 2 or x.shape[0] == 0:
            raise ValueError(f"expected a non-empty (B, F) batch of features, got {tuple(x.shape)}")
        if self._shift is None:
            self._shift = x.mean(0)
            self._sum = torch.zeros_like(self._shift)
            self._outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        x = x - self._shift
        self._sum += x.sum(0)
        self._outer += x.T @ x
        self.count += int(x.shape[0])

    def statistics(self) -> dict[str, np.ndarray]:
        """``{"mu": (F,), "sigma": (F, F)}``, the format of :func:`fid_statistics`."""
        if self.count < 2:
            raise ValueError(f"FID statistics need at least 2 feature vectors, got {self.count}")
        mean = self._sum / self.count
        sigma = (self._outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return {"mu": (mean + self._shift).numpy(), "sigma": sigma.numpy()}


def reference_key(dataset_fingerprint: str, split: str, space: FeatureSpace, num_images: int) -> str:
    """Cache key of a real split's features: changes whenever data, split, extractor weights or N change."""
    ident = [dataset_fingerprint, split, space.registry_name, space.weights_sha256, int(num_images)]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:24]


def _reference_path(key: str, cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "reference"
    return root / f"{key}.safetensors"


def load_cached_reference(key: str, cache_dir: str | Path | None = None) -> dict[str, torch.Tensor] | None:
    """The tensors cached under ``key`` (see :func:`cached_reference`), or None (also for a damaged entry, which is
    then computed again: a cache is read as untrusted data)."""
    path = _reference_path(key, cache_dir)
    if not path.is_file():
        return None
    problem = reference_problem(path)
    if problem is None:
        return load_file(str(path))
    warn_rebuild(path, problem)
    return None


def cached_reference(key: str, compute: Callable[[], dict[str, torch.Tensor]],
                     cache_dir: str | Path | None = None, metadata: dict | None = None,
                     ) -> tuple[dict[str, torch.Tensor], bool]:
    """Load the tensors stored under ``key`` or compute and store them. Returns (tensors, was_cached).

    ``compute`` returns a dict of tensors (e.g. ``features``, ``logits``, and ``mu`` / ``sigma`` when it
    computed them itself, over more images than it keeps features of); otherwise the FID statistics follow
    from ``features`` and are stored alongside (``mu``, ``sigma``) for other tools. ``metadata`` (strings:
    where the images came from, their sha256, the extractor's weights sha256) goes into the file's header.
    """
    cached = load_cached_reference(key, cache_dir)
    if cached is not None:
        return cached, True
    path = _reference_path(key, cache_dir)
    tensors = {k: v.contiguous() for k, v in compute().items()}
    if "mu" not in tensors:
        stats = fid_statistics(tensors["features"])
        tensors.update(mu=torch.from_numpy(stats["mu"]), sigma=torch.from_numpy(np.asarray(stats["sigma"])))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return tensors, False

"""Offline feature extractor: a small CNN classifier trained on the data set's own labels.

Standard FID needs torch-fidelity's Inception weights, which are downloaded on first use. Where there is no
network, ``eval`` uses this extractor instead. It is *not* Inception FID, and every report says so: the
numbers are comparable only between runs that used the same classifier weights (their sha256 is reported).

- Targets: for data with generative factors (``synthetic``) one head per factor, so that mode coverage can
  judge every factor; for labelled data one head on ``label``; for data without labels the stated fallback
  is a self-supervised rotation task (predict 0/90/180/270 degrees), which gives usable features but no
  classes, so mode coverage is reported as unavailable.
- Features: the penultimate layer (``features``, (B, feature_dim)); ``logits`` are the heads' logits
  concatenated along the last axis.
- Cache: ``$VQGEN_CACHE`` (default ``~/.cache/vqgen``) ``/classifiers/<fingerprint>/`` holds
  ``model.safetensors`` and ``meta.json`` (architecture, heads, per-head test accuracy); the fingerprint
  covers the data config and the classifier config, so each data set is trained once.
- The extractor is registered with torch-fidelity as ``vqgen-classifier``; its
  ``feature_extractor_weights_path`` is the ``model.safetensors`` above.

The helpers shared with the label-free extractor of :mod:`eval.contrastive` live here too: the cache
(:func:`cached_model`, :func:`cache_key`), the held-out split (:func:`held_out_split`), the backbone
architecture (:func:`backbone_architecture`), the optimizer (:func:`make_optimizer`) and the torch-fidelity
wrapper around a cached backbone (:class:`BackboneFeatureExtractor`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from vqgen.core import training
from vqgen.core.config import to_dict
from vqgen.core.files import write_marker
from vqgen.core.io import atomic_path, load_json, save_json
from vqgen.core.trainer import Task, TrainConfig, Trainer

from .caches import cached_model_problem, warn_rebuild

__all__ = [
    "BackboneFeatureExtractor",
    "CLASSIFIER_EXTRACTOR_NAME",
    "ClassifierConfig",
    "ClassifierFeatureExtractor",
    "FeatureClassifier",
    "backbone_architecture",
    "cache_key",
    "cache_root",
    "cached_model",
    "classifier_task",
    "held_out_split",
    "make_optimizer",
    "offline_classifier",
    "to_model_input",
    "train_classifier",
]

CLASSIFIER_EXTRACTOR_NAME = "vqgen-classifier"
_CACHE_VERSION = 1
# Data config keys that change how images are loaded, not which images: left out of the cache key.
_NOT_IMAGE_DEFINING = ("cache_in_memory", "cache_dir")


def cache_root() -> Path:
    """Where cached classifiers and reference statistics live: ``$VQGEN_CACHE`` or ``~/.cache/vqgen``."""
    return Path(os.environ.get("VQGEN_CACHE") or Path.home() / ".cache" / "vqgen")


@dataclasses.dataclass
class ClassifierConfig:
    """How the offline classifier is built and trained (part of its cache key)."""

    width: int = 32  # channels of the first conv; later layers use 2x and 4x
    feature_dim: int = 128  # size of the penultimate layer = the feature space for FID
    epochs: float = 2.0  # passes over the train split ...
    max_steps: int = 1500  # ... capped at this many optimizer steps
    batch_size: int = 128
    lr: float = 2e-3
    max_test_images: int = 10000  # test accuracy is measured on at most this many images
    seed: int = 0

    def validate(self) -> None:
        """Reject values that cannot train."""
        if self.width < 1 or self.feature_dim < 1 or self.batch_size < 1 or self.max_steps < 1:
            raise ValueError("classifier width, feature_dim, batch_size and max_steps must be positive")
        if self.epochs <= 0 or self.lr <= 0:
            raise ValueError("classifier epochs and lr must be positive")


class FeatureClassifier(nn.Module):
    """Conv net with one linear head per target.

    ``forward(x (B, C, H, W) in [-1, 1]) -> (features (B, feature_dim), [logits_i (B, n_i)])``.
    A 4x4 adaptive pool (not a global one) keeps coarse position, which the synthetic ``position`` factor
    needs; GroupNorm keeps outputs independent of the batch.
    """

    def __init__(self, channels: int, image_size: int, head_sizes: list[int], width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.channels, self.image_size = channels, image_size

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.body = nn.Sequential(
            *block(channels, width, 1),
            *block(width, 2 * width, 2),
            *block(2 * width, 4 * width, 2),
            *block(4 * width, 4 * width, 1),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(4 * width * 16, feature_dim),
            nn.SiLU(),
        )
        self.heads = nn.ModuleList(nn.Linear(feature_dim, n) for n in head_sizes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = self.body(x)  # (B, feature_dim)
        return features, [head(features) for head in self.heads]


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> the same images after a round trip through uint8.

    Evaluation feeds the classifier uint8 images (torch-fidelity's convention); training on the identically
    quantised values keeps train and eval inputs the same.
    """
    return torch.round((images.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def classifier_task(dataset) -> tuple[str, list[tuple[str, int]]]:
    """What the classifier predicts for ``dataset``: (task, [(head name, classes)]).

    ``factors`` when the data set declares generative factors, ``label`` when it has classes, else the
    ``rotation`` fallback for unlabelled data.
    """
    sizes = list(getattr(dataset, "factor_sizes", None) or [])
    if sizes:
        names = list(getattr(dataset, "factor_names", None) or [f"factor{i}" for i in range(len(sizes))])
        return "factors", [(str(n), int(s)) for n, s in zip(names, sizes)]
    num_classes = int(getattr(dataset, "num_classes", 0) or 0)
    if num_classes > 0:
        return "label", [("label", num_classes)]
    return "rotation", [("rotation", 4)]


def _batch_targets(task: str, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (B, C, H, W), targets (B, heads)) for one batch under ``task``."""
    images = to_model_input(batch["image"])
    if task == "factors":
        return images, batch["factors"].long()
    if task == "label":
        return images, batch["label"].long().view(-1, 1)
    # rotation fallback: rotate each image by k * 90 degrees and predict k.
    k = torch.randint(0, 4, (images.shape[0],), generator=generator)
    rotated = torch.stack([torch.rot90(img, int(r), dims=(1, 2)) for img, r in zip(images, k)])
    return rotated, k.view(-1, 1)


def _accuracy(model: FeatureClassifier, dataset, task: str, cfg: ClassifierConfig, device: torch.device) -> dict:
    from vqgen.tokenizer.data import make_dataloader

    n = min(len(dataset), cfg.max_test_images)
    subset = torch.utils.data.Subset(dataset, range(n))
    loader = make_dataloader(subset, batch_size=cfg.batch_size, shuffle=False, seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    correct = torch.zeros(len(model.heads), dtype=torch.long)
    model.eval()
    with torch.no_grad():
        for batch in loader:
            x, y = _batch_targets(task, batch, gen)
            _, logits = model(x.to(device))
            for i, lg in enumerate(logits):
                correct[i] += (lg.argmax(-1).cpu() == y[:, i]).sum()
    return {"per_head": (correct.double() / max(n, 1)).tolist(), "num_images": n}


def backbone_architecture(sample: torch.Tensor, head_sizes: list[int], width: int, feature_dim: int) -> dict:
    """Constructor arguments of :class:`FeatureClassifier` for images shaped like ``sample`` (C, H, W)."""
    return {
        "channels": int(sample.shape[0]),
        "image_size": int(sample.shape[-1]),
        "head_sizes": list(head_sizes),
        "width": width,
        "feature_dim": feature_dim,
    }


def make_optimizer(params, lr: float, steps: int, weight_decay: float = 1e-4):
    """AdamW with a one-cycle schedule over ``steps`` (10 % warm-up): (optimizer, scheduler).

    Built by the shared training skeleton (:mod:`tokenizer.training`): every parameter is decayed
    (``decay_all``), as the cached extractors were trained; below 20 steps (tiny test settings) the
    learning rate stays constant (``OneCycleLR`` would divide by zero).
    """
    opt = training.make_optimizer(params, lr, weight_decay=weight_decay, decay_all=True)
    return opt, training.make_schedule(opt, "one_cycle", steps)


def held_out_split(data_cfg, train):
    """(dataset, split name) to measure an extractor on: ``test``, else ``validation``, else ``train``
    itself (stated in the split name, so a report never passes train accuracy off as test accuracy)."""
    from vqgen.tokenizer.data import build_dataset

    for split in ("test", "validation"):
        try:
            candidate = build_dataset(data_cfg, split)
        except (ValueError, FileNotFoundError, KeyError):
            continue
        if len(candidate) > 0:
            return candidate, split
    return train, "train"


class ClassifierTask(Task):
    """The offline classifier as a trainer task: the data's labels (or factors, or rotations) as heads."""

    name = "classifier"
    description = "train the offline classifier (once, cached)"

    def __init__(self, train, cfg: ClassifierConfig):
        self.train, self.cfg = train, cfg
        self.hint = f"lower the classifier's lr (classifier.lr={cfg.lr})"

    def setup(self, trainer: Trainer) -> None:
        from vqgen.tokenizer.data import make_dataloader

        cfg = self.cfg
        self.task, self.heads = classifier_task(self.train)
        self.arch = backbone_architecture(self.train[0]["image"], [n for _, n in self.heads], cfg.width,
                                          cfg.feature_dim)
        model = FeatureClassifier(**self.arch)
        optimizer, schedule = make_optimizer(model.parameters(), cfg.lr, trainer.cfg.steps)
        model, optimizer = trainer.prepare(model, optimizer)
        trainer.add_trained("classifier", model, optimizer, schedule, clip=False)
        self.model = model
        self.loader = make_dataloader(self.train, batch_size=trainer.cfg.batch_size, shuffle=True, seed=cfg.seed,
                                      drop_last=True)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def batches(self, trainer: Trainer, samples_seen: int):
        while True:  # epoch after epoch of the seeded loader
            yield from self.loader

    def micro_step(self, trainer: Trainer, batch, step: int) -> dict:
        x, y = _batch_targets(self.task, batch, self.generator)
        _, logits = self.model(x.to(trainer.device))
        y = y.to(trainer.device)
        loss = sum(F.cross_entropy(lg, y[:, i]) for i, lg in enumerate(logits)) / len(logits)
        trainer.backward(loss)
        self.last_loss = loss.detach()
        return {"loss": loss}

    def finish(self, trainer: Trainer, step: int) -> dict:
        return {"final_train_loss": float(self.last_loss)}


def extractor_train_config(steps: int, batch_size: int, lr: float, seed: int) -> TrainConfig:
    """The trainer settings of a cached feature extractor: no clipping, no files, a log at the end (its own
    optimizer and schedule are built by its task)."""
    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, max_grad_norm=0.0, log_every=steps,
                       checkpoint_every=steps, seed=seed, trackers=[])


def train_classifier(data_cfg, cfg: ClassifierConfig | None = None, device: str | torch.device = "cpu"):
    """Train the offline classifier on ``data_cfg``'s train split (through :class:`vqgen.core.trainer.Trainer`,
    in memory) and measure it on its test split.

    Returns ``(model, meta)``; ``meta`` is the JSON-able description stored next to the weights.
    """
    from vqgen.tokenizer.data import build_dataset, make_dataloader

    cfg = cfg or ClassifierConfig()
    cfg.validate()
    train = build_dataset(data_cfg, "train")
    batch_size = min(cfg.batch_size, len(train))
    batches = len(make_dataloader(train, batch_size=batch_size, shuffle=False, drop_last=True))
    steps = max(1, min(cfg.max_steps, int(cfg.epochs * batches)))
    task = ClassifierTask(train, cfg)
    trainer = Trainer(task, extractor_train_config(steps, batch_size, cfg.lr, cfg.seed))
    start = time.perf_counter()
    last_loss = trainer.fit()["final_train_loss"]
    train_seconds = time.perf_counter() - start
    model = trainer.unwrap(task.model).cpu().eval()
    task_name, heads, arch, device = task.task, task.heads, task.arch, torch.device("cpu")

    test, test_split = held_out_split(data_cfg, train)
    acc = _accuracy(model, test, task_name, cfg, device)
    meta = {
        "extractor": CLASSIFIER_EXTRACTOR_NAME,
        "task": task_name,
        "heads": [[name, n] for name, n in heads],
        "architecture": arch,
        "test_split": test_split,
        "test_accuracy": {name: a for (name, _), a in zip(heads, acc["per_head"])},
        "num_test_images": acc["num_images"],
        "train_steps": steps,
        "train_seconds": round(train_seconds, 2),
        "final_train_loss": last_loss,
        "data": to_dict(data_cfg) if dataclasses.is_dataclass(data_cfg) else data_cfg,
        "classifier": to_dict(cfg),
    }
    if task_name == "rotation":
        meta["note"] = (
            "the data set has no labels: the classifier was trained on rotation prediction (self-supervised "
            "fallback); its features serve FID/KID/PRDC, but there are no classes for mode coverage"
        )
    return model.cpu().eval(), meta


def cache_key(obj) -> str:
    """Short stable hash of a JSON-able object: the folder name of a cached extractor."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _data_identity(data_cfg) -> dict:
    """The data config as a dict, without the keys that change how images are loaded but not which."""
    data_dict = to_dict(data_cfg) if dataclasses.is_dataclass(data_cfg) else dict(data_cfg)
    for key in _NOT_IMAGE_DEFINING:
        data_dict.pop(key, None)
    return data_dict


def cached_model(kind: str, data_cfg, config_name: str, cfg, version: int,
                 train: Callable[[], tuple[nn.Module, dict]], cache_dir: str | Path | None = None) -> Path:
    """Path of ``<cache>/<kind>/<key>/model.safetensors``; on a miss ``train()`` -> (model, meta) fills it.

    The key covers the data config (minus loading-only keys), ``{config_name: cfg}`` and ``version``, so
    each data set and configuration is trained once. ``cache_dir`` replaces ``<cache>/<kind>``. The folder
    is written atomically with ``meta.json`` (plus ``cache_key``) beside the weights.
    """
    key = cache_key({"data": _data_identity(data_cfg), config_name: to_dict(cfg), "version": version})
    model_dir = (Path(cache_dir) if cache_dir is not None else cache_root() / kind) / key
    weights = model_dir / "model.safetensors"
    if model_dir.exists():  # a cache is read as untrusted data: a damaged entry is trained again, never loaded
        problem = cached_model_problem(model_dir, key, cfg, FeatureClassifier)
        if problem is None:
            return weights
        warn_rebuild(model_dir, problem)
    model, meta = train()
    meta["cache_key"] = key
    with atomic_path(model_dir) as tmp:
        tmp.mkdir(parents=True)
        save_file(model.state_dict(), str(tmp / "model.safetensors"))
        save_json(meta, tmp / "meta.json")
        write_marker(tmp, "cache")
    return weights


def offline_classifier(data_cfg, cfg: ClassifierConfig | None = None, cache_dir: str | Path | None = None,
                       device: str | torch.device = "cpu") -> Path:
    """Path of the cached classifier weights (``model.safetensors``) for ``data_cfg``; trains it on a miss."""
    cfg = cfg or ClassifierConfig()
    return cached_model("classifiers", data_cfg, "classifier", cfg, _CACHE_VERSION,
                        lambda: train_classifier(data_cfg, cfg, device), cache_dir)


class BackboneFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor around a cached :class:`FeatureClassifier` (its ``meta.json`` holds
    the ``architecture``). Subclasses name what trains the weights and which outputs they provide.

    Input: uint8 images (B, 3, H, W) as torch-fidelity passes them; grey backbones get the channel mean,
    other sizes are resized to the backbone's.
    """

    trained_by = "vqgen.eval.features.offline_classifier(data_cfg)"  # named in the error messages

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(
                f"feature extractor '{name}' needs feature_extractor_weights_path: a model.safetensors written "
                f"by {self.trained_by}"
            )
        weights = Path(feature_extractor_weights_path)
        meta_path = weights.with_name("meta.json")
        if not weights.is_file() or not meta_path.is_file():
            raise FileNotFoundError(
                f"feature extractor weights {weights} (and meta.json beside it) not found; train them with "
                f"{self.trained_by}"
            )
        self.meta = load_json(meta_path)
        self.heads = [(str(n), int(s)) for n, s in self.meta.get("heads", [])]
        self.net = FeatureClassifier(**self.meta["architecture"])
        self.net.load_state_dict(load_file(str(weights)))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "features"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def net_input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float (B, C, S, S) in [-1, 1], as the backbone was trained on."""
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        x = x.float() / 127.5 - 1  # (B, 3, H, W) in [-1, 1]
        if self.net.channels == 1:
            x = x.mean(dim=1, keepdim=True)  # grey images arrive as 3 equal channels
        elif self.net.channels != 3:
            raise ValueError(f"the backbone expects {self.net.channels} channels; cannot feed RGB images")
        if x.shape[-1] != self.net.image_size or x.shape[-2] != self.net.image_size:
            x = F.interpolate(x, size=(self.net.image_size,) * 2, mode="bilinear", antialias=True,
                              align_corners=False)
        return x


class ClassifierFeatureExtractor(BackboneFeatureExtractor):
    """The offline classifier as a torch-fidelity extractor (registered as ``vqgen-classifier``).

    Provided features: ``features`` (penultimate layer, the default for FID/KID/PRC) and ``logits`` (all
    heads concatenated). ``feature_extractor_weights_path`` must point at a ``model.safetensors`` written by
    :func:`offline_classifier`, with its ``meta.json`` beside it.
    """

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    def forward(self, x: torch.Tensor):
        features, logits = self.net(self.net_input(x))
        out = {"features": features, "logits": torch.cat(logits, dim=-1)}
        return tuple(out[name] for name in self.features_list)


if CLASSIFIER_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(CLASSIFIER_EXTRACTOR_NAME, ClassifierFeatureExtractor)

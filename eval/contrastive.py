"""Label-free feature extractor: the classifier's backbone trained with a SimCLR-style contrastive loss.

The offline classifier (:mod:`eval.features`) learns what separates the data set's labels, so its features
are blind to variety *within* a class, which is what codebook "token shrinkage" takes away. This extractor
is trained on the train split's images only, never on their labels:

- Backbone: the body of :class:`~eval.features.FeatureClassifier` (same ``width`` / ``feature_dim``
  options, no heads). A two-layer MLP projection head maps its output to the space where the loss is
  computed; it is used in training only. Features for FID/KID/PRDC are the backbone's output, before
  the projection head, as in SimCLR (Chen et al. 2020).
- Loss: NT-Xent over two augmented views of every image in a batch (the other 2B - 2 views are the
  negatives), with temperature ``temperature``.
- Augmentations (:func:`augment`), batched torch ops and generic for any data set: a random resized crop
  (area fraction in [``min_crop_area``, 1], aspect ratio in [3/4, 4/3], resampled bilinearly back to the
  full size) and small brightness / contrast jitter. **No horizontal flips**: a flip turns a 2 into
  something that is not a digit and mirrors text, so flip invariance is not a property we want for
  every data set.
- Quality check: k-nearest-neighbour accuracy (``knn_k`` = 20 neighbours, cosine similarity, majority vote)
  of held-out images against the train features, when the data set has labels. Labels are read for this
  check only, after training; it is stored in ``meta.json`` and shown in reports.
- Cache: ``$VQGEN_CACHE/contrastive/<fingerprint>/`` (``model.safetensors`` of the backbone and
  ``meta.json``), the fingerprint covering the data config, :class:`ContrastiveConfig` and a version, as
  for the classifier (:func:`eval.features.cached_model`).
- Registered with torch-fidelity as ``vqgen-contrastive``; ``feature_extractor_weights_path`` is the
  ``model.safetensors`` above.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity import register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from vqgen.core.config import to_dict
from vqgen.core.trainer import Task, Trainer

from .features import (
    BackboneFeatureExtractor,
    FeatureClassifier,
    backbone_architecture,
    cached_model,
    extractor_train_config,
    held_out_split,
    make_optimizer,
    to_model_input,
)

__all__ = [
    "CONTRASTIVE_EXTRACTOR_NAME",
    "ContrastiveConfig",
    "ContrastiveFeatureExtractor",
    "ContrastiveFit",
    "ContrastiveNet",
    "augment",
    "fit_contrastive",
    "knn_accuracy",
    "load_images",
    "nt_xent",
    "offline_contrastive",
    "train_contrastive",
]

CONTRASTIVE_EXTRACTOR_NAME = "vqgen-contrastive"
_CACHE_VERSION = 1
_ASPECT_RANGE = (3 / 4, 4 / 3)  # of the random resized crop, as in torchvision's RandomResizedCrop


@dataclasses.dataclass
class ContrastiveConfig:
    """How the label-free extractor is built and trained (part of its cache key).

    The defaults train at 32x32 in about 6 minutes on one idle core of a 2-core AMD EPYC (9-12 minutes were
    measured for MNIST / CIFAR-10 while other jobs shared the machine; README, Evaluation).
    """

    width: int = 16  # channels of the backbone's first conv (later layers 2x and 4x)
    feature_dim: int = 128  # backbone output = the feature space for FID
    projection_dim: int = 64  # output of the projection head (training only)
    steps: int = 500  # optimizer steps
    batch_size: int = 256  # images per step (two views each)
    lr: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.2  # of NT-Xent
    min_crop_area: float = 0.35  # random resized crop keeps [min_crop_area, 1] of the image area
    brightness: float = 0.2  # brightness factor drawn from [1 - b, 1 + b]
    contrast: float = 0.2  # contrast factor drawn from [1 - c, 1 + c]
    max_train_images: int = 60000  # train images held in memory (a seeded subset when there are more)
    knn_k: int = 20  # neighbours of the k-NN quality check
    max_test_images: int = 10000  # held-out images of the k-NN check
    seed: int = 0

    def validate(self) -> None:
        """Reject values that cannot train."""
        positive = ("width", "feature_dim", "projection_dim", "steps", "batch_size", "max_train_images", "knn_k",
                    "max_test_images")
        bad = [k for k in positive if getattr(self, k) < 1]
        if bad:
            raise ValueError(f"contrastive.{bad[0]}={getattr(self, bad[0])!r} must be positive")
        if self.batch_size < 2:
            raise ValueError("contrastive.batch_size must be >= 2: the other images of a batch are the negatives")
        if self.lr <= 0 or self.temperature <= 0 or self.weight_decay < 0:
            raise ValueError("contrastive.lr and contrastive.temperature must be positive, weight_decay >= 0")
        if not 0 < self.min_crop_area <= 1:
            raise ValueError(f"contrastive.min_crop_area={self.min_crop_area!r} must be in (0, 1]")
        if not (0 <= self.brightness < 1 and 0 <= self.contrast < 1):
            raise ValueError("contrastive.brightness and contrastive.contrast must be in [0, 1)")


class ContrastiveNet(nn.Module):
    """Backbone (a head-less :class:`FeatureClassifier`) plus the projection head used in training.

    ``forward(x (B, C, H, W) in [-1, 1]) -> (features (B, feature_dim), z (B, projection_dim))``, ``z`` is
    L2-normalised. Only ``backbone`` is saved: the projection head plays no part in the features.
    """

    def __init__(self, architecture: dict, projection_dim: int):
        super().__init__()
        self.backbone = FeatureClassifier(**architecture)
        dim = architecture["feature_dim"]
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, projection_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, _ = self.backbone(x)  # (B, feature_dim)
        return features, F.normalize(self.projector(features), dim=-1)  # (B, projection_dim)


def augment(images: torch.Tensor, generator: torch.Generator, cfg: ContrastiveConfig) -> torch.Tensor:
    """One random view of every image: (B, C, H, W) in [-1, 1] -> (B, C, H, W) in [-1, 1].

    Random resized crop (area fraction U[min_crop_area, 1], log-uniform aspect ratio in [3/4, 4/3], the box
    inside the image, bilinear resampling to H x W), then brightness and contrast factors drawn per image,
    then the uint8 round trip that evaluation inputs go through. No flips (see the module docstring).
    The random numbers come from ``generator`` on the CPU, so a seed gives the same views on any device.
    """
    b, dev = images.shape[0], images.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(b, generator=generator, dtype=torch.float64)).to(dev)

    area = uniform(cfg.min_crop_area, 1.0)
    ratio = torch.exp(uniform(math.log(_ASPECT_RANGE[0]), math.log(_ASPECT_RANGE[1])))  # width / height
    # Crop size as fractions of the image side, clipped to the image (a clipped crop is still a crop).
    cw, ch = torch.sqrt(area * ratio).clamp(max=1.0), torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (uniform(0.0, 1.0) * (1 - cw) + cw / 2) * 2 - 1  # centre in [-1, 1] grid coordinates
    cy = (uniform(0.0, 1.0) * (1 - ch) + ch / 2) * 2 - 1
    theta = torch.zeros(b, 2, 3, dtype=images.dtype, device=dev)  # output grid -> input grid
    theta[:, 0, 0], theta[:, 0, 2] = cw.to(images.dtype), cx.to(images.dtype)
    theta[:, 1, 1], theta[:, 1, 2] = ch.to(images.dtype), cy.to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, H, W, 2)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    x = (out + 1) / 2  # [0, 1]
    x = x * uniform(1 - cfg.brightness, 1 + cfg.brightness).to(x.dtype).view(b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1) grey level the contrast pivots on
    x = (x - mean) * uniform(1 - cfg.contrast, 1 + cfg.contrast).to(x.dtype).view(b, 1, 1, 1) + mean
    return to_model_input(x.clamp(0, 1) * 2 - 1)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent loss of 2B L2-normalised embeddings (2B, P): rows i and i + B are views of one image.

    For each row, a softmax over its cosine similarities to the other 2B - 1 rows (divided by
    ``temperature``) must pick its partner; the loss is the mean cross-entropy.
    """
    n = z.shape[0]
    if n % 2 or n < 4:
        raise ValueError(f"nt_xent needs an even number >= 4 of embeddings (two views each), got {n}")
    sim = z @ z.T / temperature  # (2B, 2B)
    sim = sim.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))  # not oneself
    partner = (torch.arange(n, device=z.device) + n // 2) % n
    return F.cross_entropy(sim, partner)


def _images_only(items: list[dict]) -> torch.Tensor:
    # Collate that touches nothing but "image": the labels of the items are never read.
    return torch.stack([item["image"] for item in items])


def load_images(dataset, max_images: int, seed: int = 0, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of ``dataset`` as uint8 (N, C, H, W) plus their indices (N,) in ``dataset``.

    At most ``max_images`` (a seeded random subset, in index order, when the set is larger). Reads only the
    ``image`` of each item, so unlabelled data and data whose labels must not be used work alike.
    """
    n = len(dataset)
    if n > max_images:
        indices = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].sort().values
        dataset = torch.utils.data.Subset(dataset, indices.tolist())
    else:
        indices = torch.arange(n)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_images_only)
    batches = [torch.round((b.clamp(-1, 1) + 1) * 127.5).to(torch.uint8) for b in loader]
    return torch.cat(batches), indices


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1  # uint8 -> [-1, 1], as the torch-fidelity extractor does


@dataclasses.dataclass
class ContrastiveFit:
    """What :func:`fit_contrastive` returns."""

    backbone: FeatureClassifier  # trained, head-less, on the CPU in eval mode
    info: dict  # JSON-able: architecture, train_steps, train_seconds, final_train_loss, num_train_images
    train_images: torch.Tensor  # uint8 (N, C, H, W): the images it was trained on
    train_indices: torch.Tensor  # (N,) their indices in the train split


class ContrastiveTask(Task):
    """The label-free extractor as a trainer task: two augmented views of each image, NT-Xent on their
    projections. Batches are drawn from a seeded permutation of the in-memory images (the remainder of an epoch
    dropped); the same generator draws the augmentations."""

    name = "contrastive"
    description = "train the label-free extractor (once, cached)"

    def __init__(self, train, cfg: ContrastiveConfig):
        self.train, self.cfg = train, cfg
        self.hint = f"lower contrastive.lr ({cfg.lr})"

    def setup(self, trainer: Trainer) -> None:
        cfg = self.cfg
        # after the trainer's seeding: reading the images draws a loader seed from the global generator
        self.images, self.indices = load_images(self.train, cfg.max_train_images, cfg.seed)  # (N, C, H, W) uint8
        if self.images.shape[0] < 2:
            raise ValueError(f"the contrastive extractor needs at least 2 train images, got {self.images.shape[0]}")
        self.arch = backbone_architecture(self.images[0], [], cfg.width, cfg.feature_dim)
        model = ContrastiveNet(self.arch, cfg.projection_dim)
        optimizer, schedule = make_optimizer(model.parameters(), cfg.lr, cfg.steps, cfg.weight_decay)
        model, optimizer = trainer.prepare(model, optimizer)
        trainer.add_trained("contrastive", model, optimizer, schedule, clip=False)
        self.model = model
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def batches(self, trainer: Trainer, samples_seen: int):
        n, batch_size = self.images.shape[0], trainer.cfg.batch_size
        order, pos = torch.randperm(n, generator=self.generator), 0
        while True:
            if pos + batch_size > n:  # next epoch: a fresh permutation, the remainder dropped
                order, pos = torch.randperm(n, generator=self.generator), 0
            yield _to_float(self.images[order[pos:pos + batch_size]])  # (B, C, H, W)
            pos += batch_size

    def batch_size(self, batch) -> int:
        return batch.shape[0]

    def micro_step(self, trainer: Trainer, batch, step: int) -> dict:
        x = batch.to(trainer.device)
        views = torch.cat([augment(x, self.generator, self.cfg), augment(x, self.generator, self.cfg)])  # (2B, ...)
        _, z = self.model(views)
        loss = nt_xent(z, self.cfg.temperature)
        trainer.backward(loss)
        self.last_loss = loss.detach()
        return {"loss": loss}

    def finish(self, trainer: Trainer, step: int) -> dict:
        return {"final_train_loss": float(self.last_loss)}


def fit_contrastive(train, cfg: ContrastiveConfig | None = None, device: str | torch.device = "cpu") -> ContrastiveFit:
    """Train a :class:`ContrastiveNet` on the images of ``train`` (through :class:`vqgen.core.trainer.Trainer`, in
    memory); labels are never read (only ``train[i]["image"]`` and ``len(train)``)."""
    cfg = cfg or ContrastiveConfig()
    cfg.validate()
    n = min(len(train), cfg.max_train_images)
    task = ContrastiveTask(train, cfg)
    trainer = Trainer(task, extractor_train_config(cfg.steps, max(1, min(cfg.batch_size, n)), cfg.lr, cfg.seed))
    start = time.perf_counter()
    last_loss = trainer.fit()["final_train_loss"]
    train_seconds = time.perf_counter() - start
    info = {
        "architecture": task.arch,
        "train_steps": cfg.steps,
        "train_seconds": round(train_seconds, 2),
        "final_train_loss": last_loss,
        "num_train_images": n,
    }
    return ContrastiveFit(trainer.unwrap(task.model).backbone.cpu().eval(), info, task.images, task.indices)


def _features(backbone: FeatureClassifier, images: torch.Tensor, device: torch.device,
              batch_size: int = 500) -> torch.Tensor:
    """Backbone features (N, feature_dim), on the CPU, of uint8 images (N, C, H, W)."""
    net = backbone.to(device)
    with torch.no_grad():
        out = torch.cat([net(_to_float(b).to(device))[0].cpu() for b in images.split(batch_size)])
    backbone.cpu()
    return out


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, chunk: int = 1024) -> float:
    """Accuracy of a k-NN classifier: each test image (N, F) takes the majority label of its ``k`` most
    cosine-similar train images (M, F) (ties: the larger summed similarity). Labels are int64 >= 0."""
    k = min(k, len(train_features))
    train_n = F.normalize(train_features.double(), dim=-1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for feats, labels in zip(test_features.split(chunk), test_labels.split(chunk)):
        sims, idx = (F.normalize(feats.double(), dim=-1) @ train_n.T).topk(k, dim=-1)  # (n, k)
        votes = F.one_hot(train_labels[idx], num_classes).double()  # (n, k, classes)
        # Similarities mapped to [0, 1] sum to at most k per class, so after / (k + 1) they are below one
        # vote: the count decides, the similarity only breaks ties.
        score = votes.sum(1) + votes.mul((sims.unsqueeze(-1) + 1) / 2).sum(1) / (k + 1)
        correct += int((score.argmax(-1) == labels).sum())
    return correct / max(len(test_labels), 1)


def train_contrastive(data_cfg, cfg: ContrastiveConfig | None = None, device: str | torch.device = "cpu"):
    """Train on ``data_cfg``'s train split (images only), then run the k-NN check where labels exist.

    Returns ``(backbone, meta)``; ``meta`` is the JSON-able description stored next to the weights.
    """
    from vqgen.tokenizer.data import build_dataset

    cfg = cfg or ContrastiveConfig()
    train = build_dataset(data_cfg, "train")
    fit = fit_contrastive(train, cfg, device)
    meta = {
        "extractor": CONTRASTIVE_EXTRACTOR_NAME,
        "task": "contrastive",
        "label_free": True,
        "heads": [],
        **fit.info,
        "data": to_dict(data_cfg) if dataclasses.is_dataclass(data_cfg) else data_cfg,
        "contrastive": to_dict(cfg),
    }
    # Quality check, after training: the labels are read here and nowhere else.
    test, test_split = held_out_split(data_cfg, train)
    if int(getattr(train, "num_classes", 0) or 0) > 0 and getattr(train, "labels", None) is not None:
        start = time.perf_counter()
        test_images, test_indices = load_images(test, cfg.max_test_images, cfg.seed)
        device = torch.device(device)
        acc = knn_accuracy(_features(fit.backbone, fit.train_images, device), train.labels[fit.train_indices],
                           _features(fit.backbone, test_images, device), test.labels[test_indices], cfg.knn_k)
        meta["knn_accuracy"] = acc
        meta["knn"] = {"k": min(cfg.knn_k, len(fit.train_images)), "similarity": "cosine", "vote": "majority",
                       "classes": int(train.num_classes), "test_split": test_split,
                       "num_test_images": int(len(test_images)),
                       "num_train_images": int(len(fit.train_images)), "seconds": round(time.perf_counter() - start, 2)}
        if test_split == "train":
            meta["note"] = ("no held-out split: the k-NN check ran on train images against themselves, so it is "
                            "optimistic")
    else:
        meta["knn_accuracy"] = None
        meta["note"] = "the data set has no labels: the k-NN quality check is unavailable"
    return fit.backbone, meta


def offline_contrastive(data_cfg, cfg: ContrastiveConfig | None = None, cache_dir: str | Path | None = None,
                        device: str | torch.device = "cpu") -> Path:
    """Path of the cached contrastive backbone (``model.safetensors``) for ``data_cfg``; trains it on a miss."""
    cfg = cfg or ContrastiveConfig()
    return cached_model("contrastive", data_cfg, "contrastive", cfg, _CACHE_VERSION,
                        lambda: train_contrastive(data_cfg, cfg, device), cache_dir)


class ContrastiveFeatureExtractor(BackboneFeatureExtractor):
    """The label-free backbone as a torch-fidelity extractor (registered as ``vqgen-contrastive``).

    Provided features: ``features`` (the backbone output, before the projection head).
    ``feature_extractor_weights_path`` must point at a ``model.safetensors`` written by
    :func:`offline_contrastive`, with its ``meta.json`` beside it.
    """

    trained_by = "vqgen.eval.contrastive.offline_contrastive(data_cfg)"

    @staticmethod
    def get_provided_features_list():
        return ("features",)

    def forward(self, x: torch.Tensor):
        features, _ = self.net(self.net_input(x))
        return (features,)


if CONTRASTIVE_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(CONTRASTIVE_EXTRACTOR_NAME, ContrastiveFeatureExtractor)

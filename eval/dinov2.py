"""DINOv2 features for FD-DINOv2 (Stein et al. 2023), built on ``transformers``' ``Dinov2Model``.

torch-fidelity 0.4's own DINOv2 extractor fetches code through ``torch.hub`` and refuses a local weights
file, so vqgen registers its own, ``vqgen-dinov2``, with torch-fidelity. It follows Stein et al.'s reference
code (``dgm-eval``): images are resized to 224 x 224 with bicubic interpolation (antialiased, as PIL's, then
rounded to 8 bits as PIL returns them), scaled to [0, 1], normalised with the ImageNet mean and std, and the
feature is the class token after the final layer norm (``pooler_output``, 1024-d for ViT-L/14), which is what
the ``torch.hub`` model returns.

Weights come from a folder holding ``config.json`` and ``model.safetensors`` (or the path of that
``model.safetensors``), or a hub id (default ``facebook/dinov2-large``, read from the Hugging Face cache and
downloaded only when the hub is reachable). Only safetensors are read: the file's bytes are hashed and those
same bytes are parsed (:mod:`eval.weights`). ``known`` tells whether they are the published ViT-L/14 file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors_bytes
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from vqgen.core.hub import hub_reachable, is_hub_id, quiet_transformers

from .weights import DINOV2_VITL14, WeightsError, read_verified

__all__ = ["DINOV2_EXTRACTOR_NAME", "DEFAULT_DINOV2", "DinoV2FeatureExtractor", "resolve_dinov2_weights"]

DINOV2_EXTRACTOR_NAME = "vqgen-dinov2"
DEFAULT_DINOV2 = "facebook/dinov2-large"
INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FILES = ("config.json", "model.safetensors")




def _from_hub(repo_id: str) -> Path:
    """The cached (or, with a network, downloaded) ``model.safetensors`` of ``repo_id``."""
    from huggingface_hub import hf_hub_download

    missing = (f"DINOv2 weights {repo_id} are not in the Hugging Face cache and the hub cannot be reached; "
               f"download config.json and model.safetensors of {DINOV2_VITL14.source} into a folder and pass "
               f"{DINOV2_VITL14.option}")
    for local_only in (True, False):
        if not local_only and not hub_reachable():
            raise WeightsError(missing)
        try:
            paths = [Path(hf_hub_download(repo_id, name, local_files_only=local_only)) for name in _FILES]
            return paths[1]
        except Exception as err:  # not cached / not found / no access: try the network once, then one line
            if not local_only:
                detail = " ".join(str(err).split())[:160]
                raise WeightsError(f"{missing} ({type(err).__name__}: {detail})") from None
    raise AssertionError("unreachable")


def resolve_dinov2_weights(weights: str | None) -> Path:
    """The ``model.safetensors`` to read for ``weights`` (folder, file, hub id, or None for the default)."""
    weights = weights or DEFAULT_DINOV2
    path = Path(weights)
    if path.is_dir():
        path = path / "model.safetensors"
    elif path.suffix not in (".safetensors", ".bin", ".pth", ".pt") and is_hub_id(weights):
        return _from_hub(weights)
    if path.suffix != ".safetensors":
        raise WeightsError(f"DINOv2 weights must be a safetensors file (model.safetensors with config.json beside "
                           f"it), got {path}; vqgen does not unpickle .bin/.pth files")
    if not path.is_file() or not path.with_name("config.json").is_file():
        raise WeightsError(f"DINOv2 weights not found: {path} (and config.json beside it); download "
                           f"{DINOV2_VITL14.source} and pass {DINOV2_VITL14.option}")
    return path




def is_vit_l14(config) -> bool:
    """True when a ``Dinov2Config`` describes ViT-L/14 (the model FD-DINOv2 is defined with)."""
    return (config.hidden_size, config.num_hidden_layers, config.patch_size) == (1024, 24, 14)


class DinoV2FeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor around ``transformers.Dinov2Model`` (registered as ``vqgen-dinov2``).

    ``feature_extractor_weights_path``: a ``model.safetensors`` with its ``config.json`` beside it (see
    :func:`resolve_dinov2_weights`). Provides ``dinov2`` (the class token after the final layer norm), the
    default layer for every metric. Attributes: ``weights_sha256``, ``known`` (the published ViT-L/14 file),
    ``vit_l14``.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        from transformers import Dinov2Config, Dinov2Model

        if feature_extractor_weights_path is None:
            raise WeightsError("the DINOv2 extractor needs feature_extractor_weights_path (a model.safetensors)")
        path = Path(feature_extractor_weights_path)
        data, self.weights_sha256 = read_verified(path)
        self.known = self.weights_sha256 == DINOV2_VITL14.sha256
        try:
            config = Dinov2Config.from_dict(json.loads(path.with_name("config.json").read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise WeightsError(f"{path.with_name('config.json')} is not a DINOv2 config ({err})") from None
        self.vit_l14 = is_vit_l14(config)
        if self.vit_l14 and not self.known:
            raise WeightsError(f"{path} is a ViT-L/14 but not the published file: its sha256 is {self.weights_sha256}, "
                               f"expected {DINOV2_VITL14.sha256}; get it from {DINOV2_VITL14.source}")
        try:
            state = load_safetensors_bytes(data)
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise WeightsError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err})") from None
        state = {k.removeprefix("dinov2."): v for k, v in state.items()}
        # transformers maps the checkpoint's names onto its modules (they differ between versions)
        with quiet_transformers():
            self.model, info = Dinov2Model.from_pretrained(None, config=config, state_dict=state,
                                                           output_loading_info=True)
        missing, unexpected = info.get("missing_keys") or [], info.get("unexpected_keys") or []
        if missing or unexpected:
            raise WeightsError(f"{path} does not match its config.json (missing {sorted(missing)[:3]}, unexpected "
                               f"{sorted(unexpected)[:3]})")
        self.hidden_size = int(config.hidden_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return ("dinov2",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "dinov2"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float (B, 3, 224, 224), ImageNet-normalised."""
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        x = x.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0, 255).round()  # PIL returns 8-bit images
        return (x / 255 - self.mean) / self.std

    def forward(self, x: torch.Tensor):
        features = self.model(pixel_values=self.preprocess(x)).pooler_output  # (B, hidden)
        out = {"dinov2": features.float()}
        return tuple(out[name] for name in self.features_list)


if DINOV2_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(DINOV2_EXTRACTOR_NAME, DinoV2FeatureExtractor)

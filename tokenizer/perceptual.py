"""LPIPS perceptual loss through the ``lpips`` package (VGG trunk), usable without a network.

``lpips.LPIPS(net="vgg")`` holds two kinds of weights: the small linear heads calibrated on human judgements
(shipped inside the ``lpips`` package, always loaded) and the VGG16 trunk (torchvision's ImageNet weights,
``vgg16-397923af.pth``, which torchvision downloads on first use). :func:`build_perceptual` finds the trunk
weights in this order: ``weights_path`` (a file you downloaded elsewhere: torchvision's ``.pth`` state dict or a
safetensors file of it), torch's hub cache (``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``), a download
(after a 3-second reachability check); when none works it raises one ``PerceptualWeightsError`` line saying what
to do. ``pretrained=false`` uses a randomly initialised trunk (seeded, drawn from its own generator so the
tokenizer's initialisation does not change): that is *not* LPIPS, only a stand-in for tests and offline
machines, and every summary and report says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vqgen.core.errors import UserError
from vqgen.core.hub import reachable
from vqgen.core.io import file_fingerprint

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
NETS = ("vgg",)
# torchvision vgg16.features index -> the lpips slice that holds it (lpips.pretrained_networks.vgg16)
_SLICE_ENDS = (4, 9, 16, 23, 30)


class PerceptualWeightsError(UserError):
    """The LPIPS trunk's weights are neither given, cached nor downloadable."""


@dataclass
class PerceptualConfig:
    """The perceptual network (``loss.perceptual``); used when ``loss.perceptual_weight > 0``."""

    net: str = "vgg"  # LPIPS trunk: vgg (as taming and LlamaGen)
    pretrained: bool = True  # false: a random trunk, NOT LPIPS (tests, offline smoke runs); stated in summaries
    weights_path: str | None = None  # torchvision's vgg16-397923af.pth (or a safetensors copy), for offline machines
    seed: int = 0  # initialisation of the random trunk (pretrained=false)

    def validate(self) -> None:
        if self.net not in NETS:
            raise ValueError(f"perceptual.net must be one of {', '.join(NETS)}, got {self.net!r}")
        if self.weights_path is not None and not self.pretrained:
            raise ValueError("perceptual.weights_path is set but perceptual.pretrained=false ignores it; remove one")




def _read_state(path: Path) -> dict[str, torch.Tensor]:
    from vqgen.core.errors import CorruptFileError, MissingFileError

    if not path.is_file():
        raise MissingFileError(f"perceptual.weights_path {path} does not exist; give torchvision's {VGG16_FILE}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged or foreign file: named, one line
        raise CorruptFileError(path, f"not a VGG16 state dict: {' '.join(str(err).split())[:200]}") from None


def _trunk_state(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """torchvision VGG16 keys ``features.<i>.<weight|bias>`` -> lpips' ``slice<k>.<i>.<weight|bias>``."""
    from vqgen.core.errors import CorruptFileError

    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "features" or len(parts) != 3:
            continue  # the classifier head of VGG16 is not part of the trunk
        index = int(parts[1])
        slice_no = next((k for k, end in enumerate(_SLICE_ENDS, 1) if index < end), None)
        if slice_no is not None:
            out[f"slice{slice_no}.{index}.{parts[2]}"] = value
    if len(out) != 26:  # 13 convolutions x (weight, bias)
        raise CorruptFileError(path, f"expected the 13 convolutions of VGG16's features, found {len(out) // 2}")
    return out


def _trunk_weights(cfg: PerceptualConfig) -> Path:
    """The file with the VGG16 trunk's weights: given, cached, or downloaded."""
    if cfg.weights_path is not None:
        return Path(cfg.weights_path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    if cached.is_file():
        return cached
    hint = (f"download {VGG16_URL} on a machine with a network and pass loss.perceptual.weights_path=/path/to/"
            f"{VGG16_FILE} (or put it in {cached.parent}); loss.perceptual.pretrained=false runs with a random "
            "trunk instead, which is not LPIPS")
    if not reachable(VGG16_URL):
        raise PerceptualWeightsError(f"LPIPS needs the VGG16 trunk weights and there is no network to fetch them: {hint}")
    try:
        torch.hub.load_state_dict_from_url(VGG16_URL, progress=False, map_location="cpu")
    except Exception as err:
        raise PerceptualWeightsError(
            f"downloading the LPIPS trunk weights failed ({type(err).__name__}: {' '.join(str(err).split())[:150]}); "
            f"{hint}") from None
    return cached


def build_perceptual(cfg: PerceptualConfig) -> tuple[nn.Module, dict]:
    """``(lpips_module, description)``: a frozen ``lpips.LPIPS`` in eval mode and what it is made of.

    ``lpips_module(a, b)`` with images (B, C, H, W) in [-1, 1] returns (B, 1, 1, 1) distances; grey images are
    repeated to three channels by :class:`~tokenizer.losses.TokenizerLoss`. The description names the network,
    the linear heads' file and sha256, the trunk's weights and sha256 (or that it is random: not LPIPS).
    """
    from importlib.metadata import version

    import lpips

    weights = _trunk_weights(cfg) if cfg.pretrained else None
    # The trunk is built randomly first (pnet_rand: never a download), from its own generator, so building it
    # does not move the global random stream that initialises the tokenizer.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        module = lpips.LPIPS(net=cfg.net, pretrained=True, pnet_rand=True, verbose=False)
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{cfg.net}.pth"
    info = {
        "network": f"lpips.LPIPS(net={cfg.net!r}, version 0.1) from the lpips package {version('lpips')}",
        "heads_weights": str(heads),
        "heads_sha256": file_fingerprint(heads) if heads.is_file() else None,
    }
    if weights is not None:
        module.net.load_state_dict(_trunk_state(_read_state(weights), weights))
        info.update(trunk="VGG16, torchvision ImageNet weights", trunk_weights=str(weights),
                    trunk_sha256=file_fingerprint(weights), is_lpips=True)
    else:
        info.update(trunk=f"VGG16, randomly initialised (seed {cfg.seed})", trunk_weights=None, trunk_sha256=None,
                    is_lpips=False,
                    caveat="random VGG16 trunk (perceptual.pretrained=false): NOT LPIPS; values are comparable only "
                           "between runs with the same seed, never with published LPIPS")
    module.requires_grad_(False)
    return module.eval(), info


def random_trunk_warning(info: dict | None) -> str | None:
    """The warning a run with a random LPIPS trunk prints at start-up and its model card carries (None for real
    LPIPS or no perceptual loss); ``info`` is the description :func:`build_perceptual` returns (also kept in
    ``summary.json`` as ``perceptual``)."""
    if not info or info.get("is_lpips", True):
        return None
    return ("the perceptual loss uses a randomly initialised VGG16 trunk (loss.perceptual.pretrained=false): it is NOT "
            "LPIPS, and a tokenizer trained with it is not comparable with LPIPS-trained ones; give the trunk's "
            f"weights (loss.perceptual.weights_path=/path/to/{VGG16_FILE}) for LPIPS")


"""Weight files of the published feature extractors: where they come from, their sha256, and safe loading.

Files in caches and run folders are copied between people, so vqgen treats every weights file as untrusted:

- a file with a known published sha256 (:data:`INCEPTION`, :data:`DINOV2_VITL14`) is read once into memory,
  hashed, and only those verified bytes are parsed, so what is checked is what is loaded;
- pickled PyTorch files are parsed with ``torch.load(weights_only=True)`` (tensors and plain containers
  only: a ``__reduce__`` payload is refused, never run); safetensors files with ``safetensors``;
- a missing file is one :class:`WeightsError` line naming the file, where it comes from and which option
  takes its path; a file with another sha256 is one line naming both digests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
from pathlib import Path

import torch

from vqgen.core.errors import UserError

__all__ = [
    "DINOV2_VITL14",
    "INCEPTION",
    "KnownWeights",
    "WeightsError",
    "load_torch_state_dict",
    "read_verified",
    "sha256_bytes",
]


class WeightsError(UserError, ValueError):
    """A weights file is missing, is not the published file, or cannot be parsed safely (one line)."""


@dataclasses.dataclass(frozen=True)
class KnownWeights:
    """A published weights file: its name, sha256, size in bytes, and where to get it."""

    name: str  # what the file is, in words
    filename: str
    sha256: str
    size: int
    source: str  # where to download it (URL, or hub repository and revision)
    option: str  # the evaluate option that takes its path


# torch-fidelity's port of the TF Inception (2015-12-05) that FID and ADM's statistics are computed with.
# The 8 hex digits in the file name are the start of its sha256 (torch.hub's convention).
INCEPTION = KnownWeights(
    name="Inception weights (torch-fidelity inception-v3-compat)",
    filename="weights-inception-2015-12-05-6726825d.pth",
    sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
    size=95_628_359,
    source="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    option="--inception-weights PATH (evaluate key inception_weights)",
)

# DINOv2 ViT-L/14 as Hugging Face hosts it (facebook/dinov2-large, revision 47b73eefe95e8d44ec3623f8890bd894b6ea2d6c);
# the sha256 is the one two independent public manifests pin for that file (1,217,522,888 bytes).
DINOV2_VITL14 = KnownWeights(
    name="DINOv2 ViT-L/14 weights (facebook/dinov2-large model.safetensors)",
    filename="model.safetensors",
    sha256="399fba97a95f22c36834418bc69373364a99af3a1153da1c0fb31db567c92e23",
    size=1_217_522_888,
    source="https://huggingface.co/facebook/dinov2-large (model.safetensors and config.json, "
           "revision 47b73eefe95e8d44ec3623f8890bd894b6ea2d6c)",
    option="--dinov2-weights FOLDER (evaluate key dinov2_weights)",
)


def sha256_bytes(data: bytes) -> str:
    """sha256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def read_verified(path: str | Path, known: KnownWeights | None = None, expected_sha256: str | None = None,
                  ) -> tuple[bytes, str]:
    """The bytes of ``path`` and their sha256, checked against ``known`` (or ``expected_sha256``) when given.

    Raises :class:`WeightsError` (one line) when the file is missing or its sha256 differs.
    """
    path = Path(path)
    what = known.name if known else "weights file"
    if not path.is_file():
        where = f"; download {known.source} and pass {known.option}" if known else ""
        raise WeightsError(f"{what} not found at {path}{where}")
    data = path.read_bytes()
    digest = sha256_bytes(data)
    expected = known.sha256 if known else expected_sha256
    if expected is not None and digest != expected:
        hint = f"; get the published file from {known.source}" if known else ""
        raise WeightsError(f"{path} is not the expected {what}: its sha256 is {digest}, expected {expected}{hint}")
    return data, digest


def load_torch_state_dict(data: bytes, path: str | Path) -> dict[str, torch.Tensor]:
    """Parse the bytes of a ``torch.save`` file with ``weights_only=True`` into a dict of tensors.

    Anything but tensors and plain containers (a pickled object with ``__reduce__``, say) is refused with a
    :class:`WeightsError` naming ``path``; nothing in the file is executed.
    """
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        detail = " ".join(str(err).split())[:200]
        raise WeightsError(f"{path} is not a plain tensor file (refused by torch.load(weights_only=True): "
                           f"{detail})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state

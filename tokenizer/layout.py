"""The token layout of a tokenizer: its codebooks in one joint id space, on a grid of positions.

Codebook ``i`` owns the joint ids ``[offset_i, offset_i + N_i)`` with offsets the running sum of the sizes
(one codebook: ids ``[0, N)``). ``codebook_of`` is the one place that maps joint ids to codebooks; the
quantizers, the prior's vocabulary, the statistics and the reports all call it.

``CodebookLayout`` is what a prior, the token files and the reports need to know about a tokenizer's
tokens; ``VQVAE.layout()`` builds it. ``to_dict``/``from_dict`` write and read it as JSON, and
``from_dict`` also reads the ``vocab_info`` dict that token folders and priors written before it hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["CodebookLayout", "codebook_of"]


def codebook_of(ids: torch.Tensor, sizes: Sequence[int] | None = None, *, ends: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Which codebook each joint id in ``ids`` (any shape) belongs to: same shape, int64.

    Give the codebook ``sizes`` in order, or ``ends`` (their running sums as an int64 tensor on the ids'
    device, e.g. a buffer, so that no tensor is built per call).
    """
    if ends is None:
        ends = torch.tensor(list(sizes), dtype=torch.int64, device=ids.device).cumsum(0)
    return torch.bucketize(ids, ends.to(ids.dtype), right=True)


@dataclass(frozen=True)
class CodebookLayout:
    """Sizes and offsets of the codebooks in the joint id space, the token grid, and how codebooks are chosen.

    ``per_image_codebook``: every image's tokens come from one codebook chosen per image (the adaptive
    quantizer with ``granularity='image'``): the prior then predicts that choice first and samples inside it.
    ``kind``, ``image_size`` and ``channels`` describe the tokenizer for readers; they do not change ids.
    """

    codebook_sizes: tuple[int, ...]
    grid: tuple[int, int]
    per_image_codebook: bool = False
    kind: str | None = None
    image_size: int | None = None
    channels: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "codebook_sizes", tuple(int(s) for s in self.codebook_sizes))
        object.__setattr__(self, "grid", (int(self.grid[0]), int(self.grid[1])))
        if not self.codebook_sizes or min(self.codebook_sizes) < 1:
            raise ValueError(f"codebook_sizes must be positive, got {list(self.codebook_sizes)}")
        if self.per_image_codebook and len(self.codebook_sizes) < 2:
            raise ValueError("per_image_codebook needs several codebooks (the adaptive quantizer's ladder)")

    @property
    def num_codes(self) -> int:
        """Number of token ids of all codebooks together."""
        return sum(self.codebook_sizes)

    @property
    def num_codebooks(self) -> int:
        return len(self.codebook_sizes)

    @property
    def codebook_offsets(self) -> tuple[int, ...]:
        """Joint id of the first code of each codebook."""
        offsets, total = [], 0
        for size in self.codebook_sizes:
            offsets.append(total)
            total += size
        return tuple(offsets)

    @property
    def num_positions(self) -> int:
        """Tokens per image."""
        return self.grid[0] * self.grid[1]

    def codebook_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Codebook of each joint id (any shape) -> same shape, int64."""
        return codebook_of(ids, self.codebook_sizes)

    def local_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint ids -> (codebook, id within that codebook), both of the ids' shape."""
        book = self.codebook_of(ids)
        offsets = torch.tensor(self.codebook_offsets, dtype=ids.dtype, device=ids.device)
        return book, ids - offsets[book]

    def selection_counts(self, ids: torch.Tensor) -> torch.Tensor:
        """How many of the joint ids (any shape) fall in each codebook -> (num_codebooks,) int64."""
        flat = ids.reshape(-1).long()
        return torch.bincount(self.codebook_of(flat), minlength=self.num_codebooks)

    # ---- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-serialisable description (with the derived ``codebook_size`` and offsets for readers)."""
        return {
            "kind": self.kind,
            "codebook_size": self.num_codes,
            "codebook_sizes": list(self.codebook_sizes),
            "codebook_offsets": list(self.codebook_offsets),
            "per_image_codebook": self.per_image_codebook,
            "grid": list(self.grid),
            "image_size": self.image_size,
            "channels": self.channels,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "CodebookLayout":
        """Inverse of ``to_dict``; also reads the older ``vocab_info`` dict (``kind`` + ``granularity``)."""
        sizes = data.get("codebook_sizes") or [data["codebook_size"]]
        if "per_image_codebook" in data:
            per_image = bool(data["per_image_codebook"])
        else:  # vocab_info of tokens / priors written before the layout existed
            per_image = data.get("kind") == "adaptive" and data.get("granularity") == "image"
        return cls(
            codebook_sizes=tuple(int(s) for s in sizes),
            grid=(int(data["grid"][0]), int(data["grid"][1])),
            per_image_codebook=per_image,
            kind=data.get("kind"),
            image_size=data.get("image_size"),
            channels=data.get("channels"),
        )

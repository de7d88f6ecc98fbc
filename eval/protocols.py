"""Evaluation protocols by name: which extractor, how many images, against which reference.

A number is comparable with a paper's only when it was measured the same way. Each :class:`Protocol` fixes
everything that changes the number:

===============  =============================================================================================
``inception-50k``  FID with torch-fidelity's ``inception-v3-compat`` (the TF Inception of FID and ADM's suite):
                 50,000 samples against the statistics of the whole training split, or of a reference ``.npz``
                 (ADM's ``VIRTUAL_imagenet256_labeled.npz`` for LlamaGen / DiT / MaskGIT-style ImageNet gFID);
                 rFID on the validation split (every image, at most 50,000) against itself.
``fd-dinov2``    The same counts and references in DINOv2 ViT-L/14 features (Stein et al. 2023): Frechet
                 distance of the class token at 224 px. With an ADM ``.npz`` the reference is its images (its
                 ``mu``/``sigma`` are Inception statistics).
``rfid-val``     rFID only (LlamaGen's tokenizer table): the whole validation split reconstructed, Inception;
                 samples are not scored.
===============  =============================================================================================

KID, precision, recall, density and coverage use a seeded subset of :attr:`Protocol.knn_images` images of
each set (10,000, as ADM's reference batches hold), since their cost grows with the square of the count, and
the k-NN metrics use k = 3 neighbours, as ADM's evaluator and torch-fidelity do.
"""

from __future__ import annotations

import dataclasses

__all__ = ["PROTOCOLS", "Protocol", "get_protocol"]


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One way of measuring, by name (see the module docstring)."""

    name: str
    extractor: str  # a feature space of eval.fid.EXTRACTORS
    num_samples: int  # generated images scored (0: samples are not scored)
    reference_split: str  # split whose statistics the samples are compared with (unless an .npz is given)
    recon_split: str | None  # split reconstructed for rFID (None: no rFID)
    recon_images: int | None  # at most this many reconstructed (None: the whole split)
    knn_images: int  # KID / precision / recall / density / coverage on this many of each set
    k: int  # neighbours of precision / recall / density / coverage
    description: str

    def describe(self) -> dict:
        """JSON-able form for reports."""
        return dataclasses.asdict(self)


PROTOCOLS: dict[str, Protocol] = {
    p.name: p for p in (
        Protocol("inception-50k", "inception", 50_000, "train", "validation", 50_000, 10_000, 3,
                 "FID in torch-fidelity's inception-v3-compat space (the TF Inception of FID and of ADM's evaluation "
                 "suite): 50,000 samples against the training split's statistics (or a reference .npz); rFID: the "
                 "validation split (at most 50,000 images) reconstructed, against itself"),
        Protocol("fd-dinov2", "dinov2", 50_000, "train", "validation", 50_000, 10_000, 3,
                 "FD-DINOv2 (Stein et al. 2023): Frechet distance of DINOv2 ViT-L/14 class tokens at 224 px, 50,000 "
                 "samples against the training split (or a reference .npz's images); rFD-DINOv2 on the validation "
                 "split"),
        Protocol("rfid-val", "inception", 0, "train", "validation", None, 10_000, 3,
                 "rFID as LlamaGen reports tokenizers: every image of the validation split reconstructed, Inception "
                 "features, against the same images; samples are not scored"),
    )
}


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in PROTOCOLS:
        raise ValueError(f"protocol={name!r} is unknown; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]

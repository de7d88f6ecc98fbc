"""Token-id layout of the prior: tokenizer codes, BOS, class tokens, codebook tokens.

One joint vocabulary, in this order (``K`` = total number of tokenizer codes)::

    [0, K)                    tokenizer codes (joint ids of the tokenizer's ``CodebookLayout``: codebook offset
                              + code, as the tokenizer emits them)
    K                         BOS (first token of unconditional sequences)
    K+1 .. K+C                class tokens (class-conditional priors only)
    K+C+1                     null class (classifier-free guidance; class-conditional only)
    next n_codebooks ids      codebook tokens (only when the layout has ``per_image_codebook``)

A sequence is ``[BOS | class] (+ [codebook]) + h*w codes`` in raster order. Position 0 is always given;
every later position is predicted, including the codebook token, so the prior also learns which
codebook an image uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vqgen.core.errors import UserError
from vqgen.tokenizer.layout import CodebookLayout


class VocabError(UserError, ValueError):
    """Tokens or labels do not fit the prior's vocabulary; the message says what is wrong."""


def _checking() -> bool:
    """Whether to check token and label values: not inside ``torch.compile`` (``train.compile``), where each check
    would read a value back from the device and split the compiled graph at every batch."""
    return not torch.compiler.is_compiling()


@dataclass(frozen=True)
class TokenVocab:
    """Maps tokenizer codes (+ labels) to prior token ids and back, and says which ids are valid where."""

    codebook_sizes: tuple[int, ...]
    grid: tuple[int, int]
    num_classes: int = 0
    class_conditional: bool = False
    per_image_codebook: bool = False

    def __post_init__(self) -> None:
        if self.class_conditional and self.num_classes < 1:
            raise VocabError(
                "a class-conditional prior needs labelled data (num_classes >= 1); "
                "set model.class_conditional=false for unlabelled tokens"
            )
        try:
            self.layout
        except ValueError as err:
            raise VocabError(str(err)) from None

    @property
    def layout(self) -> CodebookLayout:
        """The tokenizer's codebook layout this vocabulary is built on (sizes, offsets, grid, codebook choice)."""
        return CodebookLayout(self.codebook_sizes, self.grid, self.per_image_codebook)

    @classmethod
    def from_layout(cls, layout: CodebookLayout, num_classes: int = 0, class_conditional: bool = False) -> "TokenVocab":
        """The vocabulary of a tokenizer's ``layout`` (``VQVAE.layout()``, or the one stored with its tokens)."""
        return cls(
            codebook_sizes=layout.codebook_sizes,
            grid=layout.grid,
            num_classes=int(num_classes) if class_conditional else 0,
            class_conditional=class_conditional,
            per_image_codebook=layout.per_image_codebook,
        )

    @classmethod
    def from_dict(cls, data: dict) -> "TokenVocab":
        """Inverse of ``to_dict`` (as stored in ``vqgen_prior.json``)."""
        return cls(
            codebook_sizes=tuple(data["codebook_sizes"]),
            grid=tuple(data["grid"]),
            num_classes=data["num_classes"],
            class_conditional=data["class_conditional"],
            per_image_codebook=data["per_image_codebook"],
        )

    def to_dict(self) -> dict:
        """JSON-serialisable description, including the derived ids for readers of the file."""
        return {
            "codebook_sizes": list(self.codebook_sizes),
            "grid": list(self.grid),
            "num_classes": self.num_classes,
            "class_conditional": self.class_conditional,
            "per_image_codebook": self.per_image_codebook,
            "num_codes": self.num_codes,
            "bos": self.bos,
            "null_class": self.null_class if self.class_conditional else None,
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
        }

    # ---- derived ids -------------------------------------------------------------------------------
    @property
    def num_codes(self) -> int:
        """Number of tokenizer codes (all codebooks together)."""
        return sum(self.codebook_sizes)

    @property
    def codebook_offsets(self) -> list[int]:
        """Joint id of the first code of each codebook."""
        return list(self.layout.codebook_offsets)

    @property
    def bos(self) -> int:
        return self.num_codes

    @property
    def class_offset(self) -> int:
        return self.num_codes + 1

    @property
    def null_class(self) -> int:
        """Id of the null class token (the unconditional branch of classifier-free guidance)."""
        if not self.class_conditional:
            raise VocabError("an unconditional prior has no null class token")
        return self.class_offset + self.num_classes

    @property
    def codebook_token_offset(self) -> int:
        return self.class_offset + (self.num_classes + 1 if self.class_conditional else 0)

    @property
    def vocab_size(self) -> int:
        return self.codebook_token_offset + (len(self.codebook_sizes) if self.per_image_codebook else 0)

    @property
    def code_start(self) -> int:
        """Sequence position of the first code token."""
        return 2 if self.per_image_codebook else 1

    @property
    def num_code_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def seq_len(self) -> int:
        return self.code_start + self.num_code_tokens

    # ---- conversions -------------------------------------------------------------------------------
    def condition_tokens(self, labels: torch.Tensor | None, batch: int, device=None) -> torch.Tensor:
        """First token of each sequence, (B,): BOS, the class token, or the null class for label -1."""
        if not self.class_conditional:
            return torch.full((batch,), self.bos, dtype=torch.long, device=device)
        if labels is None:
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        labels = labels.to(device=device, dtype=torch.long)
        if _checking() and labels.numel() and (labels.min() < -1 or labels.max() >= self.num_classes):
            raise VocabError(
                f"class labels must be in [0, {self.num_classes}) (or -1 for unconditional), "
                f"got values in [{int(labels.min())}, {int(labels.max())}]"
            )
        return torch.where(labels < 0, torch.full_like(labels, self.null_class), labels + self.class_offset)

    def codebook_of(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook index of each joint code id; same shape as ``codes``."""
        return self.layout.codebook_of(codes)

    def encode(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Tokenizer codes (B, h, w) (+ labels (B,)) -> prior sequences (B, seq_len) int64."""
        if tuple(codes.shape[1:]) != self.grid:
            raise VocabError(f"token grid {tuple(codes.shape[1:])} does not match the prior's grid {self.grid}")
        codes = codes.long().flatten(1)  # (B, h*w)
        if _checking() and codes.numel() and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise VocabError(f"code ids must be in [0, {self.num_codes}); these tokens come from another tokenizer")
        parts = [self.condition_tokens(labels, codes.shape[0], codes.device)[:, None]]
        if self.per_image_codebook:
            books = self.codebook_of(codes)  # (B, h*w)
            if _checking() and (books != books[:, :1]).any():
                raise VocabError("this tokenizer chooses one codebook per image, but a token grid mixes codebooks")
            parts.append(books[:, :1] + self.codebook_token_offset)
        parts.append(codes)
        return torch.cat(parts, dim=1)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Prior sequences (B, seq_len) -> tokenizer codes (B, h, w)."""
        return ids[:, self.code_start :].reshape(ids.shape[0], *self.grid)

    def allowed(self, ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask (B, vocab_size) of the ids that may follow the prefixes ``ids`` (B, t), 1 <= t < seq_len.

        The codebook position allows only codebook tokens; a code position allows the tokenizer codes, and
        with a per-image codebook only those of the codebook chosen at position 1.
        """
        batch, t = ids.shape
        arange = torch.arange(self.vocab_size, device=ids.device)
        if self.per_image_codebook and t == 1:
            lo = torch.full((batch,), self.codebook_token_offset, device=ids.device)
            hi = lo + len(self.codebook_sizes)
        elif self.per_image_codebook:
            book = ids[:, 1] - self.codebook_token_offset  # (B,)
            offsets = torch.tensor(self.codebook_offsets + [self.num_codes], device=ids.device)
            lo, hi = offsets[book], offsets[book + 1]
        else:
            lo = torch.zeros(batch, dtype=torch.long, device=ids.device)
            hi = torch.full((batch,), self.num_codes, device=ids.device)
        return (arange >= lo[:, None]) & (arange < hi[:, None])

"""The token data set: what ``pipelines.encode`` writes and the prior trains on.

Layout of a tokens directory (``RUN/tokens``)::

    meta.json              {"format", "layout" (CodebookLayout.to_dict()), "num_classes", "grid",
                            "tokenizer": {path, fingerprint, files}, "data": the tokenizer run's data config,
                            "splits": {split: {"file", "count"}}}
                           (folders written before the layout existed hold "vocab_info" instead; both are read)
    <split>.safetensors    "tokens" (N, h, w) int16 or int32 (the smallest that holds every code id),
                           "labels" (N,) int64 (-1 when the data has no labels)

Every file is written atomically; ``meta.json`` is rewritten after each split, so a split listed there
is complete.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset

from vqgen.core.errors import UserError
from vqgen.core.io import atomic_path, load_json, load_safetensors
from vqgen.tokenizer.layout import CodebookLayout

TOKENS_META = "meta.json"
TOKENS_FORMAT = 1


class TokenDataError(UserError, ValueError):
    """A tokens directory is missing, incomplete or inconsistent; the message says what to run."""


def storage_dtype(num_codes: int) -> torch.dtype:
    """Smallest signed integer type that holds ids ``0 .. num_codes - 1`` (safetensors has no uint16 in torch)."""
    return torch.int16 if num_codes <= torch.iinfo(torch.int16).max + 1 else torch.int32


def split_file(split: str) -> str:
    return f"{split}.safetensors"


def save_token_split(directory: str | Path, split: str, tokens: torch.Tensor, labels: torch.Tensor,
                     num_codes: int) -> Path:
    """Write ``tokens`` (N, h, w) and ``labels`` (N,) of one split compactly and atomically."""
    path = Path(directory) / split_file(split)
    tensors = {"tokens": tokens.to(storage_dtype(num_codes)).contiguous(), "labels": labels.long().contiguous()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    return path


def read_token_meta(directory: str | Path) -> dict:
    """``meta.json`` of a tokens directory, with a clear error when encoding has not been run."""
    path = Path(directory) / TOKENS_META
    if not path.is_file():
        raise TokenDataError(
            f"{directory} holds no encoded tokens (no {TOKENS_META}); run "
            f"`python -m vqgen.pipelines.encode --tokenizer-run RUN/tokenizer --output-dir {directory}` first"
        )
    meta = load_json(path)
    num_classes = meta.get("num_classes", 0) if isinstance(meta, dict) else None
    if (not isinstance(meta, dict) or not isinstance(meta.get("splits"), dict) or isinstance(num_classes, bool)
            or not isinstance(num_classes, int) or not 0 <= num_classes < 2**31):
        raise TokenDataError(f"{path} is not the meta.json of a tokens folder; re-run pipelines.encode with --overwrite")
    if meta.get("format") != TOKENS_FORMAT:
        raise TokenDataError(f"{path} has format {meta.get('format')!r}; re-run pipelines.encode with --overwrite")
    return meta


def token_layout(meta: dict) -> CodebookLayout:
    """The tokenizer's codebook layout recorded in a tokens folder's ``meta.json`` (new or old format)."""
    data = meta.get("layout") or meta.get("vocab_info")
    if not isinstance(data, dict):
        raise TokenDataError("the tokens' meta.json records no codebook layout; re-run pipelines.encode with --overwrite")
    return CodebookLayout.from_dict(data)


def load_split_tensors(directory: str | Path, meta: dict, split: str) -> dict[str, torch.Tensor]:
    """The tensors of one encoded split, checked: the file is a plain name inside ``directory``, ``tokens`` is
    (N, h, w) of an integer type with ids of the recorded layout, ``labels`` is (N,) of an integer type.

    Raises ``TokenDataError`` (or ``CorruptFileError``) naming the file.
    """
    entry = meta["splits"][split] if isinstance(meta.get("splits"), dict) else None
    name = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not re.fullmatch(r"\w+\.safetensors", name):
        raise TokenDataError(f"{Path(directory) / TOKENS_META} names {name!r} as the file of split {split!r}; a tokens "
                             "folder holds its splits as NAME.safetensors beside meta.json: re-run pipelines.encode")
    path = Path(directory) / name
    tensors = load_safetensors(path)
    tokens, labels = tensors.get("tokens"), tensors.get("labels")
    integer = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
    grid = tuple(meta.get("grid") or ())
    if (tokens is None or labels is None or tokens.dtype not in integer or labels.dtype not in integer
            or tokens.dim() != 3 or labels.shape != (tokens.shape[0],) or (grid and tuple(tokens.shape[1:]) != grid)):
        raise TokenDataError(f"{path} does not hold token grids {list(grid) or '(h, w)'} and their labels as "
                             "pipelines.encode writes them; re-run pipelines.encode")
    num_codes = token_layout(meta).num_codes
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= num_codes):
        raise TokenDataError(f"{path} holds token ids outside 0..{num_codes - 1} (the tokenizer's codes); re-run "
                             "pipelines.encode")
    return {"tokens": tokens, "labels": labels}


def load_token_split(directory: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (N, h, w) int64, labels (N,) int64) of one encoded split."""
    meta = read_token_meta(directory)
    if split not in meta["splits"]:
        raise TokenDataError(
            f"split {split!r} was not encoded in {directory} (have: {', '.join(meta['splits']) or 'none'}); "
            f"run pipelines.encode with --splits {split}"
        )
    tensors = load_split_tensors(directory, meta, split)
    return tensors["tokens"].long(), tensors["labels"].long()


class TokenDataset(Dataset):
    """One encoded split; items ``{"codes": (h, w) int64, "label": int64}``. Held compactly in memory."""

    def __init__(self, directory: str | Path, split: str):
        meta = read_token_meta(directory)
        if split not in meta["splits"]:
            load_token_split(directory, split)  # raises the explanatory error
        tensors = load_split_tensors(directory, meta, split)
        self.tokens = tensors["tokens"]  # (N, h, w) int16/int32
        self.labels = tensors["labels"]  # (N,) int64
        self.meta = meta
        self.num_classes = int(meta["num_classes"])

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"codes": self.tokens[i].long(), "label": self.labels[i]}

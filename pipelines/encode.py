"""Encode a data set into token ids with a trained tokenizer (input of the prior, stage 2).

Runs as ``python -m vqgen.pipelines.encode`` and under ``accelerate launch [--multi_gpu --num_processes N] -m``:
every process encodes its shard, the main process gathers the ids in data order and writes them::

    python -m vqgen.pipelines.encode --tokenizer-run RUN/tokenizer --output-dir RUN/tokens --splits train,validation

The data comes from the tokenizer run's ``config.yaml`` (its ``data`` section), the tokenizer from
``RUN/tokenizer/model``. Output layout: see ``prior.data``. A split already encoded with the same
tokenizer and the same data is skipped unless ``--overwrite``; tokens from another tokenizer are never
silently mixed with new ones.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from dataclasses import dataclass, field

from vqgen.core.records import file_inputs, make_record
from vqgen.pipelines.common import check_output_dir, entry_point, parse_cli, show_progress, use_cpu_processes
from vqgen.prior.data import TOKENS_FORMAT, TOKENS_META, TokenDataError, save_token_split, split_file
from vqgen.prior.model import tokenizer_record
from vqgen.core.config import ConfigError, from_dict, read_yaml, to_dict
from vqgen.tokenizer.data import SPLITS, DataConfig, build_dataset, make_dataloader
from vqgen.core.errors import MissingFileError
from vqgen.core.files import owns_folder
from vqgen.core.io import load_json, save_json
from vqgen.tokenizer.model import VQVAE


@dataclass
class EncodeConfig:
    """Settings of the encode stage (``encode.*`` in an experiment; flags of ``vqgen encode``)."""

    splits: list[str] = field(default_factory=lambda: ["train", "validation", "test"])
    batch_size: int = 256  # images per process and batch

    def validate(self) -> None:
        unknown = [s for s in self.splits if s not in SPLITS]
        if unknown or not self.splits:
            raise ValueError(f"splits must be a non-empty subset of {', '.join(SPLITS)}, got {self.splits}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


TOKENIZER_WEIGHTS = Path("tokenizer") / "model" / "model.safetensors"


def stage_record(cfg: EncodeConfig, run: Path) -> dict:
    return make_record("encode", cfg, file_inputs({"tokenizer": run / TOKENIZER_WEIGHTS}))


def stage_complete(cfg: EncodeConfig, run: Path) -> bool:
    """Every configured split is encoded by the run's current tokenizer."""
    meta_path = run / "tokens" / TOKENS_META
    weights = run / TOKENIZER_WEIGHTS
    if not meta_path.is_file() or not weights.is_file():
        return False
    meta = load_json(meta_path)
    current = tokenizer_record(weights.parent)["fingerprint"]
    return (meta.get("tokenizer") or {}).get("fingerprint") == current and all(
        s in meta.get("splits", {}) and (run / "tokens" / meta["splits"][s]["file"]).is_file() for s in cfg.splits)


def run_stage(cfg: EncodeConfig, run: Path) -> dict:
    return encode(run / "tokenizer", run / "tokens", cfg.splits, batch_size=cfg.batch_size)


def tokenizer_data_config(tokenizer_run: Path) -> DataConfig:
    """The ``data`` section of a tokenizer run's resolved ``config.yaml``."""
    config_path = tokenizer_run / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(
            f"{tokenizer_run} has no config.yaml; --tokenizer-run must be a tokenizer run folder "
            "(the --output-dir of pipelines.train_tokenizer)"
        )
    return from_dict(DataConfig, read_yaml(config_path).get("data") or {}, prefix="data.")


def _existing_meta(output_dir: Path, record: dict, overwrite: bool) -> dict | None:
    """The current ``meta.json`` if its splits can be reused with this tokenizer, else None."""
    path = output_dir / TOKENS_META
    if overwrite or not path.is_file():
        return None
    meta = load_json(path)
    if meta.get("format") != TOKENS_FORMAT:
        return None
    if meta["tokenizer"]["fingerprint"] != record["fingerprint"]:
        raise TokenDataError(
            f"{output_dir} holds tokens of another tokenizer ({meta['tokenizer']['path']}, fingerprint "
            f"{meta['tokenizer']['fingerprint'][:12]}); pass --overwrite to replace them, or choose another "
            "--output-dir"
        )
    return meta


@torch.no_grad()
def encode_split(model: VQVAE, dataset, batch_size: int, accelerator, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N, h, w) and labels (N,) of ``dataset`` in its order, gathered from every process."""
    loader = accelerator.prepare(make_dataloader(dataset, batch_size, shuffle=False))
    codes, labels = [], []
    for batch in tqdm(loader, desc=desc, disable=not show_progress(accelerator)):
        ids = model.encode(batch["image"])  # (B, h, w)
        # gather_for_metrics drops the samples Accelerate repeated to even out the last batch.
        ids, lab = accelerator.gather_for_metrics((ids, batch["label"]))
        codes.append(ids.cpu())
        labels.append(lab.cpu())
    h, w = model.config.grid
    if not codes:
        return torch.empty(0, h, w, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return torch.cat(codes), torch.cat(labels)


@owns_folder(lambda tokenizer_run, output_dir, *args, **kwargs: output_dir, "tokens")
def encode(
    tokenizer_run: str | Path,
    output_dir: str | Path,
    splits: Sequence[str] = ("train", "validation", "test"),
    overwrite: bool = False,
    batch_size: int = 256,
    data: DataConfig | None = None,
) -> dict:
    """Encode ``splits`` of the tokenizer run's data (or of ``data``) into ``output_dir``; returns ``meta.json``.

    Every process must call this under Accelerate; only the main process writes.
    """
    from accelerate import Accelerator

    tokenizer_run, output_dir = Path(tokenizer_run), Path(output_dir)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ConfigError(f"unknown split {unknown[0]!r}; --splits takes a comma-separated subset of {', '.join(SPLITS)}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    check_output_dir(output_dir)
    if not tokenizer_run.is_dir():
        raise MissingFileError(f"--tokenizer-run {tokenizer_run} is not a folder; give the tokenizer run folder "
                               "(the --output-dir of pipelines.train_tokenizer)")
    model_dir = tokenizer_run / "model"
    data_cfg = data if data is not None else tokenizer_data_config(tokenizer_run)
    record = tokenizer_record(model_dir)
    accelerator = Accelerator(cpu=use_cpu_processes())
    model = VQVAE.from_pretrained(model_dir).to(accelerator.device)
    previous = _existing_meta(output_dir, record, overwrite)
    meta = {
        "format": TOKENS_FORMAT,
        "layout": model.layout().to_dict(),
        "grid": list(model.config.grid),
        "num_classes": 0,
        "tokenizer": record,
        "data": to_dict(data_cfg),
        "splits": dict(previous["splits"]) if previous else {},
    }
    for split in splits:
        dataset = build_dataset(data_cfg, split)
        meta["num_classes"] = max(meta["num_classes"], int(getattr(dataset, "num_classes", 0)))
        done = meta["splits"].get(split)
        fingerprint = getattr(dataset, "fingerprint", None)
        if done and done.get("data_fingerprint") == fingerprint and (output_dir / done["file"]).is_file():
            accelerator.print(f"{split}: {done['count']} samples already encoded, skipping (--overwrite redoes it)")
            continue
        t0 = time.perf_counter()
        codes, labels = encode_split(model, dataset, batch_size, accelerator, desc=f"encode {split}")
        seconds = time.perf_counter() - t0
        if accelerator.is_main_process:
            save_token_split(output_dir, split, codes, labels, model.layout().num_codes)
            meta["splits"][split] = {
                "file": split_file(split),
                "count": int(codes.shape[0]),
                "data_fingerprint": fingerprint,
                "images_per_second": codes.shape[0] / seconds if seconds > 0 else None,
            }
            save_json(meta, output_dir / TOKENS_META)
            accelerator.print(f"{split}: {codes.shape[0]} images -> {tuple(codes.shape[1:])} tokens in {seconds:.1f}s")
        accelerator.wait_for_everyone()
    if accelerator.is_main_process and not (output_dir / TOKENS_META).is_file():
        save_json(meta, output_dir / TOKENS_META)
    accelerator.wait_for_everyone()
    return meta


@entry_point
def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point (see the module docstring)."""
    def paths(parser):
        parser.add_argument("--tokenizer-run", required=True, help="tokenizer run folder (holds config.yaml and model/)")
        parser.add_argument("--output-dir", required=True, help="where to write the tokens (e.g. RUN/tokens)")
        parser.add_argument("--overwrite", action="store_true", help="re-encode splits that are already there")

    cfg, args = parse_cli(EncodeConfig, argv, "Encode images into token ids with a trained tokenizer.", paths)
    return encode(args.tokenizer_run, args.output_dir, cfg.splits, overwrite=args.overwrite, batch_size=cfg.batch_size)


if __name__ == "__main__":
    main()

"""Sample images from a trained prior and its tokenizer.

Runs as ``python -m vqgen.pipelines.sample`` and under ``accelerate launch [--multi_gpu --num_processes N] -m``
(each process samples a contiguous share of the sample indices; the main process merges)::

    python -m vqgen.pipelines.sample --prior RUN/prior/model --output-dir RUN/samples --num-samples 1000 \
        --temperature 1.0 --top-k 100 --cfg-scale 2.0

Output (``eval`` reads these names)::

    images/00000.png ...   one PNG per sample, named by its global index
    grid.png               the first (up to) 64 samples
    tokens.safetensors     "tokens" (N, h, w) int64 joint ids, "labels" (N,) int64 (-1: unconditional)
    samples.npz            with --npz: the images as one ADM-style batch, arr_0 uint8 (N, H, W, 3)
    meta.json              sampling parameters, prior and tokenizer fingerprints, counts; written last

Sample ``i`` depends only on the prior, the parameters, the seed and ``i`` (see ``prior.sampling``), so
the result does not change with the batch size or the number of processes.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from safetensors.torch import save_file
from tqdm.auto import tqdm

from vqgen.core.records import file_inputs, make_record
from vqgen.pipelines.common import entry_point, parse_cli, show_progress, use_cpu_processes
from vqgen.pipelines.manifest import begin_samples, finish_samples, samples_complete
from vqgen.prior.model import Prior, check_tokenizer
from vqgen.prior.sampling import SamplingConfig, SamplingError, sample_labels, sample_tokens
from vqgen.tokenizer.data import denormalize, save_image_grid
from vqgen.core.errors import MissingFileError
from vqgen.core.diskspace import disk_full_guard
from vqgen.core.files import owns_folder
from vqgen.core.provenance import provenance
from vqgen.core.io import atomic_path, file_fingerprint, save_json
from vqgen.eval.image_sets import pack_folder
from vqgen.tokenizer.model import VQVAE

GRID_SAMPLES = 64


def stage_record(cfg: SamplingConfig, run: Path) -> dict:
    return make_record("sample", cfg, file_inputs({"prior": run / "prior" / "model" / "model.safetensors",
                                                   "tokenizer": run / "tokenizer" / "model" / "model.safetensors"}))


def stage_complete(cfg: SamplingConfig, run: Path) -> bool:
    return samples_complete(run / "samples")


def run_stage(cfg: SamplingConfig, run: Path) -> dict:
    return sample(run / "prior" / "model", run / "samples", cfg, tokenizer_dir=run / "tokenizer" / "model")


def resolve_tokenizer(prior: Prior, prior_dir: Path, tokenizer_dir: str | Path | None) -> Path:
    """The tokenizer to decode with: the given one (checked against the prior's record) or the recorded one."""
    if tokenizer_dir is None:
        tokenizer_dir = prior.tokenizer_dir
        if tokenizer_dir is None or not tokenizer_dir.is_dir():
            raise MissingFileError(
                f"the prior at {prior_dir} was trained with the tokenizer at {tokenizer_dir}, which is not there any "
                "more; pass --tokenizer DIR with that tokenizer's model/ directory"
            )
    check_tokenizer(prior.tokenizer, tokenizer_dir, f"the prior at {prior_dir}")
    return Path(tokenizer_dir)


@torch.no_grad()
def decode_to_uint8(tokenizer: VQVAE, codes: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Token grids (N, h, w) -> images (N, C, H, W) uint8, decoded in batches on the tokenizer's device."""
    device = next(tokenizer.parameters()).device
    out = [denormalize(tokenizer.decode(chunk.to(device))).cpu() for chunk in codes.split(batch_size)]
    c, s = tokenizer.config.in_channels, tokenizer.config.image_size
    return torch.cat(out) if out else torch.empty(0, c, s, s, dtype=torch.uint8)


def save_png(image: torch.Tensor, path: Path) -> None:
    """One uint8 image (C, H, W) as PNG (grey for one channel)."""
    array = image.permute(1, 2, 0).numpy()
    with disk_full_guard(path):
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)


@owns_folder(lambda prior_dir, output_dir, *args, **kwargs: output_dir, "samples", replaced=True)
def sample(
    prior_dir: str | Path,
    output_dir: str | Path,
    cfg: SamplingConfig,
    tokenizer_dir: str | Path | None = None,
    npz: bool = False,
) -> dict:
    """Draw ``cfg.num_samples`` images into ``output_dir``; returns the contents of ``meta.json``.

    ``npz``: also write ``samples.npz`` (every image as ADM's evaluator reads a sample batch).

    Every process must call this under Accelerate; each samples and writes the PNGs of its share, the
    main process writes the merged tokens, the grid and ``meta.json``. Everything is written into
    ``.<name>.partial`` beside ``output_dir`` and put in its place with ``manifest.json`` when complete
    (``pipelines.manifest``): a previous samples folder is replaced only then, and only when it holds nothing
    but the sampler's files.
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    try:
        cfg.validate()
    except ValueError as err:
        raise SamplingError(str(err)) from None
    prior_dir, final_dir = Path(prior_dir), Path(output_dir)
    accelerator = Accelerator(cpu=use_cpu_processes())
    prior = Prior.from_pretrained(prior_dir)
    tokenizer_dir = resolve_tokenizer(prior, prior_dir, tokenizer_dir)
    if cfg.cfg_scale != 1.0 and not prior.vocab.class_conditional:
        raise SamplingError("cfg_scale needs a class-conditional prior; use cfg_scale=1 for this one")
    sample_labels(prior, cfg, torch.arange(1))  # labels that are no classes of this prior fail here
    prior.to(accelerator.device)
    tokenizer = VQVAE.from_pretrained(tokenizer_dir).to(accelerator.device)

    # every file goes into the partial folder; finish_samples puts it in place of final_dir when complete
    output_dir = begin_samples(final_dir, accelerator.is_main_process, accelerator.wait_for_everyone)
    image_dir = output_dir / "images"

    with accelerator.split_between_processes(list(range(cfg.num_samples))) as share:
        indices = torch.tensor(share, dtype=torch.long)
    bar = tqdm(total=len(indices), desc=f"sample (process {accelerator.process_index})",
               disable=not show_progress(accelerator))
    t0 = time.perf_counter()
    codes, labels = sample_tokens(prior, cfg, indices, progress=bar.update)
    t_tokens = time.perf_counter() - t0
    bar.close()
    images = decode_to_uint8(tokenizer, codes, cfg.batch_size)
    for index, image in zip(indices.tolist(), images):
        save_png(image, image_dir / f"{index:05d}.png")
    seconds = time.perf_counter() - t0

    parts = gather_object([(indices, codes, labels, images[:GRID_SAMPLES])])
    accelerator.wait_for_everyone()
    meta = {
        "sampling": dataclasses.asdict(cfg),
        "num_samples": cfg.num_samples,
        "num_processes": accelerator.num_processes,
        "grid": list(prior.vocab.grid),
        "class_conditional": prior.vocab.class_conditional,
        "num_classes": prior.vocab.num_classes,
        "prior": {"path": str(prior_dir.resolve()), "fingerprint": file_fingerprint(prior_dir / "model.safetensors")},
        "tokenizer": prior.tokenizer,
        "tokens_seconds": t_tokens,
        "images_per_second": len(indices) / seconds * accelerator.num_processes if seconds > 0 else None,
        "provenance": provenance(),
    }
    if accelerator.is_main_process:
        order = torch.cat([p[0] for p in parts]).argsort()
        all_codes = torch.cat([p[1] for p in parts])[order]
        all_labels = torch.cat([p[2] for p in parts])[order]
        grid = torch.cat([p[3] for p in parts])[:GRID_SAMPLES]  # shares are contiguous: these are samples 0..63
        with atomic_path(output_dir / "tokens.safetensors") as tmp:
            save_file({"tokens": all_codes.long().contiguous(), "labels": all_labels.long().contiguous()}, str(tmp))
        save_image_grid(grid, output_dir / "grid.png")
        if npz:
            pack_folder(image_dir, output_dir / "samples.npz")
            meta["npz"] = "samples.npz"
        save_json(meta, output_dir / "meta.json")
        finish_samples(output_dir, final_dir, meta)
    accelerator.wait_for_everyone()
    return meta


@entry_point
def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point (see the module docstring); every ``SamplingConfig`` field is a flag
    (``--cfg-scale 1.5``, ``--labels 0,3``, ``--compile``, ``--no-cache``) or a ``key=value`` override."""
    def paths(parser):
        parser.add_argument("--prior", required=True, help="the prior's model/ directory (RUN/prior/model)")
        parser.add_argument("--tokenizer", help="tokenizer model/ directory (default: the one the prior records)")
        parser.add_argument("--output-dir", required=True, help="where to write the samples (e.g. RUN/samples)")
        parser.add_argument("--npz", action="store_true",
                            help="also write samples.npz: arr_0 uint8 (N, H, W, 3), the sample batch ADM's evaluator reads")

    cfg, args = parse_cli(SamplingConfig, argv, "Sample images from a trained prior and its tokenizer.", paths)
    return sample(args.prior, args.output_dir, cfg, args.tokenizer, npz=args.npz)


if __name__ == "__main__":
    main()

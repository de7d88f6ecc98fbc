"""Sample images from a trained prior and its tokenizer.

Runs as ``python -m vqgen.pipelines.sample`` and under ``accelerate launch [--multi_gpu --num_processes N] -m``
(each process samples a contiguous share of the sample indices; the main process merges)::

    python -m vqgen.pipelines.sample --prior RUN/prior/model --output-dir RUN/samples --num-samples 1000 \
        --temperature 1.0 --top-k 100 --cfg-scale 2.0

Output (``eval`` reads these names)::

    images/00000.png ...   one PNG per sample, named by its global index
    grid.png               the first (up to) 64 samples
    tokens.safetensors     "tokens" (N, h, w) int64 joint ids, "labels" (N,) int64 (-1: unconditional)
    meta.json              sampling parameters, prior and tokenizer fingerprints, counts; written last

Sample ``i`` depends only on the prior, the parameters, the seed and ``i`` (see ``prior.sampling``), so
the result does not change with the batch size or the number of processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from safetensors.torch import save_file
from tqdm.auto import tqdm

from vqgen.pipelines.common import add_debug_flag, check_output_dir, die, entry_point, show_progress, use_cpu_processes
from vqgen.prior.model import Prior, check_tokenizer
from vqgen.prior.sampling import DECODERS, SamplingConfig, SamplingError, sample_tokens
from vqgen.core.config import from_dict
from vqgen.tokenizer.data import denormalize, save_image_grid
from vqgen.core.errors import MissingFileError
from vqgen.core.provenance import provenance
from vqgen.core.io import atomic_path, file_fingerprint, save_json
from vqgen.tokenizer.model import VQVAE

GRID_SAMPLES = 64


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
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)


def sample(
    prior_dir: str | Path,
    output_dir: str | Path,
    cfg: SamplingConfig,
    tokenizer_dir: str | Path | None = None,
) -> dict:
    """Draw ``cfg.num_samples`` images into ``output_dir``; returns the contents of ``meta.json``.

    Every process must call this under Accelerate; each samples and writes the PNGs of its share, the
    main process writes the merged tokens, the grid and ``meta.json``.
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    try:
        cfg.validate()
    except ValueError as err:
        raise SamplingError(str(err)) from None
    prior_dir, output_dir = Path(prior_dir), Path(output_dir)
    check_output_dir(output_dir)  # before loading anything
    accelerator = Accelerator(cpu=use_cpu_processes())
    prior = Prior.from_pretrained(prior_dir)
    tokenizer_dir = resolve_tokenizer(prior, prior_dir, tokenizer_dir)
    prior.to(accelerator.device)
    tokenizer = VQVAE.from_pretrained(tokenizer_dir).to(accelerator.device)

    image_dir = output_dir / "images"
    if accelerator.is_main_process:
        # meta.json marks a finished run: remove it (and old images) before anything new is written.
        (output_dir / "meta.json").unlink(missing_ok=True)
        shutil.rmtree(image_dir, ignore_errors=True)
        image_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()

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
        save_json(meta, output_dir / "meta.json")
    accelerator.wait_for_everyone()
    return meta


@entry_point
def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point (see the module docstring)."""
    defaults = SamplingConfig()
    parser = argparse.ArgumentParser(description="Sample images from a trained prior and its tokenizer.")
    parser.add_argument("--prior", required=True, help="the prior's model/ directory (RUN/prior/model)")
    parser.add_argument("--tokenizer", help="tokenizer model/ directory (default: the one the prior records)")
    parser.add_argument("--output-dir", required=True, help="where to write the samples (e.g. RUN/samples)")
    parser.add_argument("--num-samples", type=int, default=defaults.num_samples)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="samples per process and batch")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0 = off")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="1 = off")
    parser.add_argument("--cfg-scale", type=float, default=defaults.cfg_scale, help="classifier-free guidance; 1 = off")
    parser.add_argument("--labels", default="", help="comma-separated class labels, cycled (default: all classes)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-cache", action="store_true", help="re-run the whole prefix each step (slow; for checks)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decoding step (the first batch pays the compilation)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="capture the decoding step as one CUDA graph per batch size (CUDA only)")
    parser.add_argument("--decoder", choices=DECODERS, default=defaults.decoder,
                        help="vqgen: vqgen's decoding step; transformers: the model's forward with its StaticCache")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    try:
        labels = [int(x) for x in args.labels.split(",") if x.strip()]
    except ValueError:
        die(f"--labels must be comma-separated integers, got {args.labels!r}")
    cfg = from_dict(SamplingConfig, {
        "num_samples": args.num_samples, "batch_size": args.batch_size, "temperature": args.temperature,
        "top_k": args.top_k, "top_p": args.top_p, "cfg_scale": args.cfg_scale, "labels": labels,
        "use_cache": not args.no_cache, "compile": args.compile, "seed": args.seed,
        "cuda_graph": args.cuda_graph, "decoder": args.decoder,
    })
    return sample(args.prior, args.output_dir, cfg, args.tokenizer)


if __name__ == "__main__":
    main()

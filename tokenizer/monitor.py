"""What a tokenizer run shows while it trains: reconstruction grids of a fixed validation batch.

:func:`write_recon_grid` writes ``RUN/recon/step_XXXXXXXX.png`` (the originals in the upper row(s), their
reconstructions below) and gives the same picture to every tracker that takes images (TensorBoard). It runs in
eval mode, without gradients, outside the global random streams (``torch.random.fork_rng``), on the main process
only, so a run with grids trains exactly the weights of a run without them. The trainer calls it every
``train.recon_every`` optimizer steps (and at the last step) with the batch :func:`fixed_batch` took once.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from vqgen.core.io import atomic_path

RECON_DIR = "recon"
MIN_SHOWN = 64  # images narrower than this are enlarged by a whole factor (nearest neighbour) in the grid
RECON_IMAGES = 8  # images of the fixed validation batch (one row of originals, one of reconstructions)


def fixed_batch(dataset: Dataset, n: int = RECON_IMAGES) -> torch.Tensor:
    """The first ``n`` images of ``dataset`` (a validation split: never augmented, same order every run),
    stacked (n, C, H, W) in [-1, 1]."""
    n = min(n, len(dataset))
    return torch.stack([dataset[i]["image"] for i in range(n)])


def recon_due(step: int, every: int, total: int) -> bool:
    """Whether optimizer step ``step`` (counted from 1) gets a grid: every ``every`` steps and the last one;
    never when ``every`` is 0."""
    return every > 0 and (step % every == 0 or step == total)


def recon_path(run_dir: str | Path, step: int) -> Path:
    """``RUN/recon/step_XXXXXXXX.png`` (eight digits, so the files sort by step)."""
    return Path(run_dir) / RECON_DIR / f"step_{step:08d}.png"


@torch.no_grad()
def recon_grid(model: torch.nn.Module, images: torch.Tensor, quantize: bool = True, alpha: float = 0.0) -> torch.Tensor:
    """Originals above their reconstructions as one image grid, float (3, H', W') in [0, 1] (grey images are
    repeated to three channels by ``make_grid``; images under ``MIN_SHOWN`` pixels are enlarged, nearest neighbour).

    ``model`` is the unwrapped tokenizer; ``quantize`` / ``alpha`` are the training phase's (the continuous phase
    of deferred quantization shows the continuous reconstruction). The global random state is left as it was.
    """
    from torchvision.utils import make_grid

    device = next(model.parameters()).device
    was_training = model.training
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model.eval()
        try:
            recon = model(images.to(device), quantize=quantize, alpha=alpha).recon.float().cpu()
        finally:
            model.train(was_training)
    both = torch.cat([images.float().cpu(), recon]).clamp(-1, 1)  # (2n, C, H, W)
    factor = max(1, MIN_SHOWN // both.shape[-1])  # small images are enlarged (nearest) so that the grid can be read
    if factor > 1:
        both = both.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    return make_grid((both + 1) / 2, nrow=images.shape[0], padding=2, pad_value=1.0)


def write_recon_grid(model: torch.nn.Module, images: torch.Tensor, run_dir: str | Path, step: int,
                     quantize: bool = True, alpha: float = 0.0, accelerator=None) -> Path | None:
    """Write the grid of :func:`recon_grid` to :func:`recon_path` atomically and log it to the trackers that take
    images (as ``recon``); returns the path. With an ``accelerator`` only its main process does this (None
    elsewhere)."""
    from torchvision.utils import save_image

    if accelerator is not None and not accelerator.is_main_process:
        return None
    grid = recon_grid(model, images, quantize, alpha)
    path = recon_path(run_dir, step)
    with atomic_path(path) as tmp:
        save_image(grid, str(tmp), format="png")
    if accelerator is not None:
        log_image(accelerator, "recon", grid, step)
    return path


def log_image(accelerator, name: str, image: torch.Tensor, step: int) -> None:
    """Give ``image`` (C, H, W) float in [0, 1] to every tracker of ``accelerator`` that takes images: TensorBoard
    (through Accelerate's ``log_images``, which writes a batch (N, C, H, W)). Other trackers are skipped."""
    for tracker in getattr(accelerator, "trackers", []):
        if getattr(tracker, "name", None) == "tensorboard" and hasattr(tracker, "log_images"):
            tracker.log_images({name: image[None]}, step=step)

"""Small collective helpers that are no-ops when ``torch.distributed`` is not initialised.

Quantizers call these directly (not through Accelerate) so that the same code runs in one process, under
``accelerate launch --multi_gpu`` (NCCL on GPUs, gloo on CPUs) and under plain ``torchrun``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_dist() else 0


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes, in place; returns ``t``."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` on every process with the value on rank ``src``, in place; returns ``t``."""
    if is_dist():
        dist.broadcast(t, src=src)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (R_i, ...) from all processes along dim 0, in rank order.

    The row counts R_i may differ between processes (they are exchanged first, which syncs with the
    host; this is meant for rare operations such as k-means initialisation and dead-code resets).
    """
    if not is_dist():
        return t
    t = t.contiguous()
    n = world_size()
    sizes = torch.tensor([t.shape[0]], device=t.device, dtype=torch.int64)
    all_sizes = [torch.zeros_like(sizes) for _ in range(n)]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s) for s in all_sizes]
    longest = max(counts)
    # all_gather needs equal shapes: pad every contribution to the longest one, cut afterwards.
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0)


def shutdown() -> None:
    """Tear the process group down in order at the end of a command (gloo aborts a process that exits while its
    threads still hold connections); nothing on one process."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

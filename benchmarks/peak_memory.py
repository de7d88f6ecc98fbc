"""Peak extra memory of one call, shared by the benchmark scripts (imported as a sibling module).

CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the call. CPU: the resident
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident size before the call
(Linux only). On the CPU this follows live tensors only once ``pin_mmap_threshold()`` has made glibc return
freed large blocks to the system; that setting is process-wide, so measure in a process of its own.
"""

from __future__ import annotations

import ctypes

import torch

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def pin_mmap_threshold() -> bool:
    """Make glibc serve every allocation >= 64 KiB with mmap (returned to the OS on free); False if it could not."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 16))
    except OSError:
        return False


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_mb(fn, device: torch.device | str) -> float:
    """Peak memory (MiB) that ``fn()`` allocates beyond what was live before it, on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    base = _status_kb("VmRSS")
    fn()
    return max(_status_kb("VmHWM") - base, 0) / 1024

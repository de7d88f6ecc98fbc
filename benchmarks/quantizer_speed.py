"""Speed of one EMA-quantizer training step over the W = 65536 ladder, against its two reference points.

For every (N, D) of the ladder and ``--vectors`` input vectors it times
  ours:   our ``EMAQuantizer`` train step (assignment + EMA update + backward),
  matmul: the one distance matrix product ``x @ codes.T`` of that shape (the part no method can avoid),
  peer:   ``vector_quantize_pytorch.VectorQuantize`` with matching settings (EMA decay 0.99,
          commitment 0.25, no rotation trick, no k-means), same train step,
as medians (and minima, ``*_min_ms``) over ``--repeats`` interleaved runs after a warm-up, with
``--threads`` CPU threads, and the peak extra memory of both train steps. Both backpropagate
``(quantized * g).sum() + loss`` with a fixed random upstream gradient ``g``, as a decoder would.
On a machine shared with other work, timings with 2 threads swing by 10x or more; compare within a row.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's resident high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident size before the step, with glibc's
mmap threshold pinned at 64 KiB so that freed tensors go back to the system and the high-water mark follows
live tensors. This setting is process-wide and makes large allocations fault in fresh pages, so memory is
measured in a separate process (started first) and the timings run with the default allocator.

    python benchmarks/quantizer_speed.py [--repeats 3] [--vectors 4096] [--json rows.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from tokenizer.quantizers import QuantizerConfig
from tokenizer.quantizers.ema import EMAQuantizer

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _pin_mmap_threshold() -> bool:
    """Make glibc serve every allocation >= 64 KiB with mmap (returned to the OS on free)."""
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


def peak_mb(fn, device: torch.device) -> float:
    """Peak memory (MiB) that ``fn()`` allocates beyond what was live before it."""
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


def interleaved_times(fns: list, repeats: int, device: torch.device) -> list[list[float]]:
    """Wall times (ms) of ``repeats`` calls of each of ``fns``, after one warm-up call each.

    The functions run in turn within every repeat, so load from other processes on a shared machine
    affects all of them alike.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    sync()
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            sync()
            bucket.append((time.perf_counter() - start) * 1e3)
    return times


def make_steps(n: int, d: int, vectors: int, device: torch.device):
    """Closures for the three measured operations on one (N, D) shape."""
    from vector_quantize_pytorch import VectorQuantize

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(vectors, d, generator=gen).to(device)  # (M, D)
    upstream = torch.randn(vectors, d, generator=gen).to(device)  # (M, D) gradient from "the decoder"
    codes = torch.randn(n, d, generator=gen).to(device)  # (N, D)

    ours = EMAQuantizer(QuantizerConfig(kind="ema", codebook_size=n, dim=d, decay=0.99, beta=0.25)).to(device).train()
    peer = VectorQuantize(
        dim=d, codebook_size=n, decay=0.99, commitment_weight=0.25, rotation_trick=False, kmeans_init=False
    ).to(device).train()

    def ours_step() -> None:
        z = x.clone().requires_grad_(True)
        out = ours(z)
        ((out.quantized * upstream).sum() + out.loss).backward()

    def matmul_step() -> None:
        x @ codes.T

    def peer_step() -> None:
        z = x.unsqueeze(0).clone().requires_grad_(True)  # (1, M, D)
        quantized, _, loss = peer(z)
        ((quantized[0] * upstream).sum() + loss.sum()).backward()

    return ours_step, matmul_step, peer_step


def measure_peaks(vectors: int, threads: int, device_name: str) -> list[tuple[float, float]]:
    """Peak extra memory (MiB) of one train step, (ours, peer) per ladder shape.

    Runs in a fresh process (see ``run``) so that glibc's mmap threshold is pinned before any tensor exists.
    """
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    if device.type == "cpu" and not _pin_mmap_threshold():
        print("warning: could not pin glibc's mmap threshold; CPU peak memory may be underestimated", file=sys.stderr)
    peaks = []
    for n, d in QuantizerConfig(kind="adaptive").ladder():
        ours_step, _, peer_step = make_steps(n, d, vectors, device)
        ours_step(), peer_step()  # warm-up: one-time allocations are not part of a step
        peaks.append((peak_mb(ours_step, device), peak_mb(peer_step, device)))
    return peaks


def run(repeats: int, vectors: int, threads: int, device: torch.device) -> list[dict]:
    """One row per (N, D) of the default W = 65536 ladder."""
    # Memory is measured in a fresh process: pinning the mmap threshold there (see module docstring) keeps
    # page faults out of the timings here, and no earlier heap growth hides allocations from VmHWM.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        peaks = pool.submit(measure_peaks, vectors, threads, str(device)).result()
    torch.set_num_threads(threads)
    rows = []
    for (n, d), (ours_mb, peer_mb) in zip(QuantizerConfig(kind="adaptive").ladder(), peaks):
        ours_step, matmul_step, peer_step = make_steps(n, d, vectors, device)
        times = interleaved_times([ours_step, matmul_step, peer_step], repeats, device)
        row = {"N": n, "D": d}
        for name, bucket in zip(("ours", "matmul", "peer"), times):
            row[f"{name}_ms"] = statistics.median(bucket)
        for name, bucket in zip(("ours", "matmul", "peer"), times):
            row[f"{name}_min_ms"] = min(bucket)  # least disturbed run, for loaded machines
        row.update(
            peak_mb=ours_mb,
            peer_peak_mb=peer_mb,
            vs_matmul=row["ours_ms"] / row["matmul_ms"],
            speedup_vs_peer=row["peer_ms"] / row["ours_ms"],
        )
        rows.append(row)
        print(_format_row(row), flush=True)
    return rows


def _format_row(r: dict) -> str:
    return (
        f"{r['N']:>6} {r['D']:>4} {r['ours_ms']:>9.2f} {r['matmul_ms']:>10.2f} {r['peer_ms']:>9.2f} "
        f"{r['vs_matmul']:>10.2f} {r['speedup_vs_peer']:>9.1f} {r['peak_mb']:>8.1f} {r['peer_peak_mb']:>9.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--vectors", type=int, default=4096, help="input vectors per step")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", type=Path, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.vectors < 1 or args.threads < 1:
        parser.error("--repeats, --vectors and --threads must be >= 1")
    device = torch.device(args.device)
    print(f"device={device} threads={args.threads} vectors={args.vectors} repeats={args.repeats} (times: median ms)")
    print(f"{'N':>6} {'D':>4} {'ours_ms':>9} {'matmul_ms':>10} {'peer_ms':>9} {'ours/mm':>10} {'peer/ours':>9} "
          f"{'peak_mb':>8} {'peer_mb':>9}")
    rows = run(args.repeats, args.vectors, args.threads, device)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Speed of one quantizer training step, ours against vector-quantize-pytorch's own implementation.

One row per (kind, shape), ``--json`` rows carry ``kind`` (``ema``, ``vq``, ``simvq``, ``fsq``, ``lfq``),
``rotation_trick``, ``N`` (vocabulary), ``D`` (code width) and for ``fsq`` its ``levels``:
  ema    every (N, D) of the W = 65536 ladder: our ``EMAQuantizer`` vs ``VectorQuantize`` (EMA decay 0.99,
         commitment 0.25, no rotation trick, no k-means);
  ema / vq with ``rotation_trick``: vs ``VectorQuantize(rotation_trick=True)`` (EMA, or a learnable codebook
         without EMA for ``vq``);
  simvq  vs ``SimVQ`` (its default rotation trick, and without);
  fsq    vs ``FSQ(levels)`` (the FSQ paper's recommended level sets);
  lfq    vs ``LFQ`` (entropy weight 0.1, commitment 0.25, diversity 1; D = log2 N);
and, for kinds with an explicit codebook, the one distance matrix product ``x @ codes.T`` of that shape (the
part no nearest-code method can avoid). A train step is the forward (assignment, codebook update where
there is one) and the backward of ``(quantized * g).sum() + loss`` with a fixed random upstream gradient
``g``, as a decoder would. Times are medians (and minima, ``*_min_ms``) over ``--repeats`` interleaved runs
after a warm-up, with ``--threads`` CPU threads, plus the peak extra memory of both train steps. On a
machine shared with other work, timings with 2 threads swing by 10x or more; compare within a row.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's resident high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident size before the step, with glibc's
mmap threshold pinned at 64 KiB so that freed tensors go back to the system and the high-water mark follows
live tensors. This setting is process-wide and makes large allocations fault in fresh pages, so memory is
measured in a separate process (started first) and the timings run with the default allocator.

    python benchmarks/quantizer_speed.py [--repeats 3] [--vectors 4096] [--kinds ema,fsq,...] [--json rows.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import math
from dataclasses import dataclass, field

import torch

from peak_memory import peak_mb, pin_mmap_threshold  # benchmarks/peak_memory.py
from vqgen.tokenizer.quantizers import QuantizerConfig, build_quantizer


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


@dataclass(frozen=True)
class Case:
    """One benchmark row: a kind and shape, configured the same way for ours and the peer."""

    kind: str
    n: int  # vocabulary
    d: int  # code width
    rotation_trick: bool = False
    levels: tuple[int, ...] = field(default=())

    @property
    def explicit(self) -> bool:
        """Whether there is a codebook matrix to search (and so a distance product to compare with)."""
        return self.kind in ("ema", "vq", "simvq")

    def ours(self) -> torch.nn.Module:
        if self.kind == "fsq":
            cfg = QuantizerConfig(kind="fsq", dim=self.d, levels=list(self.levels))
        elif self.kind == "lfq":
            cfg = QuantizerConfig(kind="lfq", dim=self.d, codebook_size=self.n, beta=0.25, entropy_weight=0.1,
                                  entropy_gamma=1.0, entropy_temperature=0.01)
        else:
            extra = {"decay": 0.99} if self.kind == "ema" else {}
            cfg = QuantizerConfig(kind=self.kind, codebook_size=self.n, dim=self.d, beta=0.25,
                                  rotation_trick=self.rotation_trick, **extra)
        return build_quantizer(cfg)

    def peer(self) -> torch.nn.Module:
        import vector_quantize_pytorch as vqp

        if self.kind == "fsq":
            return vqp.FSQ(levels=list(self.levels))
        if self.kind == "lfq":
            # inv_temperature 100 in its forward = our entropy_temperature 0.01
            return vqp.LFQ(dim=self.d, codebook_size=self.n, entropy_loss_weight=0.1, commitment_loss_weight=0.25,
                           diversity_gamma=1.0)
        if self.kind == "simvq":
            return vqp.SimVQ(dim=self.d, codebook_size=self.n, rotation_trick=self.rotation_trick,
                             input_to_quantize_commit_loss_weight=0.25)
        if self.kind == "vq":  # a codebook learned by its gradient, no EMA
            return vqp.VectorQuantize(dim=self.d, codebook_size=self.n, commitment_weight=0.25, ema_update=False,
                                      learnable_codebook=True, rotation_trick=self.rotation_trick, kmeans_init=False)
        return vqp.VectorQuantize(dim=self.d, codebook_size=self.n, decay=0.99, commitment_weight=0.25,
                                  rotation_trick=self.rotation_trick, kmeans_init=False)

    def describe(self) -> dict:
        row = {"kind": self.kind, "rotation_trick": self.rotation_trick, "N": self.n, "D": self.d}
        if self.levels:
            row["levels"] = list(self.levels)
        return row


def fsq_case(levels: tuple[int, ...]) -> Case:
    return Case("fsq", math.prod(levels), len(levels), levels=levels)


def cases(kinds: set[str]) -> list[Case]:
    """Every row of the selected kinds, in table order."""
    rows = []
    if "ema" in kinds:
        rows += [Case("ema", n, d) for n, d in QuantizerConfig(kind="adaptive").ladder()]
        rows += [Case("ema", n, d, rotation_trick=True) for n, d in ((512, 64), (4096, 16))]
    if "vq" in kinds:
        rows += [Case("vq", n, d, rotation_trick=True) for n, d in ((512, 64), (4096, 16))]
    if "simvq" in kinds:
        rows += [Case("simvq", n, d, rotation_trick=True) for n, d in ((512, 64), (4096, 16))]
        rows += [Case("simvq", 512, 64)]
    if "fsq" in kinds:  # the FSQ paper's level sets for about 2^8, 2^10 and 2^16 codes
        rows += [fsq_case(levels) for levels in ((8, 6, 5), (8, 5, 5, 5), (8, 8, 8, 5, 5, 5))]
    if "lfq" in kinds:
        rows += [Case("lfq", 2**d, d) for d in (8, 10, 12, 14)]
    return rows


def make_steps(case: Case, vectors: int, device: torch.device):
    """Closures for the measured operations of one row: ours, the distance product (or None), the peer."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(vectors, case.d, generator=gen).to(device)  # (M, D)
    upstream = torch.randn(vectors, case.d, generator=gen).to(device)  # (M, D) gradient from "the decoder"
    codes = torch.randn(case.n, case.d, generator=gen).to(device)  # (N, D)
    torch.manual_seed(0)
    ours = case.ours().to(device).train()
    peer = case.peer().to(device).train()

    def ours_step() -> None:
        z = x.clone().requires_grad_(True)
        out = ours(z)
        ((out.quantized * upstream).sum() + out.loss).backward()

    def matmul_step() -> None:
        x @ codes.T

    def peer_step() -> None:
        z = x.unsqueeze(0).clone().requires_grad_(True)  # (1, M, D)
        out = peer(z)
        loss = out[2].sum() if len(out) > 2 else 0.0  # FSQ returns (quantized, indices): no loss
        ((out[0][0] * upstream).sum() + loss).backward()

    return ours_step, (matmul_step if case.explicit else None), peer_step


def measure_peaks(rows: list[Case], vectors: int, threads: int, device_name: str) -> list[tuple[float, float]]:
    """Peak extra memory (MiB) of one train step, (ours, peer) per row.

    Runs in a fresh process (see ``run``) so that glibc's mmap threshold is pinned before any tensor exists.
    """
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    if device.type == "cpu" and not pin_mmap_threshold():
        print("warning: could not pin glibc's mmap threshold; CPU peak memory may be underestimated", file=sys.stderr)
    peaks = []
    for case in rows:
        ours_step, _, peer_step = make_steps(case, vectors, device)
        ours_step(), peer_step()  # warm-up: one-time allocations are not part of a step
        peaks.append((peak_mb(ours_step, device), peak_mb(peer_step, device)))
    return peaks


def run(repeats: int, vectors: int, threads: int, device: torch.device, kinds: set[str] | None = None) -> list[dict]:
    """One row per case of the selected kinds (all by default)."""
    rows_to_run = cases(kinds or set(KINDS))
    # Memory is measured in a fresh process: pinning the mmap threshold there (see module docstring) keeps
    # page faults out of the timings here, and no earlier heap growth hides allocations from VmHWM.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        peaks = pool.submit(measure_peaks, rows_to_run, vectors, threads, str(device)).result()
    torch.set_num_threads(threads)
    rows = []
    for case, (ours_mb, peer_mb) in zip(rows_to_run, peaks):
        ours_step, matmul_step, peer_step = make_steps(case, vectors, device)
        fns = {"ours": ours_step, "peer": peer_step}
        if matmul_step is not None:
            fns["matmul"] = matmul_step
        times = dict(zip(fns, interleaved_times(list(fns.values()), repeats, device)))
        row = case.describe()
        for name in ("ours", "matmul", "peer"):
            row[f"{name}_ms"] = statistics.median(times[name]) if name in times else None
        for name in ("ours", "matmul", "peer"):
            row[f"{name}_min_ms"] = min(times[name]) if name in times else None  # least disturbed run
        row.update(
            repeats=repeats,
            peak_mb=ours_mb,
            peer_peak_mb=peer_mb,
            vs_matmul=row["ours_ms"] / row["matmul_ms"] if row["matmul_ms"] else None,
            speedup_vs_peer=row["peer_ms"] / row["ours_ms"],
            # per repeat, ours and the peer ran back to back: the median of those ratios is robust to load swings
            speedup_vs_peer_paired=statistics.median(p / o for p, o in zip(times["peer"], times["ours"])),
        )
        rows.append(row)
        print(_format_row(row), flush=True)
    return rows


def _format_row(r: dict) -> str:
    name = r["kind"] + ("+rot" if r["rotation_trick"] else "")
    shape = "x".join(map(str, r["levels"])) if "levels" in r else f"{r['N']}x{r['D']}"
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    return (
        f"{name:>9} {shape:>12} {r['ours_ms']:>9.2f} {fmt(r['matmul_ms'], '>10.2f')} {r['peer_ms']:>9.2f} "
        f"{fmt(r['vs_matmul'], '>8.2f')} {r['speedup_vs_peer']:>9.2f} {r['speedup_vs_peer_paired']:>9.2f} "
        f"{r['peak_mb']:>8.1f} {r['peer_peak_mb']:>9.1f}"
    )


KINDS = ("ema", "vq", "simvq", "fsq", "lfq")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--vectors", type=int, default=4096, help="input vectors per step")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--json", type=Path, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.vectors < 1 or args.threads < 1:
        parser.error("--repeats, --vectors and --threads must be >= 1")
    kinds = {k.strip() for k in args.kinds.split(",") if k.strip()}
    if not kinds or kinds - set(KINDS):
        parser.error(f"--kinds takes a comma-separated subset of {','.join(KINDS)}")
    device = torch.device(args.device)
    print(f"device={device} threads={args.threads} vectors={args.vectors} repeats={args.repeats} (times: median ms)")
    print(f"{'kind':>9} {'N x D':>12} {'ours_ms':>9} {'matmul_ms':>10} {'peer_ms':>9} {'ours/mm':>8} {'peer/ours':>9} "
          f"{'paired':>9} {'peak_mb':>8} {'peer_mb':>9}")
    rows = run(args.repeats, args.vectors, args.threads, device, kinds)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

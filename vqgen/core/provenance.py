"""Which code, packages and machine produced a result: recorded with every stage and every study run.

``provenance()`` returns::

    {"commit": "<git HEAD of the source checkout>" | None, "dirty": bool | None,
     "code_sha256": "<sha256 of vqgen's own source files>", "versions": {"torch": ..., ...},
     "machine": "2-core AMD EPYC", "python": "3.11.7"}

``commit`` and ``dirty`` come from git when vqgen runs from a checkout (None for an installed copy);
``dirty`` is true when a tracked or new file under vqgen's packages or ``benchmarks/`` differs from the
commit. ``code_sha256`` fingerprints the Python files of the packages themselves, so two runs whose
fingerprints agree ran the same library code with or without git.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

GIT_PATHS = ("vqgen", "tokenizer", "prior", "pipelines", "eval", "benchmarks")  # what "dirty" looks at
PACKAGES = ("vqgen.core", "vqgen.tokenizer", "vqgen.prior", "vqgen.pipelines", "vqgen.eval")
DISTRIBUTIONS = ("torch", "transformers", "accelerate", "torch-fidelity", "datasets", "numpy", "safetensors", "vqgen")


def package_dirs() -> dict[str, Path]:
    """Where each of vqgen's packages is loaded from (a source checkout's folders, or site-packages)."""
    import importlib

    return {name: Path(importlib.import_module(name).__file__).resolve().parent for name in PACKAGES}


def code_fingerprint() -> str:
    """sha256 over the package-relative path and bytes of every ``.py`` file of vqgen's packages, sorted, so the
    same code gives the same fingerprint in a checkout and installed."""
    digest = hashlib.sha256()
    for name, folder in package_dirs().items():
        for path in sorted(folder.rglob("*.py")):
            digest.update(f"{name}/{path.relative_to(folder).as_posix()}".encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def checkout_root() -> Path:
    """The folder holding ``tokenizer/`` (and, in a checkout, ``.git``)."""
    return package_dirs()["vqgen.tokenizer"].parent


def git_state(root: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout at ``root`` (default: vqgen's); (None, None) when it is not a git checkout."""
    root = checkout_root() if root is None else root
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        if Path(git("rev-parse", "--show-toplevel").strip()).resolve() != root.resolve():
            return None, None  # vqgen installed inside some other repository: its HEAD says nothing about us
        dirty = bool(git("status", "--porcelain", "--", *GIT_PATHS).strip())
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, dirty


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide a result (None for one that is not installed)."""
    out = {}
    for name in DISTRIBUTIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_summary() -> str:
    """'<cores>-core <CPU model>' (and the GPU when there is one): what a result or a wall time came from."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()}-core {cpu}{gpu}"


@functools.lru_cache(maxsize=1)
def provenance() -> dict:
    """Commit, dirty flag, code fingerprint, package versions, machine and Python of this process (cached)."""
    commit, dirty = git_state()
    return {"commit": commit, "dirty": dirty, "code_sha256": code_fingerprint(), "versions": versions(),
            "machine": machine_summary(), "python": platform.python_version()}


def same_code(a: dict | None, b: dict | None) -> bool:
    """Whether two provenance records name the same code (fingerprint, and commit where both have one)."""
    if not a or not b:
        return False
    if a.get("code_sha256") != b.get("code_sha256"):
        return False
    return a.get("commit") is None or b.get("commit") is None or a.get("commit") == b.get("commit")


def describe(p: dict | None) -> str:
    """``abc1234`` / ``abc1234+dirty`` / ``code 0f3a9c2e1b7d`` (no git): a short name of a provenance record."""
    if not p:
        return "unrecorded code"
    if p.get("commit"):
        return p["commit"][:7] + ("+dirty" if p.get("dirty") else "")
    return f"code {str(p.get('code_sha256', ''))[:12]}"

"""Shared test fixtures."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# torch.compile's on-disk kernel cache is not keyed by ATEN_CPU_CAPABILITY (which also picks inductor's vector ISA):
# kernels cached by a run with another setting give wrong numbers. A run that sets it keeps a cache of its own.
_CAPABILITY = os.environ.get("ATEN_CPU_CAPABILITY")
if _CAPABILITY and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"torchinductor_vqgen_{_CAPABILITY}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private VQGEN_CACHE, so tests never touch (or reuse) the user's cache."""
    path = tmp_path_factory.mktemp("vqgen_cache")
    old = os.environ.get("VQGEN_CACHE")
    os.environ["VQGEN_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("VQGEN_CACHE")
    else:
        os.environ["VQGEN_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One finished tiny experiment (tokenizer, tokens, prior, samples; no report), made once per session.

    Tests that change files copy it first (``shutil.copytree``); it must stay as it is.
    """
    from pathlib import Path

    from vqgen.pipelines.run import load_experiment, run_experiment

    run = tmp_path_factory.mktemp("tiny_run") / "run"
    tiny = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "tiny.yaml"
    run_experiment(load_experiment(tiny, [f"output_dir={run}", "stages=[tokenizer, encode, prior, sample]"]))
    return run


@pytest.fixture
def kill_and_resume(tmp_path):
    """``run(command, kill_at)`` trains with ``command`` (a trainer's argv without ``--output-dir``) twice: once to
    the end in ``tmp_path/full``, once in ``tmp_path/part`` killed with SIGKILL as soon as its checkpoint folder
    ``kill_at`` exists and then started again with the same command. Returns the two run folders."""

    env = {**os.environ, "PYTHONPATH": str(REPO), "VQGEN_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}

    def train(command: list[str], out: Path) -> subprocess.Popen:
        # output to a file, not a pipe: a full pipe would block the child
        with open(tmp_path / f"{out.name}.log", "a") as log:
            return subprocess.Popen(command + ["--output-dir", str(out)], env=env, cwd=REPO, stdout=log, stderr=log)

    def finish(proc: subprocess.Popen, out: Path) -> None:
        assert proc.wait(timeout=300) == 0, (tmp_path / f"{out.name}.log").read_text()[-3000:]

    def run(command: list[str], kill_at: str) -> tuple[Path, Path]:
        full, part = tmp_path / "full", tmp_path / "part"
        finish(train(command, full), full)
        killed = train(command, part)
        marker = part / "checkpoints" / kill_at
        deadline = time.monotonic() + 300
        while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        killed.send_signal(signal.SIGKILL)
        assert killed.wait(timeout=60) == -signal.SIGKILL
        assert not (part / "model").exists(), "the run finished before it could be killed"
        finish(train(command, part), part)
        return full, part

    return run


@pytest.fixture
def benchmark_script():
    """Load ``benchmarks/<name>.py`` as a module (the folder is not a package)."""
    import importlib.util

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load

"""Two processes under ``accelerate launch --multi_gpu`` (gloo on CPU) end with identical codebooks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from vqgen.tokenizer.quantizers import KINDS, spec_of

REPO = Path(__file__).resolve().parents[1]
STAGES = ("kmeans", "ema", "reset")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_hold_identical_codebooks(tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(REPO / "tests" / "ddp_codebook_worker.py"), "--out", str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for kind in (k for k in KINDS if spec_of(k).capabilities.dead_code_reset):
        previous = None
        for stage in STAGES:
            a = load_file(str(tmp_path / f"{kind}_{stage}_rank0.safetensors"))
            b = load_file(str(tmp_path / f"{kind}_{stage}_rank1.safetensors"))
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), f"{kind} after {stage}: '{key}' differs between ranks"
            if previous is not None:  # every stage really changed the codebook state
                assert any(not torch.equal(a[k], previous[k]) for k in a), f"{kind}: {stage} changed nothing"
            previous = a

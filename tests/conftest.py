"""Test-wide setup: offline, a private Hugging Face cache, CPU only, quiet tokenizers.

Set at import time, before any test module imports datasets/evaluate/huggingface_hub (they read
these variables once, when imported).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest

_HF_HOME = tempfile.mkdtemp(prefix="bert-dist-tests-hf-")
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    HF_HOME=_HF_HOME,
    TOKENIZERS_PARALLELISM="false",
    CUDA_VISIBLE_DEVICES="",
    PYTHONUNBUFFERED="1",
)
os.environ.pop("HF_ENDPOINT", None)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """Per-test: a fresh HF_HOME for subprocesses (the in-process one is fixed at import)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    return os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], nproc: int = 1, cwd: Path | None = None, timeout: int = 300,
            env: dict[str, str] | None = None):
    """Run the real entry point in a subprocess (1 process, or `nproc` gloo processes on the CPU).

    env: variables to set on top of os.environ. A multi-process launch whose rendezvous port was taken between
    `free_port()` and the launch (EADDRINUSE) is launched again on a fresh port, twice at most: a port race on a
    shared machine, not a failure of the code under test.
    """
    import subprocess

    env = {**os.environ, **(env or {})}
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "bert_dist" / "run.py"), *args]
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    for _ in range(3):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(REPO / "bert_dist" / "run.py"), *args]
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 or "EADDRINUSE" not in proc.stderr:
            return proc
    return proc

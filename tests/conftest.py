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
# The GPUs this machine shows, for the gpu-marked tests, which run their CUDA work in subprocesses: every other test
# runs on the CPU, and torch in this process never sees a GPU.
VISIBLE_GPUS = os.environ.get("CUDA_VISIBLE_DEVICES")
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


def gpu_env() -> dict[str, str | None]:
    """Variables that make this machine's GPUs visible again (see VISIBLE_GPUS), for `environ` or run_cli's env."""
    return {"CUDA_VISIBLE_DEVICES": VISIBLE_GPUS}


def environ(overrides: dict[str, str | None] | None = None) -> dict[str, str]:
    """os.environ with `overrides` set, those of value None removed."""
    env = {**os.environ, **(overrides or {})}
    return {k: v for k, v in env.items() if v is not None}


_cuda: list[bool] = []


def cuda_available() -> bool:
    """Whether a process that sees this machine's GPUs finds CUDA (asked once, in a subprocess)."""
    import subprocess

    if not _cuda:
        p = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           env=environ(gpu_env()), capture_output=True, text=True, timeout=120)
        _cuda.append(p.stdout.strip() == "True")
    return _cuda[0]


def reset_accelerate() -> None:
    """accelerate's process-wide state forgotten: the next in-process Accelerator starts anew (its state is a singleton,
    so one run's mixed precision or accumulation steps would otherwise carry into the next)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """Every test starts with a fresh accelerate state, and leaves one."""
    reset_accelerate()
    yield
    reset_accelerate()


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
            env: dict[str, str | None] | None = None):
    """Run the real entry point in a subprocess (1 process, or `nproc` gloo processes on the CPU).

    env: variables to set on top of os.environ (None: removed). A multi-process launch whose rendezvous port was
    taken between `free_port()` and the launch (EADDRINUSE) is launched again on a fresh port, twice at most: a port
    race on a shared machine, not a failure of the code under test.
    """
    import subprocess

    env = environ(env)
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

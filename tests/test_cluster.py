"""What a GPU cluster does to a run, done to it on the CPU: signals to the whole process group, an output directory
on a filesystem without flock, NCCL-style interface names, a slow rank 0 under a short process-group timeout, and
the accelerate/torch settings a cluster run is built with (DDP buffers, TF32, FSDP's reduce dtype).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port, reset_accelerate

RUN = str(REPO / "bert_dist" / "run.py")


def launch_cmd(nproc: int, *args: str) -> list[str]:
    """The run as a cluster starts it: `accelerate launch` (torchrun) for several processes, else the script."""
    if nproc == 1:
        return [sys.executable, RUN, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()), RUN, *args]


def wait_for(path: Path, text: str, timeout: float, proc: subprocess.Popen | None = None) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content or (proc is not None and proc.poll() is not None):
            return content
        time.sleep(0.3)
    return path.read_text() if path.exists() else ""


# ---------------------------------------------------------------- SIGTERM to the process group


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_to_the_process_group_with_loader_workers_saves_a_checkpoint(tmp_path, nproc):
    """SLURM signals every process of the job: `kill -TERM -- -PGID` reaches the DataLoader workers too. They must
    live on (the main process stops at the step's end, saves, and shuts them down), not die and crash the step."""
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    flags = ["--task", "sst2", "--smoke", "--num-workers", "2", "--max-steps", "100000", "--output-dir", str(out)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as err:
        p = subprocess.Popen(launch_cmd(nproc, *flags), env=env, stdout=subprocess.DEVNULL, stderr=err,
                             start_new_session=True)
    try:
        text = wait_for(log, "step=20 ", 240, p)
        assert "step=20 " in text, text[-3000:]
        os.killpg(p.pid, signal.SIGTERM)  # kill -TERM -- -PGID
        code = p.wait(timeout=120)
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    text = log.read_text()
    assert "killed by signal" not in text and "exited unexpectedly" not in text, text[-3000:]
    assert "rerun with --resume" in text, text[-3000:]
    if nproc == 1:  # torchrun's agent reports its own SIGTERM as a failure, whatever its workers did
        assert code == 0, text[-3000:]
    saved = [d for d in (out / "checkpoints").iterdir() if (d / "train_state.json").is_file()]
    assert len(saved) == 1 and not (out / "results.json").exists()
    step = json.loads((saved[0] / "train_state.json").read_text())["step"]
    assert step >= 20
    resumed = subprocess.run(launch_cmd(nproc, *flags[:-4], "--max-steps", str(step + 3), "--output-dir", str(out),
                                        "--resume"),
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["steps"] == step + 3


# ---------------------------------------------------------------- the output directory's lock without flock


@pytest.fixture
def no_flock(monkeypatch):
    """flock on an output directory's .lock as Lustre (mounted without -o flock) and NFS without lock support answer
    it: ENOSYS. Other files (the datasets cache's locks) keep theirs: they live on another filesystem."""
    import errno
    import fcntl

    flock = fcntl.flock

    def lustre_flock(fd, op):
        if os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}").endswith("/.lock"):
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
        return flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", lustre_flock)


def fresh_accelerate_state():
    reset_accelerate()


def test_a_run_trains_where_the_filesystem_has_no_flock(tmp_path, no_flock):
    from bert_dist.run import main

    fresh_accelerate_state()
    out = tmp_path / "run"
    assert main(["--task", "sst2", "--smoke", "--max-steps", "2", "--output-dir", str(out)]) == 0
    assert (out / "results.json").is_file()
    assert not (out / ".lock.lease").exists()  # released at the end


def test_the_lease_refuses_a_live_run_and_frees_a_gone_one(tmp_path, no_flock, monkeypatch):
    import socket
    import threading

    from bert_dist import rundir

    out = tmp_path / "run"
    out.mkdir()
    lease = out / ".lock.lease"
    assert rundir.lock_output_dir(out)
    assert lease.read_text().split() == [socket.gethostname(), str(os.getpid())]
    assert not rundir.lock_output_dir(out)  # a live process of this host holds it
    rundir.release_locks()
    assert not lease.exists()

    gone = subprocess.Popen(["true"])
    gone.wait()
    lease.write_text(f"{socket.gethostname()} {gone.pid}\n")  # a killed run of this host
    assert rundir.lock_output_dir(out)
    rundir.release_locks()

    monkeypatch.setattr(rundir, "LEASE_SECONDS", 3.0)
    monkeypatch.setattr(rundir, "LEASE_REFRESH_SECONDS", 0.5)
    lease.write_text("other-node 4242\n")  # another node's run, killed long ago
    os.utime(lease, (time.time() - 600, time.time() - 600))
    t0 = time.monotonic()
    assert rundir.lock_output_dir(out)
    assert time.monotonic() - t0 < 1.0
    rundir.release_locks()

    lease.write_text("other-node 4242\n")  # another node's run, alive: it refreshes its lease
    stop = threading.Event()

    def refresh():
        while not stop.wait(0.3):
            os.utime(lease)

    threading.Thread(target=refresh, daemon=True).start()
    try:
        assert not rundir.lock_output_dir(out)
    finally:
        stop.set()
    lease.write_text("other-node 4242\n")  # ...killed just now: free once it stays unrefreshed
    t0 = time.monotonic()
    assert rundir.lock_output_dir(out)
    assert time.monotonic() - t0 < 5.0
    rundir.release_locks()


# ---------------------------------------------------------------- the process group, DDP, TF32

SLOW_MAIN = '''
"""The run, its main process slowed by SLOW_MAIN_SECONDS while it trains the tokenizer (the others wait in a
collective meanwhile); each process reports the DDP wrapper it trains."""
import os, sys, time
import bert_dist.tokenizer as T
import bert_dist.train as TR

train_tokenizer, train = T.train_tokenizer, TR.train

def slow_train_tokenizer(*args, **kw):
    if os.environ.get("RANK", "0") == "0":
        time.sleep(float(os.environ["SLOW_MAIN_SECONDS"]))
    return train_tokenizer(*args, **kw)

def reporting_train(accelerator, model, *args, **kw):
    print("DDP", type(model).__name__, getattr(model, "broadcast_buffers", None), flush=True)
    return train(accelerator, model, *args, **kw)

T.train_tokenizer, TR.train = slow_train_tokenizer, reporting_train
from bert_dist.run import launch
launch()
'''


@pytest.mark.slow
def test_a_slow_main_process_is_waited_for_up_to_the_dist_timeout(tmp_path):
    """The main process trains the tokenizer for 10 s while the other waits in a collective: under a 3 s
    --dist-timeout the run stops with one line naming the flag (not a traceback); under 60 s it trains. DDP is
    built without a buffer broadcast before every forward (the position ids never change)."""
    driver = tmp_path / "slow_main.py"
    driver.write_text(SLOW_MAIN)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "SLOW_MAIN_SECONDS": "10"}
    common = ["--task", "sst2", "--smoke", "--max-steps", "2"]

    def run(timeout_minutes: str, out: Path) -> subprocess.CompletedProcess:
        cmd = launch_cmd(2, *common, "--dist-timeout", timeout_minutes, "--output-dir", str(out))
        cmd[cmd.index(RUN)] = str(driver)
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)

    short = run("0.05", tmp_path / "short")
    assert short.returncode != 0
    errors = [ln for ln in short.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "lost contact with another process" in errors[0], short.stderr[-3000:]
    assert "--dist-timeout 0.05 min" in errors[0]
    assert "RuntimeError" not in short.stderr, short.stderr[-3000:]  # no worker's traceback

    long = run("1", tmp_path / "long")
    assert long.returncode == 0, long.stderr[-3000:]
    assert json.loads((tmp_path / "long" / "results.json").read_text())["steps"] == 2
    assert sorted(ln for ln in long.stdout.splitlines() if ln.startswith("DDP")) == \
        ["DDP DistributedDataParallel False"] * 2


def test_tf32_is_on_for_fp32_matmuls_unless_told(tmp_path):
    """fp32 runs on Ampere/Hopper use TF32 tensor cores for matmuls (torch's default is full fp32: 8x slower there);
    --no-tf32 gives full-fp32 reference numbers. Set by the run itself, whatever was set before."""
    import torch

    from bert_dist.run import main

    for flags, expect in (([], True), (["--no-tf32"], False)):
        torch.backends.cuda.matmul.allow_tf32 = not expect
        fresh_accelerate_state()
        assert main(["--task", "sst2", "--smoke", "--max-steps", "1", "--output-dir", str(tmp_path / str(expect)),
                     *flags]) == 0
        assert torch.backends.cuda.matmul.allow_tf32 is expect
        assert torch.backends.cudnn.allow_tf32 is expect
    torch.backends.cuda.matmul.allow_tf32 = False

"""Two hosts for real, on one machine: two network namespaces joined by a veth pair, each with its own hostname (a UTS
namespace) and /etc/hosts, one `launch/slurm_multi_node.sh` node stage in each (machine rank, head node and port
from the environment, as srun starts them), gloo between them over the veth.

They need root (network namespaces). Where the tests do not run as root they are skipped; as root (CI) anything
that fails to set the hosts up is a failure, not a skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs these as root)"),
]

SCRIPT = REPO / "launch" / "slurm_multi_node.sh"
# One thread per process on both sides: a different thread count sums matmuls in another order.
FLAGS = ["--task", "sst2", "--smoke", "--max-steps", "150", "--save-every", "10", "--log-every", "10", "--cpu-threads",
         "1"]


@pytest.fixture(scope="module")
def flags(tmp_path_factory):
    """FLAGS with one tokenizer for every run (WordPiece training is not reproducible from run to run)."""
    from bert_dist.data import get_task
    from bert_dist.data.synthetic import write_task_data
    from bert_dist.tokenizer import save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("tokenizer")
    data = write_task_data(get_task("sst2"), root / "data", seed=42)
    texts = [json.loads(ln)["sentence"] for ln in (data / "sst2" / "train.jsonl").read_text().splitlines()]
    save_tokenizer(train_tokenizer(iter(texts), vocab_size=400), root)
    return [*FLAGS, "--tokenizer", str(root / "tokenizer.json")]


@dataclass
class Hosts:
    namespaces: list[str]
    hostnames: list[str]
    port: int
    flags: list[str]

    def start(self, rank: int, out: Path, *extra: str, log: Path) -> subprocess.Popen:
        """Host `rank`'s node stage of the multi-node script, in its namespace under its hostname."""
        env = {**os.environ, "BERT_DIST_NODE_STAGE": "1", "NODE_RANK": str(rank), "NNODES": "2",
               "GPUS_PER_NODE": "1", "HEAD_NODE": self.hostnames[0], "PORT": str(self.port), "TASK": "",
               "PYTHON": sys.executable, "PRECISION": "no", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
        for k in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "ARGS", "CONFIG", "SCRIPT", "DRY_RUN"):
            env.pop(k, None)
        cmd = ["ip", "netns", "exec", self.namespaces[rank], "unshare", "--uts", "bash", "-c",
               'hostname "$1" && shift && exec bash "$@"', "_", self.hostnames[rank], str(SCRIPT), *self.flags,
               "--output-dir", str(out), *extra]
        with open(log, "w") as fh:
            return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def run(self, out: Path, *extra: str, timeout: float = 300) -> list[str]:
        """Both hosts to the end; returns their logs."""
        logs = [out.parent / f"{out.name}-host{r}.log" for r in (0, 1)]
        procs = [self.start(r, out, *extra, log=logs[r]) for r in (0, 1)]
        try:
            codes = [p.wait(timeout=timeout) for p in procs]
        finally:
            for p in procs:
                kill_group(p)
        texts = [lg.read_text() for lg in logs]
        assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
        return texts

    def kill(self, rank: int) -> None:
        """The host dies: every process in its namespace, at once."""
        pids = subprocess.run(["ip", "netns", "pids", self.namespaces[rank]], capture_output=True, text=True,
                              check=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def kill_group(p: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout=10)


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def hosts(flags):
    tag = os.getpid() % 100000
    namespaces = [f"bdt{tag}h{i}" for i in (0, 1)]
    hostnames = [f"bdhost{i}-{tag}" for i in (0, 1)]
    veths = [f"bdt{tag}v{i}" for i in (0, 1)]
    net = f"10.{200 + tag % 50}.{tag // 50 % 250}"
    etc = [Path("/etc/netns") / ns for ns in namespaces]
    try:
        for i, ns in enumerate(namespaces):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            etc[i].mkdir(parents=True, exist_ok=True)  # `ip netns exec` binds it over /etc/hosts
            (etc[i] / "hosts").write_text(f"127.0.0.1 localhost\n{net}.1 {hostnames[0]}\n{net}.2 {hostnames[1]}\n")
        sh("ip", "link", "add", veths[0], "type", "veth", "peer", "name", veths[1])
        for i, ns in enumerate(namespaces):
            sh("ip", "link", "set", veths[i], "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{net}.{i + 1}/24", "dev", veths[i])
            sh("ip", "-n", ns, "link", "set", veths[i], "up")
        yield Hosts(namespaces, hostnames, 29500, flags)
    finally:
        for i, ns in enumerate(namespaces):
            with contextlib.suppress(subprocess.CalledProcessError, ValueError):
                h = Hosts(namespaces, hostnames, 0, [])
                h.kill(i)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(etc[i], ignore_errors=True)


def weights(out: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in load_file(str(out / "model.safetensors")).items()}


@pytest.fixture(scope="module")
def two_hosts_run(hosts, tmp_path_factory):
    """The uninterrupted run on two hosts: (output dir, the hosts' logs)."""
    out = tmp_path_factory.mktemp("two-hosts") / "run"
    return out, hosts.run(out)


def test_two_hosts_train_as_two_processes_on_one_host(two_hosts_run, flags, tmp_path):
    out, logs = two_hosts_run
    assert "sst2 on 2 process(es)" in " ".join(logs[0].split())
    assert "gloo interface" in logs[0] and "gloo interface" in logs[1]  # each host named its own (the veth)
    one_host = tmp_path / "one-host"
    p = run_cli([*flags, "--output-dir", str(one_host)], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = weights(out), weights(one_host)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((out / "results.json").read_text())["accuracy"] == \
        json.loads((one_host / "results.json").read_text())["accuracy"]


@pytest.fixture(scope="module")
def killed_run(hosts, tmp_path_factory):
    """killed_run(r): host r dies once the step-20 checkpoint is saved: (output dir, the other host's exit code,
    seconds from the kill to its exit, its log). Once per r in the module."""
    done = {}

    def kill(r: int):
        if r in done:
            return done[r]
        out = tmp_path_factory.mktemp(f"killed{r}") / "run"
        logs = [out.parent / f"host{h}.log" for h in (0, 1)]
        procs = [hosts.start(h, out, log=logs[h]) for h in (0, 1)]
        saved, survivor = out / "checkpoints" / "step-00000020", 1 - r
        try:
            deadline = time.time() + 240
            while not saved.is_dir() and time.time() < deadline and procs[survivor].poll() is None:
                time.sleep(0.1)
            assert saved.is_dir() and procs[survivor].poll() is None, logs[survivor].read_text()[-3000:]
            hosts.kill(r)
            t0 = time.time()
            try:
                code = procs[survivor].wait(timeout=120)
            except subprocess.TimeoutExpired:
                code = None
            took = time.time() - t0
        finally:
            for p in procs:
                kill_group(p)
        done[r] = out, code, took, logs[survivor].read_text()
        return done[r]

    return kill


@pytest.mark.parametrize("killed", [1, 0], ids=["worker-host-dies", "head-host-dies"])
def test_a_host_killed_mid_run_makes_the_other_exit_with_one_line(killed_run, killed):
    """Every process of one host SIGKILLed at once (the head hosts the rendezvous store too): the other host's run
    stops within a minute with one line of its own, rather than hang or print a worker's traceback."""
    out, code, took, log = killed_run(killed)
    assert code not in (0, None), log[-3000:]
    assert took < 60, f"the other host took {took:.0f} s to exit"
    ours = [ln for ln in log.splitlines() if ln.startswith("error:")]
    assert len(ours) == 1 and "lost contact with another process" in ours[0], log[-3000:]
    assert "Traceback" not in log.split("error: lost contact")[0][-2000:]  # no worker traceback before it


def test_both_hosts_relaunched_with_resume_end_bitwise_equal_to_the_uninterrupted_run(hosts, killed_run,
                                                                                      two_hosts_run):
    out, *_ = killed_run(1)
    assert (out / "checkpoints").is_dir() and not (out / "results.json").exists()
    logs = hosts.run(out, "--resume")
    assert "resumed from" in " ".join(logs[0].split())
    a, b = weights(out), weights(two_hosts_run[0])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

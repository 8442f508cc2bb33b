"""Launch configs and scripts: accelerate YAMLs load, dry runs print the right commands.

No SLURM, GPU or network needed: the shell scripts are run with DRY_RUN=1 and a
faked SLURM environment (plus a PATH-shimmed `scontrol`, and an `srun` that runs a step's
tasks on this machine). The slow tier really launches gloo processes through them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "accelerate_configs"
LAUNCH = REPO / "launch"

# name -> expected (distributed_type, num_processes, mixed_precision, use_cpu)
EXPECTED_CONFIGS = {
    "cpu.yaml": ("NO", 1, "no", True),
    "multi_cpu.yaml": ("MULTI_GPU", 2, "no", True),
    "single_gpu.yaml": ("NO", 1, "no", False),
    "single_gpu_bf16.yaml": ("NO", 1, "bf16", False),
    "single_gpu_fp16.yaml": ("NO", 1, "fp16", False),
    "multi_gpu_bf16.yaml": ("MULTI_GPU", 8, "bf16", False),
    "fsdp.yaml": ("FSDP", 8, "bf16", False),
    "fsdp_multi_node.yaml": ("FSDP", 16, "bf16", False),
    "multi_node.yaml": ("MULTI_GPU", 16, "bf16", False),
}

# Environment variables the scripts read; cleared so the host can't leak into results.
SCRIPT_VARS = {
    "TASK", "ARGS", "SCRIPT", "CONFIG", "PRECISION", "PORT", "PYTHON", "REPO_DIR",
    "GPUS", "GPUS_PER_NODE", "NNODES", "NPROC", "DEVICE", "HEAD_NODE", "NODE_RANK",
    "RDZV_BACKEND", "SRUN_ARGS", "DRY_RUN", "BERT_DIST_NODE_STAGE", "ACCELERATE_USE_CPU",
    "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
}


# ---------------------------------------------------------------- YAML configs


def load(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(CONFIGS / name))


def test_every_config_file_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED_CONFIGS)


@pytest.mark.parametrize("name", sorted(EXPECTED_CONFIGS))
def test_config_loads_with_accelerate(name):
    dist, nproc, mp, use_cpu = EXPECTED_CONFIGS[name]
    cfg = load(name)
    assert cfg.compute_environment.value == "LOCAL_MACHINE"
    assert cfg.distributed_type.value == dist
    assert cfg.num_processes == nproc
    assert cfg.mixed_precision == mp
    assert cfg.use_cpu is use_cpu


def test_fsdp_config():
    fsdp = load("fsdp.yaml").fsdp_config
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "BertLayer"


def fsdp_launch_env(name: str, monkeypatch) -> None:
    """The environment `accelerate launch --config_file <name>` gives its workers (accelerate's own code), set here;
    sync_module_states off: FSDP refuses it without a GPU (it only broadcasts the first weights)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(CONFIGS / name),
                                                                        "--main_process_ip", "h0", "x.py"]))[0]
    for k, v in prepare_multi_gpu_env(args).items():
        if k.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")


@pytest.mark.parametrize("name, strategy", [("fsdp.yaml", "FULL_SHARD"), ("fsdp_multi_node.yaml", "HYBRID_SHARD")])
def test_fsdp_reduces_gradients_in_fp32_under_bf16(name, strategy, monkeypatch):
    """accelerate's FSDP policy for --mixed_precision bf16 reduces gradients in bf16 (DDP reduces them in fp32): the
    run's plugin keeps bf16 compute and reduces in fp32, also after accelerate applies the precision to it."""
    import torch
    from torch.distributed.fsdp import ShardingStrategy

    from bert_dist.run import fsdp_plugin

    fsdp_launch_env(name, monkeypatch)
    plugin = fsdp_plugin("bf16")
    plugin.set_mixed_precision("bf16")  # what AcceleratorState does with the run's precision
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert plugin.sharding_strategy == ShardingStrategy[strategy]
    assert plugin.transformer_cls_names_to_wrap == ["BertLayer"]
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert fsdp_plugin("bf16") is None  # DDP and single-process runs keep accelerate's defaults


def test_multi_node_config():
    import socket

    cfg = load("multi_node.yaml")
    assert cfg.num_machines == 2
    assert cfg.num_processes == 16
    assert cfg.rdzv_backend == "c10d"
    assert cfg.main_process_port == 29500
    # Used by hand without --main_process_ip, a loopback head made each node wait for the others on its own
    # 127.0.0.1: the placeholder resolves nowhere, and torchrun names it.
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo(cfg.main_process_ip, cfg.main_process_port)


@pytest.mark.parametrize("name", sorted(EXPECTED_CONFIGS))
def test_every_key_is_commented(name):
    """Each `key:` line has a `#` comment on it or directly above it."""
    lines = (CONFIGS / name).read_text().splitlines()
    for i, line in enumerate(lines):
        if not re.match(r"^\s*[A-Za-z_][A-Za-z0-9_]*:", line):
            continue
        above = lines[i - 1].strip() if i else ""
        assert "#" in line or above.startswith("#"), f"{name}:{i + 1}: uncommented key {line!r}"


def test_launcher_resolution_of_configs():
    """What `accelerate launch --config_file X` makes of each file (launcher choice)."""
    launch = pytest.importorskip("accelerate.commands.launch")
    validate = getattr(launch, "_validate_launch_command", None)
    if validate is None:
        pytest.skip("accelerate internals changed")
    parser = launch.launch_command_parser()

    def resolve(name):
        args = parser.parse_args(["--config_file", str(CONFIGS / name), "x.py"])
        return validate(args)[0]

    mc = resolve("multi_cpu.yaml")  # torchrun launcher with 2 processes, CPU intent
    assert mc.multi_gpu and mc.num_processes == 2 and mc.use_cpu
    assert resolve("fsdp.yaml").use_fsdp
    assert resolve("fsdp.yaml").fsdp_transformer_layer_cls_to_wrap == "BertLayer"
    mn = resolve("multi_node.yaml")
    assert mn.multi_gpu and mn.num_machines == 2 and mn.num_processes == 16
    c = resolve("cpu.yaml")
    assert not c.multi_gpu and c.use_cpu and c.num_processes == 1


# ---------------------------------------------------------------- launch scripts


@pytest.fixture
def env():
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in SCRIPT_VARS}
    e["DRY_RUN"] = "1"
    return e


def run(script: str, env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=30,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def commands(stdout: str, keep_env: bool = False) -> list[list[str]]:
    """Non-comment output lines, shell-split (undoes the scripts' %q quoting); the SLURM scripts' leading
    VAR=value words dropped unless keep_env (`environment` reads them)."""
    cmds = [shlex.split(ln) for ln in stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    return cmds if keep_env else [c[len(environment(c)):] for c in cmds]


def environment(tokens: list[str]) -> dict[str, str]:
    """The leading VAR=value words of a printed command."""
    env = {}
    for t in tokens:
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", t):
            break
        k, v = t.split("=", 1)
        env[k] = v
    return env


def flag(tokens: list[str], name: str) -> str:
    assert name in tokens, f"{name} missing from {tokens}"
    return tokens[tokens.index(name) + 1]


def after_script(tokens: list[str]) -> list[str]:
    return tokens[tokens.index("bert_dist/run.py") + 1:]


def test_slurm_single_node_1x4(env):
    env.update(GPUS_PER_NODE="4", ARGS="--epochs 3 --lr 2e-5")
    [cmd] = commands(run("slurm_single_node.sh", env, "--init", "ckpt dir/pre").stdout)
    assert cmd[:3] == ["accelerate", "launch", "--multi_gpu"]
    assert flag(cmd, "--num_processes") == "4"
    assert flag(cmd, "--num_machines") == "1"
    assert flag(cmd, "--mixed_precision") == "bf16"
    assert after_script(cmd) == ["--task", "sst2", "--epochs", "3", "--lr", "2e-5", "--init", "ckpt dir/pre"]


def test_slurm_single_node_env_overrides(env):
    env.update(
        SLURM_GPUS_ON_NODE="2", PRECISION="fp16", TASK="mnli", PYTHON="/opt/py/bin/python",
        CONFIG="accelerate_configs/fsdp.yaml", PORT="29600",
    )
    [cmd] = commands(run("slurm_single_node.sh", env).stdout)
    assert cmd[:3] == ["/opt/py/bin/python", "-m", "accelerate.commands.launch"]
    assert "--multi_gpu" not in cmd  # the config picks FSDP
    assert flag(cmd, "--config_file") == "accelerate_configs/fsdp.yaml"
    assert flag(cmd, "--num_processes") == "2"
    assert flag(cmd, "--mixed_precision") == "fp16"
    assert flag(cmd, "--main_process_port") == "29600"
    assert after_script(cmd) == ["--task", "mnli"]


def _multi_node_checks(cmd, rank, head="gpu-node-07"):
    assert cmd[:3] == ["accelerate", "launch", "--multi_gpu"]
    assert flag(cmd, "--num_processes") == "16"
    assert flag(cmd, "--num_machines") == "2"
    assert flag(cmd, "--machine_rank") == str(rank)
    assert flag(cmd, "--main_process_ip") == head
    assert flag(cmd, "--main_process_port") == "29500"
    assert flag(cmd, "--rdzv_backend") == "c10d"
    assert after_script(cmd) == ["--task", "sst2", "--seed", "1", "--init", "ckpt"]


@pytest.fixture
def fake_scontrol(tmp_path):
    shim = tmp_path / "bin"
    shim.mkdir()
    sc = shim / "scontrol"
    sc.write_text(
        '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 2\n'
        '[ "$3" = "gpu-node-[07-08]" ] || exit 3\necho gpu-node-07\necho gpu-node-08\n'
    )
    sc.chmod(sc.stat().st_mode | stat.S_IEXEC)
    return shim


def test_slurm_multi_node_2x8_scontrol(env, fake_scontrol):
    env.update(
        PATH=f"{fake_scontrol}:{env['PATH']}", SLURM_JOB_NODELIST="gpu-node-[07-08]",
        SLURM_NNODES="2", GPUS_PER_NODE="8", ARGS="--seed 1",
    )
    out = run("slurm_multi_node.sh", env, "--init", "ckpt").stdout
    srun, node0, node1 = commands(out)
    assert srun[0] == "srun"
    assert flag(srun, "--nodes") == "2"
    assert flag(srun, "--ntasks-per-node") == "1"
    assert srun[-4:] == ["bash", str(LAUNCH / "slurm_multi_node.sh"), "--init", "ckpt"]
    _multi_node_checks(node0, 0)
    _multi_node_checks(node1, 1)


def test_slurm_multi_node_head_override_and_node_stage(env):
    # What srun task 1 runs: rank from SLURM_NODEID, head from HEAD_NODE (no scontrol).
    env.update(
        BERT_DIST_NODE_STAGE="1", HEAD_NODE="gpu-node-07", SLURM_NNODES="2",
        SLURM_NODEID="1", SLURM_PROCID="1", GPUS_PER_NODE="8", ARGS="--seed 1",
    )
    [cmd] = commands(run("slurm_multi_node.sh", env, "--init", "ckpt").stdout)
    _multi_node_checks(cmd, 1)


def test_slurm_multi_node_with_config(env):
    env.update(HEAD_NODE="h0", NNODES="2", GPUS_PER_NODE="8", CONFIG="accelerate_configs/multi_node.yaml")
    _, node0, _ = commands(run("slurm_multi_node.sh", env).stdout)
    assert "--multi_gpu" not in node0 and "--mixed_precision" not in node0
    assert flag(node0, "--config_file") == "accelerate_configs/multi_node.yaml"
    assert flag(node0, "--rdzv_backend") == "c10d"  # the YAML key alone is ignored by accelerate 1.15
    assert flag(node0, "--main_process_ip") == "h0"


def test_slurm_multi_node_refuses_without_slurm(env):
    del env["DRY_RUN"]
    env.update(HEAD_NODE="h0", NNODES="2")
    proc = run("slurm_multi_node.sh", env, check=False)
    assert proc.returncode != 0 and "sbatch" in proc.stderr
    env.pop("HEAD_NODE")
    proc = run("slurm_multi_node.sh", env, check=False)
    assert proc.returncode != 0 and "SLURM_JOB_NODELIST" in proc.stderr


def test_local_two_cpu_processes(env):
    env.update(NPROC="2", GPUS="0")
    out = run("local.sh", env, "--max-steps", "5").stdout
    [cmd] = commands(out, keep_env=True)
    assert cmd[:5] == ["ACCELERATE_USE_CPU=1", "accelerate", "launch", "--multi_gpu", "--num_processes"]
    assert flag(cmd, "--num_processes") == "2"
    assert flag(cmd, "--mixed_precision") == "no"
    assert "--cpu" not in cmd
    assert after_script(cmd) == ["--task", "sst2", "--max-steps", "5"]


def test_local_single_cpu_process(env):
    env.update(DEVICE="cpu", GPUS="4")
    [cmd] = commands(run("local.sh", env).stdout)
    assert cmd[:3] == ["accelerate", "launch", "--cpu"]
    assert flag(cmd, "--num_processes") == "1"
    assert "--multi_gpu" not in cmd


def test_local_cpu_config_gets_env_var(env):
    env.update(GPUS="0", CONFIG="accelerate_configs/multi_cpu.yaml")
    [cmd] = commands(run("local.sh", env).stdout, keep_env=True)
    assert cmd[0] == "ACCELERATE_USE_CPU=1"
    assert flag(cmd, "--config_file") == "accelerate_configs/multi_cpu.yaml"
    assert "--num_processes" not in cmd  # the config's 2


def test_local_gpus(env):
    env.update(GPUS="2")
    [cmd] = commands(run("local.sh", env).stdout)
    assert cmd[:3] == ["accelerate", "launch", "--multi_gpu"]
    assert flag(cmd, "--num_processes") == "2"
    assert flag(cmd, "--mixed_precision") == "bf16"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck():
    scripts = sorted(str(p) for p in LAUNCH.glob("*.sh"))
    proc = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_local_really_starts_two_gloo_ranks(env, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(  # one file per rank, and out without the interpreter's teardown (see PROBE below)
        "import os, sys, torch.distributed as dist\nfrom accelerate import Accelerator\na = Accelerator()\n"
        "open(os.path.join(sys.argv[1], f'rank{a.process_index}'), 'w').write("
        "f'{a.process_index} {a.num_processes} {dist.get_backend()}')\nos._exit(0)\n"
    )
    del env["DRY_RUN"]
    env.update(NPROC="2", GPUS="0", TASK="", SCRIPT=str(probe), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(LAUNCH / "local.sh"), str(tmp_path)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted(f.read_text().split() for f in tmp_path.glob("rank*"))
    assert ranks == [["0", "2", "gloo"], ["1", "2", "gloo"]]


def _launched_threads(tmp_path, *extra: str) -> int:
    """torch threads of a 1-process `accelerate launch` run with no thread settings (accelerate's default: 1)."""
    out = tmp_path / ("run" + "".join(extra).replace("-", ""))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "bert_dist" / "run.py"), "--task", "sst2",
           "--smoke", "--max-steps", "2", "--output-dir", str(out), *extra]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((out / "results.json").read_text())["hardware"]["torch_threads"]


@pytest.mark.skipif(min(os.cpu_count() or 1, psutil.cpu_count(logical=False) or 1) < 2, reason="one core")
@pytest.mark.slow
def test_accelerate_launch_default_of_one_thread_becomes_the_cores_unless_told(tmp_path):
    cores = min(len(os.sched_getaffinity(0)), psutil.cpu_count(logical=False))
    assert _launched_threads(tmp_path) == cores
    assert _launched_threads(tmp_path, "--cpu-threads", "1") == 1


# ---------------------------------------------------------------- interfaces, signals


def global_interfaces() -> list[str]:
    """This machine's interfaces that are up and hold a global address, by name."""
    out = subprocess.run(["ip", "-o", "addr", "show", "up", "scope", "global"], capture_output=True, text=True,
                         check=True).stdout
    return sorted({ln.split()[1] for ln in out.splitlines()})


def default_route_interface() -> str:
    out = subprocess.run(["ip", "-o", "route", "show", "default"], capture_output=True, text=True, check=True).stdout
    return out.split(" dev ")[1].split()[0]


def test_a_head_node_whose_name_resolves_to_loopback_is_reached_by_the_default_route(env):
    """On the head node itself its own hostname often resolves to 127.0.1.1 (Debian's /etc/hosts): gloo there must not
    bind the loopback, which the other nodes cannot reach (this machine's hostname resolves to 127.0.0.1)."""
    import socket

    got, _, err = node_stage(dict(env), HEAD_NODE=socket.gethostname())
    assert got["GLOO_SOCKET_IFNAME"] == default_route_interface(), err


def node_stage(env: dict, **extra: str) -> tuple[dict[str, str], list[str], str]:
    """What node 0 of a 2-node job runs here (the srun task's stage): (its environment, its command, stderr)."""
    env.update({"BERT_DIST_NODE_STAGE": "1", "HEAD_NODE": "127.0.0.1", "NNODES": "2", "NODE_RANK": "0",
                "GPUS_PER_NODE": "1", **extra})
    proc = run("slurm_multi_node.sh", env)
    [cmd] = commands(proc.stdout, keep_env=True)
    return environment(cmd), cmd[len(environment(cmd)):], proc.stderr


def test_nccl_style_interface_values_become_this_nodes_interface_names(env):
    """NCCL_SOCKET_IFNAME's syntax (a prefix, =exact, ^all-but, comma lists) is no interface name for gloo: each node
    resolves it to one of its own interfaces (it was copied as is: gloo's "Unable to find address for: ^lo")."""
    ifaces = global_interfaces()
    assert ifaces, "this machine has no interface with a global address"
    first = ifaces[0]
    for nccl, expect in ((f"={first}", first), (first[:-1], next(i for i in ifaces if i.startswith(first[:-1]))),
                         (f"=nosuch0,{first}", first), (f"{first}:5000", first),
                         ("^lo,docker0", next(i for i in ifaces if not i.startswith(("lo", "docker0")))),
                         (f"^={first}", next((i for i in ifaces if i != first), None))):
        got, _, err = node_stage(dict(env), NCCL_SOCKET_IFNAME=nccl)
        if expect is None:  # nothing else here: the interface that reaches the head node, never the loopback
            assert got["GLOO_SOCKET_IFNAME"] == default_route_interface() and "selects no up interface" in err, \
                (nccl, got, err)
        else:
            assert got["GLOO_SOCKET_IFNAME"] == expect, (nccl, got, err)
    got, _, _ = node_stage(dict(env), NCCL_SOCKET_IFNAME="^lo", GLOO_SOCKET_IFNAME="mine0")
    assert got["GLOO_SOCKET_IFNAME"] == "mine0"  # the user's own choice is kept


def test_without_nccl_socket_ifname_gloo_takes_the_interface_that_reaches_the_head_node(env):
    """Where a hostname resolves to 127.0.x.x, gloo left to itself binds the loopback and a multi-node run hangs: the
    interface that holds the head node's address, or routes to it, is named instead."""
    ifaces = global_interfaces()
    addr = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", ifaces[0], "scope", "global"],
                          capture_output=True, text=True, check=True).stdout.split()[3].split("/")[0]
    got, _, _ = node_stage(dict(env), HEAD_NODE=addr)
    assert got["GLOO_SOCKET_IFNAME"] == ifaces[0]


def test_slurm_scripts_give_the_run_time_to_save_before_the_kill(env):
    """SLURM's SIGTERM at the time limit comes KillWait (30 s) before its SIGKILL, and torchrun kills its workers 30 s
    after forwarding a SIGTERM: the scripts ask for it minutes earlier (--signal), and torchrun waits that long."""
    for script in ("slurm_single_node.sh", "slurm_multi_node.sh"):
        lead = re.search(r"^#SBATCH --signal=TERM@(\d+)", (LAUNCH / script).read_text(), re.M)
        assert lead and int(lead.group(1)) >= 120, script
        e = dict(env)
        if script == "slurm_multi_node.sh":
            got, _, _ = node_stage(e)
        else:
            e.update(GPUS_PER_NODE="2")
            [cmd] = commands(run(script, e).stdout, keep_env=True)
            got = environment(cmd)
        assert int(got["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) >= int(lead.group(1)) + 30, script


@pytest.fixture
def fake_srun(tmp_path):
    """`srun` as SLURM runs a step of one task per node, here: each task with its SLURM_NODEID, node 0 first."""
    shim = tmp_path / "srun-bin"
    shim.mkdir()
    srun = shim / "srun"
    srun.write_text(
        '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do case "$1" in --*=*) shift ;; *) shift 2 ;; esac; done\n'
        'pids=()\nfor ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); '
        'sleep 3; done\nrc=0\nfor p in "${pids[@]}"; do wait "$p" || rc=$?; done\nexit $rc\n'
    )
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    return shim


PROBE = """
import os, torch, torch.distributed as dist
from pathlib import Path
from accelerate import Accelerator
a = Accelerator()
t = torch.tensor([a.process_index + 1.0])
dist.all_reduce(t)
# One file per rank: two nodes' prints share one pipe and can interleave mid-line.
line = f"{a.process_index} {a.num_processes} {os.environ.get('GLOO_SOCKET_IFNAME')} {int(t.item())}"
(Path(os.environ["PROBE_DIR"]) / f"rank{a.process_index}").write_text(line)
os._exit(0)  # as run.py leaves a multi-process run: a gloo thread alive at interpreter teardown can abort it
"""


@pytest.mark.slow
def test_multi_node_job_with_an_nccl_style_interface_value_starts_gloo(env, tmp_path, fake_srun):
    """The batch step of a 2-node job (srun: two node stages, here on one machine) with NCCL_SOCKET_IFNAME=^lo,docker0:
    both nodes' gloo ranks meet (it died before step 1: "Unable to find address for: ^lo")."""
    from conftest import free_port

    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    del env["DRY_RUN"]
    env.update(PATH=f"{fake_srun}:{env['PATH']}", SLURM_JOB_ID="1", SLURM_NNODES="2", HEAD_NODE="127.0.0.1",
               GPUS_PER_NODE="1", NCCL_SOCKET_IFNAME="^lo,docker0", PORT=str(free_port()), TASK="",
               SCRIPT=str(probe), PYTHON=sys.executable, PRECISION="no", ACCELERATE_USE_CPU="1",
               PROBE_DIR=str(tmp_path))
    proc = subprocess.run(["bash", str(LAUNCH / "slurm_multi_node.sh")], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted(f.read_text().split() for f in tmp_path.glob("rank*"))
    iface = next(i for i in global_interfaces() if not i.startswith(("lo", "docker0")))
    assert ranks == [["0", "2", iface, "3"], ["1", "2", iface, "3"]], proc.stdout + proc.stderr[-2000:]


SLOW_SAVER = """
import os, signal, sys, time
from pathlib import Path
from accelerate import Accelerator
a = Accelerator()
got = []
signal.signal(signal.SIGTERM, lambda *_: got.append(1))
Path(sys.argv[1], f"ready-{a.process_index}").touch()
while not got:
    time.sleep(0.1)
time.sleep(40)  # a large gathered save after the SIGTERM
Path(sys.argv[1], f"saved-{a.process_index}").touch()
os._exit(0)  # see PROBE
"""


@pytest.mark.slow
def test_a_save_longer_than_torchruns_30_seconds_survives_a_sigterm_to_the_job(env, tmp_path):
    """SIGTERM to every process of a node's step (as SLURM sends it): the workers take 40 s to save, longer than
    torchrun's default 30 s before it kills them; launched as the script launches them, they finish."""
    from conftest import free_port

    saver = tmp_path / "saver.py"
    saver.write_text(SLOW_SAVER)
    del env["DRY_RUN"]
    env.update(BERT_DIST_NODE_STAGE="1", HEAD_NODE="127.0.0.1", NNODES="1", NODE_RANK="0", GPUS_PER_NODE="2",
               PORT=str(free_port()), TASK="", SCRIPT=str(saver), PYTHON=sys.executable, PRECISION="no",
               ACCELERATE_USE_CPU="1", ARGS=str(tmp_path))
    p = subprocess.Popen(["bash", str(LAUNCH / "slurm_multi_node.sh")], env=env, cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while len(list(tmp_path.glob("ready-*"))) < 2 and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
        assert len(list(tmp_path.glob("ready-*"))) == 2, p.communicate(timeout=5)[0][-3000:] if p.poll() else ""
        os.killpg(p.pid, signal.SIGTERM)
        out = p.communicate(timeout=120)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    assert sorted(f.name for f in tmp_path.glob("saved-*")) == ["saved-0", "saved-1"], out[-3000:]

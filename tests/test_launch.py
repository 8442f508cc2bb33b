"""Launch configs and scripts: accelerate YAMLs load, dry runs print the right commands.

No SLURM, GPU or network needed: the shell scripts are run with DRY_RUN=1 and a
faked SLURM environment (plus a PATH-shimmed `scontrol`).
Set BERT_DIST_SLOW_TESTS=1 to also really launch 2 gloo processes on the CPU.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
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
    "multi_node.yaml": ("MULTI_GPU", 16, "bf16", False),
}

# Environment variables the scripts read; cleared so the host can't leak into results.
SCRIPT_VARS = {
    "TASK", "ARGS", "SCRIPT", "CONFIG", "PRECISION", "PORT", "PYTHON", "REPO_DIR",
    "GPUS", "GPUS_PER_NODE", "NNODES", "NPROC", "DEVICE", "HEAD_NODE", "NODE_RANK",
    "RDZV_BACKEND", "SRUN_ARGS", "DRY_RUN", "BERT_DIST_NODE_STAGE", "ACCELERATE_USE_CPU",
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


def test_multi_node_config():
    cfg = load("multi_node.yaml")
    assert cfg.num_machines == 2
    assert cfg.num_processes == 16
    assert cfg.rdzv_backend == "c10d"
    assert cfg.main_process_port == 29500


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


def commands(stdout: str) -> list[list[str]]:
    """Non-comment output lines, shell-split (undoes the scripts' %q quoting)."""
    return [shlex.split(ln) for ln in stdout.splitlines() if ln.strip() and not ln.startswith("#")]


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
    [cmd] = commands(out)
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
    [cmd] = commands(run("local.sh", env).stdout)
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


@pytest.mark.skipif(os.environ.get("BERT_DIST_SLOW_TESTS") != "1", reason="set BERT_DIST_SLOW_TESTS=1")
def test_local_really_starts_two_gloo_ranks(env, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import torch.distributed as dist\nfrom accelerate import Accelerator\na = Accelerator()\n"
        "print('RANK', a.process_index, a.num_processes, dist.get_backend(), flush=True)\n"
    )
    del env["DRY_RUN"]
    env.update(NPROC="2", GPUS="0", TASK="", SCRIPT=str(probe), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(LAUNCH / "local.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted(ln.split()[1:] for ln in proc.stdout.splitlines() if ln.startswith("RANK"))
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
def test_accelerate_launch_default_of_one_thread_becomes_the_cores_unless_told(tmp_path):
    cores = min(len(os.sched_getaffinity(0)), psutil.cpu_count(logical=False))
    assert _launched_threads(tmp_path) == cores
    assert _launched_threads(tmp_path, "--cpu-threads", "1") == 1

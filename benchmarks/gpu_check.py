"""benchmarks/gpu_check [--cpu] [--out FILE.json] [--only PART,...]: what a first GPU must show of bert-dist, in one
command, in under 8 minutes on one GPU; one table, and every figure in a JSON file.

Parts (each in its own process with its own time limit: one that fails or hangs is a row of the table, the others
still run):
    env       torch, CUDA, accelerate, transformers, the GPU, bf16, TF32
    sdpa      which attention kernel runs (flash, memory-efficient, cuDNN, math) for a masked and an unmasked batch
    smoke     sst2, squad and pretrain (--smoke) under fp32, bf16 and fp16: 8 steps with checkpoints, then --resume
    fsdp      accelerate_configs/fsdp.yaml with one process: 8 steps, a save, --resume to 12, the whole model saved
    syncs     host syncs per training step (torch.cuda.set_sync_debug_mode), fine-tuning and pretraining
    speed     BERT-base fine-tuning step vs transformers (ratio, MFU) and pretraining at T=128 (tokens/s, MFU)
    sigterm   SIGTERM mid-run: a checkpoint, exit 0, and --resume finishes the run
    compile   --compile: graph breaks and recompiles (TORCH_LOGS)
--cpu runs every part that can run on the CPU at smoke sizes (the slow test tier runs it, so the script cannot rot);
fp16 and FSDP are GPU-only and show as skipped there (the sync count runs, and reads 0). Exit status 1 if a part
failed.

On a GPU machine without a package index (the image has torch, accelerate, transformers, tokenizers, safetensors,
scikit-learn, scipy, pandas, pyarrow and xxhash, but not datasets or evaluate), bring their wheels from a machine
that has one, into the repository's .whl/ (ignored by git; about 1 MB), for the GPU machine's Python (3.12 there),
at the versions installed here (those the tests pass with):
    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \\
        $(python -m pip list --format=freeze | grep -iE '^(datasets|evaluate|dill|multiprocess)==')
carry .whl along (the device tool: carry [".whl"]) and run `bash benchmarks/gpu_check --out $OUT/gpu_check.json`:
the wrapper installs them into a private directory (pip --no-index --no-deps --target) before anything imports.
The env part says what is still missing or too old (datasets names the pyarrow it needs: add that wheel too).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RUN = str(REPO / "bert_dist" / "run.py")
RESULT = "GPU_CHECK_RESULT "
PARTS = ("env", "sdpa", "smoke", "fsdp", "syncs", "speed", "sigterm", "compile")
GPU_ONLY = ("fsdp",)
TIMED = ("sdpa", "speed")
"""Parts that time something: on a GPU they run alone, after the others, which run side by side."""
LIMITS = {"env": 60, "sdpa": 120, "smoke": 300, "fsdp": 180, "syncs": 180, "speed": 240, "sigterm": 180,
          "compile": 300}
"""Seconds per part on a GPU, beyond which it is stopped and reported as timed out (three times as long with --cpu:
a CPU runs the smoke sizes slower, and CI machines are shared)."""


class Skip(Exception):
    """A part that does not apply here (fp16, FSDP on the CPU)."""


def environment(work: Path) -> dict[str, str]:
    """The variables every run of the check gets: offline, a private HF cache, the repository importable."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HOME": str(work / "hf_home"), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def cli(work: Path, args: list[str], timeout: float, launcher: list[str] | None = None,
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), RUN, *args]
    return subprocess.run(cmd, env={**environment(work), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def last_error(p: subprocess.CompletedProcess) -> str:
    """The line that says why a run failed: its `error:` line, else the last line of a traceback."""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("error:")]
    raised = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
    return (ours or raised or lines or ["(no output)"])[-1][:300]


def steps_of(out: Path) -> int | None:
    f = out / "results.json"
    return json.loads(f.read_text()).get("steps") if f.is_file() else None


# ---------------------------------------------------------------------------------------------
# Parts: each returns a dict of figures, raises Skip where it does not apply, anything else is a failure.


def part_env(work: Path, cpu: bool) -> dict[str, Any]:
    import accelerate
    import torch

    from bert_dist.run import set_tf32

    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                            "accelerate": accelerate.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "datasets", "evaluate", "tokenizers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if not cpu:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device visible (use --cpu for the CPU parts)")
        set_tf32(True)
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported(), tf32=torch.backends.cuda.matmul.allow_tf32,
                    gpus=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version())
    missing = [n for n in ("datasets", "evaluate") if info[n] is None]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not installed: bring the wheels (benchmarks/gpu_check --help)")
    return info


KERNELS = (("flash", ("flash",)), ("cudnn", ("cudnn", "fmha_cudnn", "sm90_flash")), ("memory-efficient",
           ("efficient", "fmha_cutlass", "mem_eff")), ("math (bmm)", ("_scaled_dot_product_attention_math", "bmm")))


def classify(names: set[str]) -> str:
    """The attention implementation a profile's kernel/op names show (the first family that appears)."""
    low = {n.lower() for n in names}
    for family, keys in KERNELS:
        if any(k in n for n in low for k in keys):
            return family
    return "unknown"


def part_sdpa(work: Path, cpu: bool) -> dict[str, Any]:
    """BERT-base's forward and backward on a batch with padding (an attention mask) and one without, profiled: which
    SDPA implementation ran in each."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.speed import make_batch
    from bert_dist.config import preset
    from bert_dist.model import BertForSequenceClassification

    device = torch.device("cpu" if cpu else "cuda")
    cfg = preset("tiny" if cpu else "base")
    model = BertForSequenceClassification(cfg, 2).to(device)
    out: dict[str, Any] = {}
    for precision in ("fp32", "bf16"):
        for inputs in ("padded", "full"):
            batch = make_batch(cfg, 8, 128, inputs, "classification", device)
            activities = [ProfilerActivity.CPU] + ([] if cpu else [ProfilerActivity.CUDA])
            with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"), \
                    profile(activities=activities) as prof:
                model(**batch)["loss"].backward()
                if not cpu:
                    torch.cuda.synchronize()
            names = {e.name for e in prof.events() if "attention" in e.name.lower() or "fmha" in e.name.lower()
                     or "flash" in e.name.lower() or e.name.startswith("aten::bmm")}
            key = f"{precision} {'masked' if inputs == 'padded' else 'unmasked'}"
            out[key] = classify(names)
            out[f"{key} ops"] = sorted(names)[:8]
    return out


SMOKE_TASKS = ("sst2", "squad", "pretrain")


def part_smoke(work: Path, cpu: bool, jobs: int) -> dict[str, Any]:
    """Each task x precision: 8 steps with a checkpoint every 4, then --resume to 12 steps (on the CPU: each task in
    fp32, and sst2 in bf16)."""
    runs = [(t, p) for t in SMOKE_TASKS for p in ("no", "bf16", "fp16")]
    if cpu:
        runs = [(t, p) for t, p in runs if p == "no" or (t, p) == ("sst2", "bf16")]

    def one(task: str, precision: str) -> tuple[str, str]:
        out = work / f"smoke-{task}-{precision}"
        flags = ["--task", task, "--smoke", "--mixed-precision", precision, "--save-every", "4", "--output-dir",
                 str(out)]
        first = cli(work, [*flags, "--max-steps", "8"], timeout=240)
        if first.returncode != 0:
            return f"{task} {precision}", f"fail: {last_error(first)}"
        if not (out / "checkpoints" / "step-00000008").is_dir():
            return f"{task} {precision}", "fail: no step-8 checkpoint"
        again = cli(work, [*flags, "--max-steps", "12", "--resume"], timeout=240)
        if again.returncode != 0:
            return f"{task} {precision}", f"fail (resume): {last_error(again)}"
        if "resumed from" not in " ".join(again.stderr.split()) or steps_of(out) != 12:
            return f"{task} {precision}", "fail: the resume did not continue from step 8 to 12"
        return f"{task} {precision}", "ok"

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = dict(pool.map(lambda a: one(*a), runs))
    if cpu:
        results["fp16"] = "skip (GPU only)"
    failed = [k for k, v in results.items() if v.startswith("fail")]
    if failed:
        raise RuntimeError("; ".join(f"{k}: {results[k]}" for k in failed))
    return results


def part_fsdp(work: Path, cpu: bool) -> dict[str, Any]:
    """FSDP (fsdp.yaml) with one process, bf16: 8 steps with a save, --resume to 12, and the saved model whole."""
    if cpu:
        raise Skip("FSDP needs a GPU (accelerate refuses it on the CPU)")
    from safetensors.torch import load_file

    out = work / "fsdp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "accelerate_configs" / "fsdp.yaml"), "--num_processes", "1", "--mixed_precision", "bf16"]
    flags = ["--task", "sst2", "--smoke", "--save-every", "4", "--output-dir", str(out)]
    first = cli(work, [*flags, "--max-steps", "8"], timeout=150, launcher=launcher)
    if first.returncode != 0:
        raise RuntimeError(last_error(first))
    again = cli(work, [*flags, "--max-steps", "12", "--resume"], timeout=150, launcher=launcher)
    if again.returncode != 0:
        raise RuntimeError(f"resume: {last_error(again)}")
    weights = load_file(str(out / "model.safetensors"))
    return {"steps": steps_of(out), "resumed": "resumed from" in " ".join(again.stderr.split()),
            "saved_tensors": len(weights), "saved_params": sum(t.numel() for t in weights.values())}


SYNC_DRIVER = r'''
import json, sys, warnings
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
count, at_step = [0], []
cuda = torch.cuda.is_available()
if cuda:
    torch.cuda.set_sync_debug_mode("warn")
    warnings.simplefilter("always")
    shown = warnings.showwarning
    def counting(message, *args, **kw):
        if "synchroniz" in str(message):
            count[0] += 1
        else:
            shown(message, *args, **kw)
    warnings.showwarning = counting
register_optimizer_step_post_hook(lambda *a, **k: at_step.append(count[0]))
from bert_dist.run import main
code = main(sys.argv[1:])
per_step = [b - a for a, b in zip(at_step, at_step[1:])][1:-1]  # the first step and the log step aside
print("SYNCS " + json.dumps({"code": code, "steps": len(at_step), "per_step": per_step}), flush=True)
'''


def part_syncs(work: Path, cpu: bool) -> dict[str, Any]:
    """Host syncs between consecutive optimizer steps (none is the goal: the loop reads the device at log steps
    only), for a fine-tuning and a pretraining run of 20 steps logged once, at the end."""
    out: dict[str, Any] = {}
    for task in ("sst2", "pretrain"):
        p = subprocess.run([sys.executable, "-c", SYNC_DRIVER, "--task", task, "--smoke", "--max-steps", "20",
                            "--log-every", "20", "--mixed-precision", "no" if cpu else "bf16", "--output-dir",
                            str(work / f"syncs-{task}")], env=environment(work), capture_output=True, text=True,
                           timeout=150, cwd=REPO)
        found = [ln for ln in p.stdout.splitlines() if ln.startswith("SYNCS ")]
        if p.returncode != 0 or not found:
            raise RuntimeError(f"{task}: {last_error(p)}")
        r = json.loads(found[-1][6:])
        per = r["per_step"]
        out[task] = {"median": statistics.median(per) if per else None, "max": max(per) if per else None,
                     "steps": r["steps"]}
    if cpu:
        out["note"] = "CPU: no device to sync with (the count runs, and reads 0)"
    return out


def part_speed(work: Path, cpu: bool) -> dict[str, Any]:
    """`python -m benchmarks step pretrain`: BERT-base, B=32, T=128, bf16, ours vs transformers (tiny sizes and
    fp32 on the CPU: the figures then mean nothing)."""
    from bert_dist.config import preset
    from bert_dist.perf import mfu

    json_out = work / "speed.json"
    sizes = (["--quick", "--synthetic", "--precisions", "fp32"] if cpu else
             ["--presets", "base", "--shapes", "32x128", "--precisions", "bf16", "--inputs", "full,padded",
              "--rounds", "6", "--warmup", "2", "--pretrain-batch", "32"])
    p = subprocess.run([sys.executable, "-m", "benchmarks", "step", "pretrain", *sizes, "--out", str(json_out)],
                       env=environment(work), capture_output=True, text=True, timeout=220, cwd=REPO)
    if p.returncode != 0:
        raise RuntimeError(last_error(p))
    suites = json.loads(json_out.read_text())["suites"]
    out: dict[str, Any] = {}
    for r in suites["step"]:
        key = f"finetune {r['preset']} {r['batch']}x{r['seq']} {r['precision']} {r['inputs']}"
        tokens = r["ours_examples_per_s"] * r["seq"]
        out[key] = {"vs_transformers": round(r["speedup"], 3), "ours_ms": round(r["ours_ms"], 2),
                    "ref_ms": round(r["ref_ms"], 2),
                    "mfu": mfu(tokens, preset(r["preset"]), r["seq"], "cpu" if cpu else "cuda")}
    for r in suites["pretrain"]:
        key = f"pretrain {r['preset']} {r['batch']}x{r['seq']} {r['precision']}"
        out[key] = {"tokens_per_s": round(r["ours_tokens_per_s"]), "vs_transformers": round(r["speedup"], 3),
                    "mfu": r["ours_mfu"], "ref_mfu": r["ref_mfu"]}
    return out


def part_sigterm(work: Path, cpu: bool) -> dict[str, Any]:
    """SIGTERM to the run's process group mid-run (as SLURM sends it), DataLoader workers included: a checkpoint,
    exit 0, no results; --resume then finishes the run."""
    out, log = work / "sigterm", work / "sigterm.log"
    flags = ["--task", "sst2", "--smoke", "--num-workers", "2", "--output-dir", str(out)]
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, RUN, *flags, "--max-steps", "100000"], env=environment(work),
                             stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, cwd=REPO)
    try:
        deadline = time.time() + 120
        while "step=20 " not in log.read_text() and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
        if "step=20 " not in log.read_text():
            raise RuntimeError(f"no step 20 logged: {log.read_text().strip().splitlines()[-1:]}")
        t0 = time.time()
        os.killpg(p.pid, signal.SIGTERM)
        code = p.wait(timeout=90)
        stop_seconds = time.time() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    text = " ".join(log.read_text().split())  # the console wraps its lines
    saved = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    if code != 0 or not saved or "rerun with --resume" not in text:
        raise RuntimeError(f"exit {code}, {len(saved)} checkpoint(s): {text[-300:]}")
    step = json.loads((saved[-1] / "train_state.json").read_text())["step"]
    again = cli(work, [*flags, "--max-steps", str(step + 5), "--resume"], timeout=150)
    if again.returncode != 0 or steps_of(out) != step + 5:
        raise RuntimeError(f"resume: {last_error(again)}")
    return {"exit": code, "checkpoint_step": step, "seconds_to_stop": round(stop_seconds, 1), "resumed_to": step + 5}


def part_compile(work: Path, cpu: bool) -> dict[str, Any]:
    """--compile on a fine-tuning run with evaluations between steps (train/eval switches, the last short batch):
    graph breaks and recompiles as TORCH_LOGS reports them."""
    out = work / "compile"
    p = cli(work, ["--task", "sst2", "--smoke", "--compile", "--max-steps", "24", "--eval-every", "12",
                   "--mixed-precision", "no" if cpu else "bf16", "--output-dir", str(out)], timeout=280,
            extra_env={"TORCH_LOGS": "graph_breaks,recompiles"})
    if p.returncode != 0:
        raise RuntimeError(last_error(p))
    lines = p.stderr.splitlines()
    breaks = [ln.split("]", 1)[-1].strip() for ln in lines if "Graph break" in ln]
    recompiles = [ln for ln in lines if "Recompiling function" in ln]
    # Each recompile lists its guard failures as "[__recompiles]     - 0/0: <why>" lines.
    reasons = sorted({ln.split("[__recompiles]", 1)[1].strip()[2:].split(": ", 1)[-1][:120] for ln in lines
                      if "[__recompiles]" in ln and "     - " in ln})
    return {"graph_breaks": len(breaks), "recompiles": len(recompiles), "first_break": breaks[0][:200] if breaks
            else None, "recompile_reasons": reasons[:5], "steps": steps_of(out)}


# ---------------------------------------------------------------------------------------------


def run_part(name: str, work: Path, cpu: bool, jobs: int) -> dict[str, Any]:
    fn = globals()[f"part_{name}"]
    try:
        figures = fn(work, cpu, jobs) if name == "smoke" else fn(work, cpu)
        return {"status": "ok", **figures}
    except Skip as e:
        return {"status": "skip", "why": str(e)}
    except Exception as e:  # a part's failure is its row of the table
        return {"status": "fail", "why": f"{type(e).__name__}: {str(e).strip()[:600]}"}


def run_isolated(name: str, work: Path, cpu: bool, jobs: int) -> dict[str, Any]:
    """The part in a process of its own, within its time limit (a crash or a hang is that part's row only)."""
    t0, limit = time.perf_counter(), LIMITS[name] * (3 if cpu else 1)
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--part", name, "--work", str(work), "--jobs", str(jobs),
           *(["--cpu"] if cpu else [])]
    try:
        p = subprocess.run(cmd, env=environment(work), capture_output=True, text=True, timeout=limit, cwd=REPO)
        found = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT)]
        result = json.loads(found[-1][len(RESULT):]) if found else {
            "status": "fail", "why": f"exit {p.returncode}: {last_error(p)}"}
    except subprocess.TimeoutExpired:
        result = {"status": "fail", "why": f"timed out after {limit:g} s"}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def summary(result: dict[str, Any]) -> str:
    """A part's figures in one cell."""
    if result["status"] != "ok":
        return result.get("why", "")
    items = []
    for k, v in result.items():
        if k in ("status", "seconds") or k.endswith(" ops"):
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{a} {b}" for a, b in v.items())
        items.append(f"{k}: {v}")
    return "; ".join(items)


def print_table(results: dict[str, dict[str, Any]], cpu: bool) -> None:
    print(f"\n### bert-dist gpu_check{' --cpu' if cpu else ''}\n")
    print("| part | status | seconds | figures |")
    print("|---|---|---|---|")
    for name, r in results.items():
        cell = summary(r).replace("|", "/").replace("\n", " ")
        print(f"| {name} | {r['status']} | {r.get('seconds', '')} | {cell} |")
    print(flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_check", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the parts that run on the CPU, at smoke sizes")
    p.add_argument("--out", type=Path, help="write every figure to this JSON file")
    p.add_argument("--only", help=f"comma-separated parts (default: all of {', '.join(PARTS)})")
    p.add_argument("--jobs", type=int, help="smoke runs at once (default: 9 on a GPU, 1 on the CPU)")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # one part, in this process (run_isolated)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    jobs = a.jobs or (1 if a.cpu else 9)
    if a.part:  # the child of run_isolated
        print(RESULT + json.dumps(run_part(a.part, a.work, a.cpu, jobs), default=str), flush=True)
        return 0
    parts = [x.strip() for x in (a.only or ",".join(PARTS)).split(",") if x.strip()]
    if bad := [x for x in parts if x not in PARTS]:
        p.error(f"--only: unknown part {bad[0]!r}; choose from {', '.join(PARTS)}")
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}

    def one(name: str) -> None:
        results[name] = run_isolated(name, Path(tmp), a.cpu, jobs)
        print(f"{name}: {results[name]['status']} ({results[name]['seconds']} s)", flush=True)

    with tempfile.TemporaryDirectory(prefix="bert-dist-gpu-check-") as tmp:
        # On a GPU machine (16 cores) the untimed parts run side by side, then the timed ones alone; on the CPU,
        # one after another.
        alone = [n for n in parts if n in ("env", *TIMED) or a.cpu]
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(one, [n for n in parts if n not in alone]))
        for name in alone:
            one(name)
    results = {n: results[n] for n in parts}
    print_table(results, a.cpu)
    report = {"command": " ".join(["benchmarks/gpu_check", *(argv if argv is not None else sys.argv[1:])]),
              "cpu": a.cpu, "seconds": round(time.perf_counter() - t0, 1), "parts": results}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"wrote {a.out}")
    print(f"total {report['seconds']} s")
    return 1 if any(r["status"] == "fail" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

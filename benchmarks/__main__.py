"""python -m benchmarks [suite ...] [--quick] [--device cpu|cuda] [--out FILE.json]

Speed side by side with transformers; every suite prints a markdown table with the ratio. Suites:
step, inference, e2e, preprocess, pretrain (all by default); fastpaths and compile (only when named).
--quick runs each at tiny sizes for 2-3 steps (a smoke test for CI: its figures mean nothing).
Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

# Before datasets / transformers / huggingface_hub are imported: they read these once. A benchmark never
# downloads, and keeps its caches out of the user's.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", "/tmp/hfhome-bench")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from benchmarks.harness import machine  # noqa: E402
from benchmarks.sources import DEFAULT_DATA, DEFAULT_TOKENIZER, Options, scratch_dir, source  # noqa: E402

SUITES = ("step", "inference", "e2e", "preprocess", "pretrain")
EXTRA_SUITES = ("fastpaths", "compile")
"""Run only when named: each fast path of ours switched off and on (not a comparison with transformers)."""


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Options]:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("suites", nargs="*", metavar="suite",
                   help=f"any of {', '.join(SUITES)} (default: all of these), {', '.join(EXTRA_SUITES)}")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2-3 steps: checks the suites run, times nothing")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="write every figure and the machine to this JSON file")
    p.add_argument("--presets", help="comma-separated model presets (default: minilm,base; --quick: tiny)")
    p.add_argument("--shapes", help="comma-separated BxT (default: 32x128,16x384; --quick: 4x32,2x64)")
    p.add_argument("--precisions", help="comma-separated fp32,bf16 (default: both)")
    p.add_argument("--inputs", help="comma-separated full,padded (default: both)")
    p.add_argument("--rounds", type=int, help="timed interleaved rounds per figure (default: 10; --quick: 2)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default: 2; --quick: 1)")
    p.add_argument("--pretrain-batch", type=int, help="pretrain suite batch size at T=128 (default: 32)")
    p.add_argument("--e2e-preset", help="e2e suite model (default: minilm; --quick: tiny)")
    p.add_argument("--e2e-steps", type=int, help="e2e steps per side (default: one epoch; --quick: 3)")
    p.add_argument("--e2e-precision", choices=("fp32", "bf16"), help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--max-rows", type=int, help="preprocess/e2e: only the first N rows (--quick: 1000)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="holds glue/sst2 and squad (the package's "
                                                                       "--data-dir layout)")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="a Hugging Face BERT model directory")
    p.add_argument("--synthetic", action="store_true", help="synthetic data and tokenizer even if real ones exist")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice; --quick: 1)")
    p.add_argument("--cpu-kernels", choices=("auto", "off"), default="auto",
                   help="our model's CPU kernels (bert_dist.kernels), as the flag of a run (default: auto)")
    p.add_argument("--baseline-model", type=Path,
                   help="step and inference suites: also time this bert_dist/model.py (e.g. from `git worktree add "
                        "/tmp/base <commit>`) in the same interleaved rounds, with the same weights")
    a = p.parse_args(argv)
    if bad := [s for s in a.suites if s not in SUITES + EXTRA_SUITES]:
        p.error(f"unknown suite {bad[0]!r}; choose from {', '.join(SUITES + EXTRA_SUITES)}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    q = a.quick

    def listed(value: str | None, default: str) -> list[str]:
        return [x.strip() for x in (value or default).split(",") if x.strip()]

    shapes = [tuple(int(n) for n in s.lower().split("x")) for s in listed(a.shapes, "4x32,2x64" if q else
                                                                             "32x128,16x384")]
    opts = Options(
        device=torch.device(a.device), quick=q, presets=listed(a.presets, "tiny" if q else "minilm,base"),
        shapes=shapes, precisions=listed(a.precisions, "fp32,bf16"), inputs=listed(a.inputs, "full,padded"),
        rounds=a.rounds or (2 if q else 10), warmup=a.warmup if a.warmup is not None else (1 if q else 2),
        pretrain_batch=a.pretrain_batch or (2 if q else 32), e2e_preset=a.e2e_preset or ("tiny" if q else "minilm"),
        e2e_steps=a.e2e_steps or (3 if q else None),
        e2e_precision=a.e2e_precision or ("bf16" if a.device == "cuda" else "fp32"),
        data_dir=a.data_dir, tokenizer=a.tokenizer, synthetic=a.synthetic,
        max_rows=a.max_rows or (1000 if q else None), baseline_model=a.baseline_model, cpu_kernels=a.cpu_kernels,
    )
    if a.baseline_model is not None and not a.baseline_model.is_file():
        p.error(f"--baseline-model {a.baseline_model}: no such file (give the path of a bert_dist/model.py)")
    for name, values, allowed in (("--precisions", opts.precisions, ("fp32", "bf16")),
                                  ("--inputs", opts.inputs, ("full", "padded"))):
        if bad := [v for v in values if v not in allowed]:
            p.error(f"{name}: unknown {bad[0]!r}; choose from {', '.join(allowed)}")
    return a, opts


def main(argv: list[str] | None = None) -> int:
    args, opts = parse_args(argv)
    if args.threads or opts.quick:
        # --quick: one thread, so a smoke run beside other tests never waits on a busy second core.
        torch.set_num_threads(args.threads or 1)
    from benchmarks.fastpaths import compile_suite, fastpaths_suite
    from benchmarks.preprocess import preprocess_suite
    from benchmarks.speed import e2e_suite, inference_suite, pretrain_suite, step_suite

    run = {"step": step_suite, "inference": inference_suite, "e2e": e2e_suite, "preprocess": preprocess_suite,
           "pretrain": pretrain_suite, "fastpaths": fastpaths_suite, "compile": compile_suite}
    suites = args.suites or list(SUITES)
    info = machine(opts.device)
    quick = " (--quick: smoke sizes, not figures)" if opts.quick else ""
    print(f"# bert-dist vs transformers: {' '.join(suites)}{quick}")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    results: dict[str, object] = {"machine": info, "command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
                                  "quick": opts.quick, "suites": {}}
    work = scratch_dir()  # synthetic data and tokenizer, when they stand in
    t0 = time.perf_counter()
    try:
        src = source(opts, work) if {"e2e", "preprocess"} & set(suites) else None
        for name in suites:
            t = time.perf_counter()
            results["suites"][name] = run[name](opts, src)
            print(f"({name}: {time.perf_counter() - t:.1f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does pretraining pay? Pretrain a preset for a time budget, then fine-tune SST-2 from it and from random init.

    python benchmarks/pretrain_then_finetune.py --preset mini --pretrain-minutes 60 --finetune-minutes 15 \
        --objectives mlm-nsp,mlm --data-dir ../shared/data --out benchmarks/results/pretrain_then_finetune_mini.json

1. The corpus is prepared once per objective (`bert-dist prepare`, timed apart from the budgets): WikiText-2's
   raw test split is the only raw text offline, so it is the training corpus; the tokenized variant's validation
   split (other articles) is held out. With --sst2-text the SST-2 training sentences (no labels) are added as
   in-domain text: each is a one-sentence document, so its NSP pairs are always "random" (Google's rule) and NSP
   skews. Objectives: mlm-nsp (Google's sentence pairs, MLM + NSP) and mlm (full-length packed sequences, MLM only).
2. Pretrain (from scratch) on each prepared corpus for the budget; fine-tune SST-2 from each, for a time budget.
3. Fine-tune SST-2 from random init: same preset, tokenizer, recipe and number of steps, so the
   starting weights are the only difference. With --finetune-seeds 42,43,44 each side runs once per seed
   and the table gives the means (SST-2 dev has 872 sentences: one sentence is 0.11 points).
   With --finetune-lanes 2 two fine-tuning runs go at the same time, one thread each
   (`OMP_NUM_THREADS=1`), and the budget is calibrated the same way, two calibration runs side by side.

The WordPiece tokenizer is trained once (`--task tokenizer`) on the pretraining corpus and passed to
every run with --tokenizer, so the random-init runs read text as the pretrained ones do.

Budgets are turned into step counts by a short calibration run of each kind (so the learning-rate
schedule ends exactly at the budget): 50 steps, one mega-batch of length-grouped batches, so that its
lengths are those of the whole run. Data preparation and evaluation are outside the budgets.
Every run is the real entry point (`python -m bert_dist.run`), one process, in --work-dir.
Prints one markdown table (a row per objective) and writes --out (JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Pretraining recipe: a short-budget one (higher lr than Google's 1e-4, which assumes 1M steps of 256).
# Length-grouped: the corpus mixes 128-token WikiText pairs with ~30-token SST-2 pairs, and a batch pads its
# attention to its longest pair (1.24x the tokens/s, measured with 60-step runs of each).
PRETRAIN = dict(batch_size=32, lr=5e-4, warmup_ratio=0.06, weight_decay=0.01, max_length=128, group_by_length=True)
# Fine-tuning recipe, the same for both starting points.
FINETUNE = dict(batch_size=32, lr=1e-4, warmup_ratio=0.1, weight_decay=0.01, max_length=128, group_by_length=True)
SEED = 42


def run(name: str, args: argparse.Namespace, flags: list[str], seed: int = SEED, threads: int | None = None) -> dict:
    """`python -m bert_dist.run <flags>` into work_dir/name; its results.json plus wall seconds.

    threads: OMP_NUM_THREADS for this run (None: inherit, and print to this terminal; otherwise the run's
    output goes to work_dir/name.log, as runs side by side would interleave their progress bars)."""
    out = Path(args.work_dir) / name
    cmd = [sys.executable, "-m", "bert_dist.run", *flags, "--output-dir", str(out), "--overwrite",
           "--seed", str(seed), "--mixed-precision", args.mixed_precision]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext() if threads is None else open(out.parent / f"{name}.log", "w") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT if log else None)
    res = json.loads((out / "results.json").read_text())
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    res["dir"] = str(out)
    return res


def recipe_flags(recipe: dict) -> list[str]:
    """{"lr": 1e-4, "group_by_length": True} -> ["--lr", "0.0001", "--group-by-length"]."""
    flags = []
    for k, v in recipe.items():
        flags += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return flags


def side_by_side(args: argparse.Namespace, jobs: list[tuple]) -> list[dict]:
    """Run (name, flags, seed) jobs: args.finetune_lanes at a time, one thread each when more than one."""
    lanes = args.finetune_lanes
    threads = 1 if lanes > 1 else None
    with ThreadPoolExecutor(max_workers=lanes) as pool:
        return list(pool.map(lambda job: run(job[0], args, job[1], job[2], threads), jobs))


def budget_steps(calibration: dict, minutes: float) -> int:
    """Steps that fit in `minutes` at the calibration run's pace (its first, slower steps included), less 5%:
    a busier machine stretched a 60-minute budget to 62.4 minutes once (BENCHMARKS.md)."""
    per_step = calibration["train_seconds"] / max(calibration["steps"], 1)
    return max(1, int(0.95 * minutes * 60 / per_step))


def prepare(obj: str, args: argparse.Namespace, corpus: list[Path], held_out: Path, tok: str) -> dict:
    """`bert-dist prepare` for one objective into work_dir/prepared-<obj>; its manifest's counts and wall seconds."""
    out = Path(args.work_dir) / f"prepared-{obj}"
    cmd = [sys.executable, "-m", "bert_dist.cli", "prepare", "--train-file", ",".join(map(str, corpus)),
           "--validation-file", str(held_out), "--tokenizer", tok, "--objective", obj, "--max-length",
           str(PRETRAIN["max_length"]), "--seed", str(SEED), "--prepared-dir", str(out), "--overwrite"]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    manifest = json.loads((out / "manifest.json").read_text())
    return {"dir": str(out), "wall_seconds": round(time.perf_counter() - t0, 1),
            **{f"{split}_{k}": manifest["splits"][split][k] for split in ("train", "validation")
               for k in ("documents", "examples", "tokens")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mini", help="architecture for both runs (mini, small, ...)")
    p.add_argument("--objectives", default="mlm-nsp,mlm", help="pretraining objectives to compare: mlm-nsp, mlm")
    p.add_argument("--pretrain-minutes", type=float, default=60.0, help="pretraining budget (training time), each")
    p.add_argument("--finetune-minutes", type=float, default=15.0, help="budget of EACH SST-2 fine-tuning run")
    p.add_argument("--data-dir", default="../shared/data", help="holds wikitext-2/, wikitext-2-tokens/, glue/sst2/")
    p.add_argument("--sst2-text", action="store_true", help="add the SST-2 training sentences to the corpus")
    p.add_argument("--vocab-size", type=int, default=8192, help="WordPiece size (one tokenizer for all runs)")
    p.add_argument("--mixed-precision", default="bf16", help="no | bf16 | fp16")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="pretraining steps of every objective, instead of calibrating them (e.g. from a run's pace)")
    p.add_argument("--calibration-steps", type=int, default=50,
                   help="steps of each timing run: one length-grouped mega-batch (50 batches, longest first)")
    p.add_argument("--max-eval-samples", type=int, default=2000, help="held-out examples scored after pretraining")
    p.add_argument("--finetune-seeds", default=str(SEED), help="comma-separated: each side fine-tunes once per seed")
    p.add_argument("--finetune-lanes", type=int, default=1, choices=[1, 2],
                   help="2: two fine-tuning runs at the same time, one thread each")
    p.add_argument("--work-dir", default="runs/pretrain_then_finetune")
    p.add_argument("--out", default=None, help="write the results here (JSON)")
    args = p.parse_args()
    seeds = [int(x) for x in args.finetune_seeds.split(",")]
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    if not objectives or set(objectives) - {"mlm-nsp", "mlm"}:
        sys.exit(f"--objectives {args.objectives}: give mlm-nsp and/or mlm")

    data = Path(args.data_dir)
    corpus = [data / "wikitext-2" / "test.jsonl"] + ([data / "glue" / "sst2" / "train.jsonl"] if args.sst2_text else [])
    held_out = data / "wikitext-2-tokens" / "validation.jsonl"
    for f in [*corpus, held_out, data / "glue" / "sst2" / "train.jsonl"]:
        if not f.is_file():
            sys.exit(f"missing {f}: pass --data-dir holding wikitext-2/, wikitext-2-tokens/ and glue/sst2/")
    t_start = time.perf_counter()

    tok = run("tokenizer", args, ["--task", "tokenizer", "--train-file", ",".join(map(str, corpus)), "--vocab-size",
                                  str(args.vocab_size)])["dir"]
    per_objective: dict[str, dict] = {}
    for obj in objectives:
        prepared = prepare(obj, args, corpus, held_out, tok)
        pretrain = ["--task", "pretrain", "--preset", args.preset, "--tokenizer", tok, "--prepared-dir",
                    prepared["dir"], *recipe_flags(PRETRAIN)]
        if args.pretrain_steps:
            pt_steps = args.pretrain_steps
        else:
            calib = run(f"calibrate-pretrain-{obj}", args, [*pretrain, "--max-steps", str(args.calibration_steps),
                                                            "--max-eval-samples", "8", "--log-every",
                                                            str(args.calibration_steps)])
            pt_steps = budget_steps(calib, args.pretrain_minutes)
        pt = run(f"pretrain-{obj}", args, [*pretrain, "--max-steps", str(pt_steps), "--max-eval-samples",
                                           str(args.max_eval_samples), "--log-every", str(max(1, pt_steps // 20))])
        per_objective[obj] = {"prepare": prepared, "pretrain": pt}

    finetune = ["--task", "sst2", "--data-dir", str(data), *recipe_flags(FINETUNE)]
    scratch = ["--init", "scratch", "--preset", args.preset, "--tokenizer", tok]
    calib_flags = [*finetune, *scratch, "--max-steps", str(args.calibration_steps), "--max-eval-samples", "8",
                   "--log-every", str(args.calibration_steps)]
    calib_ft = side_by_side(args, [(f"calibrate-finetune-{i}", calib_flags, SEED) for i in range(args.finetune_lanes)])
    ft_steps = min(budget_steps(c, args.finetune_minutes) for c in calib_ft)
    log_every = ["--log-every", str(max(1, ft_steps // 10))]
    jobs = []
    for seed in seeds:
        suffix = "" if seed == SEED else f"-seed{seed}"
        jobs.append((f"sst2-from-scratch{suffix}", [*finetune, *scratch, "--max-steps", str(ft_steps), *log_every],
                     seed))
        jobs += [(f"sst2-from-{obj}{suffix}", [*finetune, "--init", per_objective[obj]["pretrain"]["dir"],
                                               "--max-steps", str(ft_steps), *log_every], seed) for obj in objectives]
    done = iter(side_by_side(args, jobs))
    from_scratch = []
    for obj in objectives:
        per_objective[obj]["sst2_from_pretrained"] = []
    for _ in seeds:
        from_scratch.append(next(done))
        for obj in objectives:
            per_objective[obj]["sst2_from_pretrained"].append(next(done))

    results = {
        "preset": args.preset, "vocab_size": args.vocab_size, "mixed_precision": args.mixed_precision,
        "corpus": [str(c) for c in corpus], "held_out": str(held_out),
        "pretrain_minutes": args.pretrain_minutes, "finetune_minutes": args.finetune_minutes,
        "objectives": per_objective, "finetune_seeds": seeds, "finetune_lanes": args.finetune_lanes,
        "sst2_from_scratch": from_scratch,
        "total_wall_minutes": round((time.perf_counter() - t_start) / 60, 2),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "pretrain_recipe": PRETRAIN, "finetune_recipe": FINETUNE, "seed": SEED,
    }
    print_table(results)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def print_table(r: dict) -> None:
    """A row per objective: the pretraining's held-out scores, then SST-2 from the checkpoint and from random init (the
    mean over the fine-tuning seeds, each seed's value in brackets when there are several). Files written before
    objectives were compared (one MLM + NSP run: `pretrain`, `sst2_from_pretrained`) print as one row."""
    objectives = r.get("objectives") or {"mlm-nsp": {"pretrain": r["pretrain"],
                                                     "sst2_from_pretrained": r["sst2_from_pretrained"]}}
    b = r["sst2_from_scratch"]
    b = b if isinstance(b, list) else [b]  # older files: one seed

    def acc(runs: list[dict]) -> str:
        mean = statistics.mean(x["accuracy"] for x in runs)
        each = " (" + ", ".join(f"{x['accuracy']:.4f}" for x in runs) + ")" if len(runs) > 1 else ""
        return f"{mean:.4f}{each}"

    print(f"\n{r['preset']}, vocab {r['vocab_size']}, {r['mixed_precision']}; each SST-2 run {b[0]['steps']} steps, "
          f"seeds {r.get('finetune_seeds', [SEED])}\n")
    print("| objective | pretraining | held-out MLM accuracy | perplexity | NSP accuracy | SST-2 acc. from checkpoint "
          "| SST-2 acc. from random init | difference |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for obj, o in objectives.items():
        pt, a = o["pretrain"], o["sst2_from_pretrained"]
        a = a if isinstance(a, list) else [a]
        tokens = pt["tokens_per_second"] * pt["train_seconds"]
        run = (f"{pt['steps']} steps, {pt['train_seconds'] / 60:.1f} min, {tokens / 1e6:.2f}M tokens, "
               f"{pt['tokens_per_second']:.0f} tokens/s, {pt['epochs']} epochs")
        nsp = f"{pt['nsp_accuracy']:.4f}" if "nsp_accuracy" in pt else "-"
        diff = statistics.mean(x["accuracy"] for x in a) - statistics.mean(x["accuracy"] for x in b)
        print(f"| {obj} | {run} | {pt['mlm_accuracy']:.4f} | {pt['perplexity']:.1f} | {nsp} | {acc(a)} | {acc(b)} "
              f"| {diff:+.4f} |")


if __name__ == "__main__":
    main()

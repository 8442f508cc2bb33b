"""Many runs of the fine-tuning recipe, one table: `--task glue` (every GLUE task, or those of --tasks, one after
another, scored as the GLUE leaderboard does, the test predictions gathered into a submission folder), and seeds
and learning rates (`--seeds 1,2,3 --lrs 2e-5,3e-5,5e-5`, for one task or for each task of --task glue).

Each run is an ordinary run (results.json, predictions, model, report), started by the entry point's own
single-run path (`run_task`, handed in), so the suite adds no second way to train. What it adds is per-task
defaults (`RECIPE`), skipping tasks whose data is missing, the learning rate picked as the BERT paper did (by its
dev score: here the mean over the seeds), and the summary:

    <output_dir>/glue_results.json   every task's official metrics and score, and the average
    <output_dir>/glue_results.md     the same as a markdown table (with --seeds: mean +/- sd per task)
    <output_dir>/submission/         the tasks' test-set TSVs (CoLA.tsv, SST-2.tsv, MNLI-m.tsv, ...)
    <output_dir>/sweep_results.json  (--seeds/--lrs on one task) every run's scores, the pick, mean and sd
    <output_dir>/sweep_results.md    the same as a markdown table

A task's runs go into <output_dir>/<task>/ (--task glue), or with --seeds/--lrs into .../lr<lr>-seed<seed>/.

Like run.py, finetune.py and pretrain.py this is a top-level recipe: only run.py imports it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from bert_dist import data as D
from bert_dist.config import RunConfig, config_from_overrides
from bert_dist.console import print_table
from bert_dist.data.glue import GLUE_TASKS
from bert_dist.distributed import main_process_first

log = logging.getLogger(__name__)

_LARGE = {"batch_size": 32, "epochs": 3.0, "lr": 2e-5}
_SMALL = {"batch_size": 32, "epochs": 3.0, "lr": 3e-5}
RECIPE: dict[str, dict[str, Any]] = {
    # The BERT paper's fine-tuning recipe (Devlin et al. 2019, sec. 4.1): batch 32 and 3 epochs for every GLUE
    # task, small ones included, and the learning rate picked per task on dev from {5, 4, 3, 2}e-5. The picks
    # were not published: 2e-5 for the large tasks (tens of thousands of steps), 3e-5 for the small ones (CoLA
    # 8.5k, MRPC 3.7k, STS-B 5.7k, RTE 2.5k, WNLI 0.6k examples: a few hundred steps at batch 32).
    "cola": _SMALL, "sst2": _LARGE, "mrpc": _SMALL, "stsb": _SMALL, "qqp": _LARGE, "mnli": _LARGE,
    "qnli": _LARGE, "rte": _SMALL, "wnli": _SMALL,
}
"""Per-task defaults; a flag given on the command line wins for every task (also at the global default's value)."""

OFFICIAL_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation",), "sst2": ("accuracy",), "mrpc": ("f1", "accuracy"),
    "stsb": ("pearson", "spearmanr"), "qqp": ("f1", "accuracy"),
    "mnli": ("validation_matched/accuracy", "validation_mismatched/accuracy"),
    "qnli": ("accuracy",), "rte": ("accuracy",), "wnli": ("accuracy",),
}
"""The leaderboard's metrics of each task (results.json keys); the task's score is their unweighted mean."""

OTHER_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("macro_f1",), "multi_label": ("macro_f1", "exact_match"), "regression": ("spearmanr",),
    "squad": ("exact_match",), "squad_v2": ("exact",)}
"""Tasks that are not GLUE's: the metrics shown beside the main one (which alone is the score)."""

METRIC_NAMES = {"matthews_correlation": "MCC", "accuracy": "acc", "f1": "F1", "pearson": "Pearson",
                "spearmanr": "Spearman", "validation_matched/accuracy": "m acc",
                "validation_mismatched/accuracy": "mm acc", "macro_f1": "macro-F1", "micro_f1": "micro-F1",
                "exact_match": "EM", "exact": "EM"}
DISPLAY = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP", "mnli": "MNLI",
           "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}
SUBMISSION_FILES = ("CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI-m", "MNLI-mm", "QNLI", "RTE", "WNLI", "AX")
"""What gluebenchmark.com expects in the zip (AX: GLUE's diagnostic set, predicted by the MNLI model)."""


def suite_tasks(cfg: RunConfig) -> list[str]:
    """The GLUE tasks to run, in the benchmark's order (ValueError naming --tasks for an unknown one)."""
    if cfg.data.train_file or cfg.data.validation_file:
        raise ValueError("--task glue reads every task from --data-dir or the hub; --train-file/--validation-file "
                         "name one task's files: run that task on its own")
    if not cfg.tasks:
        return list(GLUE_TASKS)
    names = [t.strip().lower() for t in cfg.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in GLUE_TASKS]
    if unknown or not names:
        raise ValueError(f"--tasks: {unknown[0] if unknown else cfg.tasks!r} is not a GLUE task; "
                         f"choose from {','.join(GLUE_TASKS)}")
    return [t for t in GLUE_TASKS if t in names]


def smoke_suite(cfg: RunConfig) -> RunConfig:
    """--smoke for the suite: 20 steps per task (each task then becomes a smoke run of its own) into
    runs/smoke-glue unless --output-dir says otherwise."""
    overrides: dict[str, Any] = {"max_steps": cfg.train.max_steps or 20}
    if cfg.output_dir is None:
        overrides.update(output_dir="runs/smoke-glue", overwrite=True)
    return config_from_overrides(overrides, base=cfg)


def task_config(cfg: RunConfig, task: str, out_dir: Path, given: set[str] | None = None) -> RunConfig:
    """The suite's flags for one task, into out_dir/task: its RECIPE where the command line did not give the flag
    (`given`: config.flags_given; None: where the flag is at the global default)."""
    defaults = RunConfig()
    overrides: dict[str, Any] = {"task": task, "tasks": None, "output_dir": str(out_dir / task)}
    for name, value in RECIPE[task].items():
        if name not in given if given is not None else _leaf(cfg, name) == _leaf(defaults, name):
            overrides[name] = value
    task_cfg = config_from_overrides(overrides, base=cfg)
    if cfg.smoke:
        from bert_dist.data.synthetic import smoke_config

        task_cfg = smoke_config(task_cfg)
    return task_cfg


def _leaf(cfg: RunConfig, name: str) -> Any:
    return next(getattr(g, name) for g in (cfg, cfg.data, cfg.optim, cfg.train) if hasattr(g, name))


def data_missing(cfg: RunConfig, accelerator: Accelerator) -> str | None:
    """Why the task of `cfg` cannot be run (its train or validation data is not there), or None."""
    spec = D.task_spec(cfg)
    try:
        if D.source_files(spec, cfg.data) is None:  # local files: their paths are checked (cheap)
            with main_process_first(accelerator):  # the hub or a named dataset: load it (the run then reads the cache)
                D.load_raw(spec, cfg.data)
    except ValueError as e:
        return str(e)
    return None


def release(accelerator: Accelerator) -> None:
    """Drop the previous run's model, optimizer and loaders from the shared Accelerator, and hand the freed heap back
    to the system (glibc keeps it otherwise: a sweep's resident memory then grows run after run)."""
    accelerator.free_memory()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def task_score(task: str, results: dict[str, Any]) -> tuple[dict[str, float], float]:
    """(the task's official metrics, its leaderboard score): both in percent, as the leaderboard shows them. A task
    that is not GLUE's: its main metric (results.json's main_metric) is its score; its metrics are that one and the
    others of its kind (OTHER_METRICS)."""
    if task in OFFICIAL_METRICS:
        metrics = {k: 100 * float(results[k]) for k in OFFICIAL_METRICS[task]}
        return metrics, sum(metrics.values()) / len(metrics)
    scale = 1 if task in ("squad", "squad_v2") else 100  # the SQuAD scripts give percentages already
    main = results["main_metric"]
    keys = dict.fromkeys((main, *OTHER_METRICS.get(task, ())))
    metrics = {k: scale * float(results[k]) for k in keys if k in results}
    return metrics, metrics[main]


def grid(cfg: RunConfig) -> list[RunConfig]:
    """The runs of `cfg`: itself, or one per (--lrs, --seeds) pair into output_dir/lr<lr>-seed<seed>, lr-major."""
    if not cfg.is_sweep():
        return [cfg]
    return [config_from_overrides({"lr": lr, "seed": seed, "seeds": None, "lrs": None,
                                   "output_dir": str(Path(cfg.output_dir) / f"lr{lr:g}-seed{seed}")}, base=cfg)
            for lr in cfg.lr_list() for seed in cfg.seed_list()]


def run_recipe(cfg: RunConfig, accelerator: Accelerator, run_task: Callable[[RunConfig], dict[str, Any]],
               label: str) -> dict[str, Any]:
    """Run `cfg` (every run of its grid) -> the task's entry: {"status": "done", "metrics", "score", "output_dir"},
    with --seeds/--lrs the pick's (`pick`); {"status": "skipped" | "failed", "reason"}; or, after a SIGTERM, the
    interrupted run's {"interrupted": True, "steps"} (rerun with --resume: finished runs are kept)."""
    runs = grid(cfg)
    finished = [cfg.train.resume and (Path(c.output_dir) / "results.json").is_file() for c in runs]
    if not all(finished):
        why = data_missing(runs[finished.index(False)], accelerator)
        if why is not None:
            log.warning("%s: skipped, no data: %s", label, why)
            return {"status": "skipped", "reason": why}
    done = []
    for k, (run_cfg, was_finished) in enumerate(zip(runs, finished), 1):
        name = label + (f" run {k}/{len(runs)}" if len(runs) > 1 else "")
        if was_finished:  # before the suite was stopped
            log.info("%s: finished earlier (%s)", name, Path(run_cfg.output_dir) / "results.json")
            results = json.loads((Path(run_cfg.output_dir) / "results.json").read_text())
        else:
            o, d, t = run_cfg.optim, run_cfg.data, run_cfg.train
            log.info("%s: lr %g, batch %d, seed %d, %s -> %s", name, o.lr, d.batch_size, run_cfg.seed,
                     f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epochs", run_cfg.output_dir)
            release(accelerator)
            try:
                results = run_task(run_cfg)
            except ValueError as e:  # this task's data or flags: the other tasks can still run
                log.error("%s: failed: %s", name, e)
                return {"status": "failed", "reason": str(e)}
            finally:
                release(accelerator)
            if results.get("interrupted"):
                return results
        metrics, score = task_score(run_cfg.task, results)
        done.append({"lr": run_cfg.optim.lr, "seed": run_cfg.seed, "metrics": metrics, "score": score,
                     "output_dir": run_cfg.output_dir})
    if not cfg.is_sweep():
        return {"status": "done", **{k: done[0][k] for k in ("metrics", "score", "output_dir")}}
    return pick(done)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pick(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The learning rate with the best mean dev score over its seeds (the first listed on a tie), as the BERT paper
    picked one per task on dev; its mean and sd over the seeds, each metric's mean, and its best run (the model to
    keep: `output_dir`, whose test predictions go to a GLUE submission)."""
    by_lr: dict[float, list[dict[str, Any]]] = {}
    for r in runs:
        by_lr.setdefault(r["lr"], []).append(r)
    table = [{"lr": lr, "seeds": [r["seed"] for r in rs], "scores": [r["score"] for r in rs],
              **dict(zip(("mean", "sd"), _mean_sd([r["score"] for r in rs])))} for lr, rs in by_lr.items()]
    chosen = max(table, key=lambda row: row["mean"])  # max keeps the first of equals
    at = by_lr[chosen["lr"]]
    best = max(at, key=lambda r: r["score"])
    metrics = {k: _mean_sd([r["metrics"][k] for r in at]) for k in at[0]["metrics"]}
    return {"status": "done", "metrics": {k: m for k, (m, _) in metrics.items()},
            "metrics_sd": {k: sd for k, (_, sd) in metrics.items()}, "score": chosen["mean"], "sd": chosen["sd"],
            "lr": chosen["lr"], "seeds": chosen["seeds"], "best_seed": best["seed"], "output_dir": best["output_dir"],
            "by_lr": table, "runs": runs}


def run_glue(cfg: RunConfig, accelerator: Accelerator, out_dir: Path,
             run_task: Callable[[RunConfig], dict[str, Any]], given: set[str] | None = None) -> dict[str, Any]:
    """Run the suite's tasks one after another; returns the summary written to glue_results.json
    (or the interrupted task's {"interrupted": True, "steps"} after a SIGTERM: rerun with --resume)."""
    names = suite_tasks(cfg)
    tasks: dict[str, dict[str, Any]] = {}
    for i, task in enumerate(names, 1):
        entry = run_recipe(task_config(cfg, task, out_dir, given), accelerator, run_task,
                           f"GLUE {i}/{len(names)} {task}")
        if entry.get("interrupted"):
            return entry
        tasks[task] = entry
    if not any(t["status"] == "done" for t in tasks.values()):
        raise ValueError("no GLUE task could run: " + "; ".join(f"{k}: {v['reason']}" for k, v in tasks.items()))
    scored = [k for k, v in tasks.items() if v["status"] == "done"]
    summary = {"average": sum(tasks[k]["score"] for k in scored) / len(scored), "averaged_over": scored,
               "tasks": tasks}
    if accelerator.is_main_process:
        summary["submission"] = collect_submission(out_dir, {k: Path(tasks[k]["output_dir"]) for k in scored})
        (out_dir / "glue_results.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out_dir / "glue_results.md").write_text(markdown_table(summary) + "\n")
        print_table("GLUE (dev sets, %)", {DISPLAY[k]: _table_row(v) for k, v in tasks.items()}
                    | {f"average of {len(scored)}": {"score": f"{summary['average']:.1f}"}})
        log.info("GLUE results in %s and %s", out_dir / "glue_results.md", out_dir / "glue_results.json")
    return summary


def collect_submission(out_dir: Path, tasks: dict[str, Path]) -> dict[str, Any]:
    """Copy the test-set TSVs of the tasks' runs ({task: its run's directory: with --seeds, the best run at the
    picked learning rate}) into out_dir/submission; returns {"dir", "files", "missing"}."""
    folder = out_dir / "submission"
    folder.mkdir(exist_ok=True)
    for name in SUBMISSION_FILES:  # rebuilt from this suite's tasks: none of a previous suite's may stay
        (folder / f"{name}.tsv").unlink(missing_ok=True)
    files = []
    for task, run_dir in tasks.items():
        for name in GLUE_TASKS[task].submission_names:
            src = run_dir / f"{name}.tsv"
            if src.is_file():
                shutil.copyfile(src, folder / src.name)
                files.append(src.name)
    missing = [f"{n}.tsv" for n in SUBMISSION_FILES if f"{n}.tsv" not in files]
    return {"dir": str(folder), "files": files, "missing": missing}


def _table_row(t: dict[str, Any]) -> dict[str, str]:
    if t["status"] != "done":
        return {"metrics": f"{t['status']}: {t['reason']}", "score": ""}
    sd = t.get("metrics_sd", {})
    return {"metrics": " / ".join(f"{METRIC_NAMES.get(k, k)} {v:.1f}" + (f" ± {sd[k]:.1f}" if k in sd else "")
                                  for k, v in t["metrics"].items()),
            "score": f"{t['score']:.1f}" + (f" ± {t['sd']:.1f}" if "sd" in t else ""),
            **({"lr": f"{t['lr']:g}", "seeds": str(len(t["seeds"]))} if "lr" in t else {})}


def markdown_table(summary: dict[str, Any]) -> str:
    """The results as a markdown table: one row per task, then the average as the leaderboard computes it; with
    --seeds, each task's mean +/- sd over its seeds at the picked learning rate, and each task's learning rates."""
    swept = any("sd" in t for t in summary["tasks"].values())
    head = "| task | lr (picked) | seeds | metrics (dev, %, mean ± sd) | score (mean ± sd) |" if swept else \
        "| task | metrics (dev, %) | score |"
    lines = [head, "|---|---:|---:|---|---:|" if swept else "|---|---|---:|"]
    for task, t in summary["tasks"].items():
        row = _table_row(t)
        picked = f" {row.get('lr', '')} | {row.get('seeds', '')} |" if swept else ""
        lines.append(f"| {DISPLAY[task]} |{picked} {row['metrics'].replace('|', '/')} | {row['score']} |")
    n = len(summary["averaged_over"])
    lines.append(f"| **average** ({n} task{'s' * (n > 1)}) |{' | |' if swept else ''} | **{summary['average']:.1f}** |")
    lines += ["", "Score: the task's metrics averaged (MRPC, QQP: F1 and accuracy; STS-B: Pearson and Spearman; "
              "MNLI: matched and mismatched accuracy); the average is over the tasks that ran, as the GLUE "
              "leaderboard averages its nine (a partial suite is not comparable to the leaderboard's score)."]
    if swept:
        lines += ["", "With --seeds/--lrs: each task's learning rate is the one with the best mean dev score over the "
                  "seeds; mean ± sample standard deviation over the seeds at that rate; the average is of the means. "
                  "The submission files come from each task's best run at that rate."]
        for task, t in summary["tasks"].items():
            if "by_lr" in t:
                lines += ["", f"#### {DISPLAY[task]}", "", lr_table(t)]
    sub = summary.get("submission")
    if sub:
        lines += ["", f"Test-set predictions for gluebenchmark.com: `{sub['dir']}` ({len(sub['files'])} files)"
                  + (f"; missing for a full submission: {', '.join(sub['missing'])}." if sub["missing"] else ".")]
    return "\n".join(lines)


def lr_table(entry: dict[str, Any]) -> str:
    """A swept task's learning rates as a markdown table: mean +/- sd of the score over the seeds, each seed's."""
    lines = ["| lr | seeds | score (dev, %, mean ± sd) | per seed |", "|---:|---|---:|---|"]
    for row in entry["by_lr"]:
        mark = "**" if row["lr"] == entry["lr"] else ""
        seeds = " / ".join(f"{s}: {x:.1f}" for s, x in zip(row["seeds"], row["scores"]))
        lines.append(f"| {mark}{row['lr']:g}{mark} | {','.join(map(str, row['seeds']))} | "
                     f"{mark}{row['mean']:.2f} ± {row['sd']:.2f}{mark} | {seeds} |")
    return "\n".join(lines)


def run_sweep(cfg: RunConfig, accelerator: Accelerator, out_dir: Path,
              run_task: Callable[[RunConfig], dict[str, Any]]) -> dict[str, Any]:
    """--seeds/--lrs on one task: every run into out_dir/lr<lr>-seed<seed>, the learning rate picked by the mean dev
    score over the seeds; returns the summary written to sweep_results.json (or the interrupted run's results)."""
    entry = run_recipe(config_from_overrides({"output_dir": str(out_dir)}, base=cfg), accelerator, run_task, cfg.task)
    if entry.get("interrupted"):
        return entry
    if entry["status"] != "done":
        raise ValueError(entry["reason"])
    score_metrics = list(OFFICIAL_METRICS.get(cfg.task, list(entry["metrics"])[:1]))
    summary = {"task": cfg.task, "score_metrics": score_metrics, **entry}
    if accelerator.is_main_process:
        (out_dir / "sweep_results.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out_dir / "sweep_results.md").write_text(sweep_markdown(summary) + "\n")
        print_table(f"{cfg.task}: learning rates x seeds (dev, %)",
                    {f"lr {row['lr']:g}" + (" (picked)" if row["lr"] == entry["lr"] else ""):
                     {"mean ± sd": f"{row['mean']:.2f} ± {row['sd']:.2f}",
                      "per seed": " / ".join(f"{x:.1f}" for x in row["scores"])} for row in entry["by_lr"]})
        log.info("%s: picked lr %g: %.2f ± %.2f over seeds %s; best run %s (%s)", cfg.task, entry["lr"],
                 entry["score"], entry["sd"], ",".join(map(str, entry["seeds"])), entry["output_dir"],
                 out_dir / "sweep_results.md")
    return summary


def sweep_markdown(summary: dict[str, Any]) -> str:
    """sweep_results.md: the learning-rate table, the pick, and each metric's mean +/- sd at the pick."""
    metric = " / ".join(METRIC_NAMES.get(k, k) for k in summary["score_metrics"])
    n = len(summary["seeds"])
    lines = [f"### {summary['task']}: {len(summary['by_lr'])} learning rate(s) x {n} seed(s)", "",
             f"Score: {metric} on the dev split, in %" + (" (their mean)." if " / " in metric else "."), "",
             lr_table(summary), "",
             f"Picked: lr {summary['lr']:g}, the best mean over the seeds (as the BERT paper picked the rate on dev): "
             f"{summary['score']:.2f} ± {summary['sd']:.2f} (mean ± sample standard deviation over {n} seeds). "
             f"Its best run (seed {summary['best_seed']}): `{summary['output_dir']}`.", "",
             "| metric (dev, %) | mean ± sd at the picked lr |", "|---|---:|"]
    lines += [f"| {METRIC_NAMES.get(k, k)} | {v:.2f} ± {summary['metrics_sd'][k]:.2f} |"
              for k, v in summary["metrics"].items()]
    return "\n".join(lines)

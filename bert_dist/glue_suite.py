"""`--task glue`: fine-tune every GLUE task (or those of --tasks) one after another, then score the lot as the
GLUE leaderboard does and gather the test predictions into a submission folder.

Each task is an ordinary run into <output_dir>/<task>/ (results.json, predictions, model, report), started by
the entry point's own single-run path (`run_task`, handed in), so the suite adds no second way to train. What
it adds is per-task defaults (`RECIPE`), skipping tasks whose data is missing, and the summary:

    <output_dir>/glue_results.json   every task's official metrics and score, and the average
    <output_dir>/glue_results.md     the same as a markdown table
    <output_dir>/submission/         the tasks' test-set TSVs (CoLA.tsv, SST-2.tsv, MNLI-m.tsv, ...)

Like run.py, finetune.py and pretrain.py this is a top-level recipe: only run.py imports it.
"""

from __future__ import annotations

import json
import logging
import shutil
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

METRIC_NAMES = {"matthews_correlation": "MCC", "accuracy": "acc", "f1": "F1", "pearson": "Pearson",
                "spearmanr": "Spearman", "validation_matched/accuracy": "m acc",
                "validation_mismatched/accuracy": "mm acc"}
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
    spec = D.get_task(cfg.task)
    try:
        if cfg.data.data_dir:
            D.source_files(spec, cfg.data)  # paths only: cheap
        else:
            with main_process_first(accelerator):  # the hub: load it (the run then reads the cache)
                D.load_raw(spec, cfg.data)
    except ValueError as e:
        return str(e)
    return None


def release(accelerator: Accelerator) -> None:
    """Drop the previous task's model, optimizer and loaders from the shared Accelerator."""
    accelerator.free_memory()


def task_score(task: str, results: dict[str, Any]) -> tuple[dict[str, float], float]:
    """(the task's official metrics, its leaderboard score): both in percent, as the leaderboard shows them."""
    metrics = {k: 100 * float(results[k]) for k in OFFICIAL_METRICS[task]}
    return metrics, sum(metrics.values()) / len(metrics)


def run_glue(cfg: RunConfig, accelerator: Accelerator, out_dir: Path,
             run_task: Callable[[RunConfig], dict[str, Any]], given: set[str] | None = None) -> dict[str, Any]:
    """Run the suite's tasks one after another; returns the summary written to glue_results.json
    (or the interrupted task's {"interrupted": True, "steps"} after a SIGTERM: rerun with --resume)."""
    names = suite_tasks(cfg)
    tasks: dict[str, dict[str, Any]] = {}
    for i, task in enumerate(names, 1):
        task_cfg = task_config(cfg, task, out_dir, given)
        done = out_dir / task / "results.json"
        if cfg.train.resume and done.is_file():  # finished before the suite was stopped
            log.info("GLUE %d/%d %s: finished earlier (%s)", i, len(names), task, done)
            results = json.loads(done.read_text())
        else:
            why = data_missing(task_cfg, accelerator)
            if why is not None:
                log.warning("GLUE %d/%d %s: skipped, no data: %s", i, len(names), task, why)
                tasks[task] = {"status": "skipped", "reason": why}
                continue
            o, d, t = task_cfg.optim, task_cfg.data, task_cfg.train
            log.info("GLUE %d/%d %s: lr %g, batch %d, %s -> %s", i, len(names), task, o.lr, d.batch_size,
                     f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epochs", task_cfg.output_dir)
            release(accelerator)
            try:
                results = run_task(task_cfg)
            except ValueError as e:  # this task's data or flags: the other tasks can still run
                log.error("GLUE %d/%d %s: failed: %s", i, len(names), task, e)
                tasks[task] = {"status": "failed", "reason": str(e)}
                continue
            finally:
                release(accelerator)
            if results.get("interrupted"):
                return results
        metrics, score = task_score(task, results)
        tasks[task] = {"status": "done", "metrics": metrics, "score": score, "output_dir": str(out_dir / task)}
    if not any(t["status"] == "done" for t in tasks.values()):
        raise ValueError("no GLUE task could run: " + "; ".join(f"{k}: {v['reason']}" for k, v in tasks.items()))
    scored = [k for k, v in tasks.items() if v["status"] == "done"]
    summary = {"average": sum(tasks[k]["score"] for k in scored) / len(scored), "averaged_over": scored,
               "tasks": tasks}
    if accelerator.is_main_process:
        summary["submission"] = collect_submission(out_dir, scored)
        (out_dir / "glue_results.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out_dir / "glue_results.md").write_text(markdown_table(summary) + "\n")
        print_table("GLUE (dev sets, %)", {DISPLAY[k]: _table_row(v) for k, v in tasks.items()}
                    | {f"average of {len(scored)}": {"score": f"{summary['average']:.1f}"}})
        log.info("GLUE results in %s and %s", out_dir / "glue_results.md", out_dir / "glue_results.json")
    return summary


def collect_submission(out_dir: Path, tasks: list[str]) -> dict[str, Any]:
    """Copy the tasks' test-set TSVs into out_dir/submission; returns {"dir", "files", "missing"}."""
    folder = out_dir / "submission"
    folder.mkdir(exist_ok=True)
    for name in SUBMISSION_FILES:  # rebuilt from this suite's tasks: none of a previous suite's may stay
        (folder / f"{name}.tsv").unlink(missing_ok=True)
    files = []
    for task in tasks:
        for name in GLUE_TASKS[task].submission_names:
            src = out_dir / task / f"{name}.tsv"
            if src.is_file():
                shutil.copyfile(src, folder / src.name)
                files.append(src.name)
    missing = [f"{n}.tsv" for n in SUBMISSION_FILES if f"{n}.tsv" not in files]
    return {"dir": str(folder), "files": files, "missing": missing}


def _table_row(t: dict[str, Any]) -> dict[str, str]:
    if t["status"] != "done":
        return {"metrics": f"{t['status']}: {t['reason']}", "score": ""}
    return {"metrics": " / ".join(f"{METRIC_NAMES[k]} {v:.1f}" for k, v in t["metrics"].items()),
            "score": f"{t['score']:.1f}"}


def markdown_table(summary: dict[str, Any]) -> str:
    """The results as a markdown table: one row per task, then the average as the leaderboard computes it."""
    lines = ["| task | metrics (dev, %) | score |", "|---|---|---:|"]
    for task, t in summary["tasks"].items():
        row = _table_row(t)
        lines.append(f"| {DISPLAY[task]} | {row['metrics'].replace('|', '/')} | {row['score']} |")
    n = len(summary["averaged_over"])
    lines.append(f"| **average** ({n} task{'s' * (n > 1)}) | | **{summary['average']:.1f}** |")
    lines += ["", "Score: the task's metrics averaged (MRPC, QQP: F1 and accuracy; STS-B: Pearson and Spearman; "
              "MNLI: matched and mismatched accuracy); the average is over the tasks that ran, as the GLUE "
              "leaderboard averages its nine (a partial suite is not comparable to the leaderboard's score)."]
    sub = summary.get("submission")
    if sub:
        lines += ["", f"Test-set predictions for gluebenchmark.com: `{sub['dir']}` ({len(sub['files'])} files)"
                  + (f"; missing for a full submission: {', '.join(sub['missing'])}." if sub["missing"] else ".")]
    return "\n".join(lines)

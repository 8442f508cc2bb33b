"""Entry point: `accelerate launch bert_dist/run.py --task sst2 [--init DIR|hub-id|scratch] ...`.

Flags -> RunConfig, the checks that need no data, Accelerator, output directory, then the recipe for the task.

Exit status: 0 when the run finished, or when SIGTERM stopped it after saving a checkpoint (no results.json then:
rerun with --resume to finish it); 1 for a user error (bad flags, data or checkpoints: one red line, no traceback,
and an output directory this run created is removed) or a loss that stayed non-finite (--max-bad-steps: the
checkpoints are kept); 130 on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from bert_dist.config import RunConfig, config_from_args, config_from_overrides, preset
from bert_dist.console import fail, print_table, setup_logging

log = logging.getLogger("bert_dist")


def preflight(cfg: RunConfig) -> None:
    """What can be checked before anything is created or loaded: task, paths, flags against the model."""
    from bert_dist import data as D
    from bert_dist.checkpoint import check_init
    from bert_dist.model import set_cpu_matmul

    if cfg.task not in (*D.TASKS, "glue", "tokenizer"):
        raise ValueError(f"--task: unknown task {cfg.task!r}; choose from {', '.join(D.TASKS)}, glue (every GLUE "
                         "task in turn), tokenizer (train a WordPiece vocabulary only)")
    if cfg.task == "glue":  # each task's data is checked by the suite, which skips a task whose data is missing
        from bert_dist.glue_suite import suite_tasks

        spec = D.get_task(suite_tasks(cfg)[0])
    else:
        spec = D.get_task("pretrain" if cfg.task == "tokenizer" else cfg.task)
        if spec.kind != "pretrain":  # the pretraining recipe reads its corpus its own way
            D.source_files(spec, cfg.data, need_train=not cfg.train.eval_only)
    bert = check_init(cfg.init, cfg.tokenizer, need_mask=spec.kind == "pretrain")
    if bert is None and cfg.init == "scratch":
        bert = preset(cfg.preset)
    max_length = cfg.data.max_length or spec.max_length
    if bert is not None and max_length > bert.max_position_embeddings:  # a hub model is checked once loaded
        raise ValueError(f"--max-length {max_length} is above the model's {bert.max_position_embeddings} positions; "
                         "give a smaller --max-length (longer texts are truncated)")
    if spec.kind == "qa":  # before a tokenizer is trained or data is read
        from bert_dist.data.squad import check_windows

        check_windows(max_length, cfg.data.doc_stride, cfg.data.max_query_length)
    set_cpu_matmul(cfg.train.cpu_matmul)  # a forced onednn that this torch lacks fails here, before anything starts
    check_trackers(cfg.report_to)
    from bert_dist.train import LOCK_FILE, list_checkpoints

    if cfg.train.resume and not cfg.output_dir:  # else it would start a new runs/<task>-<timestamp> and call it resumed
        raise ValueError("--resume continues the run in --output-dir: give --output-dir DIR (or --resume-from a "
                         "checkpoint)")
    if cfg.train.resume_from and Path(cfg.train.resume_from).name.endswith((".tmp", ".old")):
        # The loop removes these (left by a kill during a save): resuming from one would delete it, then fail.
        raise ValueError(f"--resume-from {cfg.train.resume_from}: an incomplete checkpoint (left by a run killed while "
                         "saving); resume from a complete step-N directory beside it")
    if cfg.train.resume_from and not Path(cfg.train.resume_from).is_dir():
        raise ValueError(f"--resume-from {cfg.train.resume_from}: no such checkpoint directory")
    out = Path(cfg.output_dir) if cfg.output_dir else None
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is a file")
    if out is not None:  # where it will be made: an existing directory there must be writable
        parent = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
        if not parent.is_dir():
            raise ValueError(f"--output-dir {out}: {parent} is a file, not a directory; choose another --output-dir")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"--output-dir {out}: {parent} is not writable; choose another --output-dir")
    resuming = cfg.train.resume or cfg.train.resume_from
    content = [p for p in out.iterdir() if p.name != LOCK_FILE] if out is not None and out.is_dir() else []
    if content and not (cfg.overwrite or resuming):
        raise ValueError(f"--output-dir {out} is not empty; pass --overwrite to replace it or --resume to continue it")
    if (cfg.train.resume and out is not None and (out / "results.json").is_file()
            and not list_checkpoints(out)):
        raise ValueError(f"--resume: {out} holds a finished run and no checkpoint to continue from; pass --overwrite "
                         "(without --resume) to train it again, or choose another --output-dir")


def check_trackers(report_to: str | None) -> None:
    """--report-to: each named tracker known to accelerate and installed (accelerate itself only warns and then
    trains without logging). Its own lists: LoggerType (the names) and the trackers it found importable."""
    from accelerate.tracking import _available_trackers
    from accelerate.utils import LoggerType

    known, installed = {t.value for t in LoggerType}, {LoggerType(t).value for t in _available_trackers}
    for name in (t.strip() for t in (report_to or "").split(",") if t.strip()):
        if name not in known:
            raise ValueError(f"--report-to {name}: unknown tracker; choose from {', '.join(sorted(known))}")
        if name != "all" and name not in installed:
            raise ValueError(f"--report-to {name}: the {name} package is not installed; pip install {name}, "
                             "or drop --report-to")


def set_cpu_threads(threads: int | None, accelerator) -> None:
    """--cpu-threads, or where `accelerate launch` left its default of one thread, the cores per local process.

    accelerate launch (without --cpu, --num_cpu_threads_per_process or OMP_NUM_THREADS) sets OMP_NUM_THREADS=1: the
    README's command would train on one core of a many-core machine (1.42x slower on the 2-vCPU VM, BENCHMARKS.md).
    An OMP_NUM_THREADS=1 given on purpose looks the same from here: --cpu-threads 1 keeps one thread.
    """
    import torch

    if accelerator.device.type != "cpu":
        return
    if threads is None:
        launched = "ACCELERATE_DYNAMO_BACKEND" in os.environ and os.environ.get("OMP_NUM_THREADS") == "1"
        if not launched or torch.get_num_threads() != 1:
            return
        import psutil

        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        cores = min(psutil.cpu_count(logical=False) or usable, usable)
        threads = max(1, cores // max(1, local))
        if threads == 1:
            return
        log.info("using %d CPU threads per process (accelerate launch set OMP_NUM_THREADS=1; --cpu-threads to choose)",
                 threads)
    torch.set_num_threads(threads)


def prepare_output_dir(cfg: RunConfig, accelerator) -> tuple[Path, bool]:
    """runs/<task>-<timestamp> by default (one name for all processes); returns (dir, whether this run made it)."""
    from accelerate.utils import broadcast_object_list

    name = [cfg.output_dir or f"runs/{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}"]
    broadcast_object_list(name)
    out = Path(name[0])
    resuming = cfg.train.resume or cfg.train.resume_from
    created = [not out.exists()]
    broadcast_object_list(created)  # decided before the main process makes it
    if resuming:
        check_resume(cfg, out, accelerator.num_processes, accelerator.mixed_precision)
    accelerator.wait_for_everyone()
    try:  # on every process (exist_ok): each fails alike, none waits for a main process that gave up
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output-dir {out}: cannot create it ({e.strerror or e}); "
                         "choose another --output-dir") from None
    locked = [lock_output_dir(out, listing=cfg.overwrite and not resuming) if accelerator.is_main_process else True]
    broadcast_object_list(locked)  # every process refuses alike
    if not locked[0]:
        raise ValueError(f"--output-dir {out} is in use by another bert-dist run (it holds {out / '.lock'}); wait for "
                         "it to end, or choose another --output-dir")
    # --overwrite of a run: its files, run_config.json included, are replaced once this run's data and model have
    # loaded (train.discard_previous_run), so a run that fails on bad input loses nothing.
    # (--task glue's own directory holds no model: its run_config.json is written now, its tasks' later.)
    from bert_dist.train import write_run_config

    replacing = cfg.overwrite and not resuming and cfg.task != "glue" and (out / "run_config.json").is_file()
    if accelerator.is_main_process and not replacing:
        write_run_config(out, cfg.to_dict())
    accelerator.wait_for_everyone()
    return out, created[0]


_held_locks: list[int] = []
"""File descriptors of the output dirs' locks this process holds (closed, so released, when main() ends)."""


def lock_output_dir(out: Path, listing: bool = False) -> bool:
    """Take an exclusive, non-blocking flock on <out>/.lock for the rest of main(); False if another run holds it.
    listing (--overwrite): then list the previous run's outputs, which train.discard_previous_run removes.

    Two runs into one directory (say two --resume of the same job) would write over each other's checkpoints and
    logs. The kernel releases a flock when its process dies, so a killed run's lock file blocks nothing."""
    import fcntl

    from bert_dist.train import LOCK_FILE, PREVIOUS_FILES, list_previous_files

    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held_locks.append(fd)
    if listing:  # what the directory holds now is the previous run's (removed once this run has loaded)
        PREVIOUS_FILES[out.resolve()] = list_previous_files(out)
    return True


RESUME_FIXED = ("task", "init", "preset", "seed", "data.batch_size", "data.group_by_length", "data.max_length",
                "data.max_train_samples", "data.data_dir", "data.train_file", "train.grad_accum")
"""Flags a checkpoint's data position and model depend on: what is checked for a checkpoint written before
checkpoints held their run's config (against the run_config.json of its run directory)."""

RESUME_MAY_CHANGE = ("output_dir", "overwrite", "report_to", "train.resume", "train.resume_from",
                     "train.max_steps", "train.epochs", "train.save_every", "train.eval_every", "train.log_every",
                     "train.keep_checkpoints", "train.max_bad_steps", "train.compile", "train.cpu_matmul",
                     "train.cpu_threads", "data.num_workers", "data.eval_batch_size", "data.max_eval_samples",
                     "data.n_best_size", "data.max_answer_length", "data.null_score_diff_threshold",
                     "mixed_precision")
"""Settings a resume may change: where and how often it logs, evaluates and saves, how long it trains (--max-steps
or --epochs: not below the checkpoint's step, train() checks; the schedule then decays to the new end from where it
is), how fast it runs (kernels, threads, loader workers), what only evaluation reads (--max-eval-samples, SQuAD's
post-processing). Every other setting must be the checkpoint's: the model, data and its order, the optimizer and
schedule (a new --lr would be overridden by the checkpoint's optimizer and scheduler state while run_config.json
claimed it). The precision and the tokenizer are compared as what ran (check_resume, _same_tokenizer)."""


def check_resume(cfg: RunConfig, out: Path, num_processes: int, mixed_precision: str) -> None:
    """Refuse, in one line, a resume that cannot continue the checkpoint's run: another number of processes, other
    settings (but RESUME_MAY_CHANGE), or --resume-from an older checkpoint while newer ones sit in the directory
    this run saves into (keeping the newest K by step, it would delete its own checkpoints and keep those)."""
    from bert_dist.train import CHECKPOINT_RE, RUN_CONFIG_FILE, TRAIN_STATE_FILE, list_checkpoints

    t = cfg.train
    ckpt = Path(t.resume_from) if t.resume_from else (list_checkpoints(out) or [None])[-1]
    run_dir = Path(t.resume_from).parent.parent if t.resume_from else out
    if ckpt is None or not (ckpt / TRAIN_STATE_FILE).is_file():  # a fresh start, or load_checkpoint says what's wrong
        check_same_run(cfg, run_dir / RUN_CONFIG_FILE, RESUME_FIXED)
        return
    state = read_json(ckpt / TRAIN_STATE_FILE)
    # Checkpoints from before num_processes was recorded: each process saved its random states.
    saved_by = state.get("num_processes") or len(list(ckpt.glob("random_states_*.pkl")))
    if saved_by and saved_by != num_processes:
        raise ValueError(f"checkpoint {ckpt} was written by {saved_by} process(es), this run has {num_processes}: "
                         "resume with the same number of processes (the data position and random states are per "
                         "process)")
    # The precision that ran (the flag, else the accelerate config), not the flag as given: unset and "no" are alike.
    if state.get("mixed_precision", mixed_precision) != mixed_precision:
        raise ValueError(f"checkpoint {ckpt} was trained with mixed precision {state['mixed_precision']}, this run "
                         f"has {mixed_precision}: resume with --mixed-precision {state['mixed_precision']}")
    if t.resume_from:
        newer = [p for p in list_checkpoints(out) if int(CHECKPOINT_RE.match(p.name).group(1)) > state.get("step", 0)]
        if newer:
            raise ValueError(f"--resume-from {ckpt} (step {state.get('step')}): {out / 'checkpoints'} holds newer "
                             f"checkpoints ({', '.join(p.name for p in newer)}) that this run would prune its own in "
                             "favour of; move or delete them first")
    if (ckpt / RUN_CONFIG_FILE).is_file():
        check_same_run(cfg, ckpt / RUN_CONFIG_FILE, None, run_dir)
    else:  # written before checkpoints held their run's config
        check_same_run(cfg, run_dir / RUN_CONFIG_FILE, RESUME_FIXED)


def check_same_run(cfg: RunConfig, saved: Path, fixed: tuple[str, ...] | None, run_dir: Path | None = None) -> None:
    """The settings in `fixed` (None: all but RESUME_MAY_CHANGE) are those of the run config `saved`; paths compare
    as the files they name, and the tokenizer by content (`_same_tokenizer`, with the run's directory `run_dir`)."""
    if not saved.is_file():
        return
    old, new = _flat(read_json(saved), keep_none=True), _flat(cfg.to_dict(), keep_none=True)
    for key in fixed or [k for k in old if k not in RESUME_MAY_CHANGE]:
        if key not in old:  # a setting newer than the saved run: it ran with the default
            continue
        if key == "tokenizer":
            if fixed is None:
                _same_tokenizer(old, new, run_dir or saved.parent, saved)
            continue
        if old[key] == new.get(key) or (key in PATH_SETTINGS and _same_path(old[key], new.get(key))):
            continue
        flag = "--" + key.rsplit(".", 1)[-1].replace("_", "-")
        was = old[key]
        fix = (f"without {flag}" if was is None else f"with {flag}" if was is True
               else f"with --no-{flag[2:]}" if was is False else f"with {flag} {was}")
        raise ValueError(f"--resume: {flag} is {_shown(new.get(key))} here but {_shown(was)} in the run being "
                         f"resumed ({saved}); resume {fix}, or start afresh with --overwrite")


PATH_SETTINGS = ("init", "tokenizer", "data.data_dir", "data.train_file", "data.validation_file")


def _same_path(a: str | None, b: str | None) -> bool:
    """Two spellings of one file or directory (relative/absolute, a trailing slash)."""
    try:
        return a is not None and b is not None and os.path.samefile(a, b)
    except OSError:
        return False


def _same_tokenizer(old: dict, new: dict, run_dir: Path, saved: Path) -> None:
    """The resumed run's tokenizer is the checkpoint's, compared by content: --tokenizer if given, else --init's, else
    (--init scratch) the one the run trained, `run_dir`/tokenizer.json (run.resume_tokenizer passes it back)."""
    from bert_dist.tokenizer import find_tokenizer_file

    def effective(d: dict) -> Path | None:
        source = d.get("tokenizer") or (d.get("init") if d.get("init") != "scratch" else run_dir / "tokenizer.json")
        return find_tokenizer_file(source) if source and Path(source).exists() else None

    was, now = effective(old), effective(new)
    if was is not None and now is not None and was.read_bytes() != now.read_bytes():
        raise ValueError(f"--resume: the tokenizer {now} is not the one of the run being resumed ({was}, per {saved}); "
                         "its embeddings fit only its own ids: resume without --tokenizer, or with that one")


def _shown(value) -> str:
    return "unset" if value is None else str(value)


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or ValueError naming the file."""
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({type(e).__name__}: {str(e)[:120]}); restore it, or start afresh "
                         "with --overwrite (without --resume)") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds a JSON {type(d).__name__}, not an object of settings; restore it, or start "
                         "afresh with --overwrite (without --resume)")
    return d


def resume_tokenizer(cfg: RunConfig, out_dir: Path) -> RunConfig:
    """A resumed --init scratch run must reuse the tokenizer it trained: WordPiece training is not
    deterministic (huggingface/tokenizers#1794), and the checkpoint's embeddings fit only its own ids."""
    from bert_dist.train import list_checkpoints

    t = cfg.train
    if cfg.init != "scratch" or cfg.tokenizer or not (t.resume or t.resume_from):
        return cfg
    run_dir = Path(t.resume_from).parent.parent if t.resume_from else out_dir
    if t.resume and not list_checkpoints(out_dir):
        return cfg  # nothing to resume: a fresh start trains its tokenizer
    saved = run_dir / "tokenizer.json"
    if not saved.is_file():
        raise ValueError(f"--resume: {saved} is missing, and a tokenizer trained again would not match the "
                         "checkpoint's embeddings; pass the run's tokenizer with --tokenizer")
    log.info("resuming with the run's own tokenizer %s", saved)
    return config_from_overrides({"tokenizer": str(saved)}, base=cfg)


def run_task(cfg: RunConfig, accelerator, out_dir: Path) -> dict:
    """One recipe into a prepared `out_dir`; then (main process) results.json, the results table and the report."""
    cfg = resume_tokenizer(cfg, out_dir)
    log.info("%s on %d process(es), %s, mixed precision %s -> %s", cfg.task, accelerator.num_processes,
             accelerator.device, accelerator.mixed_precision, out_dir)
    if cfg.task in ("pretrain", "tokenizer"):
        from bert_dist.pretrain import run_pretrain as recipe
    else:
        from bert_dist.finetune import run_finetune as recipe
    results = recipe(cfg, accelerator, out_dir)
    if accelerator.is_main_process and not results.get("interrupted"):
        from bert_dist.model import cpu_matmul
        from bert_dist.report import describe_hardware, write_report

        results["hardware"] = describe_hardware(accelerator)
        if accelerator.device.type == "cpu":
            results["hardware"]["cpu_matmul"] = cpu_matmul()  # --cpu-matmul as resolved here
        (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print_table(f"{cfg.task} results", {"final": {k: v for k, v in results.items() if isinstance(v, (int, float))}})
        try:
            write_report(out_dir)
        except Exception as e:  # the run's results and model are saved: a report bug must not fail the run
            log.warning("no report.html/README.md for %s: %s: %s", out_dir, type(e).__name__, e)
    return results


def main(argv: list[str] | None = None) -> int:
    is_main = os.environ.get("RANK", "0") == "0"
    # Errors are printed by the first process of each machine: on one machine the main process alone (the others
    # meet the same error), and a machine that fails alone (its own files) is still heard.
    reports = is_main or os.environ.get("LOCAL_RANK") == "0"
    started = time.time()
    accelerator = out_dir = None
    created = False
    from bert_dist.train import catch_sigterm

    # SIGTERM is a request to stop, not a kill, until the run's outputs are written (results.json, predictions and the
    # report come after training): train() saves a checkpoint at a step boundary, or after the last step the run
    # finishes (README, "Long runs").
    release_sigterm = catch_sigterm()
    try:
        cfg = config_from_args(argv)
        if cfg.smoke:
            if cfg.task == "glue":
                from bert_dist.glue_suite import smoke_suite as smoke_config
            else:
                from bert_dist.data.synthetic import smoke_config
            cfg = smoke_config(cfg)
        preflight(cfg)
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.train.grad_accum,
            log_with=cfg.report_to,
            project_config=ProjectConfiguration(logging_dir="."),  # set below, once the output dir is settled
        )
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and accelerator.num_processes == 1:
            raise ValueError(
                f"WORLD_SIZE is {world} but accelerate sees 1 process, so each process would run the same job alone; "
                f"on CPUs launch with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {world}`"
            )
        is_main = accelerator.is_main_process
        setup_logging(is_main)
        from bert_dist.train import check_precision

        check_precision(accelerator)
        set_cpu_threads(cfg.train.cpu_threads, accelerator)
        set_seed(cfg.seed)
        out_dir, created = prepare_output_dir(cfg, accelerator)
        if cfg.report_to:
            # TensorBoard writes to <output_dir>/logs/bert-dist/; the same run name goes to every tracker.
            accelerator.project_configuration.logging_dir = str(out_dir / "logs")
            accelerator.init_trackers("bert-dist", config=_flat(cfg.to_dict()),
                                      init_kwargs={"wandb": {"name": out_dir.name}})
        if cfg.task == "glue":
            from bert_dist.glue_suite import run_glue

            results = run_glue(cfg, accelerator, out_dir,
                               lambda c: run_task(c, accelerator, prepare_output_dir(c, accelerator)[0]))
        else:
            results = run_task(cfg, accelerator, out_dir)
        if results.get("interrupted"):
            log.warning("stopped by SIGTERM at step %d with a checkpoint in %s; rerun with --resume to finish",
                        results["steps"], out_dir)
        failed = [t for t, r in results.get("tasks", {}).items() if r.get("status") == "failed"]
        if failed:  # --task glue: the others ran and are scored, but a CI job must notice
            if is_main:
                fail(f"GLUE task(s) failed: {', '.join(failed)} (reasons in {out_dir / 'glue_results.md'}); the "
                     "average covers the others")
            return 1
        return 0
    except ValueError as e:  # user errors: bad flags, data, checkpoints
        if os.environ.get("BERT_DIST_DEBUG"):
            raise
        model_file = None if out_dir is None else out_dir / "model.safetensors"  # saved before the final eval
        kept = model_file is not None and (model_file.exists() or (out_dir / "checkpoints").exists())
        if is_main and created and not kept:
            shutil.rmtree(out_dir, ignore_errors=True)  # nothing to keep: don't leave a run that looks started
        # This run's model, not a previous run's (--overwrite removes that only once the data has loaded).
        trained = model_file is not None and model_file.exists() and model_file.stat().st_mtime >= started
        if reports:
            fail(f"{e} (the trained model is saved in {out_dir}; evaluate it with --eval-only --init {out_dir})"
                 if trained and not cfg.train.eval_only else str(e))
        sys.exit(1)
    except Exception as e:  # the run's own failures get one line; any other exception is a bug: its traceback
        from bert_dist.train import TrainingDiverged

        if isinstance(e, TrainingDiverged):
            if is_main:
                fail(str(e))
            sys.exit(1)
        if not disk_full(e):
            raise
        if reports:
            where = getattr(e, "filename", None) or out_dir or "the output directory"
            fail(f"no space left on the device writing {where}: free some space, or choose another --output-dir "
                 "(and --resume from the last checkpoint, if one was saved)")
        sys.exit(1)
    except KeyboardInterrupt:
        if is_main:
            fail("interrupted", 130)  # the shell's status for a job stopped by Ctrl-C
        sys.exit(130)
    finally:
        if accelerator is not None:
            accelerator.end_training()  # flush the trackers, also after a failure
        while _held_locks:
            os.close(_held_locks.pop())  # releases the output dir (main() may run again in this process: tests)
        release_sigterm()


def disk_full(e: BaseException) -> bool:
    """A write failed for lack of space (or quota): as an OSError, or as safetensors' own error, which carries the
    OS message only as text."""
    import errno

    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return type(e).__name__ == "SafetensorError" and "No space left on device" in str(e)


def _flat(d: dict, prefix: str = "", keep_none: bool = False) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}.", keep_none))
        elif v is not None or keep_none:
            out[prefix + k] = v
    return out


def exit_process(code: int) -> None:
    """sys.exit, except in a multi-process launch: there, once the run is over and its files are written (and the
    process group destroyed by end_training), leave without the interpreter's teardown, where a gloo worker thread
    can still be alive and abort the process ("terminate called without an active exception", SIGABRT) after a
    finished run: seen in 2 of the 5 fresh-clone test runs of session 7."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def launch(argv: list[str] | None = None) -> None:
    """`main`, then `exit_process` with its status (the script's and `bert-dist train`'s entry)."""
    stop_with_launcher()
    try:
        code = main(argv)
    except SystemExit as e:  # main's own exits (user errors: 1, Ctrl-C: 130)
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    exit_process(code)


def stop_with_launcher() -> None:
    """Under `accelerate launch` or torchrun, have the kernel send this process SIGTERM when its launcher dies.

    `kill -TERM <launcher>` (one process: accelerate's simple launcher does not forward it) would otherwise leave
    the run training on, orphaned; with this it saves a checkpoint and stops, as SIGTERM to the run itself does.
    Linux only (prctl), and only for a launcher's child: a run started from a shell (or nohup) outlives it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return
    if not launched_by(parent):
        return
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG


def launched_by(argv: list[str]) -> bool:
    """Whether a parent process with this argv is a launcher: `accelerate launch`, `torchrun`, or python -m
    accelerate.commands.launch / torch.distributed.run (a script of the same name, run by python, too)."""
    words = [a for a in argv if a]
    for i, word in enumerate(words[:3]):  # the program, or python's script or -m module
        name = os.path.basename(word)
        if name in ("torchrun", "accelerate-launch") or (name == "accelerate" and words[i + 1:i + 2] == ["launch"]):
            return True
        if word == "-m" and words[i + 1:i + 2] in (["accelerate.commands.launch"], ["torch.distributed.run"],
                                                    ["torch.distributed.launch"]):
            return True
    return False


if __name__ == "__main__":
    launch()

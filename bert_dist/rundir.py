"""The output directory: what a run writes there, its lock, --overwrite, and what a resume must match.

A run's directory holds run_config.json (every setting), the model, results and logs (RUN_OUTPUTS), and
checkpoints/step-N (each with its run's run_config.json and train_state.json). The main process holds
`<dir>/.lock` for the run's duration. `--overwrite` removes a previous run's outputs by name, and only once the
new run's data and model have loaded (discard_previous_run). `--resume` is refused in one line when the
checkpoint's run differs from this one in anything but RESUME_MAY_CHANGE (check_resume).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from bert_dist.config import RunConfig, TrainConfig, config_from_overrides
from bert_dist.data.glue import GLUE_TASKS

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
TRAIN_LOG = "train_log.jsonl"
"""One JSON line per log step (loss, lr, throughput, grad norm): what the run report plots."""


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a save in progress has a .tmp name and is ignored)."""
    d = out_dir / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def remove_incomplete_checkpoints(out_dir: Path) -> None:
    """Delete what a kill during a save left behind (step-N.tmp, step-N.old); complete ones stay."""
    d = out_dir / "checkpoints"
    for p in sorted(d.glob("step-*.tmp")) + sorted(d.glob("step-*.old")) if d.is_dir() else []:
        log.warning("removing %s, left by a run killed while saving it", p)
        shutil.rmtree(p, ignore_errors=True)


TRAIN_STATE_FILE = "train_state.json"
RUN_CONFIG_FILE = "run_config.json"
"""Every setting of the run (RunConfig.to_dict()), in the output dir and copied into each checkpoint: a resume is
checked against the checkpoint's own copy (check_resume), also when the checkpoint was moved out of its run."""
TOKENIZER_FILE = "tokenizer.json"
"""The run's tokenizer, written into each checkpoint (checkpointing.Checkpointer.save): a resume's tokenizer is
compared with the checkpoint's copy (_same_tokenizer), and a moved --init scratch checkpoint resumes with it
(resume_tokenizer)."""
LOCK_FILE = ".lock"
"""Held (flock) by the main process for the run's duration (lock_output_dir); never removed, never counted as
content of the output dir (nor is its lease, .lock.lease, where the filesystem has no flock)."""


def check_output_dir(cfg: RunConfig) -> None:
    """--output-dir, --resume and --resume-from as given, before anything is created or loaded."""
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
    content = [p for p in out.iterdir() if not p.name.startswith(LOCK_FILE)] if out is not None and out.is_dir() else []
    if content and not (cfg.overwrite or resuming):
        raise ValueError(f"--output-dir {out} is not empty; pass --overwrite to replace it or --resume to continue it")
    if (cfg.train.resume and out is not None and (out / "results.json").is_file()
            and not list_checkpoints(out)):
        raise ValueError(f"--resume: {out} holds a finished run and no checkpoint to continue from; pass --overwrite "
                         "(without --resume) to train it again, or choose another --output-dir")


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
        lock = out / (LEASE_FILE if (out / LEASE_FILE).exists() else LOCK_FILE)
        raise ValueError(f"--output-dir {out} is in use by another bert-dist run (it holds {lock}); wait for it to "
                         "end, or choose another --output-dir")
    # --overwrite of a run: its files, run_config.json included, are replaced once this run's data and model have
    # loaded (discard_previous_run), so a run that fails on bad input loses nothing.
    # (A suite's own directory, --task glue or --seeds/--lrs, holds no model: its run_config.json is written now, its
    # runs' later.)
    suite = cfg.task == "glue" or cfg.is_sweep()
    replacing = cfg.overwrite and not resuming and not suite and (out / "run_config.json").is_file()
    if accelerator.is_main_process and not replacing:
        write_run_config(out, cfg.to_dict())
    accelerator.wait_for_everyone()
    return out, created[0]


_held_locks: list[int] = []
"""File descriptors of the output dirs' locks this process holds (closed, so released, when main() ends)."""
_held_leases: list[tuple[Path, Any]] = []
"""The lease files this process holds where flock is not supported, with the event that stops their refreshing."""
NO_FLOCK = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)
"""flock's errors on a filesystem without it (Lustre mounted without -o flock, NFS without lock support)."""
LEASE_FILE = LOCK_FILE + ".lease"
LEASE_SECONDS = 90.0
"""Where flock is not supported: a lease file not refreshed for this long belongs to a run that is gone."""
LEASE_REFRESH_SECONDS = 15.0


def lock_output_dir(out: Path, listing: bool = False) -> bool:
    """Take an exclusive, non-blocking flock on <out>/.lock for the rest of main(); False if another run holds it.
    listing (--overwrite): then list the previous run's outputs, which discard_previous_run removes.

    Two runs into one directory (say two --resume of the same job) would write over each other's checkpoints and
    logs. The kernel releases a flock when its process dies, so a killed run's lock file blocks nothing. Where the
    filesystem has no flock (Lustre, NFS without locks: ENOSYS), a lease file instead (`take_lease`)."""
    import fcntl

    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    except OSError as e:
        os.close(fd)
        if e.errno not in NO_FLOCK:
            raise
        log.info("%s: the filesystem has no flock (%s); holding a lease file instead", out, os.strerror(e.errno))
        if not take_lease(out):
            return False
    else:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held_locks.append(fd)
    if listing:  # what the directory holds now is the previous run's (removed once this run has loaded)
        PREVIOUS_FILES[out.resolve()] = list_previous_files(out)
    return True


def take_lease(out: Path) -> bool:
    """<out>/.lock.lease, created exclusively (atomic on NFS and Lustre) and refreshed by a thread every
    LEASE_REFRESH_SECONDS while this process runs; False if a live run holds it.

    A lease is free when its holder is gone: a dead process of this host, or a lease that is not refreshed for
    LEASE_SECONDS (a killed run on another node: a requeued job waits that long at most). Ages are read against the
    filesystem's own clock (the mtime of <out>/.lock touched now), never this node's."""
    import socket

    lease, me = out / LEASE_FILE, f"{socket.gethostname()} {os.getpid()}"
    for _ in range(3):  # a lease removed between our look and our create: look again
        try:
            fd = os.open(lease, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if not _lease_is_free(out, lease):
                return False
            with contextlib.suppress(FileNotFoundError):
                lease.unlink()
            continue
        os.write(fd, f"{me}\n".encode())
        os.close(fd)
        _held_leases.append((lease, _keep_refreshed(lease)))
        return True
    return False


def _keep_refreshed(lease: Path) -> Any:
    """Touch `lease` every LEASE_REFRESH_SECONDS from a daemon thread; returns the Event that stops it."""
    import threading

    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(LEASE_REFRESH_SECONDS):
            with contextlib.suppress(OSError):
                os.utime(lease)

    threading.Thread(target=refresh, name="bert-dist-lease", daemon=True).start()
    return stop


def _lease_is_free(out: Path, lease: Path) -> bool:
    """Whether the existing `lease` belongs to a run that is gone (waiting, at most LEASE_SECONDS, to see whether a
    lease of another node is still refreshed)."""
    import socket

    try:
        host, pid = lease.read_text().split()
        first = lease.stat().st_mtime
    except (OSError, ValueError):  # removed meanwhile, or cut short by a kill while being written
        return True
    if host == socket.gethostname():
        return not _alive(int(pid))
    deadline = time.monotonic() + LEASE_SECONDS
    while True:
        os.utime(out / LOCK_FILE)  # the filesystem's clock, not this node's
        try:
            mtime = lease.stat().st_mtime
        except FileNotFoundError:
            return True
        if mtime != first:
            return False  # refreshed: its run is alive
        if (out / LOCK_FILE).stat().st_mtime - mtime > LEASE_SECONDS or time.monotonic() > deadline:
            return True
        log.warning("%s is held by %s (pid %s) on another node: waiting up to %.0f s to see whether that run is "
                    "alive", lease, host, pid, deadline - time.monotonic())
        time.sleep(min(LEASE_REFRESH_SECONDS, max(0.1, deadline - time.monotonic())))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def release_locks() -> None:
    """Close, so release, the output dirs' locks this process holds, and remove its leases (main() may run again in
    one process: tests)."""
    while _held_locks:
        os.close(_held_locks.pop())
    while _held_leases:
        lease, stop = _held_leases.pop()
        stop.set()
        with contextlib.suppress(FileNotFoundError):
            lease.unlink()


RESUME_FIXED = ("task", "init", "preset", "seed", "data.batch_size", "data.group_by_length", "data.max_length",
                "data.max_train_samples", "data.data_dir", "data.train_file", "train.grad_accum")
"""Flags a checkpoint's data position and model depend on: what is checked for a checkpoint written before
checkpoints held their run's config (against the run_config.json of its run directory)."""

RESUME_MAY_CHANGE = ("output_dir", "overwrite", "report_to", "train.resume", "train.resume_from",
                     "train.max_steps", "train.epochs", "train.save_every", "train.eval_every", "train.log_every",
                     "train.keep_checkpoints", "train.max_bad_steps", "train.compile", "train.cpu_kernels",
                     "train.cpu_threads", "train.tf32", "train.dist_timeout", "data.num_workers", "data.num_proc",
                     "data.eval_batch_size", "data.max_eval_samples", "data.n_best_size", "data.max_answer_length",
                     "data.null_score_diff_threshold", "mixed_precision")
"""Settings a resume may change: where and how often it logs, evaluates and saves, how long it trains (--max-steps
or --epochs: not below the checkpoint's step, train() checks; the schedule then decays to the new end from where it
is), how fast it runs (kernels, TF32, threads, loader workers, preparation processes, the collectives' timeout), what
only evaluation reads (--max-eval-samples, SQuAD's post-processing). Every other setting must be the checkpoint's:
the model, data and its order, the optimizer and schedule (a new --lr would be overridden by the checkpoint's
optimizer and scheduler state while run_config.json claimed it). The precision and the tokenizer are compared as
what ran (check_resume, _same_tokenizer)."""


def check_resume(cfg: RunConfig, out: Path, num_processes: int, mixed_precision: str) -> None:
    """Refuse, in one line, a resume that cannot continue the checkpoint's run: another number of processes, other
    settings (but RESUME_MAY_CHANGE), or --resume-from an older checkpoint while newer ones sit in the directory
    this run saves into (keeping the newest K by step, it would delete its own checkpoints and keep those)."""
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
    old, new = flat_settings(read_json(saved), keep_none=True), flat_settings(cfg.to_dict(), keep_none=True)
    for key in fixed or [k for k in old if k not in RESUME_MAY_CHANGE]:
        if key not in old:  # a setting newer than the saved run: it ran with the default
            continue
        if key == "tokenizer":
            if fixed is None:
                _same_tokenizer(old, new, run_dir or saved.parent, saved)
            continue
        if key in TOKENIZER_TRAINING and (old.get("tokenizer") or old.get("init") != "scratch"):
            continue  # they train a tokenizer, and the run was given one: they had no effect
        if old[key] == new.get(key) or (key in PATH_SETTINGS and _same_path(old[key], new.get(key))):
            continue
        flag = "--" + key.rsplit(".", 1)[-1].replace("_", "-")
        was = old[key]
        fix = (f"without {flag}" if was is None else f"with {flag}" if was is True
               else f"with --no-{flag[2:]}" if was is False else f"with {flag} {was}")
        raise ValueError(f"--resume: {flag} is {_shown(new.get(key))} here but {_shown(was)} in the run being "
                         f"resumed ({saved}); resume {fix}, or start afresh with --overwrite")


TOKENIZER_TRAINING = ("data.vocab_size", "data.lowercase")
"""Settings that only train a tokenizer (--init scratch without --tokenizer, --task tokenizer)."""
PATH_SETTINGS = ("init", "tokenizer", "data.data_dir", "data.train_file", "data.validation_file", "data.prepared_dir")


def _same_path(a: str | None, b: str | None) -> bool:
    """Two spellings of one file or directory (relative/absolute, a trailing slash)."""
    try:
        return a is not None and b is not None and os.path.samefile(a, b)
    except OSError:
        return False


def _same_tokenizer(old: dict, new: dict, run_dir: Path, saved: Path) -> None:
    """The resumed run's tokenizer is the checkpoint's, compared by content: --tokenizer if given, else --init's, else
    (--init scratch) the one the run trained, `run_dir`/tokenizer.json (resume_tokenizer passes it back). The
    checkpoint's side is the copy the checkpoint holds (`saved`'s directory: TOKENIZER_FILE), so a tokenizer file
    edited or replaced since is caught; for a checkpoint without one, the file its run config names, as it is now."""
    from bert_dist.tokenizer import find_tokenizer_file, load_tokenizer

    def effective(d: dict) -> Path | None:
        source = d.get("tokenizer") or (d.get("init") if d.get("init") != "scratch" else run_dir / "tokenizer.json")
        return find_tokenizer_file(source) if source and Path(source).exists() else None

    kept = saved.parent / TOKENIZER_FILE
    was, now = kept if kept.is_file() else effective(old), effective(new)
    if was is None or now is None or was.read_bytes() == now.read_bytes():
        return
    try:  # one tokenizer in two forms (vocab.txt and the tokenizer.json the run saved of it) is the same one
        if load_tokenizer(was).to_str() == load_tokenizer(now).to_str():
            return
    except ValueError:
        pass
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
    """A resumed --init scratch run reuses the tokenizer it trained, the copy its checkpoint's embeddings were trained
    with: training it again would give the same one (`train_tokenizer` is deterministic), but only if the corpus and
    the `tokenizers` library are unchanged, and it costs two passes over the corpus."""
    t = cfg.train
    if cfg.init != "scratch" or cfg.tokenizer or not (t.resume or t.resume_from):
        return cfg
    run_dir = Path(t.resume_from).parent.parent if t.resume_from else out_dir
    if t.resume and not list_checkpoints(out_dir):
        return cfg  # nothing to resume: a fresh start trains its tokenizer
    ckpt = Path(t.resume_from) if t.resume_from else list_checkpoints(out_dir)[-1]
    # The checkpoint's own copy first: a checkpoint moved out of its run still has it.
    saved = ckpt / TOKENIZER_FILE if (ckpt / TOKENIZER_FILE).is_file() else run_dir / TOKENIZER_FILE
    if not saved.is_file():
        raise ValueError(f"--resume: {saved} is missing, and a tokenizer trained again would not match the "
                         "checkpoint's embeddings; pass the run's tokenizer with --tokenizer")
    log.info("resuming with the run's own tokenizer %s", saved)
    return config_from_overrides({"tokenizer": str(saved)}, base=cfg)


def flat_settings(d: dict, prefix: str = "", keep_none: bool = False) -> dict:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4} (None values dropped unless keep_none)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_settings(v, f"{prefix}{k}.", keep_none))
        elif v is not None or keep_none:
            out[prefix + k] = v
    return out


def write_run_config(out_dir: Path, config: dict[str, Any]) -> None:
    """run_config.json: every setting of the run (RunConfig.to_dict())."""
    (out_dir / RUN_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def discard_previous_run(accelerator: Any, out_dir: Path, config: dict[str, Any],
                         inputs: tuple[str | None, ...] = ()) -> None:
    """--overwrite: remove what the previous bert-dist run left (results, logs, model, checkpoints, predictions,
    report, ...: else --resume would pick them up, or they would pass for this run's), and write this run's
    run_config.json (`config`). Called once this run's data and model have loaded: a run that fails on its input
    loses nothing.

    Removed: the run outputs (RUN_OUTPUTS) the directory held when this run took its lock (`PREVIOUS_FILES`, listed
    by lock_output_dir), and only if a bert-dist run was there (its run_config.json). Never removed: anything
    else (a user's own files), what this run wrote since (its tracker's logs), and this run's `inputs` (paths of
    --init, --tokenizer, data files: they may sit in the directory)."""
    if accelerator.is_main_process:
        previous = PREVIOUS_FILES.pop(out_dir.resolve(), [])
        kept = [Path(p).resolve() for p in inputs if p]
        for f in previous:
            # An input, or inside an input directory that is not the output dir itself or one holding it (--data-dir
            # DIR --output-dir DIR/out protects DIR's data files, not the previous run's outputs).
            r = f.resolve()
            if any(r == k or r in k.parents or (k in r.parents and k not in out_dir.resolve().parents
                                                 and k != out_dir.resolve()) for k in kept):
                continue
            if f.is_symlink() or f.is_file():
                f.unlink(missing_ok=True)
        for d in sorted((d for d in previous if d.is_dir() and not d.is_symlink()), key=lambda d: len(d.parts),
                        reverse=True):  # deepest first; one this run has written into stays
            if not any(d.iterdir()):
                d.rmdir()
        write_run_config(out_dir, config)
    accelerator.wait_for_everyone()


def run_inputs(cfg: RunConfig) -> tuple[str | None, ...]:
    """The paths a run reads (they may lie in its output dir: `--init <the dir>`, its own tokenizer.json). Of an
    --init or --tokenizer directory, its model and tokenizer files (it may be the previous run itself: the rest of
    it goes)."""
    d = cfg.data
    patterns = ("config.json", "model*.safetensors*", "pytorch_model*.bin*", "tokenizer.json", "vocab.txt",
                "tokenizer_config.json")
    dirs = [Path(p) for p in (cfg.init if cfg.init != "scratch" else None, cfg.tokenizer) if p and Path(p).is_dir()]
    model_files = [str(f) for p in dirs for pattern in patterns for f in p.glob(pattern)]
    return (*model_files, cfg.tokenizer, d.data_dir, d.train_file, d.validation_file)


PREVIOUS_FILES: dict[Path, list[Path]] = {}
"""Output dir (resolved) -> the previous run's outputs it held when this run took its lock: what
discard_previous_run removes."""

RUN_OUTPUTS = ("run_config.json", "config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "results.json",
               "metrics.jsonl", TRAIN_LOG, "predictions.json", "nbest_predictions.json", "null_odds.json",
               "report.html", "README.md", "glue_results.json", "glue_results.md", "sweep_results.json",
               "sweep_results.md")
"""The files a bert-dist run writes at the top of its output directory, besides predictions_<split>.jsonl and the
GLUE submission TSVs (SUBMISSION_TSVS), and inside it: checkpoints/step-N, logs/bert-dist (the tracker's),
submission/<name>.tsv (--task glue), checkpoints/best.safetensors (--keep-best)."""
SUBMISSION_TSVS = {f"{n}.tsv" for spec in GLUE_TASKS.values() for n in spec.submission_names}
RUN_SUBDIRS = {"checkpoints": lambda name: bool(re.fullmatch(r"step-\d+(\.tmp|\.old)?|best\.safetensors(\.tmp)?",
                                                             name)),
               "logs": lambda name: name == "bert-dist", "submission": lambda name: name in SUBMISSION_TSVS}


def list_previous_files(out_dir: Path) -> list[Path]:
    """The previous run's outputs in `out_dir` (RUN_OUTPUTS, SUBMISSION_TSVS, predictions_*.jsonl, RUN_SUBDIRS'
    entries with all they hold, then those directories themselves), if a bert-dist run is there (its
    run_config.json); a user's own files, whatever their names, are not listed."""
    if not (out_dir / RUN_CONFIG_FILE).is_file():
        return []  # no run here: a user's own directory, whose files are not ours to remove
    out = [p for p in out_dir.iterdir() if (p.is_symlink() or p.is_file()) and (
        p.name in RUN_OUTPUTS or p.name in SUBMISSION_TSVS or fnmatch.fnmatch(p.name, "predictions_*.jsonl"))]
    for sub, ours in RUN_SUBDIRS.items():
        d = out_dir / sub
        if not d.is_dir() or d.is_symlink():
            continue
        for p in d.iterdir():
            if ours(p.name):
                out.append(p)
                if p.is_dir() and not p.is_symlink():
                    for root, dirs, files in os.walk(p):  # never into a linked directory: not the run's
                        out += [Path(root, n) for n in (*dirs, *files)]
        out.append(d)  # removed if that leaves it empty
    return out


def resume_checkpoint(cfg: TrainConfig, out_dir: Path) -> Path | None:
    if cfg.resume_from:
        p = Path(cfg.resume_from)
        if not p.is_dir():
            raise ValueError(f"--resume-from: {p} is not a checkpoint directory")
        return p
    if cfg.resume:
        found = list_checkpoints(out_dir)
        if found:
            return found[-1]
        log.warning("--resume: no checkpoint in %s yet; starting from the beginning", out_dir / "checkpoints")
    return None

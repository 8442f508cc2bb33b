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

from bert_dist.config import OWN_TASKS, RunConfig, config_from_args, flags_given, preset
from bert_dist.console import fail, print_table, setup_logging
from bert_dist.rundir import (
    TRAIN_LOG,
    check_output_dir,
    flat_settings,
    prepare_output_dir,
    release_locks,
    resume_tokenizer,
)

log = logging.getLogger("bert_dist")


def preflight(cfg: RunConfig) -> None:
    """What can be checked before anything is created or loaded: task, paths, flags against the model."""
    from bert_dist import data as D
    from bert_dist.weights import check_init

    if cfg.task not in (*D.TASKS, *OWN_TASKS, "glue", "tokenizer"):
        raise ValueError(f"--task: unknown task {cfg.task!r}; choose from {', '.join(D.TASKS)}, glue (every GLUE "
                         f"task in turn), tokenizer (train a WordPiece vocabulary only), {', '.join(OWN_TASKS)} (your "
                         "own data)")
    if cfg.task == "tokenizer" and (cfg.tokenizer or cfg.init != "scratch"):
        raise ValueError("--task tokenizer trains a new WordPiece vocabulary from the corpus: --init and --tokenizer "
                         "do not apply; drop them")
    if cfg.task == "glue":  # each task's data is checked by the suite, which skips a task whose data is missing
        from bert_dist.glue_suite import suite_tasks

        spec = D.get_task(suite_tasks(cfg)[0])
    else:
        spec = D.get_task("pretrain") if cfg.task == "tokenizer" else D.task_spec(cfg)
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
    given = cfg.tokenizer or cfg.init != "scratch"
    defaults = RunConfig().data
    if given and (cfg.data.vocab_size, cfg.data.lowercase) != (defaults.vocab_size, defaults.lowercase):
        log.warning("--vocab-size and --lowercase train a tokenizer; this run uses the one of %s, so they are ignored",
                    "--tokenizer" if cfg.tokenizer else "--init")
    check_trackers(cfg.report_to)
    check_output_dir(cfg)


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


def build_accelerator(cfg: RunConfig):
    """The run's Accelerator: precision, accumulation, trackers, and what a cluster run needs of the process group,
    DDP and FSDP (below); TF32 set as --tf32 says."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import (
        DataLoaderConfiguration,
        DistributedDataParallelKwargs,
        InitProcessGroupKwargs,
        ProjectConfiguration,
    )

    handlers = [
        # accelerate's default is NCCL's 10 minutes, while the main process alone may train a tokenizer or prepare
        # data and the others wait in a collective.
        InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.train.dist_timeout)),
        # The model's only buffer (position ids) never changes: no broadcast of it before every forward.
        DistributedDataParallelKwargs(broadcast_buffers=False),
    ]
    try:
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.train.grad_accum,
            log_with=cfg.report_to,
            project_config=ProjectConfiguration(logging_dir="."),  # set by main, once the output dir is settled
            dataloader_config=DataLoaderConfiguration(non_blocking=True),  # pinned batches on CUDA
            kwargs_handlers=handlers,
            fsdp_plugin=fsdp_plugin(cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")),
        )
    except RuntimeError as e:  # accelerate refusing the setup it was launched with (say FSDP on a CPU machine)
        raise ValueError(f"accelerate cannot set up this run: {str(e).strip().splitlines()[0]} (check the "
                         "accelerate config or launch flags)") from None
    set_tf32(cfg.train.tf32)
    return accelerator


def fsdp_plugin(mixed_precision: str):
    """Under an FSDP launch (accelerate_configs/fsdp*.yaml), its plugin with gradients reduced in fp32, as DDP reduces
    them (accelerate's own policy reduces them in bf16/fp16: a sum over many ranks in 8 mantissa bits); None
    otherwise. Every other FSDP setting comes from the launch (its FSDP_* variables)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("1", "true"):
        return None
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin

    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if low is None:  # fp32: nothing to cast
        return FullyShardedDataParallelPlugin()
    policy = {"param_dtype": low, "reduce_dtype": torch.float32}
    if os.environ.get("FSDP_VERSION", "1") == "1":
        policy["buffer_dtype"] = low
    return FullyShardedDataParallelPlugin(mixed_precision_policy=policy)


def set_tf32(enabled: bool) -> None:
    """--tf32: fp32 matmuls (and cuDNN convolutions) on TF32 tensor cores, on Ampere and newer GPUs. On by default:
    the fp32 throughput users of A100/H100 expect (8x the fp32 rate), with a 10-bit mantissa on the products and fp32
    accumulation, which BERT trains with unchanged (NVIDIA's own recipes run fp32 as TF32); --no-tf32 for full-fp32
    reference numbers. Under bf16/fp16 autocast the matmuls are in 16 bits anyway. Logged when it applies."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        log.info("fp32 matmuls %s", "on TF32 tensor cores (--no-tf32 for full fp32)" if enabled else "in full fp32")


def set_cpu_threads(threads: int | None, accelerator) -> None:
    """--cpu-threads, or where `accelerate launch` left its default of one thread, the cores per local process.

    accelerate launch (without --cpu, --num_cpu_threads_per_process or OMP_NUM_THREADS) sets OMP_NUM_THREADS=1: the
    README's command would train on one core of a many-core machine (BENCHMARKS.md, "Threads under `accelerate
    launch`").
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
        from bert_dist.kernels import cpu_swaps
        from bert_dist.report import describe_hardware, write_report

        results["hardware"] = describe_hardware(accelerator)
        if accelerator.device.type == "cpu":  # --cpu-kernels as resolved here
            on = cfg.train.cpu_kernels == "auto"
            results["hardware"]["cpu_kernels"] = sorted(k.__name__ for k in cpu_swaps().values()) if on else []
        else:
            import torch

            results["hardware"]["tf32"] = torch.backends.cuda.matmul.allow_tf32
        (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print_table(f"{cfg.task} results", {"final": {k: v for k, v in results.items() if isinstance(v, (int, float))}})
        try:
            write_report(out_dir)
        except Exception as e:  # the run's results and model are saved: a report bug must not fail the run
            log.warning("no report.html/README.md for %s: %s: %s", out_dir, type(e).__name__, e)
    return results


def main(argv: list[str] | None = None) -> int:  # noqa: C901 - every way a run ends, each branch one exit line
    is_main = os.environ.get("RANK", "0") == "0"
    # Errors are printed by the first process of each machine: on one machine the main process alone (the others
    # meet the same error), and a machine that fails alone (its own files) is still heard.
    reports = is_main or os.environ.get("LOCAL_RANK") == "0"
    started = time.time()
    accelerator = out_dir = None
    created = lost = False
    from bert_dist.preemption import catch_sigterm

    # SIGTERM is a request to stop, not a kill, until the run's outputs are written (results.json, predictions and the
    # report come after training): train() saves a checkpoint at a step boundary, or after the last step the run
    # finishes (README, "Long runs").
    release_sigterm = catch_sigterm()
    try:
        cfg = config_from_args(argv)
        if cfg.smoke:
            if cfg.task in OWN_TASKS:
                raise ValueError(f"--smoke runs a GLUE, SQuAD or pretraining task on data the project makes; --task "
                                 f"{cfg.task} is for your own data: drop --smoke")
            if cfg.task == "glue":
                from bert_dist.glue_suite import smoke_suite as smoke_config
            else:
                from bert_dist.data.synthetic import smoke_config
            cfg = smoke_config(cfg)
        preflight(cfg)
        from accelerate.utils import set_seed

        accelerator = build_accelerator(cfg)
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
            accelerator.init_trackers("bert-dist", config=flat_settings(cfg.to_dict()),
                                      init_kwargs={"wandb": {"name": out_dir.name}})
        if cfg.task == "glue" or cfg.is_sweep():
            from bert_dist.glue_suite import run_glue, run_sweep

            def one_run(c: RunConfig) -> dict:
                return run_task(c, accelerator, prepare_output_dir(c, accelerator)[0])

            results = (run_glue(cfg, accelerator, out_dir, one_run, flags_given(argv)) if cfg.task == "glue"
                       else run_sweep(cfg, accelerator, out_dir, one_run))
        else:
            results = run_task(cfg, accelerator, out_dir)
        if results.get("interrupted"):
            log.warning("stopped by SIGTERM at step %d with a checkpoint in %s; rerun with --resume to finish",
                        results["steps"], out_dir)
        from bert_dist.preemption import sigterm_received

        if cfg.train.eval_only and sigterm_received():  # nothing to checkpoint: the evaluation ran to its end
            log.warning("SIGTERM during --eval-only: the evaluation was finished and its outputs written")
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
        if is_main and created:
            remove_unstarted(out_dir)
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
        if (reason := lost_contact(e)) is not None:
            lost = True  # its process group is broken: leave without destroying it (NCCL's destroy can hang)
            if reports:
                timeout = cfg.train.dist_timeout
                fail(f"lost contact with another process of the run ({reason}): a process or host died, or waited "
                     f"longer than --dist-timeout {timeout:g} min for the others (the main process alone preparing "
                     f"data?); rerun with --resume" + (f" (checkpoints in {out_dir / 'checkpoints'})"
                                                       if out_dir is not None and (out_dir / "checkpoints").is_dir()
                                                       else ""))
            sys.exit(1)
        if not disk_full(e):
            if is_main and created:  # a bug's traceback follows; a rerun into the same --output-dir is not refused
                remove_unstarted(out_dir)
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
        if accelerator is not None and not lost:
            accelerator.end_training()  # flush the trackers, also after a failure
        release_locks()
        release_sigterm()


def lost_contact(e: BaseException) -> str | None:
    """Why a collective failed because another process is gone or silent (a dead peer, a timeout), in a few words;
    None for any other error. gloo raises these as plain RuntimeErrors ("[.../pair.cc:553] Connection closed by
    peer ..."), NCCL and the rendezvous store as torch.distributed.DistError."""
    import re

    import torch.distributed as dist

    text = str(e).strip()
    gloo = isinstance(e, RuntimeError) and "gloo" in text and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Timed out waiting",
                            "Connection refused", "Broken pipe", "Socket Timeout"))
    if not (gloo or isinstance(e, dist.DistError)):
        return None
    first = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text.splitlines()[0] if text else type(e).__name__)
    return first.split(". ")[0][:160]


def remove_unstarted(out_dir: Path) -> None:
    """Remove the output dir this run created, if it holds no model, checkpoint or log yet: a run that failed before
    training must not leave a directory that looks started (and that a rerun would be refused as not empty)."""
    started = ("model.safetensors", "checkpoints", TRAIN_LOG, "metrics.jsonl")
    if not any((out_dir / f).exists() for f in started):
        shutil.rmtree(out_dir, ignore_errors=True)  # else its logs say how far it got


def disk_full(e: BaseException) -> bool:
    """A write failed for lack of space (or quota): as an OSError, or as safetensors' own error, which carries the
    OS message only as text."""
    import errno

    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return type(e).__name__ == "SafetensorError" and "No space left on device" in str(e)


def exit_process(code: int) -> None:
    """sys.exit, except in a multi-process launch: there, once the run is over and its files are written (and the
    process group destroyed by end_training), leave without the interpreter's teardown, where a gloo worker thread
    can still be alive and abort the process ("terminate called without an active exception", SIGABRT) after a
    finished run."""
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

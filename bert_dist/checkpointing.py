"""Resumable state: what a checkpoint holds, how it is written, pruned and loaded, and the checks a resume passes.

A checkpoint is written only at an optimizer-step boundary. accelerate's save_state holds the model, optimizer,
gradient scaler and every process's RNG states; ours beside it: `TrainState` (train_state.json), the scheduler
(lr_scheduler.pt), the run's config and tokenizer, and with --keep-best the best evaluation's weights
(best.safetensors: `BestModel`). Not accelerate's register_for_checkpointing: it pickles the objects and loads them
back with weights_only=False, so a crafted checkpoint would run code on --resume. Checkpoints are data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file

from bert_dist.config import TrainConfig
from bert_dist.distributed import gather_state_dict, load_whole_state_dict, share_from_main
from bert_dist.rundir import (
    RUN_CONFIG_FILE,
    TRAIN_LOG,
    TRAIN_STATE_FILE,
    list_checkpoints,
    remove_incomplete_checkpoints,
)

log = logging.getLogger(__name__)

SCHEDULER_FILE = "lr_scheduler.pt"  # a state dict of numbers and lists, loaded with weights_only=True
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainState:
    """Where the loop is; saved with every checkpoint, so a resume continues mid-epoch exactly."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed (skipped on resume)."""
    examples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    skipped_steps: int = 0
    """fp16: optimizer steps the gradient scaler skipped (inf/NaN gradients while it calibrates its scale). The
    learning-rate schedule counts them as steps: deciding otherwise would read the device every step."""
    nonfinite_steps: int = 0
    """Optimizer steps with a non-finite loss or gradient norm (their update was skipped)."""
    batches_per_epoch: int = 0
    """Micro-batches per epoch (per process) of the run that saved it: other data since would make its position (and
    the epoch) point elsewhere (0: a checkpoint from before it was recorded)."""
    window: dict[str, float] = field(default_factory=dict)
    """The log window's running sums at the checkpoint, so the first log line after a resume is unchanged."""
    eval_pending: bool = False
    """A SIGTERM cut the evaluation of this step short: a resume runs it first."""
    best_step: int | None = None
    """--keep-best / early stopping: the step of the best evaluation so far by the chosen metric (the earliest of
    equals); with --keep-best its weights are checkpoints/best.safetensors, and each checkpoint's best.safetensors."""
    best_value: float | None = None
    best_metrics: dict[str, Any] = field(default_factory=dict)
    """That evaluation's metrics (what results.json reports of the best model)."""
    evals_without_improvement: int = 0
    """Evaluations in a row that did not improve on `improved_value` by more than --early-stopping-delta."""
    improved_value: float | None = None
    """The value the last improvement by more than --early-stopping-delta reached (early stopping counts from it)."""
    compared_step: int = -1
    """The step of the last evaluation compared: one redone on a resume (the last step's) is not counted twice."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            setattr(self, k, v)


class Checkpointer:
    """Saves checkpoints into `out_dir`/checkpoints (the newest `keep`) and loads one to resume.

    `files`: {name: text} written into every checkpoint (the run's tokenizer.json, which a resume is checked
    against). Every method is called on every process: the saves and loads meet at barriers.
    """

    def __init__(self, *, accelerator: Accelerator, out_dir: Path, keep: int, scheduler: Any,
                 files: dict[str, str] | None = None, best: BestModel | None = None):
        self.accelerator, self.out_dir, self.keep, self.scheduler = accelerator, out_dir, keep, scheduler
        self.files = files or {}
        self.best = best  # its weights go into every checkpoint, and come back from the one resumed
        self.last_step = -1  # the step of the newest checkpoint this run saved or resumed from
        if accelerator.is_main_process:
            remove_incomplete_checkpoints(out_dir)

    def newest(self) -> Path | None:
        kept = list_checkpoints(self.out_dir)
        return kept[-1] if kept else None

    def resume(self, *, state: TrainState, path: Path | None, restart: bool, num_batches: int,
               num_steps: int) -> None:
        """Load checkpoint `path` into the prepared objects and `state`, after checking that it fits this run
        (`num_batches` micro-batches per epoch, `num_steps` steps in all). The log files lose what the killed run
        wrote after it (it is done again). `path` None: a fresh start; `restart` (--resume without a checkpoint,
        killed before its first one) trims the logs to nothing."""
        if path is not None:
            self.load(path=path, state=state)
            if state.batches_per_epoch and state.batches_per_epoch != num_batches:
                raise ValueError(f"the training data changed since the checkpoint {path}: {num_batches} batches per "
                                 f"epoch now, {state.batches_per_epoch} then (a data file edited or replaced under "
                                 "the same path?); resume with the run's own data, or start afresh with --overwrite")
            if state.step > num_steps:  # the loop would not run, and the results would say `state.step` steps
                raise ValueError(f"--max-steps/--epochs: this run ends at step {num_steps}, before the step "
                                 f"{state.step} of the checkpoint {path}; resume with --max-steps {state.step} or more")
            self.last_step = state.step
        if self.best is not None:
            self.best.resumed(path, state)
        if self.accelerator.is_main_process and (path is not None or restart):
            # The final evaluation is redone when the checkpoint is the last step, so its line goes as well.
            # So is the one that stopped the run early (the run goes on to its end from there).
            finished = state.step == num_steps or (self.best is not None and self.best.exhausted(state))
            trim_logs(self.out_dir, state.step, redo_eval=path is not None and finished)
        state.batches_per_epoch = num_batches

    def save(self, state: TrainState) -> Path:
        """Write step-N.tmp, then rename it to step-N: a kill at any point leaves the previous one newest."""
        acc = self.accelerator
        final = self.out_dir / "checkpoints" / f"step-{state.step:08d}"
        tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        with _quiet_accelerate():
            acc.save_state(str(tmp))
        if acc.is_main_process:  # both are the same on every process
            # The data position (batches_in_epoch) and random states are per process: a resume needs as many.
            (tmp / TRAIN_STATE_FILE).write_text(json.dumps({**state.state_dict(), "num_processes": acc.num_processes,
                                                            "mixed_precision": acc.mixed_precision}))
            torch.save(self.scheduler.state_dict(), tmp / SCHEDULER_FILE)
            if (self.out_dir / RUN_CONFIG_FILE).is_file():  # what a resume is checked against (rundir.check_resume)
                shutil.copy(self.out_dir / RUN_CONFIG_FILE, tmp / RUN_CONFIG_FILE)
            for name, text in self.files.items():
                (tmp / name).write_text(text)
            if self.best is not None:
                self.best.add_to(tmp, state)
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():  # from another trajectory (--resume-from an older checkpoint)
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
            self.prune()
            log.info("saved checkpoint %s", final)
        acc.wait_for_everyone()
        self.last_step = state.step
        return final

    def prune(self) -> None:
        for stale in list_checkpoints(self.out_dir)[:-self.keep]:
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, *, path: Path, state: TrainState) -> None:
        """accelerate load_state, then our TrainState and scheduler, with one clear error for a checkpoint that is
        broken or belongs to another setup. Nothing in it is unpickled beyond tensors and plain containers."""
        acc = self.accelerator
        try:
            if not (path / TRAIN_STATE_FILE).is_file():
                raise FileNotFoundError(f"no {TRAIN_STATE_FILE} (a checkpoint of an older bert-dist: its pickled "
                                        "training state is not loaded, for safety)")
            # Every process checks every process's random states (the same error everywhere, no lone failing rank):
            # without them a resumed run draws other dropout masks than the uninterrupted one.
            missing = [f"random_states_{i}.pkl" for i in range(acc.num_processes)
                       if not (path / f"random_states_{i}.pkl").is_file()]
            if missing:
                raise FileNotFoundError(f"no {', '.join(missing)} (the random states of {len(missing)} process(es))")
            torch.manual_seed(int.from_bytes(os.urandom(7), "little"))
            sentinel = torch.get_rng_state()
            with _quiet_accelerate():
                acc.load_state(str(path))
            if torch.equal(torch.get_rng_state(), sentinel):  # accelerate only logs (at INFO) a file it can't read
                raise ValueError(f"random_states_{acc.process_index}.pkl did not load")
            saved = json.loads((path / TRAIN_STATE_FILE).read_text())
            saved.pop("num_processes", None)  # checked before anything loaded (rundir.check_resume), as is
            saved.pop("mixed_precision", None)
            state.load_state_dict(saved)
            self.scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, map_location="cpu", weights_only=True))
        except Exception as e:  # torch/safetensors/pickle raise many types; all mean this checkpoint can't be used
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise ValueError(
                f"cannot resume from {path} ({type(e).__name__}: {msg}); it is incomplete, or was written by a run "
                "with another model or flags: resume with the run's own flags, or start afresh with --overwrite "
                "(without --resume)"
            ) from None
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, state.step, state.epoch,
                 state.batches_in_epoch)


@contextlib.contextmanager
def _quiet_accelerate():
    """accelerate logs a line per file it saves or loads: our one line per checkpoint is enough."""
    loggers = [logging.getLogger(n) for n in ("accelerate.accelerator", "accelerate.checkpointing")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def trim_logs(out_dir: Path, step: int, redo_eval: bool = False) -> None:
    """Drop evaluations and log lines written after the checkpoint by the run that was killed: they will be redone.
    redo_eval: the evaluation at `step` itself will be redone too, so its line goes as well."""

    def before(line: str, last: int) -> bool:
        try:
            return json.loads(line).get("step", 0) <= last
        except ValueError:  # a line cut short by the kill
            return False

    for f, last in ((out_dir / METRICS_FILE, step - redo_eval), (out_dir / TRAIN_LOG, step)):
        if f.is_file():
            f.write_text("".join(ln for ln in f.read_text().splitlines(keepends=True)
                                 if ln.strip() and before(ln, last)))


BEST_FILE = "best.safetensors"
"""The best evaluation's weights (--keep-best): checkpoints/best.safetensors, and a hard link in each checkpoint."""


class BestModel:
    """The best evaluation so far by one metric, for --keep-best and early stopping. Its step, value and metrics are
    in the TrainState; with --keep-best its weights are in checkpoints/best.safetensors (written by the main process,
    under a temporary name, whenever an evaluation improves on the best) and, hard-linked, in every checkpoint: a
    resume takes them from the checkpoint it resumes (a newer best.safetensors belongs to the evaluations it redoes),
    and pruning checkpoints never loses them.

    Every method is called on every process. Evaluations compare the main process's value, shared, so every process
    decides alike (gathering the weights under FSDP is a collective that all of them join).
    """

    def __init__(self, *, accelerator: Accelerator, model: torch.nn.Module, out_dir: Path, cfg: TrainConfig,
                 metric: str):
        self.accelerator, self.model, self.cfg = accelerator, model, cfg
        self.metric = cfg.best_metric or metric
        assert self.metric, "train(main_metric=...): the metric to compare evaluations by"
        self.keep, self.patience, self.delta = cfg.keeps_best(), cfg.early_stopping_patience, cfg.early_stopping_delta
        self.path = out_dir / "checkpoints" / BEST_FILE

    def key(self, metrics: dict[str, Any]) -> str:
        """The metric's name in `metrics`: itself, or the first evaluation split's (MNLI's validation_matched/...)."""
        if self.metric in metrics:
            return self.metric
        split = next((k for k in metrics if k.endswith("/" + self.metric)), None)
        if split is None:
            raise ValueError(f"--best-metric {self.metric}: the evaluation has no such metric (it has "
                             f"{', '.join(metrics)}); give --best-metric one of those")
        return split

    def observe(self, state: TrainState, metrics: dict[str, Any]) -> None:
        """Compare the evaluation at `state.step` with the best: a better one (strictly) becomes the best, its
        weights saved; one that does not improve by more than --early-stopping-delta counts toward the patience."""
        if state.step <= state.compared_step:  # redone after a resume: compared already
            return
        key = self.key(metrics)
        value = share_from_main(metrics[key] if self.accelerator.is_main_process else None)
        state.compared_step = state.step
        if value is None or not math.isfinite(value):
            state.evals_without_improvement += 1
            log.warning("step %d: %s is %s, so not compared with the best", state.step, key, value)
            return
        sign = 1.0 if self.cfg.greater_is_better(key) else -1.0
        if state.best_value is None or sign * (value - state.best_value) > 0:
            state.best_step, state.best_value, state.best_metrics = state.step, value, dict(metrics)
            if self.keep:
                self.save(state, key)
        if state.improved_value is None or sign * (value - state.improved_value) > self.delta:
            state.improved_value, state.evals_without_improvement = value, 0
        else:
            state.evals_without_improvement += 1
        waiting = (f"; {state.evals_without_improvement} evaluation(s) without improvement"
                   + (f" of {self.patience}" if self.patience else "")) if state.evals_without_improvement else ""
        log.info("best %s %.6g at step %d%s", key, state.best_value, state.best_step, waiting)

    def exhausted(self, state: TrainState) -> bool:
        """Early stopping: --early-stopping-patience evaluations in a row without improvement."""
        return self.patience is not None and state.evals_without_improvement >= self.patience

    def save(self, state: TrainState, key: str) -> None:
        from bert_dist.weights import save_weights

        weights = gather_state_dict(self.accelerator, self.model)
        if self.accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_weights(weights, self.path, {"step": str(state.step), "metric": key, "value": repr(state.best_value)})

    def add_to(self, checkpoint: Path, state: TrainState) -> None:
        """Main process, inside Checkpointer.save: the best weights as of `state` into the checkpoint being written."""
        if self.keep and state.best_step is not None:
            link_or_copy(self.path, checkpoint / BEST_FILE)

    def resumed(self, checkpoint: Path | None, state: TrainState) -> None:
        """After the checkpoint (None: a fresh start) is loaded into `state`: its best weights become the run's (what
        a killed run wrote since is dropped)."""
        if not self.keep:
            return
        src = checkpoint / BEST_FILE if checkpoint is not None and state.best_step is not None else None
        if src is not None:
            step = saved_step(src)
            if step != state.best_step:
                raise ValueError(f"cannot resume from {checkpoint}: its {BEST_FILE} "
                                 + ("is missing" if step is None else f"holds step {step}")
                                 + f", not its best evaluation's (step {state.best_step}); resume from another "
                                 "checkpoint, or start afresh with --overwrite (without --resume)")
        if self.accelerator.is_main_process:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.unlink(missing_ok=True)
            if src is None:
                self.path.unlink(missing_ok=True)
            else:
                link_or_copy(src, tmp)
                os.replace(tmp, self.path)

    def restore(self, state: TrainState) -> bool:
        """At the end of training, with --keep-best: the best weights into the model, unless they are the last step's
        (the model's already). Returns whether it loaded them."""
        if not self.keep or state.best_step is None or state.best_step == state.step:
            return False
        self.accelerator.wait_for_everyone()  # the main process wrote them
        if saved_step(self.path) != state.best_step:
            raise ValueError(f"{self.path} does not hold the best evaluation's weights (step {state.best_step}); "
                             "was it replaced during the run? resume from a checkpoint with --resume")
        from bert_dist.weights import TIED_KEYS

        missing = load_whole_state_dict(self.accelerator, self.model, load_file(str(self.path)))
        assert set(missing) <= set(TIED_KEYS), missing[:5]
        log.info("the run's model is the best evaluation's (step %d, %s %.6g), not the last step's (%d)",
                 state.best_step, self.key(state.best_metrics), state.best_value, state.step)
        return True

    def results(self, state: TrainState) -> dict[str, Any]:
        """What results.json says of the choice."""
        if state.best_step is None:
            return {"best_metric": self.metric, "best_step": None, "best_value": None}
        return {"best_metric": self.key(state.best_metrics), "best_step": state.best_step,
                "best_value": state.best_value}


def saved_step(path: Path) -> int | None:
    """The step a best.safetensors was written at (its metadata), or None if there is none readable."""
    try:
        with safe_open(str(path), "pt") as f:
            return int((f.metadata() or {})["step"])
    except Exception:  # missing, cut short, or not ours: no step
        return None


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no space: the weights file is only ever replaced, never written in place), else a copy."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(src, dst)

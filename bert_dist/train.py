"""The task-agnostic loop: `train()` and the `train_step()` it repeats.

It knows nothing about GLUE, SQuAD or pretraining: a recipe hands it a prepared model, optimizer, scheduler and
train loader (`prepare_training`), and an `eval_fn(step) -> metrics`. Everything is counted in optimizer steps. The
loss and token counts stay on the device (`StepMetrics`) and are read only at log and checkpoint steps; a training
step reads nothing from the device.

Resuming is exact (checkpointing.py): a checkpoint is written only at an optimizer-step boundary and holds every
process's RNG states and the data position; the batch order is a function of (seed, epoch), the consumed
micro-batches are skipped, and data loading never draws from the global RNG that dropout uses. On CPU in fp32 a run
killed and resumed ends with the weights of an uninterrupted one, bit for bit (tests/test_resume.py).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer

from bert_dist import kernels, preemption
from bert_dist.checkpointing import METRICS_FILE, BestModel, Checkpointer, TrainState
from bert_dist.config import RunConfig, TrainConfig
from bert_dist.console import StepProgress, format_metrics
from bert_dist.distributed import gather_outputs, pad_for
from bert_dist.optim import build_optimizer, build_scheduler
from bert_dist.preemption import Preempted, Preemption, sigterm_received
from bert_dist.rundir import TOKENIZER_FILE, TRAIN_LOG, discard_previous_run, resume_checkpoint, run_inputs

log = logging.getLogger(__name__)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "indices", "cu_seqlens", "masked_positions",
                "masked_index")
"""What evaluation hands the model: the inputs and the layout, no labels (test splits carry none)."""


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for --max-bad-steps consecutive optimizer steps."""


def train(
    *,
    accelerator: Accelerator,
    run: Prepared,
    cfg: RunConfig,
    out_dir: Path,
    eval_fn: Callable[[int], dict[str, float]] | None = None, main_metric: str | None = None,
    on_set_epoch: Callable[[int], None] | None = None,
    on_trained: Callable[[], None] | None = None,
    checkpoint_files: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train `run` for `run.num_steps` optimizer steps; evaluate every --eval-every steps and at the end.

    main_metric: the metric of `eval_fn`'s that --keep-best and early stopping go by unless --best-metric names
    another. on_set_epoch: called with each epoch's number before its batches (a sampler's or collator's set_epoch).
    on_trained: called after the last step, before the final evaluation (the recipes save the model there), and again
    with --keep-best once the best weights are back. checkpoint_files: {name: text} written into every checkpoint.
    Returns the final metrics (with --keep-best the best evaluation's, and its step) plus train_seconds,
    examples_per_second, tokens_per_second, steps; or {"interrupted": True, "steps"} after a SIGTERM, once a
    checkpoint is saved. --early-stopping-patience K ends the training after K evaluations without improvement.

    SIGTERM stops the run at the end of the optimizer step under way, or inside an evaluation, and saves a checkpoint
    there (preemption.py). Non-finite steps are skipped whole (`step_unless_nonfinite`); --max-bad-steps of them in a
    row stop the run with TrainingDiverged, and no checkpoint is written while the latest step is bad.
    """
    t, state = cfg.train, TrainState()
    best = (BestModel(accelerator=accelerator, model=run.model, out_dir=out_dir, cfg=t, metric=main_metric)
            if eval_fn is not None and t.tracks_best() else None)
    checkpointer = start(accelerator=accelerator, run=run, cfg=cfg, out_dir=out_dir, state=state, best=best,
                         files=checkpoint_files)
    metrics = StepMetrics(accelerator=accelerator, out_dir=out_dir, state=state, log_every=t.log_every,
                          num_steps=run.num_steps)
    evaluator = Evaluator(accelerator=accelerator, eval_fn=eval_fn, out_dir=out_dir, every=t.eval_every, best=best)
    batches = micro_batches(accelerator=accelerator, loader=run.train_loader, state=state, on_set_epoch=on_set_epoch)
    params = [p for p in run.model.parameters() if p.requires_grad]
    # --grad-accum: each micro-batch weighs by its examples (`forward_backward`), decided once.
    full_batch = cfg.data.batch_size if accelerator.gradient_accumulation_steps > 1 else None

    with Preemption(accelerator, timeout=datetime.timedelta(minutes=t.dist_timeout)) as stop:
        run.model.train()
        with metrics:
            # A resume after a SIGTERM that cut an evaluation short runs it first.
            stopping = state.eval_pending and state.step < run.num_steps and not evaluator.run(state, stop)
            lr = None
            while state.step < run.num_steps and not stopping and not (best and best.exhausted(state)):
                lr = train_step(accelerator=accelerator, model=run.model, optimizer=run.optimizer,
                                scheduler=run.scheduler, params=params, micro_batches=batches, metrics=metrics,
                                max_grad_norm=cfg.optim.max_grad_norm, full_batch=full_batch)
                state.step += 1
                if metrics.should_log(state.step):
                    check_diverged(window=metrics.log(state, lr), max_bad_steps=t.max_bad_steps, step=state.step,
                                   checkpointer=checkpointer)
                if evaluator.due(state.step):
                    stopping = not evaluate_in_training(evaluator=evaluator, state=state, stop=stop, model=run.model,
                                                        metrics=metrics)
                if t.save_every and state.step % t.save_every == 0:
                    save_unless_bad(checkpointer=checkpointer, metrics=metrics, state=state,
                                    max_bad_steps=t.max_bad_steps)
                stopping = stopping or stop.requested()
            early = state.step < run.num_steps and not stopping  # early stopping ended the loop
            if early and lr is not None and not metrics.should_log(state.step):  # the last window, as at a last step
                check_diverged(window=metrics.log(state, lr), max_bad_steps=t.max_bad_steps, step=state.step,
                               checkpointer=checkpointer)
        if stopping:
            log.warning("SIGTERM at step %d: saving a checkpoint and stopping; rerun with --resume to continue",
                        state.step)
            if checkpointer.last_step != state.step:
                save_checkpoint(checkpointer=checkpointer, metrics=metrics, state=state)
            return {"interrupted": True, "steps": state.step}
        if early:
            log.info("early stopping at step %d: %d evaluations without improvement of %s (--early-stopping-patience)",
                     state.step, state.evals_without_improvement, best.metric)
        finish(state=state, evaluator=evaluator if eval_fn is not None else None, best=best, on_trained=on_trained)
    results = summary(state=state, metrics=state.best_metrics if best and best.keep and state.best_metrics
                      else evaluator.latest, batches_per_epoch=len(run.train_loader),
                      fp16=accelerator.mixed_precision == "fp16")
    if best is not None:
        results.update(best.results(state), **({"early_stopped_at": state.step} if early else {}))
    return results


def start(*, accelerator: Accelerator, run: Prepared, cfg: RunConfig, out_dir: Path, state: TrainState,
          best: BestModel | None, files: dict[str, str] | None) -> Checkpointer:
    """The run's checkpointer, with `state` (and the model, optimizer, RNGs) restored from a checkpoint on --resume;
    a fresh run seeds each process's random draws instead."""
    t = cfg.train
    checkpointer = Checkpointer(accelerator=accelerator, out_dir=out_dir, keep=t.keep_checkpoints,
                                scheduler=run.scheduler, files=files, best=best)
    checkpointer.resume(state=state, path=run.resume_from, restart=t.resume, num_batches=len(run.train_loader),
                        num_steps=run.num_steps)
    if run.resume_from is None:
        seed_processes(accelerator=accelerator, seed=cfg.seed)
    return checkpointer


def evaluate_in_training(*, evaluator: Evaluator, state: TrainState, stop: Preemption, model: torch.nn.Module,
                         metrics: StepMetrics) -> bool:
    """An --eval-every evaluation between steps, its time left out of the training time; False where a SIGTERM cut
    it short."""
    started = time.perf_counter()
    finished = evaluator.run(state, stop)
    model.train()
    metrics.leave_out(time.perf_counter() - started)
    return finished


def finish(*, state: TrainState, evaluator: Evaluator | None, best: BestModel | None,
           on_trained: Callable[[], None] | None) -> None:
    """After the last step (or the early stop): save through `on_trained`, evaluate the last step unless that is done,
    and with --keep-best make the best evaluation's weights the run's model.

    The SIGTERM handler stays through this (and, under run.main, until the run's outputs are written): a SIGTERM in
    the last minutes of a job no longer kills the run a step from its end; it finishes, and exits 0."""
    if on_trained is not None:
        on_trained()
    if evaluator is not None and evaluator.last_step != state.step:
        evaluator.run(state)  # with --keep-best the last step's weights are a candidate too
    if best is not None and best.restore(state) and on_trained is not None:
        on_trained()  # the run's model is the best evaluation's
    if sigterm_received():
        log.warning("SIGTERM after the last step: the run was finished (model saved, evaluated) instead")


def train_step(
    *,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: list[torch.nn.Parameter],
    micro_batches: Iterator[dict[str, torch.Tensor]],
    metrics: StepMetrics,
    max_grad_norm: float,
    full_batch: int | None,
) -> float:
    """One optimizer step: forward and backward over the micro-batches that accelerate groups into it (--grad-accum,
    fewer at an epoch's end), clipping to `max_grad_norm` (0: none, the norm is still computed), the optimizer step
    unless the gradients are not finite, and the schedule's step. Reads nothing from the device.

    params: the model's trainable parameters. full_batch: the examples of a full micro-batch (--batch-size) when
    micro-batches weigh by their examples; None: every micro-batch alike. Returns the learning rate the step ran at.
    """
    examples = 0
    while True:
        batch = next(micro_batches)
        with accelerator.accumulate(model):
            loss = forward_backward(accelerator=accelerator, model=model, batch=batch, full_batch=full_batch)
            examples += batch["input_ids"].shape[0]
            if accelerator.sync_gradients:
                if full_batch is not None and examples != accelerator.gradient_accumulation_steps * full_batch:
                    # A group cut short (the epoch's last): the mean over its examples, not k/N of it.
                    torch._foreach_mul_([p.grad for p in params if p.grad is not None],
                                        accelerator.gradient_accumulation_steps * full_batch / examples)
                norm = accelerator.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
                nonfinite, skipped = optimizer_step(accelerator=accelerator, optimizer=optimizer, grad_norm=norm)
                optimizer.zero_grad(set_to_none=True)
        metrics.add_micro_batch(loss.detach(), batch)
        if accelerator.sync_gradients:
            break
    metrics.end_step(grad_norm=norm, nonfinite=nonfinite, skipped=skipped)
    lr = scheduler.get_last_lr()[0]  # this step's rate (the log shows it, not the next step's)
    scheduler.step()
    return lr


def forward_backward(*, accelerator: Accelerator, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                     full_batch: int | None) -> torch.Tensor:
    """The micro-batch's mean loss (0-d), its gradient accumulated into the parameters.

    With `full_batch` the loss weighs by the batch's examples against it: accelerate divides every micro-batch's
    loss by --grad-accum, and a short micro-batch must not count as a full one. With several processes every
    micro-batch is full (the sampler keeps a short batch last, and accelerate fills the last one from the epoch's
    start), so every process scales alike."""
    loss = model(**batch)["loss"]
    n = batch["input_ids"].shape[0]
    accelerator.backward(loss * (n / full_batch) if full_batch is not None and n != full_batch else loss)
    return loss


def optimizer_step(*, accelerator: Accelerator, optimizer: torch.optim.Optimizer,
                   grad_norm: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The optimizer's step, on the device. Returns (the gradients were not finite, the gradient scaler skipped the
    step): 0-d bool tensors, or None where that check is not made.

    Under fp16 the gradient scaler skips inf/NaN steps itself (with a fused optimizer on the device: its found_inf);
    elsewhere `step_unless_nonfinite` does, by the gradient norm (None under DeepSpeed, which steps itself)."""
    scaler = accelerator.scaler
    if scaler is None:
        if grad_norm is None:
            optimizer.step()
            return None, None
        return step_unless_nonfinite(optimizer=optimizer, grad_norm=grad_norm), None
    scale = scaler._scale.clone() if scaler._scale is not None else None
    optimizer.step()
    return None, (None if scale is None else scaler_skipped(scaler, scale))


def step_unless_nonfinite(*, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> torch.Tensor:
    """`optimizer.step()`, skipped whole (weights, moments, step count) when the gradient norm is inf/NaN, as
    GradScaler skips a step: NaN never reaches the weights. Returns the 0-d bool "not finite" flag, on the device.

    A fused Adam/AdamW (the default, OptimConfig.fused) reads `found_inf` as GradScaler sets it: the kernel skips the
    update on the device and a foreach op per parameter group undoes the step count: the guard is a few ops
    whatever the number of parameter tensors, with no host sync. Any other optimizer has no such input: the flag is
    read on the host, one sync per optimizer step (what GradScaler does for such optimizers; on CUDA the queue
    drains there).
    """
    bad = ~torch.isfinite(grad_norm)
    inner = optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer
    if getattr(inner, "_step_supports_amp_scaling", False):
        inner.found_inf = bad.float()
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    elif not bad.item():
        optimizer.step()
    return bad


def scaler_skipped(scaler: torch.amp.GradScaler, scale_before: torch.Tensor) -> torch.Tensor:
    """fp16: whether the optimizer step just taken was skipped for inf/NaN gradients, on the device (0-dim bool).

    The scaler halves its scale on such a step (and only then lowers it). Not accelerate's
    `optimizer_step_was_skipped`: with a fused optimizer the scaler always calls `step()` and the kernel skips the
    update on the device (its found_inf), so that flag is always False; and reading it unfused costs a host sync."""
    return scaler._scale < scale_before


def micro_batches(*, accelerator: Accelerator, loader: torch.utils.data.DataLoader, state: TrainState,
                  on_set_epoch: Callable[[int], None] | None) -> Iterator[dict[str, torch.Tensor]]:
    """The training micro-batches from the data position in `state` on, epoch after epoch; `state.epoch` and
    `state.batches_in_epoch` follow what was taken (a resume skips the epoch's consumed micro-batches)."""
    while True:
        if state.batches_in_epoch >= len(loader):  # a checkpoint taken as the epoch ended
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        # accelerate's prepared loader re-sets its sampler's epoch from its own pass counter when iterated (and a
        # skip_first_batches copy starts that counter afresh): set both to the epoch we are in.
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(state.epoch)
        if on_set_epoch is not None:
            on_set_epoch(state.epoch)
        epoch = accelerator.skip_first_batches(loader, state.batches_in_epoch) if state.batches_in_epoch else loader
        for batch in epoch:
            state.batches_in_epoch += 1
            yield batch
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0


def seed_processes(*, accelerator: Accelerator, seed: int) -> None:
    """With several processes each draws its own random numbers in the step (dropout masks): seed + process index,
    as NVIDIA's BERT seeds. Called once the model is built (its init is the seed's alone, on every process) and only
    for a fresh start (a resume restores each process's states). The data order has generators of its own. One
    process keeps the stream set_seed(seed) started."""
    if accelerator.num_processes > 1:
        from accelerate.utils import set_seed

        set_seed(seed, device_specific=True)


def save_checkpoint(*, checkpointer: Checkpointer, metrics: StepMetrics, state: TrainState) -> None:
    metrics.snapshot(state)
    checkpointer.save(state)
    metrics.restart_clock()  # saving time is not training time


def save_unless_bad(*, checkpointer: Checkpointer, metrics: StepMetrics, state: TrainState,
                    max_bad_steps: int) -> None:
    """A --save-every checkpoint, unless the latest step was bad: the newest checkpoint stays a good one."""
    window = metrics.read()
    check_diverged(window=window, max_bad_steps=max_bad_steps, step=state.step, checkpointer=checkpointer)
    if window["bad_run"]:
        log.warning("step %d: not saving a checkpoint while the loss is not finite", state.step)
    else:
        save_checkpoint(checkpointer=checkpointer, metrics=metrics, state=state)


def check_diverged(*, window: dict[str, float], max_bad_steps: int, step: int, checkpointer: Checkpointer) -> None:
    if window["bad_max"] >= max_bad_steps:
        newest = checkpointer.newest()
        raise TrainingDiverged(
            f"the loss or gradients were not finite for {max_bad_steps} optimizer steps in a row "
            f"(--max-bad-steps), at step {step}; no update was applied on those steps; "
            + (f"the last good checkpoint is {newest}; " if newest else "")
            + "lower --lr, use bf16 instead of fp16, or check the data"
        )


def summary(*, state: TrainState, metrics: dict[str, float], batches_per_epoch: int, fp16: bool) -> dict[str, Any]:
    """What `train()` returns: the last evaluation's metrics and the run's totals."""
    return {
        **metrics,
        "steps": state.step,
        "epochs": round(state.epoch + state.batches_in_epoch / max(1, batches_per_epoch), 3),
        "train_seconds": round(state.train_seconds, 2),
        "examples_per_second": round(state.examples / max(state.train_seconds, 1e-9), 2),
        "tokens_per_second": round(state.tokens / max(state.train_seconds, 1e-9), 1),
        **({"skipped_steps": state.skipped_steps} if fp16 else {}),
        **({"nonfinite_steps": state.nonfinite_steps} if state.nonfinite_steps else {}),
    }


class StepMetrics:
    """The loop's numbers: sums over the micro-batches since the last log step, kept on the device, and the log line,
    train_log.jsonl line, progress-bar update and tracker scalars they become at log steps.

    They are read (a host sync) only at log and checkpoint steps: the per-step bookkeeping is tensor ops queued
    behind the step's kernels. A context manager: the progress bar closes at its end.
    """

    def __init__(self, *, accelerator: Accelerator, out_dir: Path, state: TrainState, log_every: int, num_steps: int):
        self.accelerator, self.out_dir, self.log_every, self.num_steps = accelerator, out_dir, log_every, num_steps
        self.fp16 = accelerator.mixed_precision == "fp16"

        def zero(dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros((), device=accelerator.device, dtype=dtype)

        self.loss, self.micro = zero(), zero()  # the finite micro-batches' loss x examples, and their examples
        self.tokens = zero(torch.long)
        self.step_bad = zero(torch.bool)  # the optimizer step under way saw a non-finite loss or gradient norm
        self.bad_run, self.bad_max, self.bad_steps = zero(torch.long), zero(torch.long), zero(torch.long)
        self.skipped = zero(torch.long)  # fp16: optimizer steps the gradient scaler skipped
        self.grad_norm: torch.Tensor | None = None
        self.examples = 0
        self.t0 = time.perf_counter()
        w = state.window  # a checkpoint's window: the sums go to one process (they were already reduced)
        if w and accelerator.is_main_process:
            self.loss.fill_(w["loss"]), self.micro.fill_(w["micro"])
        if w:
            self.bad_run.fill_(w["bad_run"]), self.bad_max.fill_(w["bad_max"])
        self.progress = StepProgress(num_steps, accelerator.is_main_process)
        self.progress.update(state.step)

    def __enter__(self) -> StepMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.close()

    def add_micro_batch(self, loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """The micro-batch's mean `loss` weighs by its examples, as its gradient does (a short last batch)."""
        finite, n = torch.isfinite(loss), batch["input_ids"].shape[0]
        self.loss += torch.where(finite, loss * n, 0.0)
        self.micro += finite * n
        self.step_bad |= ~finite
        self.tokens += batch["attention_mask"].sum()
        self.examples += n

    def end_step(self, *, grad_norm: torch.Tensor | None, nonfinite: torch.Tensor | None,
                 skipped: torch.Tensor | None) -> None:
        """A step is bad when its loss or gradients were not finite, or (fp16) the scaler skipped it: either way its
        update was not applied, and --max-bad-steps counts it (the scaler's calibration skips a few in a row at most,
        halving its scale each time)."""
        if grad_norm is not None:
            self.grad_norm = grad_norm.detach()
        if nonfinite is not None:
            self.step_bad |= nonfinite
        bad = self.step_bad if skipped is None else self.step_bad | skipped
        self.bad_run = torch.where(bad, self.bad_run + 1, 0)
        self.bad_max = torch.maximum(self.bad_max, self.bad_run)
        self.bad_steps += self.step_bad
        if skipped is not None:
            self.skipped += skipped
        self.step_bad.zero_()

    def should_log(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.num_steps

    def flush_throughput(self, state: TrainState) -> tuple[int, int, float]:
        """Move examples, tokens and seconds into `state`; returns this window's (examples, tokens, seconds)."""
        acc = self.accelerator
        n_tok = int(acc.reduce(self.tokens, "sum").item())  # waits for the queued steps (CUDA): then the clock
        now = time.perf_counter()
        n_ex, dt = self.examples * acc.num_processes, now - self.t0
        state.examples, state.tokens, state.train_seconds = (
            state.examples + n_ex,
            state.tokens + n_tok,
            state.train_seconds + dt,
        )
        state.nonfinite_steps += int(acc.reduce(self.bad_steps, "max").item())
        state.skipped_steps += int(self.skipped.item())  # the scaler's decision is the same on every process
        self.tokens.zero_(), self.bad_steps.zero_(), self.skipped.zero_()
        self.examples, self.t0 = 0, now
        return n_ex, n_tok, dt

    def read(self) -> dict[str, float]:
        """The window across processes (one sync): mean loss, finite micro-batches, bad-step runs."""
        acc = self.accelerator
        loss, micro = acc.reduce(self.loss, "sum"), acc.reduce(self.micro, "sum")
        return {
            "loss": float(loss.item()),
            "micro": float(micro.item()),
            # No finite micro-batch in the window: nan, not the 0.0 of an empty sum (a perfect-looking loss).
            "mean_loss": float((loss / micro).item()) if micro.item() > 0 else math.nan,
            "bad_run": int(acc.reduce(self.bad_run, "max").item()),
            "bad_max": int(acc.reduce(self.bad_max, "max").item()),
        }

    def log(self, state: TrainState, lr: float) -> dict[str, float]:
        """One log line, a train_log.jsonl line, a progress-bar update and tracker scalars: the loop's regular host
        sync. `lr`: the rate the step just taken ran at. Returns the window, then starts the next one."""
        n_ex, n_tok, dt = self.flush_throughput(state)
        window = self.read()
        stats: dict[str, Any] = {"step": state.step, "epoch": state.epoch, "loss": window["mean_loss"], "lr": lr,
                                 "examples/s": n_ex / max(dt, 1e-9), "tokens/s": n_tok / max(dt, 1e-9)}
        if self.grad_norm is not None:
            stats["grad_norm"] = float(self.grad_norm.item())
        if self.fp16:
            stats["skipped_steps"] = state.skipped_steps
        if state.nonfinite_steps:
            stats["nonfinite_steps"] = state.nonfinite_steps
        self.progress.update(state.step, f"loss {stats['loss']:.4f} lr {lr:.2e} {stats['examples/s']:.1f} ex/s")
        log.info(format_metrics(stats))
        if self.accelerator.is_main_process:  # the numbers are on the host already: writing them costs no sync
            with open(self.out_dir / TRAIN_LOG, "a") as fh:
                fh.write(json.dumps({**stats, "train_seconds": round(state.train_seconds, 3)}) + "\n")
        self.accelerator.log({"train/" + k.replace("/", "_per_"): v for k, v in stats.items() if k != "step"},
                             step=state.step)
        self.loss.zero_(), self.micro.zero_(), self.bad_max.copy_(self.bad_run)
        return window

    def snapshot(self, state: TrainState) -> None:
        """Totals and the window into `state`, for a checkpoint."""
        self.flush_throughput(state)
        state.window = {k: v for k, v in self.read().items() if k != "mean_loss"}

    def restart_clock(self) -> None:
        self.t0 = time.perf_counter()

    def leave_out(self, seconds: float) -> None:
        """Leave `seconds` (an evaluation) out of the window's training time."""
        self.t0 += seconds


class Evaluator:
    """`eval_fn` every `every` optimizer steps (None: at the end only), written to metrics.jsonl and the trackers."""

    def __init__(self, *, accelerator: Accelerator, eval_fn: Callable[[int], dict[str, float]] | None,
                 out_dir: Path, every: int | None, best: BestModel | None = None):
        self.accelerator, self.eval_fn, self.out_dir, self.every = accelerator, eval_fn, out_dir, every
        self.best = best  # compares each evaluation with the best (--keep-best, early stopping)
        self.latest: dict[str, float] = {}
        self.last_step = -1

    def due(self, step: int) -> bool:
        return self.eval_fn is not None and bool(self.every) and step % self.every == 0

    def run(self, state: TrainState, stop: Preemption | None = None) -> bool:
        """Evaluate at `state.step`. With `stop`, a SIGTERM the processes agree on ends it early, unscored and
        unwritten (a resume runs it again: state.eval_pending); returns whether it ran to its end."""
        try:
            with stop.interruptible() if stop is not None else contextlib.nullcontext():
                self.latest = run_eval(accelerator=self.accelerator, eval_fn=self.eval_fn, state=state,
                                       out_dir=self.out_dir)
        except Preempted:
            log.warning("SIGTERM during the evaluation at step %d: stopped it (a resume runs it again)", state.step)
            state.eval_pending = True
            return False
        state.eval_pending, self.last_step = False, state.step
        if self.best is not None:
            self.best.observe(state, self.latest)
        return True


def run_eval(*, accelerator: Accelerator, eval_fn: Callable[[int], dict[str, float]], state: TrainState,
             out_dir: Path) -> dict[str, float]:
    metrics = eval_fn(state.step)
    if accelerator.is_main_process:
        log.info("eval step %d: %s", state.step, format_metrics(metrics))
        with open(out_dir / METRICS_FILE, "a") as fh:
            fh.write(json.dumps({"step": state.step, "epoch": state.epoch, **metrics}) + "\n")
    accelerator.log({"eval/" + k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=state.step)
    return metrics


@torch.no_grad()
def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    collect: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    pad_value: float = -1e4,
) -> dict[str, np.ndarray]:
    """Run `model` over a prepared `loader` and gather what `collect(batch, outputs)` picks, in order.

    `collect` returns tensors whose first dim is the batch (B, ...). 2-D ones (B, T) may differ in T
    between batches and processes: they are padded with `pad_value` to the longest. Each example
    is counted once (`distributed.gather_outputs`). Returns numpy arrays with one row per example of the dataset.
    Inside training a SIGTERM stops it between batches (raising preemption.Preempted).
    """
    was_training = model.training
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    try:
        for batch in loader:
            preemption.check()
            # Inputs only: evaluation needs no loss, and test splits carry no labels (-1).
            picked = collect(batch, model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}))
            for k, v in gather_outputs(accelerator, picked, pad_value).items():
                parts.setdefault(k, []).append(v)
    finally:
        model.train(was_training)
    out = {}
    for k, vs in parts.items():
        if vs[0].ndim == 2:
            width = max(v.shape[1] for v in vs)
            vs = [np.pad(v, ((0, 0), (0, width - v.shape[1])), constant_values=pad_for(vs[0].dtype, pad_value))
                  for v in vs]
        out[k] = np.concatenate(vs)
    return out


def steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    """Optimizer steps per epoch (a short tail of micro-batches still makes a step)."""
    return math.ceil(num_batches / grad_accum)


def total_steps(cfg: TrainConfig, num_batches: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * steps_per_epoch(num_batches, cfg.grad_accum)))


def check_precision(accelerator: Accelerator) -> None:
    """accelerate has no fp16 autocast on the CPU: a run (or predict) would be fp32 while saying fp16."""
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
        raise ValueError("--mixed-precision fp16 does nothing on the CPU (accelerate runs it in fp32); use bf16 there, "
                         "or no")
    if (accelerator.device.type == "cuda" and accelerator.mixed_precision == "bf16"
            and torch.cuda.get_device_capability(accelerator.device)[0] < 8):
        # torch emulates bf16 before Ampere (V100, T4) and accepts it: the run works, several times slower.
        log.warning("--mixed-precision bf16 on %s, which has no bf16 tensor cores: fp16 is much faster there",
                    torch.cuda.get_device_name(accelerator.device))


@dataclass
class Prepared:
    """What `prepare_training` hands back: accelerate-wrapped objects and the step budget."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None  # None (and scheduler, train_loader): --eval-only without a train split
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    train_loader: torch.utils.data.DataLoader | None
    eval_loaders: dict[str, torch.utils.data.DataLoader]
    num_steps: int
    resume_from: Path | None

    def fit(
        self,
        *,
        accelerator: Accelerator,
        cfg: RunConfig,
        out_dir: Path,
        eval_fn: Callable[[int], dict[str, float]],
        on_set_epoch: Callable[[int], None] | None,
        save: Callable[[], None],
        tokenizer: Any = None,
        main_metric: str | None = None,
    ) -> dict[str, Any]:
        """`train()` with this run's objects, or only `eval_fn` under --eval-only (both recipes end so). `save` writes
        the run's model: after training and before the final evaluation (and with --keep-best once more, the best
        weights loaded back), or after the evaluation under --eval-only. main_metric: see `train`."""
        if cfg.train.eval_only:
            results = {**run_eval(accelerator=accelerator, eval_fn=eval_fn, state=TrainState(), out_dir=out_dir),
                       "steps": 0}  # metrics.jsonl too
            save()
            return results
        return train(accelerator=accelerator, run=self, cfg=cfg, out_dir=out_dir, eval_fn=eval_fn,
                     main_metric=main_metric, on_set_epoch=on_set_epoch, on_trained=save,
                     checkpoint_files={TOKENIZER_FILE: tokenizer.to_str()} if tokenizer is not None else None)


def prepare_training(
    cfg: RunConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    train_loader: torch.utils.data.DataLoader | None,
    eval_loaders: dict[str, torch.utils.data.DataLoader],
    out_dir: Path,
) -> Prepared:
    """Optimizer, schedule, `accelerator.prepare`, optional torch.compile, and the checkpoint to resume.

    train_loader None (--eval-only without a train split): the model and eval loaders only, no steps."""
    if cfg.overwrite and not (cfg.train.resume or cfg.train.resume_from):
        discard_previous_run(accelerator, out_dir, cfg.to_dict(), run_inputs(cfg))
    kernels.apply(model, cfg.train.cpu_kernels, accelerator.device)
    names = list(eval_loaders)
    if train_loader is None:
        model, *loaders = accelerator.prepare(model, *eval_loaders.values())
        return Prepared(model=model, optimizer=None, scheduler=None, train_loader=None,
                        eval_loaders=dict(zip(names, loaders)), num_steps=0, resume_from=None)
    optimizer = build_optimizer(model, cfg.optim, accelerator.device.type)
    model, optimizer, train_loader, *loaders = accelerator.prepare(
        model, optimizer, train_loader, *eval_loaders.values()
    )
    if cfg.train.compile:
        t0 = time.perf_counter()
        model = torch.compile(model)
        log.info(
            "torch.compile wrapped the model in %.1fs (kernels compile on the first steps)", time.perf_counter() - t0
        )
    num_steps = total_steps(cfg.train, len(train_loader))
    scheduler = build_scheduler(optimizer, cfg.optim, num_steps)
    return Prepared(model=model, optimizer=optimizer, scheduler=scheduler, train_loader=train_loader,
                    eval_loaders=dict(zip(names, loaders)), num_steps=num_steps,
                    resume_from=resume_checkpoint(cfg.train, out_dir))

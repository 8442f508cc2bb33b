"""The task-agnostic loop: accumulate, clip, step, schedule, log, evaluate, checkpoint, resume.

It knows nothing about GLUE, SQuAD or pretraining: a recipe hands it a prepared model, optimizer,
scheduler and train loader, and an `eval_fn(step) -> metrics`. Everything is counted in optimizer
steps. The loss and token counts stay on the device and are read only at log and checkpoint steps.

Resuming is exact: a checkpoint is written only at an optimizer-step boundary and holds the model,
optimizer, scheduler, every RNG (accelerate's save_state) and `TrainState` (epoch, micro-batches
consumed, counters); the batch order is a function of (seed, epoch), the consumed micro-batches are
skipped, and data loading never draws from the global RNG that dropout uses. On CPU in fp32 a run
killed and resumed ends with the weights of an uninterrupted one, bit for bit (tests/test_resume.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from bert_dist import kernels
from bert_dist.config import RunConfig, TrainConfig
from bert_dist.console import StepProgress, format_metrics
from bert_dist.optim import build_optimizer, build_scheduler
from bert_dist.rundir import (
    RUN_CONFIG_FILE,
    TOKENIZER_FILE,
    TRAIN_LOG,
    TRAIN_STATE_FILE,
    discard_previous_run,
    list_checkpoints,
    remove_incomplete_checkpoints,
    resume_checkpoint,
    run_inputs,
)

log = logging.getLogger(__name__)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "indices", "cu_seqlens", "masked_positions",
                "masked_index")
"""What evaluation hands the model: the inputs and the layout, no labels (test splits carry none)."""


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for --max-bad-steps consecutive optimizer steps."""


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
    """Optimizer steps with a non-finite loss or gradient norm (their update was zeroed)."""
    batches_per_epoch: int = 0
    """Micro-batches per epoch (per process) of the run that saved it: other data since would make its position (and
    the epoch) point elsewhere (0: a checkpoint from before it was recorded)."""
    window: dict[str, float] = field(default_factory=dict)
    """The log window's running sums at the checkpoint, so the first log line after a resume is unchanged."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            setattr(self, k, v)


class Window:
    """Sums over the micro-batches since the last log step, kept on the device.

    They are read (a host sync) only at log and checkpoint steps: the per-step bookkeeping below is
    all tensor ops queued behind the step's kernels.
    """

    def __init__(self, device: torch.device):
        zero = lambda dtype=torch.float32: torch.zeros((), device=device, dtype=dtype)
        self.loss, self.micro = zero(), zero()  # the finite micro-batches' loss x examples, and their examples
        self.tokens = zero(torch.long)
        self.step_bad = zero(torch.bool)  # the optimizer step under way saw a non-finite loss or gradient norm
        self.bad_run, self.bad_max, self.bad_steps = zero(torch.long), zero(torch.long), zero(torch.long)
        self.skipped = zero(torch.long)  # fp16: optimizer steps the gradient scaler skipped (scaler_skipped)
        self.grad_norm: torch.Tensor | None = None
        self.examples = 0
        self.t0 = time.perf_counter()

    def add_micro_batch(self, loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """The micro-batch's mean `loss` weighs by its examples, as its gradient does (a short last batch)."""
        finite, n = torch.isfinite(loss), batch["input_ids"].shape[0]
        self.loss += torch.where(finite, loss * n, 0.0)
        self.micro += finite * n
        self.step_bad |= ~finite
        self.tokens += batch["attention_mask"].sum()
        self.examples += n

    def end_step(self, grad_ok: torch.Tensor | None) -> None:
        if grad_ok is not None:
            self.step_bad |= ~grad_ok
        self.bad_run = torch.where(self.step_bad, self.bad_run + 1, 0)
        self.bad_max = torch.maximum(self.bad_max, self.bad_run)
        self.bad_steps += self.step_bad
        self.step_bad.zero_()

    def flush_throughput(self, accelerator: Accelerator, state: TrainState) -> tuple[int, int, float]:
        """Move examples, tokens and seconds into `state`; returns this window's (examples, tokens, seconds)."""
        n_tok = int(accelerator.reduce(self.tokens, "sum").item())  # waits for the queued steps (CUDA): then the clock
        now = time.perf_counter()
        n_ex, dt = self.examples * accelerator.num_processes, now - self.t0
        state.examples, state.tokens, state.train_seconds = (
            state.examples + n_ex,
            state.tokens + n_tok,
            state.train_seconds + dt,
        )
        state.nonfinite_steps += int(accelerator.reduce(self.bad_steps, "max").item())
        state.skipped_steps += int(self.skipped.item())  # the scaler's decision is the same on every process
        self.tokens.zero_(), self.bad_steps.zero_(), self.skipped.zero_()
        self.examples, self.t0 = 0, now
        return n_ex, n_tok, dt

    def read(self, accelerator: Accelerator) -> dict[str, float]:
        """The window across processes (one sync): mean loss, finite micro-batches, bad-step runs."""
        loss, micro = accelerator.reduce(self.loss, "sum"), accelerator.reduce(self.micro, "sum")
        return {
            "loss": float(loss.item()),
            "micro": float(micro.item()),
            # No finite micro-batch in the window: nan, not the 0.0 of an empty sum (a perfect-looking loss).
            "mean_loss": float((loss / micro).item()) if micro.item() > 0 else math.nan,
            "bad_run": int(accelerator.reduce(self.bad_run, "max").item()),
            "bad_max": int(accelerator.reduce(self.bad_max, "max").item()),
        }

    def reset_loss(self) -> None:
        self.loss.zero_(), self.micro.zero_(), self.bad_max.copy_(self.bad_run)

    def load(self, w: dict[str, float], is_main: bool) -> None:
        """Restore a checkpoint's window: the sums go to one process (they were already reduced)."""
        if w and is_main:
            self.loss.fill_(w["loss"]), self.micro.fill_(w["micro"])
        if w:
            self.bad_run.fill_(w["bad_run"]), self.bad_max.fill_(w["bad_max"])


def steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    """Optimizer steps per epoch (a short tail of micro-batches still makes a step)."""
    return math.ceil(num_batches / grad_accum)


def total_steps(cfg: TrainConfig, num_batches: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * steps_per_epoch(num_batches, cfg.grad_accum)))


# ---------------------------------------------------------------------------------------------
# Checkpoints (accelerate save_state: model, optimizer, scaler, RNG states; ours: TrainState, scheduler)


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


@contextlib.contextmanager
def main_process_first(accelerator: Accelerator):
    """`accelerator.main_process_first()` (the main process runs the block first, e.g. to write a datasets cache the
    others then read), also when the block raises on the main process: it still meets the others at the barrier
    before raising, so they run the block too, meet the same error (bad data is bad on every process) and exit,
    rather than wait at the barrier forever."""
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        yield
        return
    try:
        yield
    finally:
        accelerator.wait_for_everyone()


def gather_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The prepared `model`'s whole state dict (no `_orig_mod.` keys of torch.compile) on the main process, None on
    the others. Call it on every process: under FSDP the layers' shards are gathered by collectives that every rank
    must join (a main process gathering alone would hang, or meet the others' next evaluation), and the module
    itself holds only this rank's shards."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        weights = {k.removeprefix("_orig_mod."): v for k, v in accelerator.get_state_dict(model).items()}
    elif accelerator.is_main_process:
        weights = accelerator.unwrap_model(model, keep_torch_compile=False).state_dict()
    return weights if accelerator.is_main_process else None


def share_from_main(obj: Any) -> Any:
    """The main process's `obj` (picklable), on every process (None elsewhere before the call)."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj])[0]


# Ours, beside accelerate's files (with rundir.TRAIN_STATE_FILE and RUN_CONFIG_FILE). Not accelerate's
# register_for_checkpointing: it pickles the objects and loads them back with weights_only=False, so a crafted
# checkpoint would run code on --resume. Checkpoints are data.
SCHEDULER_FILE = "lr_scheduler.pt"  # a state dict of numbers and lists, loaded with weights_only=True


def save_checkpoint(accelerator: Accelerator, out_dir: Path, step: int, keep: int, state: TrainState,
                    scheduler: Any, files: dict[str, str] | None = None) -> Path:
    """Write step-N.tmp, then rename it to step-N: a kill at any point leaves the previous one newest. `files`:
    {name: text} written into it too (the run's tokenizer.json, which a resume is checked against)."""
    final = out_dir / "checkpoints" / f"step-{step:08d}"
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with _quiet_accelerate():
        accelerator.save_state(str(tmp))
    if accelerator.is_main_process:  # both are the same on every process
        # The data position (batches_in_epoch) and random states are per process: a resume needs as many.
        (tmp / TRAIN_STATE_FILE).write_text(json.dumps({**state.state_dict(),
                                                        "num_processes": accelerator.num_processes,
                                                        "mixed_precision": accelerator.mixed_precision}))
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        if (out_dir / RUN_CONFIG_FILE).is_file():  # what a resume is checked against (rundir.check_resume)
            shutil.copy(out_dir / RUN_CONFIG_FILE, tmp / RUN_CONFIG_FILE)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # from another trajectory (--resume-from an older checkpoint)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        for stale in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, state: TrainState, scheduler: Any) -> None:
    """accelerate load_state, then our TrainState and scheduler, with one clear error for a checkpoint that is broken
    or belongs to another setup. Nothing in it is unpickled beyond tensors and plain containers."""
    try:
        if not (path / TRAIN_STATE_FILE).is_file():
            raise FileNotFoundError(f"no {TRAIN_STATE_FILE} (a checkpoint of an older bert-dist: its pickled "
                                    "training state is not loaded, for safety)")
        # Every process checks every process's random states (the same error everywhere, no lone failing rank):
        # without them a resumed run draws other dropout masks than the uninterrupted one.
        missing = [f"random_states_{i}.pkl" for i in range(accelerator.num_processes)
                   if not (path / f"random_states_{i}.pkl").is_file()]
        if missing:
            raise FileNotFoundError(f"no {', '.join(missing)} (the random states of {len(missing)} process(es))")
        torch.manual_seed(int.from_bytes(os.urandom(7), "little"))
        sentinel = torch.get_rng_state()
        with _quiet_accelerate():
            accelerator.load_state(str(path))
        if torch.equal(torch.get_rng_state(), sentinel):  # accelerate only logs (at INFO) a file it could not read
            raise ValueError(f"random_states_{accelerator.process_index}.pkl did not load")
        saved = json.loads((path / TRAIN_STATE_FILE).read_text())
        saved.pop("num_processes", None)  # checked before anything loaded (rundir.check_resume), as is
        saved.pop("mixed_precision", None)
        state.load_state_dict(saved)
        scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, map_location="cpu", weights_only=True))
    except Exception as e:  # torch/safetensors/pickle raise many types; all mean this checkpoint can't be used
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ValueError(
            f"cannot resume from {path} ({type(e).__name__}: {msg}); it is incomplete, or was written by a run "
            "with another model or flags: resume with the run's own flags, or start afresh with --overwrite "
            "(without --resume)"
        ) from None
    log.info("resumed from %s at step %d (epoch %d, batch %d)", path, state.step, state.epoch, state.batches_in_epoch)


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


def _trim_metrics(out_dir: Path, step: int, redo_eval: bool = False) -> None:
    """Drop evaluations and log lines written after the checkpoint by the run that was killed: they will be redone.
    redo_eval: the evaluation at `step` itself will be redone too (the checkpoint is the last step: the final
    evaluation runs again), so its line goes as well."""

    def before(line: str, last: int) -> bool:
        try:
            return json.loads(line).get("step", 0) <= last
        except ValueError:  # a line cut short by the kill
            return False

    for f, last in ((out_dir / "metrics.jsonl", step - redo_eval), (out_dir / TRAIN_LOG, step)):
        if f.is_file():
            f.write_text("".join(ln for ln in f.read_text().splitlines(keepends=True)
                                 if ln.strip() and before(ln, last)))


def _set_epoch(loader: Any, epoch: int, on_set_epoch: Callable[[int], None] | None) -> None:
    # accelerate's prepared loader re-sets its sampler's epoch from its own pass counter when iterated
    # (and a skip_first_batches copy starts that counter afresh): set both to the epoch we are in.
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    if on_set_epoch is not None:
        on_set_epoch(epoch)


def scaler_skipped(scaler: torch.amp.GradScaler, scale_before: torch.Tensor) -> torch.Tensor:
    """fp16: whether the optimizer step just taken was skipped for inf/NaN gradients, on the device (0-dim bool).

    The scaler halves its scale on such a step (and only then lowers it). Not accelerate's
    `optimizer_step_was_skipped`: with a fused optimizer the scaler always calls `step()` and the kernel skips the
    update on the device (its found_inf), so that flag is always False; and reading it unfused costs a host sync."""
    return scaler._scale < scale_before


def _zero_nonfinite_grads(params: list[torch.nn.Parameter], grad_norm: torch.Tensor) -> torch.Tensor:
    """Zero every gradient when the (global) gradient norm is inf/NaN; on the device, no host sync.

    The optimizer then steps with zero gradients: the weights stay finite (AdamW's moments decay one
    step and its momentum still moves the weights a little, as for any zero gradient) instead of
    becoming NaN for good. Skipping the step outright would need the flag on the host (a sync every
    step, as GradScaler does); this costs one small kernel per parameter. Returns the 0-d "gradients
    were finite" flag.
    """
    ok = torch.isfinite(grad_norm)
    for p in params:
        if p.grad is not None:
            p.grad.masked_fill_(~ok, 0.0)
    return ok


_sigterm: dict[str, Any] = {"signum": None, "depth": 0, "previous": None}


def catch_sigterm() -> Callable[[], None]:
    """From now on SIGTERM (SLURM's warning before preemption or a time limit) is noted instead of fatal: `train()`
    stops at a step boundary and saves a checkpoint; after the last step the run goes on to write its outputs.
    Returns the function that ends it. Calls nest (run.main around the whole run, `train()` inside it): the
    outermost one installs the handler and restores the previous one."""

    def on_sigterm(signum: int, frame: Any) -> None:
        _sigterm["signum"] = signum

    if _sigterm["depth"] == 0:
        _sigterm["signum"], _sigterm["previous"] = None, signal.getsignal(signal.SIGTERM)
        with contextlib.suppress(ValueError):  # not the main thread: no handler, SIGTERM kills as usual
            signal.signal(signal.SIGTERM, on_sigterm)
    _sigterm["depth"] += 1

    def release() -> None:
        _sigterm["depth"] -= 1
        if _sigterm["depth"] == 0:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, _sigterm["previous"] or signal.SIG_DFL)  # None: set outside Python

    return release


def sigterm_received() -> bool:
    return _sigterm["signum"] is not None


# ---------------------------------------------------------------------------------------------


def train(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_loader: torch.utils.data.DataLoader,
    cfg: TrainConfig,
    num_steps: int,
    out_dir: Path,
    eval_fn: Callable[[int], dict[str, float]] | None = None,
    resume_from: Path | None = None,
    on_set_epoch: Callable[[int], None] | None = None,
    max_grad_norm: float = 1.0,
    on_trained: Callable[[], None] | None = None,
    batch_size: int | None = None,
    checkpoint_files: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train for `num_steps` optimizer steps; evaluate every `cfg.eval_every` steps and at the end.

    on_trained: called once the last step is done, before the final evaluation (the recipes save the model there,
    so that an evaluation that fails cannot cost the training).
    batch_size: the examples of a full micro-batch per process (--batch-size): with --grad-accum each
    micro-batch's loss weighs by its examples against it (None: every micro-batch alike).
    checkpoint_files: {name: text} written into every checkpoint (the run's tokenizer.json).

    The scheduler is stepped here once per optimizer step (it is not passed through
    `accelerator.prepare`, which would step it once per process). Returns the final metrics plus
    train_seconds, examples_per_second, tokens_per_second, steps; or {"interrupted": True, "steps"}
    after a SIGTERM, once a checkpoint is saved.

    SIGTERM (SLURM's notice before preemption or the time limit) stops the run at the end of the
    optimizer step under way, and saves a checkpoint there; several processes agree on that step every
    step (one small all-reduce over a CPU group, so no device sync).

    Non-finite steps: the gradient norm is computed every step (clipping to --max-grad-norm, or to
    inf when clipping is off); when it is not finite the gradients are zeroed on the device, so NaN
    never reaches the weights. Such steps, and non-finite losses, are counted on the device and read
    at log and checkpoint steps: --max-bad-steps in a row stop the run there with TrainingDiverged,
    and no checkpoint is written while the latest step is bad, so the newest one is a good one.
    Under fp16 the gradient scaler skips inf/NaN steps itself (counted on the device as skipped_steps).
    """
    state = TrainState()
    is_main = accelerator.is_main_process
    if is_main:
        remove_incomplete_checkpoints(out_dir)
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from, state, scheduler)
        if state.batches_per_epoch and state.batches_per_epoch != len(train_loader):
            raise ValueError(f"the training data changed since the checkpoint {resume_from}: {len(train_loader)} "
                             f"batches per epoch now, {state.batches_per_epoch} then (a data file edited or replaced "
                             "under the same path?); resume with the run's own data, or start afresh with --overwrite")
        if state.step > num_steps:  # the loop would not run, and the results would say `state.step` steps
            raise ValueError(f"--max-steps/--epochs: this run ends at step {num_steps}, before the step {state.step} "
                             f"of the checkpoint {resume_from}; resume with --max-steps {state.step} or more")
        if is_main:
            _trim_metrics(out_dir, state.step, redo_eval=state.step == num_steps)
    elif cfg.resume and is_main:
        _trim_metrics(out_dir, 0)  # killed before its first checkpoint: it starts over, its lines would repeat
    state.batches_per_epoch = len(train_loader)
    win = Window(accelerator.device)
    win.load(state.window, is_main)
    fp16 = accelerator.mixed_precision == "fp16"
    params = [p for p in model.parameters() if p.requires_grad]
    accum, group_examples = accelerator.gradient_accumulation_steps, 0
    # --grad-accum: each micro-batch's mean loss weighs by its examples, so that a group cut short (the epoch's last
    # micro-batch, or last group) is the mean over its examples, as one batch of them would be, not k/N of it
    # (accelerate divides every micro-batch's loss by N). With several processes every micro-batch is full (the
    # sampler keeps a short batch last, and accelerate fills the last one from the epoch's start): each scales alike.
    weigh = accum > 1 and batch_size is not None
    metrics: dict[str, float] = {}
    last_eval = last_save = -1
    progress = StepProgress(num_steps, is_main)
    progress.update(state.step)
    release_sigterm = catch_sigterm()

    # Several processes must agree to stop (one alone would wait forever for the others at the checkpoint), and
    # soon: torchrun kills its workers 30 s after it forwards a SIGTERM. So they agree every step, over a CPU (gloo)
    # group: a one-integer all-reduce with no device sync (NCCL's would make the host wait for the step's kernels).
    flag_group = None
    if accelerator.num_processes > 1 and torch.distributed.get_backend() != "gloo":
        flag_group = torch.distributed.new_group(backend="gloo")

    def stop_requested() -> bool:
        stop = sigterm_received()
        if accelerator.num_processes == 1:
            return stop
        flag = torch.tensor([int(stop)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=flag_group)
        return bool(flag.item())

    def check_diverged(window: dict[str, float]) -> None:
        if window["bad_max"] >= cfg.max_bad_steps:
            kept = list_checkpoints(out_dir)
            raise TrainingDiverged(
                f"the loss or gradients were not finite for {cfg.max_bad_steps} optimizer steps in a row "
                f"(--max-bad-steps), at step {state.step}; no update was applied on those steps; "
                + (f"the last good checkpoint is {kept[-1]}; " if kept else "")
                + "lower --lr, use bf16 instead of fp16, or check the data"
            )

    def checkpoint() -> None:
        nonlocal last_save
        win.flush_throughput(accelerator, state)
        state.window = {k: v for k, v in win.read(accelerator).items() if k != "mean_loss"}
        save_checkpoint(accelerator, out_dir, state.step, cfg.keep_checkpoints, state, scheduler, checkpoint_files)
        last_save = state.step
        win.t0 = time.perf_counter()  # saving time is not training time

    model.train()
    stopping = False
    try:
        while state.step < num_steps and not stopping:
            if state.batches_in_epoch >= len(train_loader):  # the checkpoint closed an epoch
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            _set_epoch(train_loader, state.epoch, on_set_epoch)
            loader = train_loader
            if state.batches_in_epoch:
                loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
            for batch in loader:
                state.batches_in_epoch += 1
                grad_ok = scale = None
                with accelerator.accumulate(model):
                    loss = model(**batch)["loss"]
                    n = batch["input_ids"].shape[0]
                    group_examples += n
                    accelerator.backward(loss * (n / batch_size) if weigh and n != batch_size else loss)
                    if accelerator.sync_gradients:
                        if weigh and group_examples != accum * batch_size:
                            torch._foreach_mul_([p.grad for p in params if p.grad is not None],
                                                accum * batch_size / group_examples)
                        group_examples = 0
                        norm = accelerator.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
                        if norm is not None:
                            win.grad_norm = norm.detach()
                            if not fp16:
                                grad_ok = _zero_nonfinite_grads(params, norm)
                        if fp16 and accelerator.scaler._scale is not None:
                            scale = accelerator.scaler._scale.clone()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                win.add_micro_batch(loss.detach(), batch)
                if not accelerator.sync_gradients:
                    continue
                win.end_step(grad_ok)
                if scale is not None:
                    win.skipped += scaler_skipped(accelerator.scaler, scale)
                lr = scheduler.get_last_lr()[0]  # this step's rate (the log shows it, not the next step's)
                scheduler.step()
                state.step += 1
                log_now = state.step % cfg.log_every == 0 or state.step == num_steps
                save_now = bool(cfg.save_every) and state.step % cfg.save_every == 0
                if log_now:
                    check_diverged(_log_step(accelerator, state, win, lr, progress, fp16, out_dir))
                    win.reset_loss()
                else:
                    progress.update(state.step)
                if eval_fn is not None and cfg.eval_every and state.step % cfg.eval_every == 0:
                    metrics = _run_eval(accelerator, eval_fn, state, out_dir)
                    last_eval = state.step
                    model.train()
                    win.t0 = time.perf_counter()  # evaluation time is not training time
                if save_now:
                    window = win.read(accelerator)
                    check_diverged(window)
                    if window["bad_run"]:
                        log.warning("step %d: not saving a checkpoint while the loss is not finite", state.step)
                    else:
                        checkpoint()
                stopping = stop_requested()
                if state.step >= num_steps or stopping:
                    break
            else:
                state.epoch += 1
                state.batches_in_epoch = 0
    except BaseException:
        release_sigterm()
        raise
    finally:
        progress.close()
    try:
        if stopping:
            log.warning("SIGTERM at step %d: saving a checkpoint and stopping; rerun with --resume to continue",
                        state.step)
            if last_save != state.step:
                checkpoint()
            return {"interrupted": True, "steps": state.step}
        # The handler stays through the saving and the final evaluation (and, under run.main, until the run's
        # outputs are written): a SIGTERM there (the last minutes of a job) no longer kills the run a step from its
        # end; it finishes, and exits 0.
        if on_trained is not None:
            on_trained()
        if eval_fn is not None and last_eval != state.step:
            metrics = _run_eval(accelerator, eval_fn, state, out_dir)
        if sigterm_received():
            log.warning("SIGTERM after the last step: the run was finished (model saved, evaluated) instead")
    finally:
        release_sigterm()
    return {
        **metrics,
        "steps": state.step,
        "epochs": round(state.epoch + state.batches_in_epoch / max(1, len(train_loader)), 3),
        "train_seconds": round(state.train_seconds, 2),
        "examples_per_second": round(state.examples / max(state.train_seconds, 1e-9), 2),
        "tokens_per_second": round(state.tokens / max(state.train_seconds, 1e-9), 1),
        **({"skipped_steps": state.skipped_steps} if fp16 else {}),
        **({"nonfinite_steps": state.nonfinite_steps} if state.nonfinite_steps else {}),
    }


def _log_step(
    accelerator: Accelerator,
    state: TrainState,
    win: Window,
    lr: float,
    progress: StepProgress,
    fp16: bool,
    out_dir: Path,
) -> dict[str, float]:
    """One log line, a train_log.jsonl line, a progress-bar update and tracker scalars: the loop's regular host
    sync. `lr`: the rate the step just taken ran at. Returns the window."""
    n_ex, n_tok, dt = win.flush_throughput(accelerator, state)
    window = win.read(accelerator)
    stats: dict[str, Any] = {
        "step": state.step,
        "epoch": state.epoch,
        "loss": window["mean_loss"],
        "lr": lr,
        "examples/s": n_ex / max(dt, 1e-9),
        "tokens/s": n_tok / max(dt, 1e-9),
    }
    if win.grad_norm is not None:
        stats["grad_norm"] = float(win.grad_norm.item())
    if fp16:
        stats["skipped_steps"] = state.skipped_steps
    if state.nonfinite_steps:
        stats["nonfinite_steps"] = state.nonfinite_steps
    progress.update(state.step, f"loss {stats['loss']:.4f} lr {stats['lr']:.2e} {stats['examples/s']:.1f} ex/s")
    log.info(format_metrics(stats))
    if accelerator.is_main_process:  # the numbers are on the host already: writing them costs no sync
        with open(out_dir / TRAIN_LOG, "a") as fh:
            fh.write(json.dumps({**stats, "train_seconds": round(state.train_seconds, 3)}) + "\n")
    accelerator.log({"train/" + k.replace("/", "_per_"): v for k, v in stats.items() if k != "step"}, step=state.step)
    return window


def _run_eval(
    accelerator: Accelerator, eval_fn: Callable[[int], dict[str, float]], state: TrainState, out_dir: Path
) -> dict[str, float]:
    metrics = eval_fn(state.step)
    if accelerator.is_main_process:
        log.info("eval step %d: %s", state.step, format_metrics(metrics))
        with open(out_dir / "metrics.jsonl", "a") as fh:
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
    is counted once (`gather_for_metrics` drops the samples repeated to even out the last batch).
    Returns numpy arrays with one row per example of the dataset.
    """
    was_training = model.training
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    for batch in loader:
        # Inputs only: evaluation needs no loss, and test splits carry no labels (-1).
        picked = collect(batch, model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}))
        picked = {
            k: accelerator.pad_across_processes(v, dim=1, pad_index=_pad(v, pad_value)) if v.ndim == 2 else v
            for k, v in picked.items()
        }
        for k, v in accelerator.gather_for_metrics(picked).items():
            parts.setdefault(k, []).append(v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy())
    model.train(was_training)
    out = {}
    for k, vs in parts.items():
        if vs[0].ndim == 2:
            width = max(v.shape[1] for v in vs)
            fill = pad_value if np.issubdtype(vs[0].dtype, np.floating) else -100
            vs = [np.pad(v, ((0, 0), (0, width - v.shape[1])), constant_values=fill) for v in vs]
        out[k] = np.concatenate(vs)
    return out


def _pad(t: torch.Tensor, pad_value: float) -> float | int:
    return pad_value if t.is_floating_point() else -100


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
        accelerator: Accelerator,
        cfg: RunConfig,
        out_dir: Path,
        eval_fn: Callable[[int], dict[str, float]],
        on_set_epoch: Callable[[int], None] | None,
        save: Callable[[], None],
        tokenizer: Any = None,
    ) -> dict[str, Any]:
        """`train()` with this run's objects, or only `eval_fn` under --eval-only (both recipes end so). `save` writes
        the run's model: after training and before the final evaluation, or after the evaluation under --eval-only."""
        if cfg.train.eval_only:
            results = {**_run_eval(accelerator, eval_fn, TrainState(), out_dir), "steps": 0}  # metrics.jsonl too
            save()
            return results
        return train(
            accelerator,
            self.model,
            self.optimizer,
            self.scheduler,
            self.train_loader,
            cfg.train,
            self.num_steps,
            out_dir,
            eval_fn,
            self.resume_from,
            on_set_epoch,
            cfg.optim.max_grad_norm,
            save,
            cfg.data.batch_size,
            {TOKENIZER_FILE: tokenizer.to_str()} if tokenizer is not None else None,
        )


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
        return Prepared(model, None, None, None, dict(zip(names, loaders)), 0, None)
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
    return Prepared(
        model,
        optimizer,
        scheduler,
        train_loader,
        dict(zip(names, loaders)),
        num_steps,
        resume_checkpoint(cfg.train, out_dir),
    )



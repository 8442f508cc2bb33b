"""The task-agnostic loop: accumulate, clip, step, schedule, log, evaluate, checkpoint, resume.

It knows nothing about GLUE, SQuAD or pretraining: a recipe hands it a prepared model, optimizer,
scheduler and train loader, and an `eval_fn(step) -> metrics`. Everything is counted in optimizer
steps. The loss and token counts stay on the device and are read only at log steps.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from bert_dist.config import RunConfig, TrainConfig
from bert_dist.console import StepProgress, format_metrics
from bert_dist.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for --max-bad-steps consecutive micro-batches."""


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

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            setattr(self, k, v)


def steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    """Optimizer steps per epoch (a short tail of micro-batches still makes a step)."""
    return math.ceil(num_batches / grad_accum)


def total_steps(cfg: TrainConfig, num_batches: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * steps_per_epoch(num_batches, cfg.grad_accum)))


# ---------------------------------------------------------------------------------------------
# Checkpoints (accelerate save_state: model, optimizer, scheduler, scaler, RNG states, TrainState)


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a save in progress has a .tmp name and is ignored)."""
    d = out_dir / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def save_checkpoint(accelerator: Accelerator, out_dir: Path, step: int, keep: int) -> Path:
    final = out_dir / "checkpoints" / f"step-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)  # atomic: a kill during the save leaves the previous checkpoint as newest
        for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


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
) -> dict[str, Any]:
    """Train for `num_steps` optimizer steps; evaluate every `cfg.eval_every` steps and at the end.

    The scheduler is stepped here once per optimizer step (it is not passed through
    `accelerator.prepare`, which would step it once per process). Returns the final metrics plus
    train_seconds, examples_per_second, tokens_per_second, steps.
    """
    state = TrainState()
    accelerator.register_for_checkpointing(state, scheduler)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, state.step, state.epoch,
                 state.batches_in_epoch)
    dev = accelerator.device
    loss_sum = torch.zeros((), device=dev)
    micro = torch.zeros((), device=dev)
    tokens = torch.zeros((), device=dev, dtype=torch.long)
    bad_run = torch.zeros((), device=dev, dtype=torch.long)
    bad_max = torch.zeros((), device=dev, dtype=torch.long)
    examples = 0
    fp16 = accelerator.mixed_precision == "fp16"
    metrics: dict[str, float] = {}
    last_eval = -1
    progress = StepProgress(num_steps, accelerator.is_main_process)
    progress.update(state.step)
    stop = {"signal": None}
    prev_handler = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:  # SLURM's warning before preemption
        stop["signal"] = signum

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread
        pass

    model.train()
    t_last = time.perf_counter()
    ex_last, tok_last = state.examples, state.tokens
    try:
        while state.step < num_steps and stop["signal"] is None:
            if on_set_epoch is not None:
                on_set_epoch(state.epoch)
            loader = train_loader
            if state.batches_in_epoch:
                loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
            for batch in loader:
                state.batches_in_epoch += 1
                with accelerator.accumulate(model):
                    loss = model(**batch)["loss"]
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                loss = loss.detach()
                finite = torch.isfinite(loss)
                loss_sum += torch.where(finite, loss, 0.0)
                micro += finite
                bad_run = torch.where(finite, 0, bad_run + 1)
                bad_max = torch.maximum(bad_max, bad_run)
                tokens += batch["attention_mask"].sum()
                examples += batch["input_ids"].shape[0]
                if not accelerator.sync_gradients:
                    continue
                if fp16 and accelerator.optimizer_step_was_skipped:
                    state.skipped_steps += 1  # the scaler found inf/nan: no update, and no schedule step
                else:
                    scheduler.step()
                state.step += 1
                if state.step % cfg.log_every == 0 or state.step == num_steps:
                    now = time.perf_counter()
                    n_tok = int(accelerator.reduce(tokens, "sum").item())
                    n_ex = examples * accelerator.num_processes
                    state.train_seconds += now - t_last
                    state.examples += n_ex
                    state.tokens += n_tok
                    mean_loss = (accelerator.reduce(loss_sum, "sum") / accelerator.reduce(micro, "sum").clamp(min=1))
                    stats = {
                        "step": state.step,
                        "epoch": state.epoch,
                        "loss": float(mean_loss.item()),
                        "lr": scheduler.get_last_lr()[0],
                        "examples/s": n_ex / max(now - t_last, 1e-9),
                        "tokens/s": n_tok / max(now - t_last, 1e-9),
                    }
                    if fp16:
                        stats["skipped_steps"] = state.skipped_steps
                    progress.update(state.step, f"loss {stats['loss']:.4f} lr {stats['lr']:.2e} "
                                                f"{stats['examples/s']:.1f} ex/s")
                    log.info(format_metrics(stats))
                    accelerator.log({"train/" + k.replace("/", "_per_"): v for k, v in stats.items()
                                     if k not in ("step",)}, step=state.step)
                    if int(accelerator.reduce(bad_max, "max").item()) >= cfg.max_bad_steps:
                        raise TrainingDiverged(
                            f"the loss was not finite for {cfg.max_bad_steps} consecutive steps at step "
                            f"{state.step}; lower --lr, use bf16 instead of fp16, or check the data"
                        )
                    loss_sum.zero_(), micro.zero_(), tokens.zero_(), bad_max.zero_()
                    examples = 0
                    t_last = time.perf_counter()
                else:
                    progress.update(state.step)
                if eval_fn is not None and cfg.eval_every and state.step % cfg.eval_every == 0:
                    metrics = _run_eval(accelerator, eval_fn, state, out_dir)
                    last_eval = state.step
                    model.train()
                    t_last = time.perf_counter()  # evaluation time is not training time
                if cfg.save_every and state.step % cfg.save_every == 0:
                    save_checkpoint(accelerator, out_dir, state.step, cfg.keep_checkpoints)
                    t_last = time.perf_counter()
                if state.step >= num_steps or stop["signal"] is not None:
                    break
            else:
                state.epoch += 1
                state.batches_in_epoch = 0
    finally:
        progress.close()
        try:
            signal.signal(signal.SIGTERM, prev_handler)
        except ValueError:
            pass
    if stop["signal"] is not None:
        log.warning("SIGTERM at step %d: saving a checkpoint and stopping; resume with --resume", state.step)
        save_checkpoint(accelerator, out_dir, state.step, cfg.keep_checkpoints)
        return {"interrupted": True, "steps": state.step}
    if eval_fn is not None and last_eval != state.step:
        metrics = _run_eval(accelerator, eval_fn, state, out_dir)
    return {
        **metrics,
        "steps": state.step,
        "epochs": round(state.epoch + state.batches_in_epoch / max(1, len(train_loader)), 3),
        "train_seconds": round(state.train_seconds, 2),
        "examples_per_second": round(state.examples / max(state.train_seconds, 1e-9), 2),
        "tokens_per_second": round(state.tokens / max(state.train_seconds, 1e-9), 1),
        **({"skipped_steps": state.skipped_steps} if fp16 else {}),
    }


def _run_eval(accelerator: Accelerator, eval_fn: Callable[[int], dict[str, float]], state: TrainState,
              out_dir: Path) -> dict[str, float]:
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
        picked = {k: accelerator.pad_across_processes(v, dim=1, pad_index=_pad(v, pad_value)) if v.ndim == 2 else v
                  for k, v in picked.items()}
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
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: torch.utils.data.DataLoader
    eval_loaders: dict[str, torch.utils.data.DataLoader]
    num_steps: int
    resume_from: Path | None


def prepare_training(
    cfg: RunConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    train_loader: torch.utils.data.DataLoader,
    eval_loaders: dict[str, torch.utils.data.DataLoader],
    out_dir: Path,
) -> Prepared:
    """Optimizer, schedule, `accelerator.prepare`, optional torch.compile, and the checkpoint to resume."""
    optimizer = build_optimizer(model, cfg.optim, accelerator.device.type)
    names = list(eval_loaders)
    model, optimizer, train_loader, *loaders = accelerator.prepare(model, optimizer, train_loader,
                                                                    *eval_loaders.values())
    if cfg.train.compile:
        t0 = time.perf_counter()
        model = torch.compile(model)
        log.info("torch.compile wrapped the model in %.1fs (kernels compile on the first steps)",
                 time.perf_counter() - t0)
    num_steps = total_steps(cfg.train, len(train_loader))
    scheduler = build_scheduler(optimizer, cfg.optim, num_steps)
    return Prepared(model, optimizer, scheduler, train_loader, dict(zip(names, loaders)), num_steps,
                    resume_checkpoint(cfg.train, out_dir))


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

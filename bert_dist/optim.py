"""AdamW with BERT's parameter groups, and the warmup + decay schedule."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from bert_dist.config import OptimConfig

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; never biases or LayerNorm (every 1-D parameter)."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied tensor once
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel by default on CUDA and on the CPU.

    On the CPU, torch's own default is a Python loop over the parameters (one small kernel per op per
    tensor); the fused kernel (torch >= 2.4) does each tensor's whole update in one pass, several times faster
    there, and faster than foreach=True (BENCHMARKS.md, "Fast paths": the adamw row).
    Elsewhere (mps, ...) torch picks.
    """
    fused = cfg.fused if cfg.fused is not None else device_type in ("cuda", "cpu")
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        fused=fused or None,
    )


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    """Linear warmup to the peak lr, then linear (or cosine) decay to 0 at `total_steps`, or constant."""
    warmup = warmup_steps(cfg, total_steps)
    if cfg.warmup_steps is not None and warmup >= total_steps and warmup > 0:  # given: --warmup-ratio is below 1
        log.warning("--warmup-steps %d is not below the run's %d optimizer steps: the learning rate never reaches "
                    "--lr (at most %.3g)", warmup, total_steps, cfg.lr * (total_steps - 1) / warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup  # the schedule of BERT and of transformers' get_linear_schedule_with_warmup
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return LambdaLR(optimizer, factor)

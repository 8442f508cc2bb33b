"""SIGTERM as a request to stop, not a kill: SLURM's notice before preemption or a time limit, a scheduler's or a
user's `kill`. Training stops at the end of the optimizer step under way (or inside an evaluation) and saves a
checkpoint; after the last step the run goes on to write its outputs.

Several processes must agree to stop (one alone would wait forever for the others at the checkpoint), and soon:
torchrun kills its workers 30 s after it forwards a SIGTERM. So they agree at every optimizer step and at every
evaluation batch, over a CPU (gloo) group: a one-integer all-reduce with no device sync (NCCL's would make the host
wait for the step's kernels).
"""

from __future__ import annotations

import contextlib
import datetime
import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate import Accelerator

_sigterm: dict[str, Any] = {"signum": None, "depth": 0, "previous": None}


def catch_sigterm() -> Callable[[], None]:
    """From now on SIGTERM is noted instead of fatal. Returns the function that ends it. Calls nest (run.main around
    the whole run, `train()` inside it): the outermost one installs the handler and restores the previous one."""

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


class Preempted(Exception):
    """The processes agreed to stop during an evaluation (`Preemption.interruptible`): it ends there, unscored."""


_interruptible: list[Preemption] = []  # the preemption whose `interruptible()` block is under way, if any


class Preemption:
    """SIGTERM caught for the life of the object (a context manager), and the processes' agreement to stop."""

    def __init__(self, accelerator: Accelerator, timeout: datetime.timedelta | None = None):
        """timeout: how long the agreement waits for the others (--dist-timeout, as the run's own process group)."""
        self.single = accelerator.num_processes == 1
        self.group = None
        if not self.single and torch.distributed.get_backend() != "gloo":  # every process builds it: a collective
            self.group = torch.distributed.new_group(backend="gloo", timeout=timeout)
        self.release: Callable[[], None] | None = None

    def __enter__(self) -> Preemption:
        self.release = catch_sigterm()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def requested(self) -> bool:
        """Whether any process has received SIGTERM. Every process calls it at the same points (a collective)."""
        stop = sigterm_received()
        if self.single:
            return stop
        flag = torch.tensor([int(stop)])  # on the CPU: reading it back is no device sync
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Inside the block, `check()` (called by `train.evaluate` before each batch) raises `Preempted` once the
        processes agree to stop: a long evaluation must not spend the 30 s a checkpoint needs."""
        _interruptible.append(self)
        try:
            yield
        finally:
            _interruptible.pop()


def check() -> None:
    """Raise `Preempted` if an `interruptible()` block is under way and the processes agree to stop; else nothing
    (outside training, e.g. the final evaluation or `predict`, it costs nothing and never stops)."""
    if _interruptible and _interruptible[-1].requested():
        raise Preempted

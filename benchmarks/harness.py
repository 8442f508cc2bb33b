"""Timing that survives a shared machine: interleaved rounds, medians, and the machine it ran on.

Every comparison alternates its contestants within a round, and flips their order every other round
(A B, B A, A B, ...), so a burst of load from another process lands on both sides alike rather than
on whichever ran second. Figures are medians over rounds; on the CPU the process's CPU time is kept
beside the wall clock as a second opinion (it does not count time spent waiting for a busy core).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Samples:
    """One contestant's measurements: seconds per call (wall and CPU) and any sub-phases it reported."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)

    def median(self, what: str = "wall") -> float:
        values = self.wall if what == "wall" else self.cpu if what == "cpu" else self.phases[what]
        return statistics.median(values)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for queued device work (CUDA kernels run asynchronously); a no-op on the CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleave(fns: dict[str, Callable[[], dict[str, float] | None]], rounds: int, warmup: int = 1,
               sync: Callable[[], None] = lambda: None) -> dict[str, Samples]:
    """Call each function once per round, alternating their order; return their timings by name.

    A function may return {phase: seconds} for parts it timed itself (kept in `Samples.phases`).
    `warmup` untimed rounds come first (allocator, autotuning, lazy initialisation).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
        sync()
    out = {name: Samples() for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            phases = fns[name]()
            sync()
            s = out[name]
            s.wall.append(time.perf_counter() - t0)
            s.cpu.append(time.process_time() - c0)
            for k, v in (phases or {}).items():
                s.phases.setdefault(k, []).append(v)
    return out


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    """What the figures were measured on (and how busy it was: the load average at the start)."""
    import transformers

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"cpu": cpu_model(), "cores": cores, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "device": str(device)}
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_table(title: str, header: list[str], rows: list[list], note: str | None = None) -> None:
    """A markdown table (pastes into BENCHMARKS.md as it is)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print(f"\n### {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    if note:
        print(f"\n{note}")
    print(flush=True)


def progress(row: dict) -> None:
    """One line per measured configuration as it finishes (a full run takes a while on a CPU)."""
    print("  " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or x != x else f"{x:,.{digits}f}"  # x != x: NaN


def times(x: float | None) -> str:
    """A ratio as "1.23x" (n/a where there is none)."""
    return "n/a" if x is None or x != x else f"{x:.2f}x"


def ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")

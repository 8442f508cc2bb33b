"""Console output: rich on the main process only; one progress bar over optimizer steps; result tables.

Library modules log through `logging.getLogger(__name__)`; this module decides where that goes.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)


def setup_logging(is_main: bool, level: int = logging.INFO) -> None:
    """INFO and up from the main process, only errors from the others (every process runs the same code on the same
    data, so their warnings would be the main process's, repeated once per process)."""
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False,
                          log_time_format="[%X]")
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if is_main else logging.ERROR)
    for noisy in ("datasets", "huggingface_hub", "filelock", "urllib3", "fsspec", "accelerate.utils.other",
                  "torch.distributed", "evaluate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    other = logging.getLogger("accelerate.utils.other")
    if not any(isinstance(f, _TiedDecoderSaved) for f in other.filters):
        other.addFilter(_TiedDecoderSaved())
    # Library progress bars (datasets.map, evaluate) would fight with ours.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_warning()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    if not is_main:
        warnings.simplefilter("ignore")  # Python warnings (torch's, ours) too


class _TiedDecoderSaved(logging.Filter):
    """Drops accelerate's warning, at every pretraining checkpoint, that it left out the MLM decoder's weight: that
    weight is the word embeddings (tied), and loading ties it again. Its other warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Removed shared tensor" in message and "'cls.predictions.decoder.weight'}" in message)


class StepProgress:
    """One bar over optimizer steps (a no-op off the main process, or when output is not a terminal)."""

    def __init__(self, total: int, enabled: bool, description: str = "train"):
        self.enabled = enabled and console.is_terminal
        self._p = None
        if self.enabled:
            self._p = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[stats]}"), console=console, transient=False,
            )
            self._task = self._p.add_task(description, total=total, stats="")
            self._p.start()

    def update(self, step: int, stats: str | None = None) -> None:
        if self._p is not None:
            kw: dict[str, Any] = {"completed": step}
            if stats is not None:
                kw["stats"] = stats
            self._p.update(self._task, **kw)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None


def format_metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def print_table(title: str, rows: dict[str, dict[str, Any]], is_main: bool = True) -> None:
    """A rich table: one row per key of `rows` (e.g. an eval split), one column per metric."""
    if not is_main or not rows:
        return
    if len(rows) == 1 and len(next(iter(rows.values()))) > 4:  # one wide row reads better as a column
        (name, only), = rows.items()
        rows = {k: {name: v} for k, v in only.items()}
    cols: list[str] = []
    for r in rows.values():
        cols += [c for c in r if c not in cols]
    table = Table(title=title)
    table.add_column("")
    for c in cols:
        table.add_column(c, justify="right")
    for name, r in rows.items():
        table.add_row(name, *[f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols])
    console.print(table)


def emit(text: str, is_main: bool = True) -> None:
    """A command's result on stdout, as plain text (no markup, no wrapping: scripts read it), from the main process
    only; everything else goes to stderr."""
    if is_main:
        Console(markup=False, highlight=False, emoji=False, soft_wrap=True).print(text)


def fail(message: str, code: int = 1) -> None:
    """One red line on stderr, from every process (so a lone failing rank is seen), then exit `code`."""
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)

"""Offline evaluation metrics for GLUE, SQuAD and tasks on one's own data.

The metric modules live next to this file (``glue/glue.py``, ``squad/squad.py``, ``squad_v2/squad_v2.py``,
``classification/classification.py``)
and are loaded by path, so ``evaluate`` never has to reach the Hugging Face Hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import evaluate

AVAILABLE_METRICS = ("glue", "squad", "squad_v2", "classification")

_METRICS_DIR = Path(__file__).resolve().parent


def load_metric(name: str, config_name: str | None = None) -> evaluate.EvaluationModule:
    """Loads one of the package's metric modules without touching the network.

    ``evaluate`` copies the module into ``$HF_HOME/modules`` (under a file lock, so concurrent first loads
    from several processes are safe) and imports it from there. The metric keeps its predictions and
    references in memory rather than in an Arrow cache file under ``$HF_HOME/metrics``, which avoids lock
    files shared between processes that evaluate at the same time.

    Args:
        name: One of ``AVAILABLE_METRICS``: ``"glue"``, ``"squad"``, ``"squad_v2"`` or ``"classification"``.
        config_name: The metric configuration; for ``"glue"`` the task name (``"cola"``, ``"sst2"``,
            ``"mrpc"``, ``"qqp"``, ``"stsb"``, ``"mnli"``, ``"mnli_matched"``, ``"mnli_mismatched"``,
            ``"qnli"``, ``"rte"``, ``"wnli"`` or ``"ax"``); for ``"classification"`` the kind of task
            (``"classification"``, ``"multi_label"``, ``"regression"``). The SQuAD metrics take none.

    Returns:
        The loaded metric, ready for ``add_batch`` / ``compute``.

    Raises:
        ValueError: If ``name`` is not one of ``AVAILABLE_METRICS``.
        KeyError: If ``name`` is ``"glue"`` and ``config_name`` is not a GLUE task (same as the Hub metric), or
            ``name`` is ``"classification"`` and ``config_name`` is not a kind of task.
    """
    # Imported here because importing evaluate takes seconds, which e.g. a CLI failing on a bad path or a
    # module that merely imports this package should not pay.
    evaluate = _import_evaluate()

    if name not in AVAILABLE_METRICS:
        raise ValueError(f"Unknown metric {name!r}; valid metrics are: {', '.join(AVAILABLE_METRICS)}")
    # A path ending in <name>.py makes evaluate take the local branch outright, never the Hub fallback.
    script = _METRICS_DIR / name / f"{name}.py"
    return evaluate.load(str(script), config_name, keep_in_memory=True)


def _import_evaluate():
    """`import evaluate`, without the ~6 s import of transformers' pipelines when transformers is installed.

    evaluate's `Evaluator` classes import transformers inside try/except ImportError; metrics never use
    them. Hiding transformers for the duration of that one import makes evaluate skip them. If
    transformers is already imported, nothing is hidden.
    """
    import sys

    if "evaluate" in sys.modules or "transformers" in sys.modules:
        import evaluate

        return evaluate
    sys.modules["transformers"] = None  # type: ignore[assignment]  # makes `import transformers` fail
    try:
        import evaluate
    finally:
        del sys.modules["transformers"]
    return evaluate

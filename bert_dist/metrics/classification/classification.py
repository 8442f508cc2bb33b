"""Metrics of a task on one's own data (--task classification | multi_label | regression), offline.

The config name is the kind of task. ``evaluate`` scans this file's top-level imports with a line-based regex and
refuses to load it unless each one is installed: import only installed packages, one per ``import`` line.
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score

_DESCRIPTION = """\
Scores of a text classification, multi-label classification or regression task on one's own data: accuracy and
macro-F1 (classification), micro-F1, macro-F1 and exact match (multi-label), Pearson, Spearman and mean squared
error (regression).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: class ids (classification); 0/1 rows of one length, one column per label (multi_label); scores
        (regression).
    references: the same, gold.
Returns: by the config name (the kind of task):
    classification: "accuracy", "macro_f1" (F1 of each class, averaged unweighted over the classes that occur in
        the predictions or references)
    multi_label: "micro_f1" (F1 over every (row, label) decision), "macro_f1" (F1 per label, averaged), "exact_match"
        (rows whose whole label set is right)
    regression: "pearson", "spearmanr", "mse"
Examples:
    >>> metric = load_metric("classification", "multi_label")
    >>> metric.compute(predictions=[[1, 0], [1, 1]], references=[[1, 0], [0, 1]])
    {'micro_f1': 0.8, 'macro_f1': 0.8333333333333333, 'exact_match': 0.5}
"""

_KINDS = ("classification", "multi_label", "regression")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Classification(evaluate.Metric):
    """Own-data metric; the config name selects the kind of task."""

    def _info(self):
        if self.config_name not in _KINDS:
            raise KeyError(f"You should supply a configuration name selected in {list(_KINDS)}")
        value = {"classification": datasets.Value("int64"), "regression": datasets.Value("float64"),
                 "multi_label": datasets.Sequence(datasets.Value("int64"))}[self.config_name]
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": value, "references": value}),
            reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html"],
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if self.config_name == "regression":
            return {"pearson": float(pearsonr(predictions, references)[0]),
                    "spearmanr": float(spearmanr(predictions, references)[0]),
                    "mse": float(np.mean((predictions - references) ** 2))}
        if self.config_name == "multi_label":
            return {"micro_f1": float(f1_score(references, predictions, average="micro", zero_division=0)),
                    "macro_f1": float(f1_score(references, predictions, average="macro", zero_division=0)),
                    "exact_match": float((predictions == references).all(axis=1).mean())}
        return {"accuracy": float((predictions == references).mean()),
                "macro_f1": float(f1_score(references, predictions, average="macro", zero_division=0))}

"""GLUE benchmark metric, offline and interface-compatible with the Hugging Face Hub ``glue`` metric.

``evaluate`` scans this file's top-level imports with a line-based regex and refuses to load it unless
each one is installed, so import only installed packages and never write ``import a, b`` (the scanner
takes ``a,`` for a package name; ``from x import a, b`` is fine).
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman,
    Samuel R.},
  note={In the Proceedings of ICLR.},
  year={2019}
}
"""

_DESCRIPTION = """\
GLUE, the General Language Understanding Evaluation benchmark, is a collection of resources for training,
evaluating, and analyzing natural language understanding systems. This metric computes the official
score(s) of each GLUE task from predicted and gold labels.
"""

_KWARGS_DESCRIPTION = """
Compute the GLUE evaluation metric associated with each GLUE task.
Args:
    predictions: list of predicted labels (ints), or scores (floats) for stsb.
    references: list of gold labels (ints), or scores (floats) for stsb.
Returns: depending on the task (the config name):
    "accuracy": accuracy, for sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli, ax, mrpc, qqp
    "f1": binary F1 of the positive class, for mrpc and qqp
    "pearson": Pearson correlation, for stsb
    "spearmanr": Spearman rank correlation, for stsb
    "matthews_correlation": Matthews correlation coefficient, for cola
Examples:
    >>> glue_metric = load_metric("glue", "mrpc")
    >>> glue_metric.compute(predictions=[0, 1], references=[0, 1])
    {'accuracy': 1.0, 'f1': 1.0}
"""

_ACCURACY_TASKS = ("sst2", "mnli", "mnli_mismatched", "mnli_matched", "qnli", "rte", "wnli", "ax")
_ACCURACY_F1_TASKS = ("mrpc", "qqp")
_TASKS = ("cola", "stsb") + _ACCURACY_TASKS + _ACCURACY_F1_TASKS


def _accuracy(predictions, references):
    return float((predictions == references).mean())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Glue(evaluate.Metric):
    """GLUE metric; the config name selects the task."""

    def _info(self):
        if self.config_name not in _TASKS:
            raise KeyError(f"You should supply a configuration name selected in {list(_TASKS)}")
        label_type = "float64" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value(label_type), "references": datasets.Value(label_type)}
            ),
            codebase_urls=[],
            reference_urls=["https://gluebenchmark.com/"],
            # No format="numpy" (unlike the Hub metric): datasets' numpy formatter casts floats to float32,
            # which would move stsb correlations by ~1e-8 away from scipy on the float64 scores.
        )

    def _compute(self, predictions, references):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if self.config_name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if self.config_name == "stsb":
            return {
                "pearson": float(pearsonr(predictions, references)[0]),
                "spearmanr": float(spearmanr(predictions, references)[0]),
            }
        if self.config_name in _ACCURACY_F1_TASKS:
            return {
                "accuracy": _accuracy(predictions, references),
                "f1": float(f1_score(y_true=references, y_pred=predictions)),
            }
        return {"accuracy": _accuracy(predictions, references)}

"""The nine GLUE tasks as data (Wang et al. 2019; column names and labels of the hub's nyu-mll/glue)."""

from __future__ import annotations

from bert_dist.config import TaskSpec

_NLI = ("entailment", "not_entailment")


def _glue(name: str, text: tuple[str, ...], labels: tuple[str, ...], main: str = "accuracy", **kw) -> TaskSpec:
    kind = "regression" if not labels else "classification"
    return TaskSpec(name=name, kind=kind, hub_path="nyu-mll/glue", hub_config=name, text_columns=text,
                    label_names=labels, metric="glue", metric_config=name, main_metric=main, **kw)


GLUE_TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        _glue("cola", ("sentence",), ("unacceptable", "acceptable"), "matthews_correlation",
              submission_names=("CoLA",)),
        _glue("sst2", ("sentence",), ("negative", "positive"), submission_names=("SST-2",)),
        _glue("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "f1",
              submission_names=("MRPC",)),
        _glue("stsb", ("sentence1", "sentence2"), (), "pearson", submission_names=("STS-B",)),
        _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), "f1",
              submission_names=("QQP",)),
        _glue("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
              eval_splits=("validation_matched", "validation_mismatched"),
              test_splits=("test_matched", "test_mismatched", "ax"), submission_names=("MNLI-m", "MNLI-mm", "AX"),
              submission_label_names=True, other_splits=(("ax", "ax", "test"),)),
        _glue("qnli", ("question", "sentence"), _NLI, submission_names=("QNLI",), submission_label_names=True),
        _glue("rte", ("sentence1", "sentence2"), _NLI, submission_names=("RTE",), submission_label_names=True),
        _glue("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), submission_names=("WNLI",)),
    )
}

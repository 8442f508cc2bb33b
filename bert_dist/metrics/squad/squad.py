"""SQuAD v1.1 metric implementing the rules of the official ``evaluate-v1.1.py`` script.

``evaluate`` scans this file's top-level imports with a line-based regex and refuses to load it unless
each one is installed, so import only installed packages and never write ``import a, b`` (the scanner
takes ``a,`` for a package name; ``from x import a, b`` is fine).
"""

import collections
import re
import string

import datasets
import evaluate

_CITATION = """\
@inproceedings{Rajpurkar2016SQuAD10,
  title={SQuAD: 100,000+ Questions for Machine Comprehension of Text},
  author={Pranav Rajpurkar and Jian Zhang and Konstantin Lopyrev and Percy Liang},
  booktitle={EMNLP},
  year={2016}
}
"""

_DESCRIPTION = """\
Official scoring of the Stanford Question Answering Dataset (SQuAD) v1.1: exact match and token-overlap F1
between the predicted answer text and the best-matching gold answer, after normalization (lowercase,
no punctuation, no articles a/an/the, single spaces).
"""

_KWARGS_DESCRIPTION = """
Computes SQuAD v1.1 exact match and F1.
Args:
    predictions: list of dicts with keys
        - "id": question id
        - "prediction_text": the predicted answer text
    references: list of dicts with keys
        - "id": question id
        - "answers": {"text": [gold answer texts], "answer_start": [character offsets]}
Returns:
    "exact_match": percentage (0-100) of questions whose prediction exactly matches a gold answer
    "f1": average (0-100) of the best token-overlap F1 against the gold answers
Questions without a prediction score 0, as in the official script.
Examples:
    >>> squad = load_metric("squad")
    >>> squad.compute(
    ...     predictions=[{"id": "q1", "prediction_text": "the Denver Broncos"}],
    ...     references=[{"id": "q1", "answers": {"text": ["Denver Broncos"], "answer_start": [177]}}],
    ... )
    {'exact_match': 100.0, 'f1': 100.0}
"""

logger = evaluate.logging.get_logger(__name__)

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text):
    """Lowercases and removes punctuation, articles and extra whitespace, in the official order."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction, ground_truth):
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction, ground_truth):
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, ground_truth) for ground_truth in ground_truths)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Squad(evaluate.Metric):
    """SQuAD v1.1 exact match and F1."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {
                        "id": datasets.Value("string"),
                        "prediction_text": datasets.Value("string"),
                    },
                    "references": {
                        "id": datasets.Value("string"),
                        "answers": datasets.Sequence(
                            {"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}
                        ),
                    },
                }
            ),
            codebase_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
            reference_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
        )

    def _compute(self, predictions, references):
        if not references:
            raise ValueError("SQuAD metric needs at least one reference")
        answer_by_id = {pred["id"]: pred["prediction_text"] for pred in predictions}
        exact_match = 0.0
        f1 = 0.0
        for ref in references:
            qid = ref["id"]
            if qid not in answer_by_id:
                logger.warning(f"Unanswered question {qid} will receive score 0.")
                continue
            gold = ref["answers"]["text"]
            if not gold:
                raise ValueError(f"Question {qid} has no gold answer; SQuAD v1.1 needs at least one")
            prediction = answer_by_id[qid]
            exact_match += metric_max_over_ground_truths(exact_match_score, prediction, gold)
            f1 += metric_max_over_ground_truths(f1_score, prediction, gold)
        total = len(references)
        return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}

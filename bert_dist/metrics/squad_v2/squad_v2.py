"""SQuAD v2.0 metric implementing the rules of the official ``evaluate-v2.0.py`` script.

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
@inproceedings{Rajpurkar2018SQuAD2,
  title={Know What You Don't Know: Unanswerable Questions for SQuAD},
  author={Pranav Rajpurkar and Robin Jia and Percy Liang},
  booktitle={ACL},
  year={2018}
}
"""

_DESCRIPTION = """\
Official scoring of the Stanford Question Answering Dataset (SQuAD) v2.0, which adds unanswerable
questions to SQuAD v1.1. A question with no gold answer counts as answered correctly when the prediction
is the empty string, or when its no-answer probability is above the threshold.
"""

_KWARGS_DESCRIPTION = """
Computes SQuAD v2.0 scores.
Args:
    predictions: list of dicts with keys
        - "id": question id
        - "prediction_text": the predicted answer text ("" to predict no answer)
        - "no_answer_probability": the model's probability that the question has no answer
    references: list of dicts with keys
        - "id": question id
        - "answers": {"text": [gold answer texts], "answer_start": [character offsets]};
          empty lists for an unanswerable question
    no_answer_threshold: a question is predicted unanswerable when its no_answer_probability is above this
        (default 1.0, i.e. only the prediction text decides)
Returns:
    "exact", "f1", "total": exact match and F1 (0-100) over all questions, and their number
    "HasAns_exact", "HasAns_f1", "HasAns_total": the same over answerable questions (if any)
    "NoAns_exact", "NoAns_f1", "NoAns_total": the same over unanswerable questions (if any)
    "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh": the best score reachable by choosing
        the no-answer probability threshold, and that threshold
Every question needs a prediction, as in the official script.
Examples:
    >>> squad_v2 = load_metric("squad_v2")
    >>> squad_v2.compute(
    ...     predictions=[{"id": "q1", "prediction_text": "", "no_answer_probability": 0.0}],
    ...     references=[{"id": "q1", "answers": {"text": [], "answer_start": []}}],
    ... )["exact"]
    100.0
"""

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text):
    """Lowercases and removes punctuation, articles and extra whitespace, in the official order."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def get_tokens(text):
    if not text:
        return []
    return normalize_answer(text).split()


def compute_exact(a_gold, a_pred):
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold, a_pred):
    gold_toks = get_tokens(a_gold)
    pred_toks = get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    # An empty side (no-answer gold or no-answer prediction) scores 1 only if both are empty.
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def get_raw_scores(references, preds):
    exact_scores = {}
    f1_scores = {}
    for ref in references:
        qid = ref["id"]
        # Gold answers that normalize to nothing are dropped; none left means unanswerable.
        gold_answers = [text for text in ref["answers"]["text"] if normalize_answer(text)]
        if not gold_answers:
            gold_answers = [""]
        a_pred = preds[qid]
        exact_scores[qid] = max(compute_exact(a, a_pred) for a in gold_answers)
        f1_scores[qid] = max(compute_f1(a, a_pred) for a in gold_answers)
    return exact_scores, f1_scores


def apply_no_ans_threshold(scores, na_probs, qid_to_has_ans, na_prob_thresh):
    new_scores = {}
    for qid, score in scores.items():
        pred_na = na_probs[qid] > na_prob_thresh
        if pred_na:
            new_scores[qid] = float(not qid_to_has_ans[qid])
        else:
            new_scores[qid] = score
    return new_scores


def make_eval_dict(exact_scores, f1_scores, qid_list=None):
    if not qid_list:
        total = len(exact_scores)
        return collections.OrderedDict(
            [
                ("exact", 100.0 * sum(exact_scores.values()) / total),
                ("f1", 100.0 * sum(f1_scores.values()) / total),
                ("total", total),
            ]
        )
    total = len(qid_list)
    return collections.OrderedDict(
        [
            ("exact", 100.0 * sum(exact_scores[k] for k in qid_list) / total),
            ("f1", 100.0 * sum(f1_scores[k] for k in qid_list) / total),
            ("total", total),
        ]
    )


def merge_eval(main_eval, new_eval, prefix):
    for key in new_eval:
        main_eval[f"{prefix}_{key}"] = new_eval[key]


def find_best_thresh(preds, scores, na_probs, qid_to_has_ans):
    # Start from "predict no answer everywhere", then admit questions in order of increasing no-answer
    # probability, so each candidate threshold is one of the observed probabilities.
    num_no_ans = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
    cur_score = num_no_ans
    best_score = cur_score
    best_thresh = 0.0
    qid_list = sorted(na_probs, key=lambda k: na_probs[k])
    for qid in qid_list:
        if qid not in scores:
            continue
        if qid_to_has_ans[qid]:
            diff = scores[qid]
        elif preds[qid]:
            diff = -1
        else:
            diff = 0
        cur_score += diff
        if cur_score > best_score:
            best_score = cur_score
            best_thresh = na_probs[qid]
    return 100.0 * best_score / len(scores), best_thresh


def find_all_best_thresh(main_eval, preds, exact_raw, f1_raw, na_probs, qid_to_has_ans):
    best_exact, exact_thresh = find_best_thresh(preds, exact_raw, na_probs, qid_to_has_ans)
    best_f1, f1_thresh = find_best_thresh(preds, f1_raw, na_probs, qid_to_has_ans)
    main_eval["best_exact"] = best_exact
    main_eval["best_exact_thresh"] = exact_thresh
    main_eval["best_f1"] = best_f1
    main_eval["best_f1_thresh"] = f1_thresh


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SquadV2(evaluate.Metric):
    """SQuAD v2.0 exact match and F1, with HasAns/NoAns breakdown and best no-answer threshold."""

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
                        # float64 so the reported best thresholds are exactly the probabilities passed in.
                        "no_answer_probability": datasets.Value("float64"),
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

    def _compute(self, predictions, references, no_answer_threshold=1.0):
        if not references:
            raise ValueError("SQuAD v2 metric needs at least one reference")
        na_probs = {pred["id"]: pred["no_answer_probability"] for pred in predictions}
        preds = {pred["id"]: pred["prediction_text"] for pred in predictions}
        # The official script cannot score a partial prediction set (it fails on the HasAns/NoAns split).
        missing = [ref["id"] for ref in references if ref["id"] not in preds]
        if missing:
            raise ValueError(
                f"SQuAD v2 needs a prediction for every question; {len(missing)} of {len(references)} are "
                f"missing (e.g. {missing[0]!r})"
            )
        qid_to_has_ans = {ref["id"]: bool(ref["answers"]["text"]) for ref in references}
        has_ans_qids = [k for k, v in qid_to_has_ans.items() if v]
        no_ans_qids = [k for k, v in qid_to_has_ans.items() if not v]
        exact_raw, f1_raw = get_raw_scores(references, preds)
        exact_thresh = apply_no_ans_threshold(exact_raw, na_probs, qid_to_has_ans, no_answer_threshold)
        f1_thresh = apply_no_ans_threshold(f1_raw, na_probs, qid_to_has_ans, no_answer_threshold)
        out_eval = make_eval_dict(exact_thresh, f1_thresh)
        if has_ans_qids:
            merge_eval(out_eval, make_eval_dict(exact_thresh, f1_thresh, qid_list=has_ans_qids), "HasAns")
        if no_ans_qids:
            merge_eval(out_eval, make_eval_dict(exact_thresh, f1_thresh, qid_list=no_ans_qids), "NoAns")
        find_all_best_thresh(out_eval, preds, exact_raw, f1_raw, na_probs, qid_to_has_ans)
        return dict(out_eval)

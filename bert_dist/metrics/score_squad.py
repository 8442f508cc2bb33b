"""Scores an official-format SQuAD predictions file against an official dev JSON.

The command is ``bert-dist score-squad PREDICTIONS_JSON DEV_JSON [--na-prob-file F] [--na-prob-thresh T]``
(bert_dist/cli.py; this module only scores). ``PREDICTIONS_JSON`` maps question id to answer text (``""``
predicts "no answer" for SQuAD v2). The SQuAD version is detected from the dev file.
"""

import json
import logging
from pathlib import Path

from bert_dist.metrics import load_metric

logger = logging.getLogger(__name__)


class SquadScoringError(ValueError):
    """An input file or mapping is missing or not in the expected SQuAD format."""


def _read_json(path: str | Path, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise SquadScoringError(f"{what} file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SquadScoringError(f"cannot read {what} file {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise SquadScoringError(f"{what} file {path} is not valid JSON: {e}") from None


def _check_mapping(mapping, what: str, value_types: tuple[type, ...], value_desc: str) -> None:
    if not isinstance(mapping, dict):
        raise SquadScoringError(f"{what} must be a JSON object mapping question id to {value_desc}")
    for qid, value in mapping.items():
        # bool is an int subclass, but true/false is never a meaningful probability.
        if isinstance(value, bool) or not isinstance(value, value_types):
            shown = repr(value)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."  # one line, even for a whole article
            raise SquadScoringError(f"{what}: value for id {qid!r} is not {value_desc}: {shown}")


def _load_dev(dev_json_path: str | Path) -> tuple[bool, list[dict]]:
    """Returns whether the dev set is SQuAD v2 and its questions as metric references."""
    dev = _read_json(dev_json_path, "dev")
    try:
        is_v2 = str(dev.get("version", "")).lstrip("v").startswith("2")
        references = []
        for article in dev["data"]:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    is_v2 = is_v2 or "is_impossible" in qa
                    answers = qa["answers"]
                    references.append(
                        {
                            "id": str(qa["id"]),
                            "answers": {
                                "text": [str(a["text"]) for a in answers],
                                "answer_start": [int(a["answer_start"]) for a in answers],
                            },
                        }
                    )
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise SquadScoringError(
            f"dev file {dev_json_path} is not in SQuAD format ({type(e).__name__}: {e})"
        ) from None
    if not references:
        raise SquadScoringError(f"dev file {dev_json_path} contains no questions")
    return is_v2, references


def score_predictions(
    predictions: dict,
    dev_json_path: str | Path,
    na_probs: dict | None = None,
    na_prob_thresh: float = 1.0,
) -> dict:
    """Scores SQuAD predictions against an official dev JSON with the package's metric modules.

    For SQuAD v1.1, questions without a prediction score 0 (as the official script does). For SQuAD v2.0
    every question needs a prediction, and missing no-answer probabilities default to 0.0 as in the
    official script, which makes only the empty prediction text mean "no answer".

    Args:
        predictions: Official-format predictions, mapping question id to predicted answer text.
        dev_json_path: Path to an official SQuAD dev JSON (v1.1 or v2.0; detected from its ``version``
            field or the presence of ``is_impossible``).
        na_probs: SQuAD v2 only: question id to no-answer probability (the official ``--na-prob-file``).
        na_prob_thresh: SQuAD v2 only: a question is predicted unanswerable when its no-answer probability
            exceeds this.

    Returns:
        The metric dict: ``exact_match`` and ``f1`` for v1.1; ``exact``, ``f1``, ``total``, the
        ``HasAns_*``/``NoAns_*`` breakdown and the ``best_*`` thresholds for v2.0.

    Raises:
        SquadScoringError: If the dev file is missing or malformed, the mappings have the wrong shape, or
            (v2) some question has no prediction or ``na_probs`` is given for a v1.1 dev set.
    """
    if isinstance(predictions, dict) and isinstance(predictions.get("data"), list):
        raise SquadScoringError("the predictions look like a SQuAD dataset (they hold \"data\"): the arguments are "
                                "PREDICTIONS_JSON DEV_JSON, in that order")
    _check_mapping(predictions, "predictions", (str,), "an answer string")
    is_v2, references = _load_dev(dev_json_path)

    if not is_v2:
        if na_probs is not None:
            raise SquadScoringError("no-answer probabilities only apply to SQuAD v2.0 dev sets")
        # The metric needs one prediction per reference, so score the answered subset and rescale: the
        # official script gives unanswered questions 0, which only adds to the denominator.
        answered = [ref for ref in references if ref["id"] in predictions]
        if len(answered) < len(references):
            logger.warning(
                "%d of %d questions have no prediction and score 0",
                len(references) - len(answered),
                len(references),
            )
        if not answered:
            return {"exact_match": 0.0, "f1": 0.0}
        metric = load_metric("squad")
        result = metric.compute(
            predictions=[{"id": ref["id"], "prediction_text": predictions[ref["id"]]} for ref in answered],
            references=answered,
        )
        if len(answered) < len(references):
            result = {key: value * len(answered) / len(references) for key, value in result.items()}
        return result

    if na_probs is None:
        na_probs = {qid: 0.0 for qid in predictions}
    _check_mapping(na_probs, "no-answer probabilities", (int, float), "a number")
    missing = [ref["id"] for ref in references if ref["id"] not in predictions]
    if missing:
        raise SquadScoringError(
            f"SQuAD v2 needs a prediction for every question; {len(missing)} of {len(references)} are "
            f"missing (e.g. {missing[0]!r})"
        )
    missing = [ref["id"] for ref in references if ref["id"] not in na_probs]
    if missing:
        raise SquadScoringError(
            f"{len(missing)} of {len(references)} questions have no no-answer probability "
            f"(e.g. {missing[0]!r})"
        )
    metric = load_metric("squad_v2")
    return metric.compute(
        predictions=[
            {
                "id": ref["id"],
                "prediction_text": predictions[ref["id"]],
                "no_answer_probability": float(na_probs[ref["id"]]),
            }
            for ref in references
        ],
        references=references,
        no_answer_threshold=na_prob_thresh,
    )


def score_files(predictions_json: str | Path, dev_json: str | Path, na_prob_file: str | Path | None = None,
                na_prob_thresh: float = 1.0) -> dict:
    """`score_predictions` on files: an official-format predictions JSON, a dev JSON, and for v2 optionally a
    no-answer probability JSON. SquadScoringError names what is wrong."""
    predictions = _read_json(predictions_json, "predictions")
    na_probs = _read_json(na_prob_file, "no-answer probability") if na_prob_file else None
    return score_predictions(predictions, dev_json, na_probs, na_prob_thresh)

"""Tests for bert_dist.metrics: GLUE against scikit-learn/scipy, the official SQuAD rules, score_squad."""

import json
import os
import subprocess
import sys
from pathlib import Path

import evaluate
import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

import bert_dist.metrics
from bert_dist.metrics import AVAILABLE_METRICS, load_metric
from bert_dist.metrics.score_squad import SquadScoringError, score_predictions

REPO_ROOT = Path(bert_dist.metrics.__file__).resolve().parents[2]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}


def _drop_evaluate_modules() -> dict:
    names = [n for n in sys.modules if n == "evaluate_modules" or n.startswith("evaluate_modules.")]
    return {n: sys.modules.pop(n) for n in names}


@pytest.fixture(scope="module", autouse=True)
def hf_home(tmp_path_factory):
    """Runs this module offline against a fresh, empty HF_HOME.

    evaluate reads its cache paths once at import time, so setting HF_HOME is not enough in-process: the
    config is patched too, and the dynamically imported ``evaluate_modules`` package (imported from the
    first modules cache on sys.path) is swapped out and restored so other test modules keep theirs.
    """
    home = tmp_path_factory.mktemp("hf_home")
    modules_cache = home / "modules"
    # Must exist before it goes on sys.path, or the import system caches it as a missing path.
    modules_cache.mkdir()
    mp = pytest.MonkeyPatch()
    for var, value in OFFLINE_ENV.items():
        mp.setenv(var, value)
    mp.setenv("HF_HOME", str(home))
    mp.setattr(evaluate.config, "HF_MODULES_CACHE", modules_cache)
    mp.setattr(evaluate.config, "HF_METRICS_CACHE", home / "metrics")
    mp.syspath_prepend(str(modules_cache))
    saved = _drop_evaluate_modules()
    try:
        yield home
    finally:
        _drop_evaluate_modules()
        sys.modules.update(saved)
        mp.undo()


def _subprocess_env(hf_home_dir: Path) -> dict:
    env = dict(os.environ, **OFFLINE_ENV, HF_HOME=str(hf_home_dir))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


# ---------------------------------------------------------------------------------------------- loading


def test_unknown_metric_name_lists_valid_ones():
    with pytest.raises(ValueError) as excinfo:
        load_metric("bleu")
    for name in AVAILABLE_METRICS:
        assert name in str(excinfo.value)


def test_unknown_glue_config_raises_key_error():
    with pytest.raises(KeyError, match="cola"):
        load_metric("glue", "not_a_task")


def test_loads_from_the_fresh_hf_home(hf_home):
    load_metric("squad")
    assert list((hf_home / "modules" / "evaluate_modules" / "metrics" / "squad").rglob("squad.py"))


@pytest.mark.slow
def test_concurrent_first_loads_with_empty_hf_home(tmp_path):
    # Both processes wait at a barrier after the slow imports so their first loads really overlap.
    script = """
import sys, time
from pathlib import Path
from bert_dist.metrics import load_metric
barrier, me = Path(sys.argv[1]), sys.argv[2]
(barrier / me).touch()
deadline = time.time() + 120
while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
    time.sleep(0.01)
out = {}
for name, config in [("glue", "mrpc"), ("squad", None), ("squad_v2", None)]:
    out[name] = load_metric(name, config)
r = out["glue"].compute(predictions=[0, 1, 1], references=[0, 1, 0])
assert abs(r["accuracy"] - 2 / 3) < 1e-12, r
print("ok")
"""
    hf_home_dir = tmp_path / "hf_home"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = _subprocess_env(hf_home_dir)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(barrier), str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        assert stdout.strip() == "ok"


# ------------------------------------------------------------------------------------------------- GLUE

_ACCURACY_TASKS = ["sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "ax"]
_THREE_CLASS_TASKS = {"mnli", "mnli_matched", "mnli_mismatched", "ax"}


def _random_labels(seed: int, num_classes: int, n: int = 300):
    rng = np.random.default_rng(seed)
    return rng.integers(0, num_classes, size=n), rng.integers(0, num_classes, size=n)


@pytest.mark.parametrize("task", _ACCURACY_TASKS)
def test_glue_accuracy_tasks(task):
    preds, refs = _random_labels(_ACCURACY_TASKS.index(task), 3 if task in _THREE_CLASS_TASKS else 2)
    result = load_metric("glue", task).compute(predictions=preds, references=refs)
    assert result == {"accuracy": pytest.approx(accuracy_score(refs, preds), abs=1e-12)}


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_glue_accuracy_and_f1_tasks(task):
    preds, refs = _random_labels(7 if task == "mrpc" else 8, 2)
    result = load_metric("glue", task).compute(predictions=preds.tolist(), references=refs.tolist())
    assert result == {
        "accuracy": pytest.approx(accuracy_score(refs, preds), abs=1e-12),
        "f1": pytest.approx(f1_score(refs, preds), abs=1e-12),
    }


def test_glue_cola_matthews():
    preds, refs = _random_labels(3, 2)
    result = load_metric("glue", "cola").compute(predictions=preds, references=refs)
    assert result == {"matthews_correlation": pytest.approx(matthews_corrcoef(refs, preds), abs=1e-12)}


def test_glue_stsb_correlations():
    rng = np.random.default_rng(5)
    refs = rng.uniform(0, 5, size=300)
    preds = refs + rng.normal(0, 1.0, size=300)
    result = load_metric("glue", "stsb").compute(predictions=preds, references=refs)
    assert result == {
        "pearson": pytest.approx(pearsonr(preds, refs)[0], abs=1e-12),
        "spearmanr": pytest.approx(spearmanr(preds, refs)[0], abs=1e-12),
    }


def test_glue_add_batch_accumulates_like_an_eval_loop():
    preds, refs = _random_labels(11, 2, n=100)
    metric = load_metric("glue", "mrpc")
    for start in range(0, 100, 32):
        metric.add_batch(predictions=preds[start : start + 32], references=refs[start : start + 32])
    result = metric.compute()
    assert result["accuracy"] == pytest.approx(accuracy_score(refs, preds), abs=1e-12)
    assert result["f1"] == pytest.approx(f1_score(refs, preds), abs=1e-12)


# --------------------------------------------------------------------------------------------- SQuAD v1


def _ref(qid: str, *golds: str) -> dict:
    return {"id": qid, "answers": {"text": list(golds), "answer_start": [0] * len(golds)}}


def _squad_v1(prediction: str, *golds: str) -> dict:
    return load_metric("squad").compute(
        predictions=[{"id": "q", "prediction_text": prediction}], references=[_ref("q", *golds)]
    )


@pytest.mark.parametrize(
    ("prediction", "golds", "exact_match", "f1"),
    [
        # Case, punctuation, articles and whitespace are all normalized away.
        ("The  Denver Broncos!", ["Denver Broncos"], 100.0, 100.0),
        ("U.S.", ["US"], 100.0, 100.0),
        ("an apple", ["apple"], 100.0, 100.0),
        # Articles are removed only as whole words.
        ("theater", ["ater"], 0.0, 0.0),
        # Best over several gold answers, for EM and F1 separately.
        ("Broncos", ["Denver Broncos", "Broncos"], 100.0, 100.0),
        ("Denver", ["Denver Broncos", "Carolina Panthers"], 0.0, 100 * 2 / 3),
        # "in city of paris" vs "paris france": P = 1/4, R = 1/2.
        ("in the city of Paris", ["Paris, France"], 0.0, 100 * 1 / 3),
        # Token overlap counts multiplicity: common {y: 2}, P = R = 2/3.
        ("x y y", ["y y z"], 0.0, 100 * 2 / 3),
        ("x y y", ["y z z"], 0.0, 100 * (2 * (1 / 3) * (1 / 3)) / (2 / 3)),
        ("completely wrong", ["Denver Broncos"], 0.0, 0.0),
    ],
)
def test_squad_v1_single_question(prediction, golds, exact_match, f1):
    result = _squad_v1(prediction, *golds)
    assert result == {"exact_match": pytest.approx(exact_match), "f1": pytest.approx(f1)}


def test_squad_v1_averages_and_scores_missing_predictions_zero():
    references = [_ref("q1", "Denver Broncos"), _ref("q2", "Denver Broncos"), _ref("q3", "Paris")]
    predictions = [
        {"id": "q1", "prediction_text": "the Denver Broncos"},
        {"id": "q2", "prediction_text": "Denver"},
        # q3 has no prediction; this one matches no question and must be ignored.
        {"id": "unknown", "prediction_text": "Paris"},
    ]
    result = load_metric("squad").compute(predictions=predictions, references=references)
    assert result["exact_match"] == pytest.approx(100 * 1 / 3)
    assert result["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)


# --------------------------------------------------------------------------------------------- SQuAD v2


def _pred(qid: str, text: str, na_prob: float = 0.0) -> dict:
    return {"id": qid, "prediction_text": text, "no_answer_probability": na_prob}


def _squad_v2(predictions, references, **kwargs) -> dict:
    return load_metric("squad_v2").compute(predictions=predictions, references=references, **kwargs)


@pytest.mark.parametrize(("prediction", "score"), [("", 100.0), ("Normans", 0.0)])
def test_squad_v2_unanswerable_needs_empty_prediction(prediction, score):
    result = _squad_v2([_pred("q", prediction)], [_ref("q")])
    assert result["exact"] == score
    assert result["f1"] == score
    assert result["NoAns_total"] == 1
    assert not any(key.startswith("HasAns_") for key in result)


def test_squad_v2_answerable_with_empty_prediction_scores_zero():
    result = _squad_v2([_pred("q", "")], [_ref("q", "Denver Broncos")])
    assert (result["exact"], result["f1"], result["HasAns_total"]) == (0.0, 0.0, 1)
    assert not any(key.startswith("NoAns_") for key in result)


def test_squad_v2_gold_that_normalizes_to_nothing_matches_empty_prediction():
    # It still counts as answerable (the raw answers list is non-empty), as in the official script.
    result = _squad_v2([_pred("q", "")], [_ref("q", "The")])
    assert (result["exact"], result["HasAns_total"]) == (100.0, 1)


def test_squad_v2_has_ans_no_ans_split():
    references = [_ref("a1", "Denver Broncos"), _ref("a2", "Denver Broncos"), _ref("n1"), _ref("n2")]
    predictions = [_pred("a1", "Denver Broncos"), _pred("a2", "Denver"), _pred("n1", ""), _pred("n2", "x")]
    result = _squad_v2(predictions, references)
    expected = {
        "exact": 50.0,
        "f1": 100 * (1 + 2 / 3 + 1 + 0) / 4,
        "total": 4,
        "HasAns_exact": 50.0,
        "HasAns_f1": 100 * (1 + 2 / 3) / 2,
        "HasAns_total": 2,
        "NoAns_exact": 50.0,
        "NoAns_f1": 50.0,
        "NoAns_total": 2,
    }
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key


def test_squad_v2_no_answer_threshold():
    references = [_ref("a1", "Denver Broncos"), _ref("n1")]
    predictions = [_pred("a1", "Denver Broncos", 0.9), _pred("n1", "Normans", 0.9)]
    # Probabilities never exceed the default threshold of 1.0, so only the texts count.
    assert _squad_v2(predictions, references)["exact"] == 50.0
    # Above the threshold both become "no answer": right for n1, wrong for a1.
    result = _squad_v2(predictions, references, no_answer_threshold=0.5)
    assert (result["HasAns_exact"], result["NoAns_exact"]) == (0.0, 100.0)


def test_squad_v2_best_thresholds():
    references = [_ref("a1", "Denver Broncos"), _ref("a2", "Denver Broncos"), _ref("n1"), _ref("n2")]
    predictions = [
        _pred("a1", "Denver Broncos", 0.1),
        _pred("a2", "Denver", 0.6),
        _pred("n1", "Normans", 0.8),
        _pred("n2", "", 0.3),
    ]
    result = _squad_v2(predictions, references)
    # Exact: keeping only a1 answered (threshold 0.1) gives a1, n1, n2 right; a2 adds no exact match.
    assert result["best_exact"] == pytest.approx(75.0)
    assert result["best_exact_thresh"] == 0.1
    # F1: also keeping a2 (threshold 0.6) adds its partial 2/3.
    assert result["best_f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 1) / 4)
    assert result["best_f1_thresh"] == 0.6
    at_best = _squad_v2(predictions, references, no_answer_threshold=result["best_f1_thresh"])
    assert at_best["f1"] == pytest.approx(result["best_f1"])


def test_squad_v2_missing_prediction_is_an_error():
    with pytest.raises(ValueError, match="missing"):
        # evaluate itself rejects unequal lengths, so the gap has to hide behind an unknown id.
        _squad_v2([_pred("a1", "x"), _pred("other", "")], [_ref("a1", "x"), _ref("n1")])


# ------------------------------------------------------------------------------------------ score_squad


def _dev_json(path: Path, questions: list[tuple[str, list[str]]], version: str, is_impossible: bool) -> Path:
    qas = []
    for qid, golds in questions:
        qa = {"id": qid, "question": "?", "answers": [{"text": g, "answer_start": 0} for g in golds]}
        if is_impossible:
            qa["is_impossible"] = not golds
        qas.append(qa)
    data = {"version": version, "data": [{"title": "t", "paragraphs": [{"context": "c", "qas": qas}]}]}
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def dev_v1(tmp_path) -> Path:
    questions = [("q1", ["Denver Broncos", "Broncos"]), ("q2", ["Paris, France"]), ("q3", ["1990"])]
    return _dev_json(tmp_path / "dev-v1.1.json", questions, "1.1", is_impossible=False)


@pytest.fixture
def dev_v2(tmp_path) -> Path:
    questions = [("a1", ["Denver Broncos"]), ("a2", ["Paris"]), ("n1", []), ("n2", [])]
    return _dev_json(tmp_path / "dev-v2.0.json", questions, "v2.0", is_impossible=True)


def test_score_predictions_v1(dev_v1):
    result = score_predictions({"q1": "the Broncos", "q2": "in Paris", "q3": "1990"}, dev_v1)
    assert result == {
        "exact_match": pytest.approx(100 * 2 / 3),
        # "in paris" vs "paris france": P = R = 1/2.
        "f1": pytest.approx(100 * (1 + 1 / 2 + 1) / 3),
    }


def test_score_predictions_v1_missing_prediction_scores_zero(dev_v1):
    result = score_predictions({"q1": "Broncos"}, dev_v1)
    assert result == {"exact_match": pytest.approx(100 / 3), "f1": pytest.approx(100 / 3)}


def test_score_predictions_v2_with_na_probs(dev_v2):
    predictions = {"a1": "Denver Broncos", "a2": "Paris", "n1": "", "n2": "Lyon"}
    result = score_predictions(predictions, dev_v2)
    assert (result["exact"], result["HasAns_exact"], result["NoAns_exact"]) == (75.0, 100.0, 50.0)
    na_probs = {"a1": 0.1, "a2": 0.2, "n1": 0.5, "n2": 0.9}
    result = score_predictions(predictions, dev_v2, na_probs=na_probs, na_prob_thresh=0.5)
    assert result["exact"] == 100.0
    # Answering a1 and a2 (threshold 0.2) is already perfect, since n1's prediction is empty.
    assert (result["best_exact"], result["best_exact_thresh"]) == (100.0, 0.2)


def test_score_predictions_detects_v2_from_version_field(tmp_path):
    dev = _dev_json(tmp_path / "dev.json", [("a1", ["x"]), ("n1", [])], "v2.0", is_impossible=False)
    result = score_predictions({"a1": "x", "n1": ""}, dev)
    assert (result["exact"], result["HasAns_total"], result["NoAns_total"]) == (100.0, 1, 1)


def test_score_predictions_rejects_bad_inputs(dev_v1, dev_v2, tmp_path):
    with pytest.raises(SquadScoringError, match="not found"):
        score_predictions({}, tmp_path / "missing.json")
    with pytest.raises(SquadScoringError, match="answer string"):
        score_predictions({"q1": ["Broncos"]}, dev_v1)
    with pytest.raises(SquadScoringError, match="only apply to SQuAD v2"):
        score_predictions({"q1": "Broncos"}, dev_v1, na_probs={"q1": 0.5})
    with pytest.raises(SquadScoringError, match="missing"):
        score_predictions({"a1": "Denver Broncos"}, dev_v2)
    not_squad = tmp_path / "not_squad.json"
    not_squad.write_text(json.dumps({"data": [{"title": "t"}]}))
    with pytest.raises(SquadScoringError, match="not in SQuAD format"):
        score_predictions({}, not_squad)


def score_squad_main(argv: list[str]) -> int:
    """`bert-dist score-squad` in this process: its status (fail() exits)."""
    from bert_dist.cli import main

    try:
        return main(["score-squad", *argv])
    except SystemExit as e:
        return e.code


def test_score_squad_main_prints_json(dev_v2, tmp_path, capsys):
    preds = tmp_path / "predictions.json"
    preds.write_text(json.dumps({"a1": "Denver Broncos", "a2": "Paris", "n1": "", "n2": "Lyon"}))
    na_probs = tmp_path / "na_probs.json"
    na_probs.write_text(json.dumps({"a1": 0.1, "a2": 0.2, "n1": 0.5, "n2": 0.9}))
    argv = [str(preds), str(dev_v2), "--na-prob-file", str(na_probs), "--na-prob-thresh", "0.5"]
    assert score_squad_main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["exact"], result["f1"], result["total"]) == (100.0, 100.0, 4)


@pytest.mark.parametrize("bad", ["missing", "invalid_json", "not_a_mapping"])
def test_score_squad_main_bad_predictions_file(bad, dev_v1, tmp_path, capsys):
    preds = tmp_path / "predictions.json"
    if bad == "invalid_json":
        preds.write_text("{not json")
    elif bad == "not_a_mapping":
        preds.write_text(json.dumps(["Broncos"]))
    assert score_squad_main([str(preds), str(dev_v1)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("error: ")


def test_score_squad_main_arguments_swapped(dev_v1, tmp_path, capsys):
    preds = tmp_path / "predictions.json"
    preds.write_text(json.dumps({"q1": "Denver Broncos"}))
    assert score_squad_main([str(dev_v1), str(preds)]) == 1  # the dev file where the predictions go
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "PREDICTIONS_JSON DEV_JSON, in that order" in err


def test_score_squad_main_long_bad_value_stays_one_short_line(dev_v1, tmp_path, capsys):
    preds = tmp_path / "predictions.json"
    preds.write_text(json.dumps({"q1": {"text": "x" * 5000}}))
    assert score_squad_main([str(preds), str(dev_v1)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'q1'" in err and len(err) < 200


@pytest.mark.slow
def test_score_squad_command(dev_v1, tmp_path):
    preds = tmp_path / "predictions.json"
    preds.write_text(json.dumps({"q1": "Denver Broncos", "q2": "Paris, France", "q3": "1990"}))
    env = _subprocess_env(tmp_path / "hf_home")
    command = [sys.executable, "-m", "bert_dist.cli", "score-squad"]
    ok = subprocess.run(
        [*command, str(preds), str(dev_v1)], check=False, env=env, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"exact_match": 100.0, "f1": 100.0}

    bad = subprocess.run(
        [*command, str(tmp_path / "nope.json"), str(dev_v1)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0
    assert bad.stdout == ""
    expected = f"error: predictions file not found: {tmp_path / 'nope.json'}"
    assert bad.stderr.strip().splitlines() == [expected]

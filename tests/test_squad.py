"""SQuAD features and post-processing (bert_dist.data.squad), on a tiny WordPiece tokenizer; CPU, offline."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

from bert_dist.data.squad import (
    answer_alignment,
    locate_answer,
    postprocess_predictions,
    prepare_eval_features,
    prepare_train_features,
    write_predictions,
)
from bert_dist.tokenizer import train_tokenizer

LONG = (
    "The river flows north through the valley and past the old mill. Farmers grow wheat and barley on "
    "its banks, and in spring the water rises over the low fields. A stone bridge was built in 1820 by "
    "the town council. Later a railway crossed the valley further south. The mill closed in 1950 and "
    "is now a museum that tells the story of the river people."
)
UNICODE = "Café  Zürich\thosts the\n\nnaïve 東京 festival 🍕 every   year, said Émile."
CORPUS = [LONG, UNICODE, "Who built the bridge? When did the mill close? Where is the festival?"] * 3

KW = {"max_length": 32, "doc_stride": 8, "max_query_length": 8}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300)


def row(id_, context, question, text=None, start=None):
    if text is None:
        answers = {"text": [], "answer_start": []}
    else:
        answers = {"text": [text], "answer_start": [start if start is not None else context.index(text)]}
    return {"id": id_, "title": "t", "context": context, "question": question, "answers": answers}


def batch(rows):
    return {k: [r[k] for r in rows] for k in rows[0]}


def gold_logits(feats, pad=1e6, big=100.0):
    """One-hot logits at each feature's gold start/end (at 0 when it points at [CLS]); padding past each
    feature's length gets `pad`, which post-processing must ignore."""
    lengths = np.array([len(x) for x in feats["input_ids"]])
    T = lengths.max() + 3
    start = np.where(np.arange(T) < lengths[:, None], 0.0, pad)
    end = start.copy()
    start[np.arange(len(lengths)), feats["start_positions"]] = big
    end[np.arange(len(lengths)), feats["end_positions"]] = big
    return start, end


def rows_of(feats):
    return [dict(zip(feats, values, strict=True)) for values in zip(*feats.values(), strict=True)]


def span_text(feats, i, context):
    """The context text under feature i's gold positions."""
    off = feats["offset_mapping"][i]
    return context[off[feats["start_positions"][i]][0] : off[feats["end_positions"][i]][1]]


# ---------------------------------------------------------------------------------------------


def test_layout_and_windows(tok):
    r = row("a", LONG, "   Who built the bridge?", "the town council")
    f = prepare_eval_features(batch([r]), tok, **KW)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    q = tok.encode("Who built the bridge?", add_special_tokens=False).ids
    ctx = tok.encode(LONG, add_special_tokens=False)
    assert len(f["input_ids"]) > 2
    room = KW["max_length"] - len(q) - 3
    covered = []
    for ids, types, offs in zip(f["input_ids"], f["token_type_ids"], f["offset_mapping"], strict=True):
        assert len(ids) <= KW["max_length"] and len(ids) == len(types) == len(offs)
        assert ids[: len(q) + 2] == [cls, *q, sep] and ids[-1] == sep  # leading whitespace stripped
        assert types == [0] * (len(q) + 2) + [1] * (len(ids) - len(q) - 2)
        assert offs[: len(q) + 2] == [None] * (len(q) + 2) and offs[-1] is None
        covered.append([tuple(o) for o in offs[len(q) + 2 : -1]])
    # Consecutive windows overlap by exactly doc_stride context tokens; together they cover the context.
    for a, b in zip(covered, covered[1:]):
        assert len(a) == room and a[-KW["doc_stride"] :] == b[: KW["doc_stride"]]
    assert covered[0][0] == ctx.offsets[0] and covered[-1][-1] == ctx.offsets[-1]
    assert f["example_id"] == ["a"] * len(covered)


def test_question_truncated(tok):
    r = row("a", LONG, "who built the bridge who built the bridge who built the bridge?", "1820")
    f = prepare_train_features(batch([r]), tok, **KW)
    sep = tok.token_to_id("[SEP]")
    assert all(ids.index(sep) == KW["max_query_length"] + 1 for ids in f["input_ids"])


def test_answer_in_a_later_window_only(tok):
    text = "now a museum"
    r = row("a", LONG, "What is the mill now?", text)
    f = prepare_eval_features(batch([r]), tok, **KW)
    holding = [i for i, s in enumerate(f["start_positions"]) if s > 0]
    assert holding and holding[0] > 0 and f["start_positions"][0] == f["end_positions"][0] == 0
    for i in holding:
        assert span_text(f, i, LONG) == text
    for i in set(range(len(f["input_ids"]))) - set(holding):
        assert f["start_positions"][i] == f["end_positions"][i] == 0
    preds, _, _ = postprocess_predictions([r], f, *gold_logits(f))
    assert preds == {"a": text}


def test_answer_at_the_very_end(tok):
    text = "the river people."
    r = row("a", LONG, "Whose story?", text)
    f = prepare_eval_features(batch([r]), tok, **KW)
    last = len(f["input_ids"]) - 1
    assert f["end_positions"][last] == len(f["input_ids"][last]) - 2  # the token before the final [SEP]
    assert span_text(f, last, LONG) == text
    preds, _, _ = postprocess_predictions([r], f, *gold_logits(f))
    assert preds == {"a": text}


UNICODE_ANSWERS = ["Café  Zürich", "Zürich", "naïve 東京", "東京", "🍕", "every   year", "Émile"]


@pytest.mark.parametrize("text", UNICODE_ANSWERS)
def test_unicode_and_odd_whitespace(tok, text):
    r = row("u", UNICODE, "Where?", text)
    f = prepare_eval_features(batch([r]), tok, max_length=24, doc_stride=4, max_query_length=8)
    assert any(span_text(f, i, UNICODE) == text for i, s in enumerate(f["start_positions"]) if s > 0)
    preds, _, _ = postprocess_predictions([r], f, *gold_logits(f))
    assert preds == {"u": text}


def test_answer_with_whitespace_at_its_ends(tok):
    # A span that starts on the space before a word still labels that word, not the previous one.
    r = row("u", UNICODE, "What?", "\thosts the\n")
    f = prepare_eval_features(batch([r]), tok, **KW)
    i = next(i for i, s in enumerate(f["start_positions"]) if s > 0)
    assert span_text(f, i, UNICODE) == "hosts the"


def test_unanswerable(tok):
    r = row("n", LONG, "Who painted the bridge?")
    tr = prepare_train_features(batch([r]), tok, **KW)
    ev = prepare_eval_features(batch([r]), tok, **KW)
    assert len(tr["input_ids"]) == len(ev["input_ids"]) > 1
    assert set(tr["start_positions"]) == set(tr["end_positions"]) == {0}
    preds, nbest, null_odds = postprocess_predictions([r], ev, *gold_logits(ev), version_2=True)
    assert preds == {"n": ""} and null_odds["n"] > 0
    assert nbest["n"][0]["text"] == "" and abs(sum(d["probability"] for d in nbest["n"]) - 1) < 1e-9


def test_misaligned_answer_start(tok):
    shifted = row("s", LONG, "When was the bridge built?", "1820", LONG.index("1820") + 2)
    missing = row("m", LONG, "Who?", "the mayor", 5)
    ok = row("o", LONG, "Who built the bridge?", "the town council")
    b = batch([shifted, missing, ok])
    assert locate_answer(LONG, "1820", LONG.index("1820") + 2) == LONG.index("1820")
    assert locate_answer(LONG, "the mayor", 5) is None
    counts = answer_alignment(b)
    assert counts == {"answered": 3, "exact": 1, "relocated": 1, "unfound": 1}
    assert answer_alignment(datasets.Dataset.from_dict(b)) == counts
    assert answer_alignment(batch([shifted])) + answer_alignment(batch([missing, ok])) == counts

    ev = prepare_eval_features(b, tok, **KW)
    tr = prepare_train_features(b, tok, **KW)
    n_missing = ev["example_id"].count("m")
    assert len(tr["input_ids"]) == len(ev["input_ids"]) - n_missing  # the unfound row is dropped in training
    assert all(s == 0 for s, e in zip(ev["start_positions"], ev["example_id"], strict=True) if e == "m")
    preds, _, _ = postprocess_predictions([shifted, missing, ok], ev, *gold_logits(ev))
    assert preds["s"] == "1820" and preds["o"] == "the town council"


def test_dataset_map_and_arrow_postprocessing(tok):
    rows = [
        row("a", LONG, "What is the mill now?", "now a museum"),
        row("b", UNICODE, "Where?", "東京"),
        row("c", LONG, "Who built the bridge?", "the town council"),
        row("n", LONG, "Who painted the bridge?"),
    ]
    ds = datasets.Dataset.from_list(rows)
    feats = ds.map(prepare_eval_features, batched=True, batch_size=3, remove_columns=ds.column_names,
                   fn_kwargs={"tokenizer": tok, **KW})
    train = ds.map(prepare_train_features, batched=True, batch_size=3, remove_columns=ds.column_names,
                   fn_kwargs={"tokenizer": tok, **KW})
    assert train.column_names == ["input_ids", "token_type_ids", "start_positions", "end_positions"]
    assert train["start_positions"] == feats["start_positions"]
    as_dict = feats.to_dict()
    start, end = gold_logits(as_dict)
    from_arrow = postprocess_predictions(ds, feats, start, end, version_2=True)
    from_lists = postprocess_predictions(rows, rows_of(as_dict), start, end, version_2=True)
    assert from_arrow == from_lists
    assert from_arrow[0] == {"a": "now a museum", "b": "東京", "c": "the town council", "n": ""}
    # Feature order does not matter, and a selected/shuffled dataset (indices mapping) reads correctly.
    perm = np.random.default_rng(0).permutation(len(feats))
    shuffled = postprocess_predictions(ds, feats.select(perm), start[perm], end[perm], version_2=True)
    assert shuffled[0] == from_arrow[0]


def test_null_threshold_and_min_over_windows(tok):
    r = row("a", LONG, "When did the mill close?", "1950")
    f = prepare_eval_features(batch([r]), tok, **KW)
    start, end = gold_logits(f, big=2.0)  # span score 4 in the window holding the answer
    hold = next(i for i, s in enumerate(f["start_positions"]) if s > 0)
    start[:, 0] = end[:, 0] = 5.0  # null score 10 in every window ...
    preds, _, odds = postprocess_predictions([r], f, start, end, version_2=True)
    assert preds == {"a": ""} and odds["a"] == pytest.approx(6.0)
    preds, _, _ = postprocess_predictions([r], f, start, end, version_2=True, null_score_diff_threshold=6.5)
    assert preds == {"a": "1950"}
    start[hold, 0], end[hold, 0] = 1.0, 1.5  # ... but 2.5 in one: the minimum speaks for the question
    preds, nbest, odds = postprocess_predictions([r], f, start, end, version_2=True)
    assert preds == {"a": "1950"} and odds["a"] == pytest.approx(-1.5)
    null = [d for d in nbest["a"] if d["text"] == ""]
    assert len(null) == 1 and (null[0]["start_logit"], null[0]["end_logit"]) == (1.0, 1.5)
    start[hold, 0], end[hold, 0] = 2.0, 2.5  # null 4.5 - span 4 = 0.5: above 0, below 1
    assert postprocess_predictions([r], f, start, end, version_2=True)[0] == {"a": ""}
    assert postprocess_predictions([r], f, start, end, version_2=True, null_score_diff_threshold=1.0)[0] == {
        "a": "1950"}
    # v1 ignores the null answer and returns no null odds.
    preds, _, odds = postprocess_predictions([r], f, start, end)
    assert preds == {"a": "1950"} and odds == {}


def test_max_answer_length(tok):
    text = "A stone bridge was built in 1820 by the town council."
    r = row("a", LONG, "What?", text)
    f = prepare_eval_features(batch([r]), tok, **{**KW, "max_length": 64})
    i = next(i for i, s in enumerate(f["start_positions"]) if s > 0)
    n_tokens = f["end_positions"][i] - f["start_positions"][i] + 1
    start, end = gold_logits(f)
    preds, _, _ = postprocess_predictions([r], f, start, end, max_answer_length=n_tokens)
    assert preds == {"a": text}
    preds, nbest, _ = postprocess_predictions([r], f, start, end, max_answer_length=n_tokens - 1)
    assert preds["a"] != text
    assert all(len(tok.encode(d["text"], add_special_tokens=False).ids) <= n_tokens - 1 for d in nbest["a"])


def test_nbest_and_spans_stay_in_context(tok):
    r = row("a", LONG, "When did the mill close?", "1950")
    f = prepare_eval_features(batch([r]), tok, **KW)
    rng = np.random.default_rng(1)
    T = max(map(len, f["input_ids"]))
    start, end = rng.normal(size=(len(f["input_ids"]), T)), rng.normal(size=(len(f["input_ids"]), T))
    start[:, 1:4] = end[:, 1:4] = 50.0  # question tokens: never part of an answer
    preds, nbest, _ = postprocess_predictions([r], f, start, end, n_best_size=5, max_answer_length=6)
    texts = [d["text"] for d in nbest["a"]]
    assert len(texts) == 5 and len(set(texts)) == 5 and preds["a"] == texts[0]
    assert all(t and t in LONG for t in texts)
    scores = [d["start_logit"] + d["end_logit"] for d in nbest["a"]]
    assert scores == sorted(scores, reverse=True)
    assert sum(d["probability"] for d in nbest["a"]) == pytest.approx(1.0)


def test_write_predictions(tmp_path):
    nbest = {"a": [{"text": "東京", "start_logit": 1.0, "end_logit": 2.0, "probability": 1.0}]}
    files = write_predictions(tmp_path / "out", {"a": "東京"}, nbest, {})
    assert sorted(files) == ["nbest_predictions", "predictions"]
    assert json.loads((tmp_path / "out" / "predictions.json").read_text("utf-8")) == {"a": "東京"}
    files = write_predictions(tmp_path / "v2", {"a": ""}, nbest, {"a": 3.5})
    assert json.loads(files["null_odds"].read_text("utf-8")) == {"a": 3.5}
    assert json.loads(files["nbest_predictions"].read_text("utf-8")) == nbest


def test_bad_lengths(tok):
    r = batch([row("a", LONG, "Who?", "1820")])
    with pytest.raises(ValueError, match="doc-stride"):
        prepare_train_features(r, tok, max_length=32, doc_stride=21, max_query_length=8)
    with pytest.raises(ValueError, match="max-length"):
        prepare_train_features(r, tok, max_length=10, doc_stride=1, max_query_length=8)

"""SQuAD v1.1 / v2.0: sliding-window features, gold token positions, and logits back to answer text.

Every feature is one window over one (question, context) row:

    input_ids       [CLS] question [SEP] context[ws:we] [SEP]      length L <= max_length
    token_type_ids  0 ... 0 (len(question) + 2)  1 ... 1 (we - ws + 1)

The question is stripped of leading whitespace and cut to `max_query_length` tokens; only the context
is windowed: each window holds up to `max_length - len(question) - 3` context tokens and consecutive
windows share `doc_stride` of them (Hugging Face run_qa's meaning of "stride"; Google's run_squad.py
instead advances by doc_stride). Nothing is padded: the collator pads per batch.

Gold positions come from the first answer's character span and the tokenizer's offsets (offsets are
character offsets into the original context, so lowercasing, accent stripping and odd whitespace do
not move them). A window that does not hold the whole answer, and every window of an unanswerable
(v2) question, points at 0 ([CLS]).

An answer whose `answer_start` does not point at its text is handled as follows (see
`locate_answer`): the occurrence of the text nearest to `answer_start` is used ("relocated"); if the
text does not occur in the context at all ("unfound"), training drops the row (a [CLS] label would
teach the model that an answerable question has no answer) and evaluation keeps its windows with
positions 0 (every question must still get a prediction). `answer_alignment` counts these cases.
"""

from __future__ import annotations

import json
import math
import os
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

Rows = Mapping[str, Sequence[Any]]
"""A batch in `datasets.Dataset.map(batched=True)` form: column name -> list of values."""

_CHUNK = 4096
"""Features per block in post-processing at --n-best-size 20 (fewer for a larger one): bounds the (chunk, k, k)
candidate arrays' memory."""


# ---------------------------------------------------------------------------------------------
# Answers: where their text really is.


def locate_answer(context: str, text: str, answer_start: int) -> int | None:
    """Character index where `text` starts in `context`, or None if it does not occur at all.

    `answer_start` when it points at `text`; otherwise the occurrence nearest to it (annotation tools
    sometimes count characters differently, which shifts a few starts by one or two).
    """
    if context.startswith(text, answer_start):
        return answer_start
    best, pos = None, context.find(text)
    while pos != -1:
        if best is None or abs(pos - answer_start) < abs(best - answer_start):
            best = pos
        pos = context.find(text, pos + 1)
    return best


def answer_alignment(examples: Rows | Any) -> Counter[str]:
    """Count how the first answer of each row lines up with its context.

    Args:
        examples: a batch (dict of lists), a `datasets.Dataset`, or a list of row dicts, with columns
            context and answers ({"text": [...], "answer_start": [...]}).

    Returns:
        Counter with keys "answered", "unanswerable", "exact" (answer_start points at the text),
        "relocated" (the text occurs elsewhere; the nearest occurrence is used) and "unfound" (the text
        does not occur: dropped from training, [CLS] in evaluation). Counters add, so the counts of
        batches sum to those of the dataset.
    """
    contexts, answers = _columns(examples, "context", "answers")
    counts: Counter[str] = Counter()
    for context, ans in zip(contexts, answers):
        if not ans["text"]:
            counts["unanswerable"] += 1
            continue
        counts["answered"] += 1
        start = locate_answer(context, ans["text"][0], ans["answer_start"][0])
        if start is None:
            counts["unfound"] += 1
        else:
            counts["exact" if start == ans["answer_start"][0] else "relocated"] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# Features.


def prepare_train_features(
    examples: Rows,
    tokenizer: Tokenizer,
    max_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
) -> dict[str, list]:
    """Training windows for `Dataset.map(batched=True, remove_columns=<all input columns>)`.

    Args:
        examples: N rows with columns question, context, answers ({"text": [...], "answer_start": [...]};
            empty lists = unanswerable). Other columns are ignored.
        tokenizer: a BERT WordPiece tokenizer with no padding or truncation of its own
            (`bert_dist.tokenizer.load_tokenizer` gives one).

    Returns:
        M >= N' features (N' = N minus rows whose answer text is not in the context):
        input_ids, token_type_ids: M lists of L_m <= max_length ints;
        start_positions, end_positions: M ints, token indices into the feature (0 = [CLS] = no answer).
    """
    keys = ("input_ids", "token_type_ids", "start_positions", "end_positions")
    out: dict[str, list] = {k: [] for k in keys}
    for f in _features(examples, tokenizer, max_length, doc_stride, max_query_length, drop_unfound=True):
        out["input_ids"].append(f["input_ids"])
        out["token_type_ids"].append(f["token_type_ids"])
        out["start_positions"].append(f["start"])
        out["end_positions"].append(f["end"])
    return out


def prepare_eval_features(
    examples: Rows,
    tokenizer: Tokenizer,
    max_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
) -> dict[str, list]:
    """Evaluation windows: the training windows of every row, plus what post-processing needs.

    Args: as `prepare_train_features`; examples also need an id column.

    Returns:
        M features: input_ids, token_type_ids, start_positions, end_positions as in
        `prepare_train_features` (positions let the evaluation loop report a loss; rows whose answer is
        not in the context are kept, with positions 0); example_id: M strings, the row's id;
        offset_mapping: M lists of L_m entries, [start, end) character offsets into the context for
        context tokens and None for [CLS], question and [SEP] tokens (Arrow stores list<list<int64>>
        with nulls).
    """
    keys = ("input_ids", "token_type_ids", "start_positions", "end_positions", "example_id", "offset_mapping")
    out: dict[str, list] = {k: [] for k in keys}
    for f in _features(examples, tokenizer, max_length, doc_stride, max_query_length, drop_unfound=False):
        out["input_ids"].append(f["input_ids"])
        out["token_type_ids"].append(f["token_type_ids"])
        out["start_positions"].append(f["start"])
        out["end_positions"].append(f["end"])
        out["example_id"].append(f["example_id"])
        n_special = f["n_question"] + 2
        out["offset_mapping"].append([None] * n_special + f["offsets"] + [None])
    return out


def _check_lengths(tokenizer: Tokenizer, max_length: int, doc_stride: int, max_query_length: int) -> None:
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        raise ValueError("SQuAD features need a tokenizer without padding or truncation "
                         "(bert_dist.tokenizer.load_tokenizer gives one)")
    check_windows(max_length, doc_stride, max_query_length)


def check_windows(max_length: int, doc_stride: int, max_query_length: int) -> None:
    """ValueError naming the flags when windows of these sizes cannot hold context or would not advance."""
    room = max_length - max_query_length - 3  # context tokens per window with the longest question
    if room < 1:
        raise ValueError(f"--max-length {max_length} leaves no room for context after a question of "
                         f"--max-query-length {max_query_length} tokens and 3 special tokens")
    if not 0 <= doc_stride < room:
        raise ValueError(f"--doc-stride {doc_stride} must be below the context tokens per window, "
                         f"--max-length - --max-query-length - 3 = {room}, or windows would not advance")


def _features(
    examples: Rows, tokenizer: Tokenizer, max_length: int, doc_stride: int, max_query_length: int,
    drop_unfound: bool,
) -> Iterator[dict[str, Any]]:
    """Yield one dict per window: input_ids, token_type_ids, start, end, example_id, n_question, offsets."""
    _check_lengths(tokenizer, max_length, doc_stride, max_query_length)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    questions = [q.lstrip() for q in examples["question"]]
    contexts = examples["context"]
    ids = examples["id"] if "id" in examples else [None] * len(questions)
    # Test sets come without answers; their windows all point at [CLS].
    all_answers = examples["answers"] if "answers" in examples else [{"text": []}] * len(questions)
    # Several questions share a paragraph: encode each distinct context once (encode_batch runs in
    # parallel in Rust), and read ids/offsets into Python lists once per context.
    unique = list(dict.fromkeys(contexts))
    ctx_enc = {c: (e.ids, e.offsets) for c, e in
               zip(unique, tokenizer.encode_batch(unique, add_special_tokens=False))}
    q_enc = tokenizer.encode_batch(questions, add_special_tokens=False)

    for i, context in enumerate(contexts):
        q_ids = q_enc[i].ids[:max_query_length]
        c_ids, c_offs = ctx_enc[context]
        head = [cls_id, *q_ids, sep_id]
        n_head = len(head)
        max_ctx = max_length - n_head - 1
        step = max_ctx - doc_stride

        answers = all_answers[i]
        tok_start = tok_end = None  # token span of the answer in the whole context
        if answers["text"]:
            text, a_start = answers["text"][0], answers["answer_start"][0]
            start = locate_answer(context, text, a_start)
            if start is not None:
                # First token ending after the answer's first character, last token starting before its
                # end: exact for answers on token boundaries, and robust to stray whitespace at its ends.
                tok_start = bisect_right(c_offs, start, key=lambda o: o[1])
                tok_end = bisect_left(c_offs, start + len(text), key=lambda o: o[0]) - 1
                if tok_start > tok_end:  # the span covers no token (whitespace or removed characters)
                    tok_start = tok_end = None
            if tok_start is None and drop_unfound:
                continue

        ws = 0
        while True:
            we = min(ws + max_ctx, len(c_ids))
            if tok_start is not None and ws <= tok_start and tok_end < we:
                s, e = tok_start - ws + n_head, tok_end - ws + n_head
            else:
                s = e = 0
            yield {
                "input_ids": head + c_ids[ws:we] + [sep_id],
                "token_type_ids": [0] * n_head + [1] * (we - ws + 1),
                "start": s,
                "end": e,
                "example_id": ids[i],
                "n_question": len(q_ids),
                "offsets": c_offs[ws:we],
            }
            if we >= len(c_ids):
                break
            ws += step


# ---------------------------------------------------------------------------------------------
# Post-processing.


def postprocess_predictions(
    examples: Any,
    features: Any,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> tuple[dict[str, str], dict[str, list[dict]], dict[str, float]]:
    """Turn per-window start/end logits into one answer per question.

    Args:
        examples: N rows (a `datasets.Dataset` or a list of dicts) with id and context.
        features: F rows from `prepare_eval_features` (Dataset or list of dicts) with example_id and
            offset_mapping (L_f entries, None or negative for non-context tokens).
        start_logits, end_logits: (F, T) float arrays, row f for feature f. Positions >= L_f (padding,
            any value) and outside the context are ignored; T may differ from max L_f.
        n_best_size: start and end candidates per window, and entries kept per question in `nbest`.
        max_answer_length: longest answer in tokens.
        version_2: SQuAD v2: the null answer (both pointers at [CLS]) competes with the best span.
        null_score_diff_threshold: v2: predict "" when null score - best span score > this.

    Returns:
        predictions: {id: answer text} (the official predictions.json format);
        nbest: {id: [{"text", "start_logit", "end_logit", "probability"}, ...]}, best first, distinct
            texts, probabilities a softmax over the listed scores (v2 lists the null answer "" too);
        null_odds: v2 only, {id: null score - best span score}; empty for v1.

    The null score of a question is the minimum over its windows of start_logits[f, 0] + end_logits[f, 0]
    (the window most sure there is an answer speaks for the question). Span score = start + end logit;
    answer text = context[offset start of the start token : offset end of the end token].
    """
    ex_ids, contexts = _columns(examples, "id", "context")
    (feat_ex_ids,) = _columns(features, "example_id")
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    n_feat = len(feat_ex_ids)
    if start_logits.shape != end_logits.shape or start_logits.ndim != 2 or start_logits.shape[0] != n_feat:
        raise ValueError(f"start/end logits must both be ({n_feat}, T), got {start_logits.shape} "
                         f"and {end_logits.shape}")
    ex_index = {eid: j for j, eid in enumerate(ex_ids)}
    try:
        feat_ex = np.fromiter((ex_index[e] for e in feat_ex_ids), dtype=np.int64, count=n_feat)
    except KeyError as e:
        raise ValueError(f"feature example_id {e.args[0]!r} is not an id of `examples`") from None
    off_start, off_end = _offset_arrays(features, n_feat)  # (F, W) each, -1 outside the context
    W = min(off_start.shape[1], start_logits.shape[1])
    off_start, off_end = off_start[:, :W], off_end[:, :W]

    # Candidate spans of every window, as flat arrays (one entry per valid (start, end) pair).
    cand = {k: [] for k in ("feat", "score", "sl", "el", "cs", "ce")}
    k = min(n_best_size, W)
    chunk = max(1, _CHUNK * 20 * 20 // (k * k))  # the (chunk, k, k) arrays stay the size they are at n_best 20
    for lo in range(0, n_feat, chunk):
        hi = min(lo + chunk, n_feat)
        in_ctx = off_start[lo:hi] >= 0
        s = np.where(in_ctx, start_logits[lo:hi, :W], -np.inf).astype(np.float64)
        e = np.where(in_ctx, end_logits[lo:hi, :W], -np.inf).astype(np.float64)
        # Top-k over context tokens only, so [CLS]/question tokens never take a candidate's place.
        top_s, top_e = (np.argpartition(-x, k - 1, axis=1)[:, :k] if k < W else
                        np.broadcast_to(np.arange(W), x.shape).copy() for x in (s, e))
        s_val, e_val = np.take_along_axis(s, top_s, 1), np.take_along_axis(e, top_e, 1)  # (C, k)
        score = s_val[:, :, None] + e_val[:, None, :]  # (C, k, k)
        length = top_e[:, None, :] - top_s[:, :, None] + 1
        valid = np.isfinite(score) & (length >= 1) & (length <= max_answer_length)
        # A window's spans beyond its n_best best can never reach a question's n_best list.
        m = min(n_best_size, k * k)
        flat = np.where(valid, score, -np.inf).reshape(len(score), -1)
        keep = np.zeros_like(valid).reshape(len(score), -1)
        np.put_along_axis(keep, np.argpartition(-flat, m - 1, axis=1)[:, :m], True, 1)
        f, a, b = np.nonzero(valid & keep.reshape(valid.shape))
        ts, te = top_s[f, a], top_e[f, b]
        cand["feat"].append(f + lo)
        cand["score"].append(score[f, a, b])
        cand["sl"].append(s_val[f, a])
        cand["el"].append(e_val[f, b])
        cand["cs"].append(off_start[lo + f, ts])
        cand["ce"].append(off_end[lo + f, te])
    c = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cand.items()}
    c_ex = feat_ex[c["feat"].astype(np.int64)]
    order = np.lexsort((-c["score"], c_ex))  # by example, best first
    bounds = np.searchsorted(c_ex[order], np.arange(len(ex_ids) + 1)).tolist()
    score, sl, el = (c[k][order].tolist() for k in ("score", "sl", "el"))
    cs, ce = (c[k][order].astype(np.int64).tolist() for k in ("cs", "ce"))

    if version_2:
        # Null score per example: the minimum over its windows, and the logits of that window.
        null_s = np.asarray(start_logits[:, 0], dtype=np.float64)
        null_e = np.asarray(end_logits[:, 0], dtype=np.float64)
        null = null_s + null_e
        n_order = np.lexsort((null, feat_ex))
        first = np.searchsorted(feat_ex[n_order], np.arange(len(ex_ids)))
        has_feat = np.bincount(feat_ex, minlength=len(ex_ids)) > 0
        pick = n_order[np.minimum(first, n_feat - 1)] if n_feat else first

    predictions: dict[str, str] = {}
    nbest: dict[str, list[dict]] = {}
    null_odds: dict[str, float] = {}
    for j, (eid, context) in enumerate(zip(ex_ids, contexts)):
        entries, seen = [], set()
        for r in range(bounds[j], bounds[j + 1]):
            text = context[cs[r]:ce[r]]
            if text in seen:  # the same span seen from an overlapping window, or the same words elsewhere
                continue
            seen.add(text)
            entries.append({"text": text, "start_logit": sl[r], "end_logit": el[r], "score": score[r]})
            if len(entries) == n_best_size:
                break
        best = entries[0] if entries else None
        if version_2 and has_feat[j]:
            p = pick[j]
            null_entry = {"text": "", "start_logit": float(null_s[p]), "end_logit": float(null_e[p]),
                          "score": float(null[p])}
            # As Google's run_squad.py: a question with no valid span compares the null score with 0.
            diff = null_entry["score"] - (best["score"] if best else 0.0)
            null_odds[eid] = diff
            entries = sorted(entries + [null_entry], key=lambda d: -d["score"])
            if len(entries) > n_best_size and entries[-1] is not null_entry:
                entries.pop()  # keep n_best entries, but always the null one
            predictions[eid] = "" if best is None or diff > null_score_diff_threshold else best["text"]
        else:
            if version_2:
                null_odds[eid] = 0.0
            predictions[eid] = best["text"] if best else ""
            if not entries:
                entries = [{"text": "", "start_logit": 0.0, "end_logit": 0.0, "score": 0.0}]
        top = max(d["score"] for d in entries)
        exps = [math.exp(d["score"] - top) for d in entries]  # ~20 numbers: plain floats beat numpy here
        total = sum(exps)
        nbest[eid] = [{"text": d["text"], "start_logit": d["start_logit"], "end_logit": d["end_logit"],
                       "probability": x / total} for d, x in zip(entries, exps)]
    return predictions, nbest, null_odds


def _columns(rows: Any, *names: str) -> tuple[list, ...]:
    """Columns of a `datasets.Dataset`, a dict of lists, or a list of row dicts."""
    if isinstance(rows, Mapping):
        return tuple(list(rows[n]) for n in names)
    if hasattr(rows, "column_names"):  # datasets.Dataset: whole columns through Arrow, whatever its format
        rows = rows.with_format("arrow")
        return tuple(rows[n].to_pylist() for n in names)
    return tuple([r[n] for r in rows] for n in names)


def _offset_arrays(features: Any, n_feat: int) -> tuple[np.ndarray, np.ndarray]:
    """offset_mapping of F features -> (start, end) arrays (F, max L_f), int64, -1 where not context."""
    flat = None
    if hasattr(features, "column_names"):
        # From Arrow directly: converting ~F * 200 offset pairs to Python objects costs seconds.
        col = features.with_format("arrow")["offset_mapping"].combine_chunks()
        lengths = col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        tokens = col.flatten()  # list<int64> per token, null for non-context tokens
        if hasattr(tokens, "flatten"):  # not when no feature has a context token (all null: Arrow's null type)
            valid = tokens.is_valid().to_numpy(zero_copy_only=False)
            values = tokens.flatten().to_numpy(zero_copy_only=False)
            if len(values) == 2 * int(valid.sum()):  # else an unexpected layout: take the generic path
                flat = np.full((len(tokens), 2), -1, dtype=np.int64)
                flat[valid] = values.astype(np.int64).reshape(-1, 2)
    if flat is None:
        (offsets,) = _columns(features, "offset_mapping")
        lengths = np.fromiter(map(len, offsets), dtype=np.int64, count=n_feat)
        none = (-1, -1)
        flat = np.fromiter((x for om in offsets for o in om for x in (none if o is None else o)),
                           dtype=np.int64, count=2 * int(lengths.sum())).reshape(-1, 2)
    width = int(lengths.max()) if n_feat else 0
    rows = np.repeat(np.arange(n_feat), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    start = np.full((n_feat, width), -1, dtype=np.int64)
    end = np.full((n_feat, width), -1, dtype=np.int64)
    start[rows, cols], end[rows, cols] = flat[:, 0], flat[:, 1]
    return start, end


def write_predictions(
    out_dir: str | os.PathLike,
    predictions: dict[str, str],
    nbest: dict[str, list[dict]],
    null_odds: dict[str, float] | None = None,
) -> dict[str, Path]:
    """Write predictions.json ({id: text}, the official evaluation scripts' input),
    nbest_predictions.json and, when `null_odds` is non-empty (v2), null_odds.json (the official v2
    script's --na-prob-file). Returns {name: path} of the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"predictions": (out / "predictions.json", predictions),
             "nbest_predictions": (out / "nbest_predictions.json", nbest)}
    if null_odds:
        files["null_odds"] = (out / "null_odds.json", null_odds)
    for path, obj in files.values():
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, ensure_ascii=False, indent=2)
            fh.write("\n")
    return {name: path for name, (path, _) in files.items()}

"""Gold round trip of the SQuAD feature pipeline: answers -> windows -> one-hot logits -> answers.

Windows the SQuAD dev set with `prepare_train_features` and `prepare_eval_features` (timed, cold: a
fresh datasets cache), turns every feature's gold start/end positions into logits (LARGE at the gold
start and end, 0 elsewhere; LARGE at 0 for features pointing at [CLS]; padding past each feature's
length is filled with a larger value that post-processing must ignore), post-processes them and
scores the result with the package's squad / squad_v2 metric. What is lost is what windowing and
post-processing lose: answers that start or end inside a word piece, answers longer than a window or
than --max-answer-length, answers whose text is not in the context.

    python benchmarks/squad_roundtrip.py --data-dir /work/shared/data \
        --tokenizer /work/shared/models/all-MiniLM-L6-v2 [--version 1|2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import numpy as np

from bert_dist.data.squad import (
    answer_alignment,
    locate_answer,
    postprocess_predictions,
    prepare_eval_features,
    prepare_train_features,
)
from bert_dist.metrics import load_metric
from bert_dist.tokenizer import load_tokenizer

LARGE = 100.0
PAD = 1e6
"""Padding logits, larger than any gold logit: a span reaching into the padding would win."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="/work/shared/data")
    p.add_argument("--tokenizer", default="/work/shared/models/all-MiniLM-L6-v2")
    p.add_argument("--version", type=int, choices=(1, 2), default=1)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--doc-stride", type=int, default=128)
    p.add_argument("--max-query-length", type=int, default=64)
    p.add_argument("--n-best-size", type=int, default=20)
    p.add_argument("--max-answer-length", type=int, default=30)
    p.add_argument("--show", type=int, default=10, help="print this many lost answers per cause")
    args = p.parse_args()

    v2 = args.version == 2
    path = os.path.join(args.data_dir, "squad_v2" if v2 else "squad", "validation.jsonl")
    tok = load_tokenizer(args.tokenizer)
    kw = {"tokenizer": tok, "max_length": args.max_length, "doc_stride": args.doc_stride,
          "max_query_length": args.max_query_length}

    with tempfile.TemporaryDirectory() as cache:
        examples = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache)
        align = answer_alignment(examples)
        t0 = time.perf_counter()
        train = examples.map(prepare_train_features, batched=True, remove_columns=examples.column_names,
                             fn_kwargs=kw, desc="train features")
        t1 = time.perf_counter()
        feats = examples.map(prepare_eval_features, batched=True, remove_columns=examples.column_names,
                             fn_kwargs=kw, desc="eval features")
        t2 = time.perf_counter()

        lengths = np.array([len(x) for x in feats["input_ids"]])
        gold_s, gold_e = np.array(feats["start_positions"]), np.array(feats["end_positions"])
        # The training windows are the evaluation windows less those of rows dropped for an unfound answer.
        assert len(train) <= len(feats)
        if align["unfound"] == 0:
            assert train["start_positions"] == feats["start_positions"], "train/eval windows differ"
            assert train["end_positions"] == feats["end_positions"], "train/eval windows differ"
            assert train["input_ids"] == feats["input_ids"], "train/eval windows differ"

        F, T = len(feats), int(lengths.max())
        start = np.where(np.arange(T) < lengths[:, None], 0.0, PAD).astype(np.float32)
        end = start.copy()
        start[np.arange(F), gold_s] = LARGE
        end[np.arange(F), gold_e] = LARGE

        t3 = time.perf_counter()
        preds, _, _ = postprocess_predictions(
            examples, feats, start, end, n_best_size=args.n_best_size,
            max_answer_length=args.max_answer_length, version_2=v2,
        )
        t4 = time.perf_counter()

        ids, answers = list(examples["id"]), list(examples["answers"])
        metric = load_metric("squad_v2" if v2 else "squad")
        pred_rows = [{"id": i, "prediction_text": preds[i], **({"no_answer_probability": 0.0} if v2 else {})}
                     for i in ids]
        refs = [{"id": i, "answers": a} for i, a in zip(ids, answers)]
        scores = metric.compute(predictions=pred_rows, references=refs)

        lost = diagnose(examples, feats, gold_s, gold_e, preds, args.max_answer_length)

    print(f"SQuAD v{'2.0' if v2 else '1.1'} dev round trip: {path}")
    print(f"  tokenizer {args.tokenizer}; max_length {args.max_length}, doc_stride {args.doc_stride}, "
          f"max_query_length {args.max_query_length}, n_best {args.n_best_size}, "
          f"max_answer_length {args.max_answer_length}")
    print(f"  examples {len(examples)}, train features {len(train)}, eval features {F} "
          f"(mean length {lengths.mean():.1f}, max {T}); features with the answer {int((gold_s > 0).sum())}")
    print(f"  answer alignment: {dict(sorted(align.items()))}")
    print(f"  windowing (cold cache): prepare_train_features {t1 - t0:.2f} s, prepare_eval_features "
          f"{t2 - t1:.2f} s; post-processing {t4 - t3:.2f} s")
    for k, v in scores.items():
        if isinstance(v, float):
            print(f"  {k}: {v:.3f}")
        else:
            print(f"  {k}: {v}")
    print(f"  predictions differing from the first gold answer's text: {sum(len(v) for v in lost.values())}")
    for cause, rows in sorted(lost.items(), key=lambda kv: -len(kv[1])):
        em = exact_under_metric(metric, rows, preds, dict(zip(ids, answers)), v2)
        print(f"    {cause}: {len(rows)} ({em} still exact under the metric's normalisation)")
        for eid in rows[: args.show]:
            a = answers[ids.index(eid)]
            gold = a["text"][0] if a["text"] else ""
            print(f"      {eid}: gold {_short(gold)!r} (start {a['answer_start'][:1]}) -> "
                  f"predicted {_short(preds[eid])!r}")


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def diagnose(examples, feats, gold_s, gold_e, preds, max_answer_length) -> dict[str, list[str]]:
    """Examples whose prediction is not their first answer's text, by cause."""
    span = {}  # example id -> shortest gold span in tokens over the windows that hold the answer
    for eid, s, e in zip(feats["example_id"], gold_s.tolist(), gold_e.tolist()):
        if s > 0:
            span[eid] = min(span.get(eid, e - s + 1), e - s + 1)
    lost: dict[str, list[str]] = {}
    for eid, context, ans in zip(examples["id"], examples["context"], examples["answers"]):
        gold = ans["text"][0] if ans["text"] else ""
        if preds[eid] == gold:
            continue
        if not ans["text"]:
            cause = "unanswerable, but a span was predicted"
        elif locate_answer(context, gold, ans["answer_start"][0]) is None:
            cause = "answer text not in the context"
        elif eid not in span:
            cause = "no window holds the whole answer"
        elif span[eid] > max_answer_length:
            cause = f"answer longer than --max-answer-length {max_answer_length} tokens"
        elif gold in preds[eid]:
            cause = "answer starts or ends inside a word piece (prediction is wider)"
        else:
            cause = "other"
        lost.setdefault(cause, []).append(eid)
    return lost


def exact_under_metric(metric, rows, preds, answers, v2) -> int:
    """How many of `rows` the metric still scores as exact matches (its normalisation drops
    punctuation, articles and case)."""
    n = 0
    for eid in rows:
        pred = {"id": eid, "prediction_text": preds[eid], **({"no_answer_probability": 0.0} if v2 else {})}
        s = metric.compute(predictions=[pred], references=[{"id": eid, "answers": answers[eid]}])
        n += (s["exact"] if v2 else s["exact_match"]) == 100.0
    return n


if __name__ == "__main__":
    main()

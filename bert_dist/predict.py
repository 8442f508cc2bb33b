"""Predict with a finished run: texts in, one JSON line per input out, through the code that trained it.

    bert-dist predict --model RUN_DIR --text "a sentence" [--text-pair "a second"]
    bert-dist predict --model RUN_DIR --file rows.jsonl|rows.csv|rows.tsv      (or JSON Lines / text on stdin)

The model is rebuilt from the run's config.json (`checkpoint.load_run_model`), texts are tokenized by the
fine-tuning path (`data.tokenize_classification`, or SQuAD's `prepare_eval_features` windows), batches are
padded by `PadCollator` and run through `train.evaluate` on the best device accelerate finds; SQuAD logits go
through the same `postprocess_predictions`. So a run's validation rows give back its own
predictions_validation.jsonl line for line, with the run's precision: `--mixed-precision bf16` for a bf16 run
(the default, fp32, differs from a bf16 run's figures in the last digits). Output, per input:

    GLUE-style   {"idx"?, "prediction": class id, "label": name, "probabilities": [...]} as in
                 predictions_<split>.jsonl; regression (STS-B): {"idx"?, "prediction": score}; multi-label:
                 {"idx"?, "prediction": [ids], "label": [names], "probabilities": [each label's sigmoid]}
    SQuAD        {"id"?, "answer": text, "start", "end": character span in the context, "score": the n-best
                 probability}; a v2 model that finds no answer gives "answer": "", start/end null
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bert_dist.config import DataConfig, TaskSpec

log = logging.getLogger(__name__)

INPUT_COLUMNS = ["input_ids", "token_type_ids"]
"""What the loader hands the collator: bookkeeping columns (offsets, example ids) stay out of the batches."""
CHUNK = 8192
"""Rows per round of tokenize -> model -> output, so a large file streams in bounded memory."""


class Predictor:
    """A run's model, tokenizer and evaluation settings, ready to predict rows.

    Args:
        model_dir: a bert-dist run directory (or its `export --format hf` directory).
        batch_size: rows per forward pass (default: the run's --eval-batch-size).
        max_length: tokens per sequence (default: the run's own), the windows' length for SQuAD.
        mixed_precision: no (fp32), bf16 or fp16 (CUDA only): autocast for the forward passes.
    """

    def __init__(self, model_dir: str | os.PathLike, batch_size: int | None = None, max_length: int | None = None,
                 mixed_precision: str = "no"):
        from accelerate import Accelerator

        from bert_dist import data as D
        from bert_dist.weights import load_run_model

        self.dir = Path(model_dir)
        model, src = load_run_model(self.dir)
        self.meta, self.tokenizer = src.meta, src.tokenizer
        if self.meta["kind"] not in ("classification", "multi_label", "regression", "qa"):
            raise ValueError(f"--model: {self.dir} is a {self.meta['kind']} model; predict takes a fine-tuned "
                             "(GLUE-style, own-data or SQuAD) one")
        self.spec: TaskSpec = D.spec_from_meta(self.meta)
        self.data = self._data_config(batch_size, max_length)
        if self.data.max_length > src.config.max_position_embeddings:
            raise ValueError(f"--max-length {self.data.max_length} is above the model's "
                             f"{src.config.max_position_embeddings} positions")
        if self.meta["kind"] == "qa":  # the run's windows, which predict takes as they are (it has no such flags)
            d = self.data
            if d.max_length - d.max_query_length - 3 <= d.doc_stride:
                raise ValueError(f"--max-length {d.max_length} is too short for this run's SQuAD windows (its "
                                 f"--doc-stride {d.doc_stride}, --max-query-length {d.max_query_length}): use at least "
                                 f"{d.doc_stride + d.max_query_length + 4}")
        from bert_dist.train import check_precision

        self.accelerator = Accelerator(mixed_precision=mixed_precision)
        check_precision(self.accelerator)
        from bert_dist import kernels

        kernels.apply(model, "auto", self.accelerator.device)
        self.model = self.accelerator.prepare_model(model, evaluation_mode=True)

    def _data_config(self, batch_size: int | None, max_length: int | None) -> DataConfig:
        """The run's own evaluation settings (max length, batch size, SQuAD post-processing), flags on top."""
        saved = self.meta.get("data", {})  # an export's copy of them (checkpoint.EXPORTED_DATA_SETTINGS)
        f = self.dir / "run_config.json"
        if f.is_file():
            saved = json.loads(f.read_text()).get("data", {})
        cfg = DataConfig(**{k: v for k, v in saved.items() if k in DataConfig.__dataclass_fields__})
        cfg.max_length = max_length or cfg.max_length or self.spec.max_length
        cfg.eval_batch_size = batch_size or cfg.eval_batch_size
        if cfg.eval_batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {cfg.eval_batch_size}")
        return cfg

    def predict(self, rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Rows with the task's text columns (or `text`/`text_pair`) -> one output dict per row, in order."""
        chunk: list[dict[str, Any]] = []
        for i, row in enumerate(rows, 1):
            chunk.append(self._check(row, i))
            if len(chunk) == CHUNK:
                yield from self._predict_chunk(chunk)
                chunk = []
        if chunk:
            yield from self._predict_chunk(chunk)

    def _check(self, row: dict[str, Any], n: int) -> dict[str, Any]:
        """The row's texts under the task's column names; ValueError naming the row when they are missing."""
        cols = self.spec.text_columns
        generic = ("text", "text_pair")[: len(cols)]
        if all(c in row for c in cols):
            texts = {c: row[c] for c in cols}
        elif all(g in row for g in generic):
            texts = {c: row[g] for c, g in zip(cols, generic)}
        else:
            raise ValueError(f"input row {n}: a {self.spec.name} model needs {' and '.join(cols)} "
                             f"(or {' and '.join(generic)}); got {', '.join(row) or 'nothing'}")
        bad = next((c for c, t in texts.items() if not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(f"input row {n}: {bad} is {texts[bad]!r}, not text")
        key = "id" if self.meta["kind"] == "qa" else "idx"
        return {key: row[key], **texts} if key in row else texts

    def _run(self, feats: Any, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        from bert_dist import data as D
        from bert_dist.data.collate import PadCollator
        from bert_dist.train import evaluate

        collator = PadCollator(self.tokenizer.token_to_id("[PAD]"), None, scalar_keys=())
        loader = self.accelerator.prepare_data_loader(D.eval_loader(feats.select_columns(INPUT_COLUMNS), self.data,
                                                                    collator))
        outs = evaluate(self.accelerator, self.model, loader, lambda b, o: {k: o[k] for k in outputs})
        self.accelerator.free_memory()  # a loader per chunk: don't keep them all (self.model stays)
        return outs

    def _predict_chunk(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self._answer(rows) if self.meta["kind"] == "qa" else self._classify(rows)

    def _classify(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from datasets import Dataset, DatasetDict

        from bert_dist import data as D

        texts = Dataset.from_list([{c: r[c] for c in self.spec.text_columns} for r in rows])
        feats = D.tokenize_classification(DatasetDict({"predict": texts}), self.spec, self.tokenizer,
                                          self.data.max_length)["predict"]
        logits = self._run(feats, ("logits",))["logits"]  # (N, C), or (N,) scores for regression
        # As finetune's predictions_<split>.jsonl (the same function): the two agree line for line.
        return [{**({"idx": r["idx"]} if "idx" in r else {}), **row}
                for r, row in zip(rows, D.prediction_rows(self.spec, logits))]

    def _answer(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from datasets import Dataset

        from bert_dist.data.squad import postprocess_predictions, prepare_eval_features

        # Our own ids: the user's need not be unique, and post-processing keys answers by id.
        examples = Dataset.from_list([{"id": str(i), "question": r["question"], "context": r["context"]}
                                      for i, r in enumerate(rows)])
        d = self.data
        feats = examples.map(prepare_eval_features, batched=True, remove_columns=examples.column_names,
                             fn_kwargs={"tokenizer": self.tokenizer, "max_length": d.max_length,
                                        "doc_stride": d.doc_stride, "max_query_length": d.max_query_length})
        outs = self._run(feats, ("start_logits", "end_logits"))
        v2 = self.spec.metric == "squad_v2"
        texts, nbest, _ = postprocess_predictions(examples, feats, outs["start_logits"], outs["end_logits"],
                                                  n_best_size=d.n_best_size, max_answer_length=d.max_answer_length,
                                                  version_2=v2, null_score_diff_threshold=d.null_score_diff_threshold)
        by_example: dict[str, list[int]] = {}
        for f, eid in enumerate(feats["example_id"]):
            by_example.setdefault(eid, []).append(f)
        offsets = feats["offset_mapping"]
        out = []
        for i, r in enumerate(rows):
            eid, text = str(i), texts[str(i)]
            row: dict[str, Any] = {"id": r["id"]} if "id" in r else {}
            span = _char_span(text, r["context"], [(offsets[f], outs["start_logits"][f], outs["end_logits"][f])
                                                   for f in by_example.get(eid, [])]) if text else None
            prob = next((e["probability"] for e in nbest[eid] if e["text"] == text), 0.0)
            row.update(answer=text, start=span[0] if span else None, end=span[1] if span else None,
                       score=round(float(prob), 6))
            if v2:
                row["no_answer"] = text == ""
            out.append(row)
        return out


def _char_span(text: str, context: str, windows: list[tuple[list, np.ndarray, np.ndarray]]) -> tuple[int, int]:
    """[start, end) of the answer in `context`. Post-processing returns the text only; where it occurs more than
    once, the occurrence is the one whose start/end tokens score highest, which is the span it was cut from."""
    starts = []
    s = context.find(text)
    while s != -1:
        starts.append(s)
        s = context.find(text, s + 1)
    if len(starts) <= 1:
        return (starts[0], starts[0] + len(text)) if starts else (-1, -1)

    def score(s: int) -> float:
        best = -np.inf
        for offsets, start_logits, end_logits in windows:
            a = [t for t, o in enumerate(offsets) if o is not None and o[0] == s]
            b = [t for t, o in enumerate(offsets) if o is not None and o[1] == s + len(text)]
            if a and b:
                best = max(best, max(start_logits[t] for t in a) + max(end_logits[t] for t in b))
        return best

    s = max(starts, key=score)
    return s, s + len(text)


# ---------------------------------------------------------------------------------------------
# Inputs


def read_rows(texts: list[str] | None, pairs: list[str] | None, file: str | None, stdin: Any = None,
              pair_task: bool = False) -> Iterator[dict[str, Any]]:
    """Input rows from --text/--text-pair, a .jsonl/.csv/.tsv file, or stdin (JSON Lines, or one text a line:
    a tab between the two texts of a pair)."""
    if texts:
        if pairs and len(pairs) != len(texts):
            raise ValueError(f"--text-pair: {len(pairs)} given for {len(texts)} --text")
        for i, t in enumerate(texts):
            yield {"text": t, "text_pair": pairs[i]} if pairs else {"text": t}
        return
    if pairs:
        raise ValueError("--text-pair goes with --text")
    if file:
        path = Path(file)
        if not path.exists():
            raise ValueError(f"--file {path}: no such file")
        if path.is_dir():
            raise ValueError(f"--file {path} is a directory; give a file")
        suffix = path.suffix.lower()
        if suffix not in (".jsonl", ".json", ".csv", ".tsv", ".txt") and not path.is_file():
            # A pipe (bash's <(...)) or a device has no type to go by: its lines are read as stdin's are.
            with open(path, encoding="utf-8-sig", newline="") as fh:
                yield from _text_lines(fh, f"--file {path}", pair_task)
            return
        if suffix not in (".jsonl", ".json", ".csv", ".tsv", ".txt"):
            raise ValueError(f"--file {path}: unsupported type {suffix!r}; use .jsonl, .csv, .tsv or .txt")
        with open(path, encoding="utf-8-sig", newline="") as fh:  # -sig: a byte-order mark is not text
            if suffix in (".csv", ".tsv"):  # .tsv unquoted, as GLUE's files (a '"' is text)
                from bert_dist.data import check_fields

                dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {}
                check_fields(path, f"--file {path}", **dialect)
                yield from csv.DictReader(fh, **dialect)
            elif suffix == ".txt":
                yield from _text_lines(fh, f"--file {path}", pair_task)
            elif suffix == ".json" and fh.read(4096).lstrip().startswith("["):  # a JSON array of rows
                fh.seek(0)
                yield from _json_array(fh, f"--file {path}")
            else:
                fh.seek(0)
                yield from _json_lines(fh, f"--file {path}")
        return
    if stdin is None or stdin.isatty():
        raise ValueError("nothing to predict: give --text, --file, or rows on stdin")
    yield from _text_lines(stdin, "stdin", pair_task)


def _text_lines(lines: Iterable[str], where: str, pair_task: bool) -> Iterator[dict[str, Any]]:
    """One row per line: a JSON object, or text (a tab between the two texts of a pair). A blank line is an empty
    text, so that output line n answers input line n."""
    for n, line in enumerate(lines, 1):
        row = _json_object(line) if line.lstrip().startswith("{") else None
        if row is not None:
            yield row
            continue
        text = line.rstrip("\r\n")  # a line like "{curly} text" that is no JSON object is text
        parts = text.split("\t") if pair_task else [text]
        if len(parts) > 2:
            raise ValueError(f"{where} line {n}: {len(parts)} tab-separated fields; a pair is two texts with "
                             "one tab between them (or give JSON Lines)")
        if pair_task and parts == [""]:
            parts = ["", ""]  # a blank line: an empty pair, answered in its place
        yield dict(zip(("text", "text_pair"), parts))


def _json_object(line: str) -> dict[str, Any] | None:
    """The JSON object on `line`, or None where it holds none."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def _json_array(fh: Any, where: str) -> Iterator[dict[str, Any]]:
    try:
        rows = json.load(fh)
    except ValueError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: item {n} of the array is not a JSON object")
        yield row


def _json_lines(lines: Iterable[str], where: str) -> Iterator[dict[str, Any]]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}, line {n}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}, line {n}: a JSON object per line, please")
        yield row


def predict_main(model: str, texts: list[str] | None = None, pairs: list[str] | None = None,
                 file: str | None = None, batch_size: int | None = None, max_length: int | None = None,
                 out: Any = None, mixed_precision: str = "no") -> int:
    """`bert-dist predict`: JSON Lines on stdout (or `out`), one line per input row, in input order."""
    out = out or sys.stdout
    predictor = Predictor(model, batch_size=batch_size, max_length=max_length, mixed_precision=mixed_precision)
    rows = read_rows(texts, pairs, file, sys.stdin, pair_task=len(predictor.spec.text_columns) == 2)
    n = 0
    try:
        for row in predictor.predict(rows):
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    except UnicodeError:  # decoding a file; or stdin's undecodable bytes (surrogate escapes) met when encoding
        where = f"--file {file}" if file else "stdin"
        raise ValueError(f"{where}: not UTF-8 text (after {n} rows); re-encode it as UTF-8") from None
    except BrokenPipeError:  # the reader left (`| head`): stop as a Unix filter does, with no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush has nowhere to fail
        return 141  # 128 + SIGPIPE, the shell's status for a filter stopped this way
    log.info("%d predictions with %s on %s", n, predictor.dir, predictor.accelerator.device)
    return 0

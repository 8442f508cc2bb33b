"""Tasks, dataset loading (hub, --data-dir, custom files, or a named dataset), checks, tokenization and dataloaders.

Every task goes through the same path: rows in the hub's schema -> checked -> tokenized once with
`datasets.map` (batched, cached) -> a DataLoader that pads per batch. A task on one's own data is a TaskSpec built
from flags (`own.py`), on that same path.
"""

from __future__ import annotations

import csv
import logging
import math
import multiprocessing.context
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer

from bert_dist.config import OWN_TASKS, DataConfig, RunConfig, TaskSpec
from bert_dist.data import own
from bert_dist.data.glue import GLUE_TASKS

log = logging.getLogger(__name__)

SQUAD_TASKS = {
    "squad": TaskSpec(name="squad", kind="qa", hub_path="rajpurkar/squad", text_columns=("question", "context"),
                      metric="squad", main_metric="f1", test_splits=(), max_length=384),
    "squad_v2": TaskSpec(name="squad_v2", kind="qa", hub_path="rajpurkar/squad_v2",
                         text_columns=("question", "context"), metric="squad_v2", main_metric="f1",
                         test_splits=(), max_length=384),
}
PRETRAIN_TASKS = {
    "pretrain": TaskSpec(name="pretrain", kind="pretrain", hub_path="Salesforce/wikitext",
                         hub_config="wikitext-2-raw-v1", text_columns=("text",), label_column="",
                         metric="", main_metric="mlm_accuracy", test_splits=(), data_name="wikitext-2"),
}
TASKS: dict[str, TaskSpec] = {**GLUE_TASKS, **SQUAD_TASKS, **PRETRAIN_TASKS}
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"--task: unknown task {name!r}; choose from {', '.join(TASKS)}, {', '.join(OWN_TASKS)}")
    return TASKS[name]


def task_spec(cfg: RunConfig) -> TaskSpec:
    """The run's task: a registered one (GLUE, SQuAD, pretraining), or one built from flags on own data."""
    return own.task_from_flags(cfg.task, cfg.data) if cfg.task in OWN_TASKS else get_task(cfg.task)


def spec_from_meta(meta: dict[str, Any]) -> TaskSpec:
    """The task a saved model was trained on (its config.json's `bert_dist` metadata): an own-data task's spec is
    kept there whole (its columns and label names come from flags and data), a registered one's by name."""
    return TaskSpec.from_dict(meta["spec"]) if "spec" in meta else get_task(meta["task"])


# ---------------------------------------------------------------------------------------------
# Loading


def check_file(path: Path, flag: str, any_suffix: bool = False) -> None:
    """A data file of a known type (any type with `any_suffix`) that exists and is not empty, or ValueError
    naming `flag` (no parsing)."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give the data file(s) in it")
    if not any_suffix and path.suffix.lower() not in DATA_SUFFIXES:
        raise ValueError(f"{flag} {path}: unsupported file type {path.suffix!r}; use .jsonl, .csv, .tsv or .parquet")
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"{flag} {path}: the file is empty")


def _read_file(path: Path, split: str, flag: str = "", kind: str | None = None,
               text_columns: tuple[str, ...] = ()) -> Dataset:
    """One data file -> a Dataset; `kind` "text" reads it a line per row (pretraining corpora), else the suffix says.
    `text_columns` of a CSV/TSV are read as text whatever they look like (a sentence "1999" is not a number)."""
    check_file(path, flag, any_suffix=kind is not None)
    kind = kind or DATA_SUFFIXES[path.suffix.lower()]
    where = f"{flag} {path}".strip()
    kw: dict[str, Any] = {}
    if kind == "csv":
        # Cells are what they say: pandas would read "None", "NA", "null", "nan" or "N/A" as missing, and refuse a
        # sentence that is just that word (GLUE's own reader keeps them); an empty cell is "", as in JSON Lines.
        # index_col False: a row with a field too many must not make its first field an index (check_fields).
        kw = {"keep_default_na": False, "converters": dict.fromkeys(text_columns, str) or None, "index_col": False}
        if path.suffix.lower() == ".tsv":
            # .tsv as GLUE's own files are written: tab-separated, no quoting ('"' is text: MRPC's rows hold unmatched
            # ones, which CSV quoting would read as one field running over the next rows).
            kw.update(delimiter="\t", quoting=csv.QUOTE_NONE)
        check_fields(path, where, kw.get("delimiter", ","), kw.get("quoting", csv.QUOTE_MINIMAL))
    lib = logging.getLogger("datasets")  # its readers log a parse error, which the one line below says in full
    level = lib.level
    lib.setLevel(logging.CRITICAL)
    try:
        ds = datasets.load_dataset(kind, data_files={split: str(path)}, split=split, **kw)
    except Exception as e:  # pyarrow/pandas parse errors have many types; all mean a bad file
        raise _load_error(e, where, f"cannot be read as {kind}") from None
    finally:
        lib.setLevel(level)
    _check_utf8(ds, where)
    return ds


def _load_error(e: Exception, where: str, what: str) -> ValueError:
    """A datasets/pyarrow/pandas loading error as one line naming `where`."""
    while (e.__cause__ or e.__context__) is not None and "error occurred while generating" in str(e):
        e = e.__cause__ or e.__context__  # datasets wraps the parser's error: the inner one says what is wrong
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, UnicodeDecodeError) or "utf-8" in msg.lower() or "utf8" in msg.lower():
        return ValueError(f"{where}: not UTF-8 text; re-encode it as UTF-8")
    if "corresponds to no data" in msg:  # a CSV with a header and no rows
        return ValueError(f"{where}: the file has no rows")
    return ValueError(f"{where}: {what} ({msg[:200]}); fix or remove the malformed rows")


def _check_utf8(ds: Dataset, where: str) -> None:
    bad = _first_invalid_utf8(ds)
    if bad is not None:
        raise ValueError(f"{where}: not UTF-8 text (column {bad[0]!r}, row {bad[1] + 1}); re-encode it as UTF-8")


def load_folder(folder: Path, config: str | None, where: str) -> DatasetDict:
    """A local directory in the hub's layout (a dataset repository's files: README.md's `configs`, data/*.parquet,
    train.csv, ...) as datasets reads it from the hub, with no network; ValueError naming `where`."""
    lib = logging.getLogger("datasets")
    level = lib.level
    lib.setLevel(logging.CRITICAL)
    try:
        raw = datasets.load_dataset(str(folder), config)
    except Exception as e:  # an unknown config, no data files, a malformed file: each one line
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "BuilderConfig" in msg or "config" in msg.lower() and "not found" in msg.lower():
            raise ValueError(f"{where}: no such config ({msg[:200]})") from None
        raise _load_error(e, where, "cannot be read as a dataset") from None
    finally:
        lib.setLevel(level)
    if not isinstance(raw, DatasetDict):
        raise ValueError(f"{where}: not a dataset with splits (train, validation, ...)")
    for split, ds in raw.items():
        _check_utf8(ds, f"{where}, {split} split")
    return raw


def check_fields(path: Path, where: str, delimiter: str = ",", quoting: int = csv.QUOTE_MINIMAL) -> None:
    """Every row of a CSV/TSV has as many fields as its header, else ValueError naming the row: pandas would read one
    with a field too many (an unquoted comma in a sentence) by shifting its fields into other columns, csv.DictReader
    would drop the extra field, without a word."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = csv.reader(fh, delimiter=delimiter, quoting=quoting)
            header = next(rows, [])
            for n, row in enumerate(rows, 1):
                if row and len(row) != len(header):
                    fields = f"{len(row)} field" + "s" * (len(row) != 1)
                    raise ValueError(f"{where}: row {n} has {fields}, the header {len(header)} ({', '.join(header)}); "
                                     "quote a text that holds the separator")
    except (UnicodeDecodeError, csv.Error):
        return  # the reader that follows says what is wrong with the file


def _first_invalid_utf8(ds: Dataset) -> tuple[str, int] | None:
    """(column, row) of the first string that is not UTF-8: the JSON reader stores such bytes as they are,
    and they would only fail later, deep in tokenization."""
    table = ds.data.table
    for name, col in zip(table.column_names, table.columns):
        offset = 0
        for chunk in col.chunks:
            try:
                chunk.validate(full=True)
            except pa.ArrowInvalid as e:
                m = re.search(r"string index (\d+)", str(e))
                return name, offset + (int(m.group(1)) if m else 0)
            offset += len(chunk)
    return None


def _find_split_file(data_dir: Path, spec: TaskSpec, split: str) -> Path | None:
    folder, stem = spec.split_location(split)
    own = folder == (spec.data_name or spec.name)  # another config's split (MNLI's ax) is never DIR/test.jsonl
    for d in (data_dir / folder, data_dir / "glue" / folder, *([data_dir] if own else [])):
        for suffix in DATA_SUFFIXES:
            if (d / f"{stem}{suffix}").is_file():
                return d / f"{stem}{suffix}"
    return None


def _load_hub(spec: TaskSpec) -> DatasetDict:
    from bert_dist.weights import hub_reachable

    what = spec.hub_path + (f" ({spec.hub_config})" if spec.hub_config else "")
    hint = (f"pass --data-dir DIR holding {spec.data_name or spec.name}/<split>.jsonl "
            "(or --train-file/--validation-file)")
    if spec.from_flags:
        hint = (f"pass --data-dir DIR holding DIR/{spec.hub_path} (a copy of the dataset repository's files), or "
                "--train-file/--validation-file")
    if not hub_reachable():
        # Without a network, fail in seconds, not after datasets' ~25 s of retries; a cached copy still works.
        import huggingface_hub.constants

        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
        try:
            return datasets.load_dataset(spec.hub_path, spec.hub_config)
        except Exception:
            raise ValueError(f"cannot reach the Hugging Face hub to load {what}, and it is not cached; "
                             f"{hint}") from None
    try:
        return datasets.load_dataset(spec.hub_path, spec.hub_config)
    except Exception as e:
        raise ValueError(f"cannot load {what} from the hub ({str(e).splitlines()[0][:150]}); {hint}") from None


def load_raw(spec: TaskSpec, cfg: DataConfig, need_train: bool = True) -> DatasetDict:
    """The task's splits in the hub's schema: train, eval splits and (where present) test splits.

    Custom files (--train-file/--validation-file) come back as the task's train and first eval split.
    need_train False (--eval-only): no train split, none read.
    """
    wanted = [spec.train_split, *spec.eval_splits] if need_train else list(spec.eval_splits)
    files = source_files(spec, cfg, need_train)
    if files is not None:
        raw = DatasetDict({split: _read_file(f, split, flag, text_columns=spec.text_columns)
                           for split, (flag, f) in files.items()})
    else:
        raw = own.load_named(spec, cfg) if spec.from_flags else _load_hub(spec)
        missing = [s for s in wanted if s not in raw]
        if missing:
            name = cfg.dataset_name if spec.from_flags else spec.hub_path
            raise ValueError(f"{name} has no split {missing[0]}; available: {', '.join(raw)}")
        for split, config, theirs in spec.other_splits:  # optional, as every test split: skipped if unreachable
            try:
                raw[split] = datasets.load_dataset(spec.hub_path, config, split=theirs)
            except Exception as e:
                log.info("no %s split (%s %s): %s", split, spec.hub_path, config, str(e).splitlines()[0][:150])
    out = DatasetDict({k: raw[k] for k in [*wanted, *spec.test_splits] if k in raw})
    # Which file each split came from, so check_raw's messages can name it.
    out.source_files = {split: f"{flag} {f}" for split, (flag, f) in (files or {}).items()}
    return out


def source_files(spec: TaskSpec, cfg: DataConfig, need_train: bool = True) -> dict[str, tuple[str, Path]] | None:
    """{split: (flag, file)} for local data (--train-file/--validation-file or --data-dir), None for the hub.

    need_train False (--eval-only): the train split is neither needed nor listed; --validation-file may come alone.
    Checks only paths (cheap), so the entry point can call it before it creates anything.
    """
    if spec.from_flags:
        own.check_source(spec, cfg)
        if cfg.dataset_name:
            return None
    if cfg.train_file or cfg.validation_file:
        if need_train and not (cfg.train_file and cfg.validation_file):
            raise ValueError("--train-file and --validation-file go together: give both")
        if not cfg.validation_file:
            raise ValueError("--eval-only with custom files: give --validation-file")
        files = {spec.eval_splits[0]: ("--validation-file", Path(cfg.validation_file))}
        if need_train:
            files = {spec.train_split: ("--train-file", Path(cfg.train_file)), **files}
    elif cfg.data_dir:
        data_dir = Path(cfg.data_dir)
        if not data_dir.is_dir():
            raise ValueError(f"--data-dir {data_dir}: no such directory")
        files = {}
        for split in [spec.train_split, *spec.eval_splits, *spec.test_splits]:
            if split == spec.train_split and not need_train:
                continue
            f = _find_split_file(data_dir, spec, split)
            if f is None and split not in spec.test_splits:
                raise ValueError(
                    f"--data-dir {data_dir}: no {split} split for {spec.name} "
                    f"(looked for {spec.data_name or spec.name}/{split}.jsonl|csv|tsv|parquet)"
                )
            if f is not None:
                files[split] = ("--data-dir", f)
    else:
        return None
    for flag, f in files.values():
        check_file(f, flag)
    return files


def check_raw(raw: DatasetDict, spec: TaskSpec, source: str,  # noqa: C901 - one branch per bad-input case, each its line
              labels_from: str = "the training split") -> DatasetDict:
    """Columns present, datasets non-empty, no missing values, labels of the right type and range;
    label names -> ids. Each problem is one ValueError naming the file (or `source`), split and row.

    Test splits may carry -1 (no label), as on the hub. Rows are counted from 1 (a CSV header excluded). An own-data
    task's labels go through `own.encode_labels` (`labels_from`: where its label names came from, for messages).
    """
    files = getattr(raw, "source_files", {})
    for split, ds in raw.items():
        where = f"{files.get(split, source)}: the {split} split of {spec.name}"
        if len(ds) == 0:
            raise ValueError(f"{where} is empty")
        for col in spec.text_columns:
            if col not in ds.column_names:
                raise ValueError(f"{where} has no text column {col!r} (columns: {', '.join(ds.column_names)})"
                                 + ("; give --text-columns" if spec.from_flags else ""))
            if ds.features[col] == datasets.Value("null"):  # JSON Lines whose every value is null
                raise ValueError(f"{where}: the text column {col!r} is empty (no row has a value)")
            if ds.features[col] not in (datasets.Value("string"), datasets.Value("large_string")):
                raise ValueError(f"{where}: column {col!r} holds {ds.features[col]}, not text")
            texts = ds.with_format("arrow")[col]
            nulls = pc.is_null(texts)
            if pc.any(nulls).as_py():
                raise ValueError(f"{where} has no {col!r} text at row {pc.index(nulls, True).as_py() + 1} "
                                 "(a malformed row?)")
            if not pc.any(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0)).as_py():
                raise ValueError(f"{where}: the text column {col!r} is empty (every row is blank); check "
                                 + ("--text-columns" if spec.from_flags else "the file"))
        if spec.kind == "qa":
            ds = raw[split] = _check_answers(ds, where)
            if "id" in ds.column_names and ds.features["id"] != datasets.Value("string"):
                ds = raw[split] = ds.cast_column("id", datasets.Value("string"))  # predictions.json keys are text
            if split != spec.train_split:
                _check_unique_ids(ds, where)
            if spec.metric == "squad":  # v1.1: every question has an answer, to train on and to score against
                empty = next((i for i, a in enumerate(column(ds, "answers")) if not a["text"]), None)
                if empty is not None:
                    raise ValueError(f"{where}: question {column(ds, 'id')[empty]!r} at row {empty + 1} has no "
                                     "answer; SQuAD v1.1 trains and scores every question on one (for unanswerable "
                                     "questions use --task squad_v2)")
            continue
        if spec.kind not in ("classification", "multi_label", "regression"):
            continue
        is_test = split in spec.test_splits
        if spec.from_flags and spec.kind != "regression":
            raw[split] = own.encode_labels(ds, spec, where, is_test, labels_from)
            continue
        if spec.from_flags and is_test and spec.label_column in ds.column_names:
            raw[split] = ds.remove_columns(spec.label_column)  # predicted, not scored: its labels are not checked
            continue
        if spec.label_column not in ds.column_names:
            if is_test:
                raw[split] = ds.add_column(spec.label_column, [-1] * len(ds))
                continue
            raise ValueError(f"{where} has no {spec.label_column!r} column (columns: {', '.join(ds.column_names)})")
        # A column of mixed JSON types (1, "x", true) comes as datasets' Json feature: decode it.
        labels = column(ds, spec.label_column) if isinstance(ds.features[spec.label_column], datasets.Value) \
            else list(ds[spec.label_column])
        missing = next((i for i, v in enumerate(labels) if v is None or (isinstance(v, float) and math.isnan(v))
                        or (isinstance(v, str) and not v.strip())), None)  # "": an empty CSV cell
        if missing is not None:
            raise ValueError(f"{where} has no {spec.label_column!r} at row {missing + 1} (a malformed row?)")
        wrong = next((i for i, v in enumerate(labels) if isinstance(v, bool) or not isinstance(v, (int, float, str))),
                     None)
        if wrong is not None:
            raise ValueError(f"{where}: the label {labels[wrong]!r} at row {wrong + 1} is not a "
                             + ("class id or name" if spec.kind == "classification" else "number"))
        if spec.kind == "regression":
            scores = [_number(v) for v in labels]  # numbers written as text ("3.8", a CSV column) are numbers
            bad = next((i for i, v in enumerate(scores) if v is None or not math.isfinite(v)), None)
            if bad is not None:
                raise ValueError(f"{where} is a regression task: the label {labels[bad]!r} at row {bad + 1} is "
                                 "not a finite number")
            if any(isinstance(v, str) for v in labels):
                raw[split] = ds.remove_columns(spec.label_column).add_column(spec.label_column, scores)
            continue
        if any(isinstance(v, str) for v in labels):
            # Custom files may name the classes; map names (and ids written as text) to ids.
            ids = {n: i for i, n in enumerate(spec.label_names)}
            bad = next((i for i, v in enumerate(labels) if isinstance(v, str) and v not in ids
                        and not v.lstrip("-").isdigit()), None)
            if bad is not None:
                raise ValueError(f"{where}: the label {labels[bad]!r} at row {bad + 1} is not one of "
                                 f"{', '.join(spec.label_names)} (or 0..{spec.num_labels - 1})")
            labels = [ids[v] if v in ids else int(v) for v in labels]
            ds = ds.remove_columns(spec.label_column).add_column(spec.label_column, labels)
            raw[split] = ds
        frac = next((i for i, v in enumerate(labels) if isinstance(v, float) and not v.is_integer()), None)
        if frac is not None:
            raise ValueError(f"{where}: the label {labels[frac]!r} at row {frac + 1} is fractional, not a class "
                             f"id (0..{spec.num_labels - 1})")
        lo = -1 if is_test else 0
        bad = next((i for i, v in enumerate(labels) if not lo <= v < spec.num_labels), None)
        if bad is not None:
            raise ValueError(f"{where}: the label {labels[bad]!r} at row {bad + 1} is outside "
                             f"0..{spec.num_labels - 1} ({spec.num_labels} classes: {', '.join(spec.label_names)})")
        if any(isinstance(v, float) for v in labels):  # 1.0 (a float column, a CSV with a blank cell) is class 1
            raw[split] = raw[split].remove_columns(spec.label_column).add_column(spec.label_column,
                                                                                 [int(v) for v in labels])
    return raw


def _number(v: Any) -> float | None:
    """A regression label as a float: a number, or a number written as text; None otherwise."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return float(v)


def _check_answers(ds: Dataset, where: str) -> Dataset:
    """SQuAD rows: `answers` as the hub has it, {"text": [str], "answer_start": [int]} of one length (empty:
    unanswerable). The official JSON's per-question form, a list of {"text", "answer_start"}, is converted."""
    if "answers" not in ds.column_names:
        raise ValueError(f"{where} has no 'answers' column (columns: {', '.join(ds.column_names)})")
    as_given = isinstance(ds.features["answers"], dict)
    # A file mixing the two forms comes as datasets' Json feature: decode it row by row.
    given = column(ds, "answers") if not isinstance(ds.features["answers"], datasets.Json) else list(ds["answers"])
    answers = given if as_given else [_answers_from_list(row) if isinstance(row, list) else row for row in given]
    for i, a in enumerate(answers):
        ok = isinstance(a, dict) and isinstance(a.get("text"), list) and isinstance(a.get("answer_start"), list) \
            and len(a["text"]) == len(a["answer_start"]) and all(isinstance(t, str) for t in a["text"]) \
            and all(isinstance(n, int) and not isinstance(n, bool) for n in a["answer_start"])
        if not ok:
            shown = repr(given[i])
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise ValueError(f"{where}: the answers at row {i + 1} need a 'text' list of strings and an "
                             f"'answer_start' list of integers, of one length: {shown}")
    return ds if as_given else ds.remove_columns("answers").add_column("answers", answers)


def _check_unique_ids(ds: Dataset, where: str) -> None:
    """Evaluation rows are matched to their predictions (and predictions.json written) by id."""
    if "id" not in ds.column_names:
        raise ValueError(f"{where} has no 'id' column (columns: {', '.join(ds.column_names)}): predictions are "
                         "written by question id")
    first: dict = {}
    for i, q in enumerate(column(ds, "id")):
        if q in first:
            raise ValueError(f"{where}: the id {q!r} is at rows {first[q] + 1} and {i + 1}; predictions are written "
                             "by question id, so ids must be unique")
        first[q] = i


def _answers_from_list(row: list | None) -> dict | None:
    """[{"text": t, "answer_start": n}, ...] -> {"text": [t, ...], "answer_start": [n, ...]}; None if malformed."""
    try:
        return {"text": [a["text"] for a in row], "answer_start": [a["answer_start"] for a in row]}
    except (KeyError, TypeError):
        return None


def describe_source(spec: TaskSpec, cfg: DataConfig) -> str:
    if cfg.train_file:
        return f"--train-file {cfg.train_file}"
    if spec.from_flags and cfg.dataset_name:
        return f"--dataset-name {cfg.dataset_name}" + (f" --dataset-config {cfg.dataset_config}"
                                                       if cfg.dataset_config else "")
    return f"--data-dir {cfg.data_dir}" if cfg.data_dir else spec.hub_path


def column(ds: Dataset, name: str) -> list:
    """A whole column as a Python list, straight from Arrow (`ds[name]` decodes row by row: 100x slower)."""
    return ds.with_format("arrow")[name].to_pylist()


# ---------------------------------------------------------------------------------------------
# Tokenization


def _encode_batch(batch: dict[str, list], tokenizer: Tokenizer, text_columns: tuple[str, ...],
                  label_column: str) -> dict[str, list]:
    texts = [[t if t is not None else "" for t in batch[c]] for c in text_columns]
    inputs = texts[0] if len(texts) == 1 else list(zip(*texts))
    encodings = tokenizer.encode_batch(inputs)
    out = {
        "input_ids": [e.ids for e in encodings],
        "token_type_ids": [e.type_ids for e in encodings],
        "length": [len(e.ids) for e in encodings],
    }
    if label_column in batch:
        out["labels"] = batch[label_column]
    return out


def tokenize_classification(raw: DatasetDict, spec: TaskSpec, tokenizer: Tokenizer, max_length: int,
                            num_proc: int | None = None) -> DatasetDict:
    """Rows -> {input_ids, token_type_ids, length, labels}; pairs truncated longest-first to `max_length`.

    Run under `accelerator.main_process_first()` so the other processes read the cache it writes.
    """
    tok = Tokenizer.from_str(tokenizer.to_str())  # a copy: truncation is this call's business
    tok.enable_truncation(max_length, strategy="longest_first")
    kw = {"tokenizer": tok, "text_columns": spec.text_columns, "label_column": spec.label_column}
    # Each split drops its own columns: a validation file need not carry the training file's extra ones.
    return DatasetDict({split: ds.map(_encode_batch, batched=True, batch_size=1000, fn_kwargs=kw,
                                      remove_columns=ds.column_names, num_proc=num_proc, desc="tokenizing")
                        for split, ds in raw.items()})


def predictions_of(spec: TaskSpec, logits: np.ndarray) -> np.ndarray:
    """A sequence head's logits -> its predictions: (N,) scores for regression, (N,) class ids, or (N, C) 0/1 for
    multi_label (a label is on where its sigmoid passes 0.5: its logit is positive)."""
    if spec.kind == "regression":
        return logits
    return (logits > 0).astype(np.int64) if spec.kind == "multi_label" else logits.argmax(-1)


def prediction_rows(spec: TaskSpec, logits: np.ndarray) -> list[dict[str, Any]]:
    """One dict per row, as predictions_<split>.jsonl and `bert-dist predict` write them: {"prediction": class id,
    "label": name, "probabilities": softmax}; multi_label {"prediction": [ids], "label": [names], "probabilities":
    each label's sigmoid}; regression {"prediction": score}."""
    preds = predictions_of(spec, logits).tolist()
    if spec.kind == "regression":
        return [{"prediction": p} for p in preds]
    rows = []
    for p, lg in zip(preds, logits):
        if spec.kind == "multi_label":
            on = [i for i, x in enumerate(p) if x]
            probs = 1 / (1 + np.exp(-lg))
            rows.append({"prediction": on, "label": [spec.label_names[i] for i in on]})
        else:
            e = np.exp(lg - lg.max())
            probs = e / e.sum()
            rows.append({"prediction": p, "label": spec.label_names[p]})
        rows[-1]["probabilities"] = [round(float(x), 6) for x in probs]
    return rows


def task_texts(raw: DatasetDict, spec: TaskSpec, split: str | None = None):
    """Every text of the training split (for training a tokenizer with --init scratch)."""
    ds = raw[split or spec.train_split]
    for col in spec.text_columns:
        for t in column(ds, col):
            if t:
                yield t


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Loaders


def train_loader(ds: Dataset, cfg: DataConfig, collator: Any, seed: int) -> tuple[Any, Any]:
    """A shuffled loader whose order depends only on (seed, epoch); returns (loader, sampler).

    Call `sampler.set_epoch(e)` before each epoch (accelerate shards the batches across processes). Batches are
    pinned where CUDA is: the Accelerator copies them to the GPU with non_blocking (run.main), so the copy does not
    wait for the GPU to finish the step before it (an unpinned copy synchronises the host with the device).
    """
    import torch
    from torch.utils.data import DataLoader

    from bert_dist.data.collate import BatchSampler

    # A numpy copy of the Arrow column (torch wants it writable), not a list: 10 million lengths as Python ints took
    # seconds to make a tensor of.
    lengths = ds.with_format("arrow")["length"].to_numpy().copy() if cfg.group_by_length else None
    sampler = BatchSampler(len(ds), cfg.batch_size, shuffle=True, seed=seed, lengths=lengths,
                           group_by_length=cfg.group_by_length)
    # A generator of its own: otherwise each pass over the loader draws its workers' base seed from the
    # global RNG, which dropout also draws from, and a resumed run would draw it at another point.
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collator, generator=torch.Generator().manual_seed(seed),
                        **loader_workers(cfg.num_workers))
    return loader, sampler


def eval_loader(ds: Dataset, cfg: DataConfig, collator: Any) -> Any:
    """Dataset order, so gathered outputs line up with the rows (the last batch may be short)."""
    import torch
    from torch.utils.data import DataLoader

    # Its own generator, as for training: evaluating never moves the global RNG (so --eval-every does not
    # change the training run's dropout).
    return DataLoader(ds, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collator,
                      generator=torch.Generator().manual_seed(0), **loader_workers(cfg.num_workers))


def loader_workers(num_workers: int | None) -> dict[str, Any]:
    """DataLoader arguments for --num-workers: as given, or by default (None) workers where they pay: with CUDA,
    reading rows, collating and pinning then overlap the GPU's step (up to 4 per process, a core left to the process
    itself); on the CPU they would take cores from the step, so none. Workers persist across epochs and evaluations
    (no new processes each time), live through a SIGTERM (`sigterm_proof_workers`), and change nothing in the data:
    batches are made by index (the sampler) and masks by example (the collator), both functions of the seed."""
    import torch

    cuda = torch.cuda.is_available()
    if num_workers is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        num_workers = min(4, cpu_count() // max(1, local) - 1) if cuda else 0
    num_workers = max(0, num_workers)
    return {"num_workers": num_workers, "pin_memory": cuda, "persistent_workers": num_workers > 0,
            **sigterm_proof_workers(num_workers)}


def sigterm_proof_workers(num_workers: int) -> dict[str, Any]:
    """DataLoader arguments for worker processes that live through a SIGTERM to the whole process group (SLURM signals
    every process of the job): the main process stops at the step's end and saves, then shuts its workers down.

    torch's workers die of a SIGTERM from anyone but their parent, and the main process then fails mid-step
    ("DataLoader worker ... killed by signal"). On Linux a worker is forked with SIGTERM blocked, so there is no
    window before its init function runs; the init function ignores it (elsewhere, that alone)."""
    if num_workers == 0:
        return {}
    kwargs: dict[str, Any] = {"worker_init_fn": _ignore_sigterm}
    if sys.platform == "linux":  # fork: torch's own default there
        kwargs["multiprocessing_context"] = _SigtermBlockedForkContext()
    return kwargs


def _ignore_sigterm(worker_id: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # also discards one that arrived while it was blocked


if sys.platform == "linux":

    class _SigtermBlockedForkProcess(multiprocessing.context.ForkProcess):
        def start(self) -> None:
            # Blocked in this thread for the fork only: a SIGTERM meanwhile goes to another thread, or waits.
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            try:
                super().start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    class _SigtermBlockedForkContext(multiprocessing.context.ForkContext):
        """The fork start method, its children born with SIGTERM blocked."""

        Process = _SigtermBlockedForkProcess

"""Tasks on one's own data, built from flags: a `TaskSpec` like GLUE's, whose columns come from the command line and
whose label names come from the training split.

    --task classification   one label per row: class names (text) or numbers, inferred from the training split
    --task multi_label      a list of labels per row (JSON Lines: ["a", "b"]; CSV/TSV: a JSON list in the cell)
    --task regression       a number per row

The rows come from --train-file/--validation-file (.csv, .tsv, .jsonl, .parquet) or --dataset-name (a hub id, a
directory in the hub's layout, or with --data-dir DIR the folder DIR/<name>, read offline). Label names are sorted
(numerically where they are numbers), so a run's ids are a function of its training data alone; they go to the
model's config.json (id2label/label2id on export). After `settle_labels` the task runs the GLUE path: one check
(`data.check_raw`, which calls `encode_labels` here), one tokenization, one head.
"""

from __future__ import annotations

import ast
import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict

from bert_dist.config import OWN_TASKS, DataConfig, TaskSpec

log = logging.getLogger(__name__)

MAIN_METRICS = {"classification": "accuracy", "multi_label": "micro_f1", "regression": "pearson"}
"""What picks the best run (--seeds/--lrs) and heads the tables, by kind."""
SHOWN_NAMES = 8
"""Label names listed in a message (a task may have hundreds)."""


def task_from_flags(task: str, cfg: DataConfig) -> TaskSpec:
    """The TaskSpec of --task classification | multi_label | regression, from --text-columns, --label-column and
    --dataset-name/--dataset-config; its label names are settled once the training split is read (`settle_labels`)."""
    if task not in OWN_TASKS:
        raise ValueError(f"--task {task} is not a task on own data ({', '.join(OWN_TASKS)})")
    text = tuple(c.strip() for c in cfg.text_columns.split(",")) if cfg.text_columns else ("text",)
    return TaskSpec(name=task, kind=task, hub_path=cfg.dataset_name or "", hub_config=cfg.dataset_config,
                    text_columns=text, label_column=(cfg.label_column or "label").strip(), metric="classification",
                    metric_config=task, main_metric=MAIN_METRICS[task], test_splits=("test",), from_flags=True)


def check_source(spec: TaskSpec, cfg: DataConfig) -> None:
    """Where the own data comes from, checked before anything is made: files (checked by the caller), or a named
    dataset (a directory that must exist; a hub id is looked up when loaded)."""
    if cfg.train_file or cfg.validation_file:
        return
    if not cfg.dataset_name:
        raise ValueError(f"--task {spec.name} trains on your own data: give --train-file and --validation-file "
                         "(.csv, .tsv, .jsonl, .parquet), or --dataset-name (a hub dataset, or a directory in its "
                         "layout)")
    if cfg.data_dir:
        _named_folder(cfg)
    elif _is_path(cfg.dataset_name) and not Path(cfg.dataset_name).expanduser().is_dir():
        raise ValueError(f"--dataset-name {cfg.dataset_name}: no such directory (give a hub dataset id, or a "
                         "directory in the hub's layout)")


def _is_path(name: str) -> bool:
    """A --dataset-name that names a directory rather than a hub id (as datasets decides: a directory there wins)."""
    return Path(name).expanduser().is_dir() or name.startswith((".", "/", "~")) or name.count("/") > 1


def _named_folder(cfg: DataConfig) -> Path:
    """--data-dir DIR --dataset-name org/name: DIR/org/name, else DIR/name (ValueError naming both)."""
    base, name = Path(cfg.data_dir), cfg.dataset_name
    if not base.is_dir():
        raise ValueError(f"--data-dir {base}: no such directory")
    tried = [base / name, base / name.rsplit("/", 1)[-1]]
    found = next((d for d in tried if d.is_dir()), None)
    if found is None:
        raise ValueError(f"--data-dir {base}: no folder for --dataset-name {name} (looked for "
                         f"{' and '.join(str(t) for t in dict.fromkeys(tried))}: the dataset repository's files)")
    return found


def load_named(spec: TaskSpec, cfg: DataConfig) -> DatasetDict:
    """--dataset-name's splits: DIR/<name> with --data-dir, a local directory in the hub's layout, else the hub
    (offline: its cache, or one line within seconds). A dataset with a test split and no validation split is
    evaluated on its test split (said in a warning)."""
    from bert_dist import data as D

    if cfg.data_dir or _is_path(cfg.dataset_name):
        folder = _named_folder(cfg) if cfg.data_dir else Path(cfg.dataset_name).expanduser()
        where = f"--dataset-name {cfg.dataset_name}" + (f" ({folder})" if cfg.data_dir else "")
        if cfg.dataset_config:
            where += f" --dataset-config {cfg.dataset_config}"
        raw = D.load_folder(folder, cfg.dataset_config, where)
    else:
        raw = D._load_hub(spec)
    if spec.eval_splits[0] not in raw and "test" in raw and spec.train_split in raw:
        log.warning("%s has no %s split: evaluating on its test split (splits: %s)", cfg.dataset_name,
                    spec.eval_splits[0], ", ".join(raw))
        raw = DatasetDict({("validation" if k == "test" else k): v for k, v in raw.items()})
    return raw


# ---------------------------------------------------------------------------------------------
# Labels


def settle_labels(raw: DatasetDict, spec: TaskSpec, where: str, known: tuple[str, ...] = ()) -> TaskSpec:
    """`spec` with its label names: the training split's (sorted; a hub ClassLabel's own order), or `known` (the
    model's, for --eval-only). Regression and GLUE tasks come back as they are."""
    if not spec.from_flags or spec.kind == "regression" or spec.label_names:
        return spec
    if known:
        return replace(spec, label_names=tuple(known))
    ds = raw[spec.train_split]
    _check_label_column(ds, spec, where)
    feature = ds.features[spec.label_column]
    inner = getattr(feature, "feature", None)
    if isinstance(feature, datasets.ClassLabel) or isinstance(inner, datasets.ClassLabel):
        names = tuple((feature if isinstance(feature, datasets.ClassLabel) else inner).names)
    else:
        rows = _label_rows(ds, spec, where)
        values = sorted({v for row in rows for v in row}, key=_sort_key)
        names = tuple(values)
    if spec.kind == "classification" and len(names) < 2:
        raise ValueError(f"{where}: every row of the training split has the label {names[0]!r}; a classifier needs "
                         "at least 2 classes (check --label-column)")
    if not names:
        raise ValueError(f"{where}: no row of the training split has a label (every {spec.label_column!r} list is "
                         "empty); a multi-label task learns from rows that have some")
    if len(names) > 100 and len(names) > len(ds) // 2:
        log.warning("%s: %d distinct labels in %d training rows: is --label-column %s the label?", where, len(names),
                    len(ds), spec.label_column)
    log.info("%s: %d labels from the training split: %s", spec.name, len(names), _shown(names))
    return replace(spec, label_names=names)


def encode_labels(ds: Dataset, spec: TaskSpec, where: str, is_test: bool,
                  labels_from: str = "the training split") -> Dataset:
    """The label column as ids of `spec.label_names` (classification), or 0/1 rows with a column per label
    (multi_label). A test split's labels are dropped (it is predicted, not scored); ValueError naming the row for a
    label that `labels_from` (where the names came from) never had, a missing one, or one of the wrong type."""
    col = spec.label_column
    if is_test:
        return ds.remove_columns(col) if col in ds.column_names else ds
    _check_label_column(ds, spec, where)
    ids = {n: i for i, n in enumerate(spec.label_names)}
    rows = _label_rows(ds, spec, where)
    encoded: list[Any] = []
    for r, names in enumerate(rows):
        unknown = next((n for n in names if n not in ids), None)
        if unknown is not None:
            raise ValueError(f"{where}: the label {unknown!r} at row {r + 1} is not among the {len(ids)} labels of "
                             f"{labels_from} ({_shown(spec.label_names)}); a class never trained on cannot be "
                             "predicted: add training rows of it, or drop these rows")
        if spec.kind == "multi_label":
            hot = [0] * len(ids)
            for n in names:
                hot[ids[n]] = 1
            encoded.append(hot)
        else:
            encoded.append(ids[names[0]])
    return ds.remove_columns(col).add_column(col, encoded)


def _check_label_column(ds: Dataset, spec: TaskSpec, where: str) -> None:
    col = spec.label_column
    if col not in ds.column_names:
        raise ValueError(f"{where} has no label column {col!r} (columns: {', '.join(ds.column_names)}); give "
                         "--label-column")


def _label_rows(ds: Dataset, spec: TaskSpec, where: str) -> list[tuple[str, ...]]:
    """Each row's label(s) as names: one for classification, a tuple of any length for multi_label. A number is named
    by its value ("5"); ValueError naming the row for a missing label, a fractional class, a multi-label cell that is
    no list, or a column that mixes numbers and names."""
    col, feature = spec.label_column, ds.features[spec.label_column]
    inner = getattr(feature, "feature", None)
    values = list(ds[col]) if isinstance(feature, datasets.Json) else ds.with_format("arrow")[col].to_pylist()
    if all(_missing(v) for v in values):
        raise ValueError(f"{where}: the label column {col!r} is empty (no row has a value); check --label-column")
    class_names = feature.names if isinstance(feature, datasets.ClassLabel) else \
        inner.names if isinstance(inner, datasets.ClassLabel) else None
    rows: list[tuple[str, ...]] = []
    first: dict[bool, tuple[int, Any]] = {}  # is a number -> (row, value) of the first label of that kind
    for r, v in enumerate(values):
        if _missing(v):
            raise ValueError(f"{where} has no {col!r} at row {r + 1}" + (" (an empty list [] says: no label)"
                                                                         if spec.kind == "multi_label" else ""))
        if spec.kind == "multi_label":
            items = _as_list(v)
            if items is None:
                raise ValueError(f"{where}: the labels at row {r + 1} are {_short(v)}, not a list; a multi-label row "
                                 'holds a list of labels (JSON Lines: ["a", "b"]; CSV/TSV: a JSON list in the cell)')
        elif isinstance(v, (list, tuple)):
            raise ValueError(f"{where}: the label at row {r + 1} is a list ({_short(v)}); for rows with several labels "
                             "use --task multi_label")
        else:
            items = [v]
        names = []
        for item in items:
            if class_names is not None and isinstance(item, int) and not isinstance(item, bool):
                if not 0 <= item < len(class_names):
                    raise ValueError(f"{where}: the label {item} at row {r + 1} is outside the dataset's "
                                     f"{len(class_names)} classes")
                names.append(class_names[item])
                continue
            name, number = _name(item)
            if name is None:
                raise ValueError(f"{where}: the label {_short(item)} at row {r + 1} is "
                                 + ("fractional: a class is a name or a whole number (for scores use --task "
                                    "regression)" if number else "not a class name or number"))
            first.setdefault(number, (r, item))
            names.append(name)
        rows.append(tuple(dict.fromkeys(names)))
    if len(first) == 2:
        (rn, vn), (rt, vt) = first[True], first[False]
        raise ValueError(f"{where}: the label column {col!r} mixes numbers ({vn!r} at row {rn + 1}) and names "
                         f"({vt!r} at row {rt + 1}); give each class one kind of label (all names, or all numbers)")
    return rows


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _name(v: Any) -> tuple[str | None, bool]:
    """(the class name of a label value, whether it is a number): 5, 5.0 and "5" are "5"; 2.5 is (None, True) (no
    class); a bool is a name ("True"); anything but text or a number (None, False)."""
    if isinstance(v, bool):
        return str(v), False
    if isinstance(v, int):
        return str(v), True
    if isinstance(v, float):
        return (str(int(v)), True) if v.is_integer() else (None, True)
    if isinstance(v, str):
        try:
            number = float(v)
        except ValueError:
            return v, False
        return v, math.isfinite(number)
    return None, False


def _as_list(v: Any) -> list | None:
    """A multi-label cell as a list: a list, or text holding one (JSON, or Python's repr, as pandas writes lists)."""
    if isinstance(v, (list, tuple)):
        return list(v)
    if isinstance(v, str) and v.strip().startswith("["):
        for parse in (json.loads, ast.literal_eval):  # literal_eval evaluates literals only, never code
            try:
                parsed = parse(v)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                continue
            if isinstance(parsed, list):
                return parsed
    return None


def _sort_key(name: str) -> tuple:
    """Numbers by value (2 before 10), then names alphabetically: the label ids' order."""
    try:
        number = float(name)
    except ValueError:
        return (1, 0.0, name)
    return (0, number, name) if math.isfinite(number) else (1, 0.0, name)


def _shown(names: tuple[str, ...]) -> str:
    head = ", ".join(names[:SHOWN_NAMES])
    return head + (f", ... ({len(names) - SHOWN_NAMES} more)" if len(names) > SHOWN_NAMES else "")


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."

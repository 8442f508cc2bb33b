"""Tasks, dataset loading (hub, --data-dir, or custom files), checks, tokenization and dataloaders.

Every task goes through the same path: rows in the hub's schema -> checked -> tokenized once with
`datasets.map` (batched, cached) -> a DataLoader that pads per batch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer

from bert_dist.config import DataConfig, TaskSpec
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
        raise ValueError(f"--task: unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


# ---------------------------------------------------------------------------------------------
# Loading


def _read_file(path: Path, split: str) -> Dataset:
    kind = DATA_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .csv, .tsv or .parquet")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    kw: dict[str, Any] = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        return datasets.load_dataset(kind, data_files={split: str(path)}, split=split, **kw)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-encode it as UTF-8") from None
    except Exception as e:  # pyarrow/pandas parse errors have many types; all mean a bad file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        cause = e.__cause__ or e.__context__
        if isinstance(cause, UnicodeDecodeError) or "utf-8" in msg.lower() or "utf8" in msg.lower():
            raise ValueError(f"{path}: not UTF-8 text; re-encode it as UTF-8") from None
        raise ValueError(f"{path}: cannot be read as {kind}: {msg[:200]}") from None


def _find_split_file(data_dir: Path, spec: TaskSpec, split: str) -> Path | None:
    folder = spec.data_name or spec.name
    for d in (data_dir / folder, data_dir / "glue" / folder, data_dir):
        for suffix in DATA_SUFFIXES:
            if (d / f"{split}{suffix}").is_file():
                return d / f"{split}{suffix}"
    return None


def _load_hub(spec: TaskSpec) -> DatasetDict:
    from bert_dist.checkpoint import hub_reachable

    what = spec.hub_path + (f" ({spec.hub_config})" if spec.hub_config else "")
    hint = f"pass --data-dir DIR holding {spec.data_name or spec.name}/<split>.jsonl (or --train-file/--validation-file)"
    if not hub_reachable():
        # Without a network, fail in seconds, not after datasets' ~25 s of retries; a cached copy still works.
        import huggingface_hub.constants

        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
        try:
            return datasets.load_dataset(spec.hub_path, spec.hub_config)
        except Exception:
            raise ValueError(f"cannot reach the Hugging Face hub to load {what}, and it is not cached; {hint}") from None
    try:
        return datasets.load_dataset(spec.hub_path, spec.hub_config)
    except Exception as e:
        raise ValueError(f"cannot load {what} from the hub ({str(e).splitlines()[0][:150]}); {hint}") from None


def load_raw(spec: TaskSpec, cfg: DataConfig) -> DatasetDict:
    """The task's splits in the hub's schema: train, eval splits and (where present) test splits.

    Custom files (--train-file/--validation-file) come back as the task's train and first eval split.
    """
    wanted = [spec.train_split, *spec.eval_splits]
    if cfg.train_file or cfg.validation_file:
        if not (cfg.train_file and cfg.validation_file):
            raise ValueError("--train-file and --validation-file go together: give both")
        raw = DatasetDict({spec.train_split: _read_file(Path(cfg.train_file), "train"),
                           spec.eval_splits[0]: _read_file(Path(cfg.validation_file), "validation")})
    elif cfg.data_dir:
        data_dir = Path(cfg.data_dir)
        if not data_dir.is_dir():
            raise ValueError(f"--data-dir: {data_dir} is not a directory")
        raw = DatasetDict()
        for split in wanted + list(spec.test_splits):
            f = _find_split_file(data_dir, spec, split)
            if f is None and split in wanted:
                raise ValueError(
                    f"--data-dir: no {split} split for {spec.name} under {data_dir} "
                    f"(looked for {spec.data_name or spec.name}/{split}.jsonl|csv|tsv|parquet)"
                )
            if f is not None:
                raw[split] = _read_file(f, split)
    else:
        raw = _load_hub(spec)
        missing = [s for s in wanted if s not in raw]
        if missing:
            raise ValueError(f"{spec.hub_path} has no split {missing[0]}; available: {', '.join(raw)}")
    return DatasetDict({k: raw[k] for k in [*wanted, *spec.test_splits] if k in raw})


def check_raw(raw: DatasetDict, spec: TaskSpec, source: str) -> DatasetDict:
    """Columns present, datasets non-empty, labels of the right type and range; label names -> ids.

    Test splits may carry -1 (no label), as on the hub.
    """
    for split, ds in raw.items():
        if len(ds) == 0:
            raise ValueError(f"{source}: the {split} split of {spec.name} is empty")
        for col in spec.text_columns:
            if col not in ds.column_names:
                raise ValueError(f"{source}: the {split} split of {spec.name} has no text column {col!r} "
                                 f"(columns: {', '.join(ds.column_names)})")
        if spec.kind not in ("classification", "regression"):
            continue
        is_test = split in spec.test_splits
        if spec.label_column not in ds.column_names:
            if is_test:
                raw[split] = ds.add_column(spec.label_column, [-1] * len(ds))
                continue
            raise ValueError(f"{source}: the {split} split of {spec.name} has no {spec.label_column!r} column")
        labels = column(ds, spec.label_column)
        if spec.kind == "classification" and any(isinstance(v, str) for v in labels):
            # Custom files may name the classes; map names to ids.
            ids = {n: i for i, n in enumerate(spec.label_names)}
            bad = next((v for v in labels if v not in ids and not str(v).lstrip("-").isdigit()), None)
            if bad is not None:
                raise ValueError(f"{source}: {split} label {bad!r} of {spec.name} is not one of "
                                 f"{', '.join(spec.label_names)} (or 0..{spec.num_labels - 1})")
            labels = [ids[v] if v in ids else int(v) for v in labels]
            ds = ds.remove_columns(spec.label_column).add_column(spec.label_column, labels)
            raw[split] = ds
        if any(v is None for v in labels):
            raise ValueError(f"{source}: the {split} split of {spec.name} has rows without a label")
        if spec.kind == "classification":
            if any(isinstance(v, float) and not float(v).is_integer() for v in labels):
                raise ValueError(f"{source}: {spec.name} labels must be class ids, found a fractional label")
            lo, hi = min(labels), max(labels)
            if hi >= spec.num_labels or lo < (-1 if is_test else 0):
                raise ValueError(f"{source}: {split} labels of {spec.name} run {lo}..{hi}, outside "
                                 f"0..{spec.num_labels - 1}")
        elif any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in labels):
            raise ValueError(f"{source}: {spec.name} is a regression task: labels must be numbers")
    return raw


def describe_source(spec: TaskSpec, cfg: DataConfig) -> str:
    if cfg.train_file:
        return f"--train-file {cfg.train_file}"
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
    return raw.map(
        _encode_batch,
        batched=True,
        batch_size=1000,
        fn_kwargs={"tokenizer": tok, "text_columns": spec.text_columns, "label_column": spec.label_column},
        remove_columns=raw[next(iter(raw))].column_names,
        num_proc=num_proc,
        desc="tokenizing",
    )


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

    Call `sampler.set_epoch(e)` before each epoch (accelerate shards the batches across processes).
    """
    from torch.utils.data import DataLoader

    from bert_dist.data.collate import BatchSampler

    lengths = column(ds, "length") if cfg.group_by_length else None
    sampler = BatchSampler(len(ds), cfg.batch_size, shuffle=True, seed=seed, lengths=lengths,
                           group_by_length=cfg.group_by_length)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collator, num_workers=cfg.num_workers)
    return loader, sampler


def eval_loader(ds: Dataset, cfg: DataConfig, collator: Any) -> Any:
    """Dataset order, so gathered outputs line up with the rows (the last batch may be short)."""
    from torch.utils.data import DataLoader

    return DataLoader(ds, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collator,
                      num_workers=cfg.num_workers)

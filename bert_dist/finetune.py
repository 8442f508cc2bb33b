"""The fine-tuning recipe: a TaskSpec -> tokenizer + features -> model with a head -> train() -> outputs.

`run_finetune` is the one recipe for every task: resolve the model and tokenizer, load and check the
rows, build features, load weights into a head, prepare, train, evaluate, save. What depends on the
kind of task is five small steps, picked from `KINDS` by `spec.kind`:

    features   rows of every split -> model inputs, training targets, and what `predict` needs
    head       the model: sequence classification/regression, or span extraction (SQuAD)
    predict    gathered model outputs of one split -> predictions (classes/scores, or answer texts)
    score      predictions -> metrics (the GLUE metric, or the official SQuAD v1.1/v2.0 scoring)
    write      predictions -> files (predictions_<split>.jsonl + GLUE TSVs, or the SQuAD JSON files)

GLUE tasks differ only in their TaskSpec data, and so do tasks on one's own data (a TaskSpec built from flags,
whose label names come from its training split); SQuAD v1.1 and v2.0 differ only in `spec.metric`.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer
from torch import nn

from bert_dist import data as D
from bert_dist.config import BertConfig, DataConfig, RunConfig, TaskSpec, check_model_fits, preset
from bert_dist.data.collate import PadCollator, pad_multiple
from bert_dist.data.squad import (
    answer_alignment,
    postprocess_predictions,
    prepare_eval_features,
    prepare_train_features,
    write_predictions,
)
from bert_dist.distributed import gather_state_dict, main_process_first, share_from_main
from bert_dist.metrics import load_metric
from bert_dist.model import BertForQuestionAnswering, BertForSequenceClassification, count_params
from bert_dist.perf import mfu
from bert_dist.tokenizer import save_tokenizer, train_shared_tokenizer
from bert_dist.train import evaluate, prepare_training
from bert_dist.weights import InitSource, load_init, load_weights, save_run_model

log = logging.getLogger(__name__)

INPUT_COLUMNS = ["input_ids", "token_type_ids"]
"""The only feature columns evaluation loaders read: offsets and ids stay out of the batches."""


@dataclass
class Split:
    """One split as the kind-specific steps see it."""

    name: str
    rows: Dataset
    """N rows in the hub's schema."""
    feats: Dataset
    """M features, in the order of their rows (M == N for GLUE; M >= N context windows for SQuAD)."""


@dataclass(frozen=True)
class Kind:
    """The steps of the recipe that depend on the kind of task; everything else is shared."""

    features: Callable[[DatasetDict, TaskSpec, Tokenizer, int, DataConfig], DatasetDict]
    """(rows, spec, tokenizer, max_length, data config) -> features of every split."""
    head: Callable[[BertConfig, TaskSpec], nn.Module]
    targets: tuple[str, ...]
    """Feature columns the training collator passes to the head's loss."""
    outputs: tuple[str, ...]
    """Model outputs gathered in evaluation, one row per feature."""
    predict: Callable[[TaskSpec, DataConfig, Split, dict[str, np.ndarray]], dict[str, Any]]
    score: Callable[[TaskSpec, DataConfig, Any, Split, dict[str, Any]], dict[str, float]]
    """(spec, data config, metric, split, predictions) -> metrics; called for evaluation splits only."""
    write: Callable[[Path, TaskSpec, Split, dict[str, Any]], None]


# ---------------------------------------------------------------------------------------------
# The shared recipe


def resolve_model(
    cfg: RunConfig, src: InitSource, texts: Any, accelerator: Accelerator, out_dir: Path
) -> tuple[BertConfig, Any]:
    """The architecture and tokenizer for this run: from --init, or a preset plus a trained tokenizer."""
    tokenizer = src.tokenizer
    if tokenizer is None:  # trained on the task's training text
        tokenizer = train_shared_tokenizer(texts, accelerator.is_main_process, share_from_main, cfg.data.vocab_size,
                                           cfg.data.lowercase)
    if src.config is not None:
        return src.config, tokenizer
    bert = preset(cfg.preset, vocab_size=tokenizer.get_vocab_size(), pad_token_id=tokenizer.token_to_id("[PAD]"))
    return bert, tokenizer


def check_max_length(cfg: RunConfig, spec: TaskSpec, bert: BertConfig) -> int:
    """The run's max length (--max-length, else the task's), once the model is known to take it."""
    max_length = cfg.data.max_length or spec.max_length
    check_model_fits(bert, spec, max_length)
    return max_length


def cap_splits(raw: DatasetDict, spec: TaskSpec, data: DataConfig) -> None:
    """--max-train-samples / --max-eval-samples: each split cut to its first rows, in place; a regression dev split
    of fewer than 2 rows refused before training (its correlations need 2)."""
    if data.max_train_samples and spec.train_split in raw:
        raw[spec.train_split] = raw[spec.train_split].select(
            range(min(data.max_train_samples, len(raw[spec.train_split])))
        )
    if data.max_eval_samples:
        for s in [*spec.eval_splits, *spec.test_splits]:
            if s in raw:
                if s in spec.test_splits and len(raw[s]) > data.max_eval_samples:
                    n = data.max_eval_samples
                    log.warning("--max-eval-samples %d: the %s predictions cover %d of its %d rows (not a full "
                                "submission file)", n, s, n, len(raw[s]))
                raw[s] = raw[s].select(range(min(data.max_eval_samples, len(raw[s]))))
    if spec.kind == "regression":  # scipy refuses a correlation of one pair, after the whole training
        for s in spec.eval_splits:
            if s in raw and len(raw[s]) < 2:
                raise ValueError(f"{spec.name}: the {s} split has {len(raw[s])} row(s) and its Pearson/Spearman "
                                 "correlations need at least 2 (raise --max-eval-samples, or add rows to the file)")


def run_finetune(cfg: RunConfig, accelerator: Accelerator, out_dir: Path) -> dict[str, Any]:
    spec = D.task_spec(cfg)
    if spec.kind not in KINDS:
        raise ValueError(f"--task {spec.name}: the fine-tuning recipe has no {spec.kind!r} tasks")
    kind = KINDS[spec.kind]
    source = D.describe_source(spec, cfg.data)
    src = load_init(cfg.init, cfg.tokenizer)
    known, labels_from = own_labels(spec, src, cfg)
    with main_process_first(accelerator):
        raw = D.load_raw(spec, cfg.data, need_train=not cfg.train.eval_only)
        spec = D.own.settle_labels(raw, spec, source, known)
        raw = D.check_raw(raw, spec, source, labels_from)
    cap_splits(raw, spec, cfg.data)
    bert, tokenizer = resolve_model(cfg, src, lambda: D.task_texts(raw, spec), accelerator, out_dir)
    max_length = check_max_length(cfg, spec, bert)
    with main_process_first(accelerator):  # the main process writes the datasets cache, the others read it
        feats = kind.features(raw, spec, tokenizer, max_length, cfg.data)

    torch.manual_seed(cfg.seed)  # the head's init depends on the seed alone
    model = kind.head(bert, spec)
    if src.state_dict is not None:
        loaded = load_weights(model, src.state_dict, src.name)
        if cfg.train.eval_only and any(not k.startswith("bert.") for k in loaded["new"]):
            log.warning("--eval-only: %s has no trained %s head; these scores are those of a random head "
                        "(--init a run fine-tuned on %s)", src.name, spec.name, spec.name)
    num_params = count_params(model)  # before prepare: under FSDP the module then holds this rank's shards
    log.info(
        "%s: %s parameters, %d train / %s features, max length %d",
        spec.name,
        f"{num_params:,}",
        len(feats[spec.train_split]) if spec.train_split in feats else 0,
        " / ".join(f"{len(feats[s])} {s}" for s in spec.eval_splits if s in feats),
        max_length,
    )

    collator = PadCollator(
        tokenizer.token_to_id("[PAD]"),
        pad_multiple(cfg.data.pad_to_multiple_of, accelerator.mixed_precision),
        scalar_keys=kind.targets,
        max_length=max_length,
    )
    metric = load_metric(spec.metric, spec.metric_config)
    loader, sampler = (D.train_loader(feats[spec.train_split], cfg.data, collator, cfg.seed)
                       if spec.train_split in feats else (None, None))  # --eval-only reads no train split
    splits = {s: Split(s, raw[s], feats[s]) for s in (*spec.eval_splits, *spec.test_splits) if s in feats}
    run = prepare_training(
        cfg,
        accelerator,
        model,
        loader,
        {s: D.eval_loader(feats[s].select_columns(INPUT_COLUMNS), cfg.data, collator) for s in splits},
        out_dir,
    )
    if src.tokenizer is None and accelerator.is_main_process:  # trained here: now that a previous run is gone,
        save_tokenizer(tokenizer, out_dir)  # at once (a resume of --init scratch may read it: rundir.resume_tokenizer)
    eval_splits = [s for s in spec.eval_splits if s in splits]
    latest: dict[str, tuple[int, dict[str, Any]]] = {}  # split -> (step, predictions) of the last evaluation

    def predict(split: str) -> dict[str, Any]:
        outs = evaluate(accelerator, run.model, run.eval_loaders[split], lambda b, o: {k: o[k] for k in kind.outputs})
        return kind.predict(spec, cfg.data, splits[split], outs)

    def eval_fn(step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for split in eval_splits:
            latest[split] = (step, predict(split))
            scores = kind.score(spec, cfg.data, metric, splits[split], latest[split][1])
            prefix = "" if len(eval_splits) == 1 else f"{split}/"
            metrics.update({prefix + k: round(float(v), 6) for k, v in scores.items()})
        return metrics

    meta = {"task": spec.name, "kind": spec.kind, "num_labels": spec.num_labels, "label_names": list(spec.label_names)}
    if spec.from_flags:  # not in the registry: predict and export rebuild the task from this
        meta["spec"] = spec.to_dict()

    def save() -> None:  # on every process (FSDP gathers the weights)
        weights = gather_state_dict(accelerator, run.model)
        if accelerator.is_main_process:
            save_run_model(weights, out_dir, bert, meta, tokenizer)

    results = run.fit(accelerator=accelerator, cfg=cfg, out_dir=out_dir, eval_fn=eval_fn, main_metric=spec.main_metric,
                      on_set_epoch=sampler.set_epoch if sampler else None, save=save, tokenizer=tokenizer)
    if results.get("interrupted"):
        return results

    # train() ends with an evaluation of the final weights: reuse its predictions rather than predict twice, unless
    # the model is an earlier step's (--keep-best).
    model_step = results["best_step"] if cfg.train.keeps_best() and results.get("best_step") is not None \
        else results["steps"]
    for split in splits:
        step, preds = latest.get(split, (-1, None))
        if step != model_step:
            preds = predict(split)
        if accelerator.is_main_process:
            kind.write(out_dir, spec, splits[split], preds)
    results.update(
        task=spec.name,
        init=cfg.init,
        num_params=num_params,
        max_length=max_length,
        main_metric=spec.main_metric,
        mfu=mfu(results.get("tokens_per_second", 0.0), bert, max_length, accelerator.device, accelerator.num_processes),
    )
    return results


def own_labels(spec: TaskSpec, src: InitSource, cfg: RunConfig) -> tuple[tuple[str, ...], str]:
    """(label names, where they come from) for an own-data task: under --eval-only the --init model's (no training
    split is read), else none yet (the training split's, `own.settle_labels`)."""
    if not (spec.from_flags and cfg.train.eval_only) or spec.kind == "regression":
        return (), "the training split"
    if src.meta.get("kind") != spec.kind or not src.meta.get("label_names"):
        raise ValueError(f"--eval-only --task {spec.name}: {cfg.init} is not a fine-tuned {spec.name} model (its "
                         "label names come from its config.json); --init the run that trained it")
    return tuple(src.meta["label_names"]), f"the model {cfg.init}"


# ---------------------------------------------------------------------------------------------
# GLUE and own data: classification, multi-label classification and regression


def classification_head(bert: BertConfig, spec: TaskSpec) -> nn.Module:
    return BertForSequenceClassification(bert, spec.num_labels, regression=spec.kind == "regression",
                                         multi_label=spec.kind == "multi_label")


def classification_predict(spec: TaskSpec, cfg: DataConfig, split: Split, outs: dict[str, np.ndarray]) -> dict:
    """logits (N, C), or (N,) scores for regression -> {"logits", "predictions": (N,) class ids or scores, or (N, C)
    0/1 for multi_label}."""
    logits = outs["logits"]
    return {"logits": logits, "predictions": D.predictions_of(spec, logits)}


def classification_score(spec: TaskSpec, cfg: DataConfig, metric: Any, split: Split, preds: dict) -> dict:
    return metric.compute(predictions=preds["predictions"], references=D.column(split.feats, "labels"))


def classification_write(out_dir: Path, spec: TaskSpec, split: Split, preds: dict) -> None:
    """predictions_<split>.jsonl for every split; <GLUE name>.tsv (the submission format) for test splits."""
    rows, labels = split.rows, preds["predictions"]
    idx = D.column(rows, "idx") if "idx" in rows.column_names else list(range(len(rows)))
    with open(out_dir / f"predictions_{split.name}.jsonl", "w", encoding="utf-8") as fh:
        for i, row in zip(idx, D.prediction_rows(spec, preds["logits"])):
            fh.write(json.dumps({"idx": i, **row}, ensure_ascii=False) + "\n")
    if split.name in spec.test_splits and spec.submission_names:
        name = spec.submission_names[spec.test_splits.index(split.name)]
        with open(out_dir / f"{name}.tsv", "w", newline="") as fh:
            w = csv.writer(fh, delimiter="\t", lineterminator="\n")
            w.writerow(["index", "prediction"])
            for i, p in zip(idx, labels.tolist()):
                if spec.kind == "regression":
                    p = round(min(5.0, max(0.0, float(p))), 3)
                elif spec.submission_label_names:
                    p = spec.label_names[p]
                w.writerow([i, p])


CLASSIFICATION = Kind(
    features=lambda raw, spec, tok, max_length, cfg: D.tokenize_classification(raw, spec, tok, max_length),
    head=classification_head,
    targets=("labels",),
    outputs=("logits",),
    predict=classification_predict,
    score=classification_score,
    write=classification_write,
)


# ---------------------------------------------------------------------------------------------
# SQuAD v1.1 / v2.0: span extraction over context windows


def _is_v2(spec: TaskSpec) -> bool:
    """v2 semantics (unanswerable questions, null odds) go with the v2 metric."""
    return spec.metric == "squad_v2"


def _train_windows(examples: dict[str, list], **kw: Any) -> dict[str, list]:
    out = prepare_train_features(examples, **kw)
    out["length"] = [len(x) for x in out["input_ids"]]  # for --group-by-length
    return out


def qa_features(
    raw: DatasetDict, spec: TaskSpec, tokenizer: Tokenizer, max_length: int, cfg: DataConfig
) -> DatasetDict:
    """Questions -> context windows: training windows with gold positions for the training split,
    windows with example ids and character offsets (for post-processing) for the others.

    Run under `accelerator.main_process_first()` so the other processes read the cache it writes.
    """
    kw = {
        "tokenizer": tokenizer,
        "max_length": max_length,
        "doc_stride": cfg.doc_stride,
        "max_query_length": cfg.max_query_length,
    }
    feats, counts = DatasetDict(), {}
    for name, rows in raw.items():
        train_split = name == spec.train_split
        for col in ("answers",) if train_split else ("id", "answers"):
            if col not in rows.column_names:
                raise ValueError(
                    f"the {name} split of {spec.name} has no {col!r} column (columns: {', '.join(rows.column_names)})"
                )
        counts[name] = answer_alignment(rows)
        feats[name] = rows.map(
            _train_windows if train_split else prepare_eval_features,
            batched=True,
            fn_kwargs=kw,
            remove_columns=rows.column_names,
            desc=f"windowing {name}",
        )
    log.info(
        "%s answers: %s", spec.name, "; ".join(_alignment_line(n, c, n == spec.train_split) for n, c in counts.items())
    )
    return feats


def _alignment_line(split: str, c: Counter, train_split: bool) -> str:
    fate = "dropped" if train_split else "kept, gold span at [CLS]"
    return (
        f"{split} {c['answered'] + c['unanswerable']} questions ({c['unanswerable']} unanswerable), "
        f"{c['relocated']} answer_start off (nearest occurrence used), {c['unfound']} text not in the "
        f"context ({fate})"
    )


def qa_head(bert: BertConfig, spec: TaskSpec) -> nn.Module:
    return BertForQuestionAnswering(bert)


def qa_predict(spec: TaskSpec, cfg: DataConfig, split: Split, outs: dict[str, np.ndarray]) -> dict:
    """start/end logits (M, T) of the split's windows -> {"predictions": {id: text}, "nbest", "null_odds"}."""
    predictions, nbest, null_odds = postprocess_predictions(
        split.rows,
        split.feats,
        outs["start_logits"],
        outs["end_logits"],
        n_best_size=cfg.n_best_size,
        max_answer_length=cfg.max_answer_length,
        version_2=_is_v2(spec),
        null_score_diff_threshold=cfg.null_score_diff_threshold,
    )
    return {"predictions": predictions, "nbest": nbest, "null_odds": null_odds}


def qa_score(spec: TaskSpec, cfg: DataConfig, metric: Any, split: Split, preds: dict) -> dict:
    """The official scoring. v1.1: exact_match, f1. v2.0: exact, f1, HasAns_*, NoAns_*, best_*.

    For v2 the no-answer "probability" is the null odds (null score - best span score), as Google's
    run_squad.py passes null_odds.json to the official script as --na-prob-file; with the threshold at
    --null-score-diff-threshold the official exact/f1 are those of predictions.json, and best_f1_thresh
    is the --null-score-diff-threshold that would have given best_f1.
    """
    ids, answers = D.column(split.rows, "id"), D.column(split.rows, "answers")
    texts = preds["predictions"]
    refs = [{"id": i, "answers": a} for i, a in zip(ids, answers)]
    if not _is_v2(spec):
        return metric.compute(predictions=[{"id": i, "prediction_text": texts[i]} for i in ids], references=refs)
    odds = preds["null_odds"]
    return metric.compute(
        predictions=[{"id": i, "prediction_text": texts[i], "no_answer_probability": odds[i]} for i in ids],
        references=refs,
        no_answer_threshold=cfg.null_score_diff_threshold,
    )


def qa_write(out_dir: Path, spec: TaskSpec, split: Split, preds: dict) -> None:
    """predictions.json (the official scripts' input), nbest_predictions.json, null_odds.json (v2)."""
    folder = out_dir if split.name == spec.eval_splits[0] else out_dir / split.name
    write_predictions(folder, preds["predictions"], preds["nbest"], preds["null_odds"])


QUESTION_ANSWERING = Kind(
    features=qa_features,
    head=qa_head,
    targets=("start_positions", "end_positions"),
    outputs=("start_logits", "end_logits"),
    predict=qa_predict,
    score=qa_score,
    write=qa_write,
)

KINDS: dict[str, Kind] = {"classification": CLASSIFICATION, "multi_label": CLASSIFICATION, "regression": CLASSIFICATION,
                          "qa": QUESTION_ANSWERING}

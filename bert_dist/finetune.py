"""The fine-tuning recipe: a TaskSpec -> tokenizer + features -> model with a head -> train() -> outputs.

One path for every GLUE task (classification or regression, single sentences or pairs); the
task's differences are all data in its TaskSpec.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from bert_dist import data as D
from bert_dist.checkpoint import InitSource, load_init, load_weights, save_run_model
from bert_dist.config import BertConfig, RunConfig, TaskSpec, preset
from bert_dist.data.collate import PadCollator
from bert_dist.metrics import load_metric
from bert_dist.model import BertForSequenceClassification, count_params
from bert_dist.tokenizer import train_tokenizer
from bert_dist.train import evaluate, prepare_training, train

log = logging.getLogger(__name__)


def resolve_model(cfg: RunConfig, src: InitSource, texts: Any, accelerator: Accelerator) -> tuple[BertConfig, Any]:
    """The architecture and tokenizer for this run: from --init, or a preset plus a trained tokenizer."""
    tokenizer = src.tokenizer
    if tokenizer is None:
        log.info("training a WordPiece tokenizer (vocab %d) on the task's training text", cfg.data.vocab_size)
        with accelerator.main_process_first():  # deterministic: every process trains the same one
            tokenizer = train_tokenizer(texts(), vocab_size=cfg.data.vocab_size, lowercase=cfg.data.lowercase)
    if src.config is not None:
        return src.config, tokenizer
    return preset(cfg.preset, vocab_size=tokenizer.get_vocab_size(), pad_token_id=tokenizer.token_to_id("[PAD]")), tokenizer


def check_max_length(cfg: RunConfig, spec: TaskSpec, bert: BertConfig) -> int:
    max_length = cfg.data.max_length or spec.max_length
    if max_length > bert.max_position_embeddings:
        raise ValueError(f"--max-length {max_length} is above the model's {bert.max_position_embeddings} positions")
    return max_length


def pad_multiple(cfg: RunConfig, accelerator: Accelerator) -> int | None:
    """Tensor cores (and AMX tiles) want dimensions in multiples of 8 under fp16/bf16."""
    if cfg.data.pad_to_multiple_of is not None:
        return cfg.data.pad_to_multiple_of or None
    return 8 if accelerator.mixed_precision in ("fp16", "bf16") else None


def run_finetune(cfg: RunConfig, accelerator: Accelerator, out_dir: Path) -> dict[str, Any]:
    spec = D.get_task(cfg.task)
    if spec.kind == "qa":
        from bert_dist.finetune_qa import run_qa  # noqa: PLC0415 (SQuAD has its own features)

        return run_qa(cfg, spec, accelerator, out_dir)
    source = D.describe_source(spec, cfg.data)
    src = load_init(cfg.init, cfg.tokenizer)
    with accelerator.main_process_first():
        raw = D.check_raw(D.load_raw(spec, cfg.data), spec, source)
    if cfg.data.max_train_samples:
        raw[spec.train_split] = raw[spec.train_split].select(range(min(cfg.data.max_train_samples,
                                                                       len(raw[spec.train_split]))))
    if cfg.data.max_eval_samples:
        for s in [*spec.eval_splits, *spec.test_splits]:
            if s in raw:
                raw[s] = raw[s].select(range(min(cfg.data.max_eval_samples, len(raw[s]))))
    bert, tokenizer = resolve_model(cfg, src, lambda: D.task_texts(raw, spec), accelerator)
    max_length = check_max_length(cfg, spec, bert)
    with accelerator.main_process_first():
        feats = D.tokenize_classification(raw, spec, tokenizer, max_length)

    torch.manual_seed(cfg.seed)  # the head's init depends on the seed alone
    model = BertForSequenceClassification(bert, spec.num_labels, regression=spec.kind == "regression")
    if src.state_dict is not None:
        load_weights(model, src.state_dict, src.name)
    log.info("%s: %s parameters, %d train / %s examples, max length %d", spec.name,
             f"{count_params(model):,}", len(feats[spec.train_split]),
             " / ".join(f"{len(feats[s])} {s}" for s in spec.eval_splits if s in feats), max_length)

    collator = PadCollator(tokenizer.token_to_id("[PAD]"), pad_multiple(cfg, accelerator))
    metric = load_metric(spec.metric, spec.metric_config)
    loader, sampler = D.train_loader(feats[spec.train_split], cfg.data, collator, cfg.seed)
    splits = [s for s in (*spec.eval_splits, *spec.test_splits) if s in feats]
    run = prepare_training(cfg, accelerator, model, loader,
                           {s: D.eval_loader(feats[s], cfg.data, collator) for s in splits}, out_dir)

    def predict(split: str) -> dict[str, np.ndarray]:
        return evaluate(accelerator, run.model, run.eval_loaders[split],
                        lambda b, o: {"logits": o["logits"], "labels": b["labels"]})

    def to_predictions(logits: np.ndarray) -> np.ndarray:
        return logits if spec.kind == "regression" else logits.argmax(-1)

    eval_splits = [s for s in spec.eval_splits if s in feats]

    def eval_fn(step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for split in eval_splits:
            out = predict(split)
            scores = metric.compute(predictions=to_predictions(out["logits"]), references=out["labels"])
            prefix = "" if len(eval_splits) == 1 else f"{split}/"
            metrics.update({prefix + k: round(float(v), 6) for k, v in scores.items()})
        return metrics

    if cfg.train.eval_only:
        results = {**eval_fn(0), "steps": 0}
    else:
        results = train(accelerator, run.model, run.optimizer, run.scheduler, run.train_loader, cfg.train,
                        run.num_steps, out_dir, eval_fn, run.resume_from, sampler.set_epoch,
                        cfg.optim.max_grad_norm)
    if results.get("interrupted"):
        return results
    model = accelerator.unwrap_model(run.model)
    meta = {"task": spec.name, "kind": spec.kind, "num_labels": spec.num_labels,
            "label_names": list(spec.label_names)}

    # Validation predictions and GLUE test-set submission files.
    for split in splits:
        out = predict(split)
        if accelerator.is_main_process:
            write_predictions(out_dir, spec, split, raw[split], out["logits"], to_predictions(out["logits"]))
    if accelerator.is_main_process:
        save_run_model(model, out_dir, bert, meta, tokenizer)
    results.update(task=spec.name, init=cfg.init, num_params=count_params(model), max_length=max_length,
                   main_metric=spec.main_metric)
    return results


def write_predictions(out_dir: Path, spec: TaskSpec, split: str, rows: Any, logits: np.ndarray,
                      preds: np.ndarray) -> None:
    """predictions_<split>.jsonl for every split; <GLUE name>.tsv (the submission format) for test splits."""
    idx = D.column(rows, "idx") if "idx" in rows.column_names else list(range(len(rows)))
    with open(out_dir / f"predictions_{split}.jsonl", "w") as fh:
        for i, p, lg in zip(idx, preds.tolist(), logits):
            row: dict[str, Any] = {"idx": i, "prediction": p}
            if spec.kind == "classification":
                row["label"] = spec.label_names[p]
                e = np.exp(lg - lg.max())
                row["probabilities"] = [round(float(x), 6) for x in e / e.sum()]
            fh.write(json.dumps(row) + "\n")
    if split in spec.test_splits and spec.submission_names:
        name = spec.submission_names[spec.test_splits.index(split)]
        with open(out_dir / f"{name}.tsv", "w", newline="") as fh:
            w = csv.writer(fh, delimiter="\t", lineterminator="\n")
            w.writerow(["index", "prediction"])
            for i, p in zip(idx, preds.tolist()):
                if spec.kind == "regression":
                    p = round(min(5.0, max(0.0, float(p))), 3)
                elif spec.submission_label_names:
                    p = spec.label_names[p]
                w.writerow([i, p])

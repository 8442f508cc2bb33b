"""The pretraining recipe: text corpus -> WordPiece tokenizer -> NSP pairs -> BertForPreTraining -> train().

Also `--task tokenizer`, which stops after the tokenizer (tokenizer.json + vocab.txt in --output-dir).

Where the corpus comes from (first that applies):
    --train-file F[,F...]      text files (one row per line), JSON Lines, CSV, TSV or Parquet; the text is
                               the `text` column, else the first string column (SST-2's `sentence`).
                               --validation-file F[,F...] gives the held-out text.
    --data-dir DIR             DIR/wikitext-2/{train,validation}.jsonl|txt|...
    (neither)                  the hub's Salesforce/wikitext, wikitext-2-raw-v1.
Without held-out text, every 20th document of the training corpus is held out.

The output directory has the fine-tuning layout (model.safetensors with the cls.* heads, config.json,
tokenizer.json, vocab.txt), so `--task sst2 --init <this run>` starts from the pretrained encoder and
tokenizer; the fine-tuning recipe reports the pretraining heads as unused and drops them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from bert_dist import data as D
from bert_dist.config import RunConfig, TaskSpec, check_model_fits, preset
from bert_dist.data.collate import MLMCollator, pad_multiple
from bert_dist.data.pretraining import (
    TEXT_SUFFIXES,
    CorpusFile,
    corpus_documents,
    hold_out_documents,
    make_pairs,
    read_corpus_file,
)
from bert_dist.distributed import gather_state_dict, main_process_first, share_from_main
from bert_dist.model import BertForPreTraining, count_params
from bert_dist.perf import mfu
from bert_dist.rundir import discard_previous_run, run_inputs
from bert_dist.tokenizer import (
    SPECIAL_TOKENS,
    check_special_tokens,
    save_tokenizer,
    train_shared_tokenizer,
)
from bert_dist.train import evaluate, prepare_training
from bert_dist.weights import load_init, load_weights, save_run_model

log = logging.getLogger(__name__)

EVAL_LOGITS_BUDGET = 1 << 26
"""Most elements of one evaluation batch's (M, V) MLM logits, M about mlm_probability x T per example: the
evaluation batch is made small enough that this tensor stays near 256 MB (fp32)."""


# ---------------------------------------------------------------------------------------------
# Corpus


def _paths(arg: str) -> list[Path]:
    return [Path(p.strip()) for p in arg.split(",") if p.strip()]


def _find_split(data_dir: Path, spec: TaskSpec, split: str) -> Path | None:
    found = D._find_split_file(data_dir, spec, split)
    if found is None:
        for d in (data_dir / (spec.data_name or spec.name), data_dir):
            found = next((d / f"{split}{s}" for s in TEXT_SUFFIXES if (d / f"{split}{s}").is_file()), None)
            if found is not None:
                break
    return found


def load_corpus(cfg: RunConfig, spec: TaskSpec) -> tuple[list[CorpusFile], list[CorpusFile] | None, str]:
    """(training files, held-out files or None, a description), each file's rows with one `text` column.

    Files stay separate because each gets its own document rule (see `bert_dist.data.pretraining`).
    """
    d = cfg.data
    if d.train_file:
        held = None if not d.validation_file else [read_corpus_file(p, "validation", flag="--validation-file")
                                                   for p in _paths(d.validation_file)]
        train = [read_corpus_file(p, "train", flag="--train-file") for p in _paths(d.train_file)]
        return train, held, f"--train-file {d.train_file}"
    if d.validation_file:
        raise ValueError("--validation-file needs --train-file for pretraining")
    if d.data_dir:
        data_dir = Path(d.data_dir)
        if not data_dir.is_dir():
            raise ValueError(f"--data-dir: {data_dir} is not a directory")
        train_path = _find_split(data_dir, spec, spec.train_split)
        if train_path is None:
            raise ValueError(
                f"--data-dir: no {spec.train_split} split for pretraining under {data_dir} (looked for "
                f"{spec.data_name}/{spec.train_split}.jsonl|txt|csv|parquet); pass --train-file FILE[,FILE...] "
                "(text, JSON Lines, CSV or Parquet) instead"
            )
        val_path = _find_split(data_dir, spec, spec.eval_splits[0])
        held = [read_corpus_file(val_path, "validation", flag="--data-dir")] if val_path else None
        return [read_corpus_file(train_path, "train", flag="--data-dir")], held, f"--data-dir {data_dir}"
    raw = D.load_raw(spec, d)  # the hub's wikitext: a `text` column of lines, train/validation/test
    return (
        [CorpusFile(raw[spec.train_split].select_columns(["text"]))],
        [CorpusFile(raw[spec.eval_splits[0]].select_columns(["text"]))],
        spec.hub_path,
    )


def corpus_texts(files: list[CorpusFile]):
    """Every non-empty row of `files` (for training a tokenizer)."""
    for f in files:
        for t in D.column(f.rows, "text"):
            if t and t.strip():
                yield t


# ---------------------------------------------------------------------------------------------
# Evaluation


def mlm_collect(batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-example sums, so only (B,)-sized tensors are gathered across processes, never (M, V).

    batch: masked_positions (B, Qm), masked_index and masked_labels (M,), next_sentence_label (B,); out: mlm_logits
    (M, V), nsp_logits (B, 2). Returns mlm_loss_sum, mlm_count, mlm_correct, nsp_correct, each (B,).
    """
    B, qm = batch["masked_positions"].shape
    rows = batch["masked_index"] // max(qm, 1)  # (M,) the example each masked token belongs to
    logits, target = out["mlm_logits"].float(), batch["masked_labels"]
    zeros = torch.zeros(B, device=logits.device)
    return {
        "mlm_loss_sum": zeros.index_add(0, rows, F.cross_entropy(logits, target, reduction="none")),
        "mlm_count": zeros.index_add(0, rows, torch.ones_like(target, dtype=zeros.dtype)).long(),
        "mlm_correct": zeros.index_add(0, rows, (logits.argmax(-1) == target).float()),
        "nsp_correct": (out["nsp_logits"].argmax(-1) == batch["next_sentence_label"]).long(),
    }


def mlm_metrics(sums: dict[str, Any]) -> dict[str, float | None]:
    """The MLM metrics over the masked positions of the held-out pairs; None (not a perfect 0 loss) where no
    position was masked."""
    n = int(sums["mlm_count"].sum())
    nsp = round(float(sums["nsp_correct"].mean()), 6)
    if n == 0:
        log.warning("evaluation: no token of the %d held-out pairs was masked, so MLM loss, perplexity and "
                    "accuracy are not defined (null in the results); more --max-eval-samples or a higher "
                    "--mlm-probability give them", len(sums["nsp_correct"]))
        return {"mlm_loss": None, "perplexity": None, "mlm_accuracy": None, "nsp_accuracy": nsp}
    loss = float(sums["mlm_loss_sum"].sum()) / n
    return {
        "mlm_loss": round(loss, 6),
        "perplexity": round(math.exp(min(loss, 50.0)), 4),
        "mlm_accuracy": round(float(sums["mlm_correct"].sum()) / n, 6),
        "nsp_accuracy": nsp,
    }


# ---------------------------------------------------------------------------------------------


def run_pretrain(cfg: RunConfig, accelerator: Accelerator, out_dir: Path) -> dict[str, Any]:
    """`--task pretrain` (MLM + NSP) or `--task tokenizer` (WordPiece only); returns the run's results."""
    spec = D.get_task("pretrain")
    with main_process_first(accelerator):
        train_files, held_files, source = load_corpus(cfg, spec)

    def corpus_tokenizer():  # trained once, on the main process, then shared
        return train_shared_tokenizer(lambda: corpus_texts(train_files), accelerator.is_main_process, share_from_main,
                                      cfg.data.vocab_size, cfg.data.lowercase)

    if cfg.task == "tokenizer":
        tok = corpus_tokenizer()
        if cfg.overwrite:  # a previous run's model must not stay beside a tokenizer that is not its own
            discard_previous_run(accelerator, out_dir, cfg.to_dict(), run_inputs(cfg))
        if accelerator.is_main_process:
            save_tokenizer(tok, out_dir)
        log.info("wrote %s and vocab.txt (%d tokens) from %s", out_dir / "tokenizer.json", tok.get_vocab_size(), source)
        return {"vocab_size": tok.get_vocab_size(), "lowercase": cfg.data.lowercase, "source": source}

    src = load_init(cfg.init, cfg.tokenizer)
    if src.tokenizer is not None:
        tok = src.tokenizer
        check_special_tokens(tok, cfg.tokenizer or cfg.init, need_mask=True)  # MLM needs [MASK]
    else:
        tok = corpus_tokenizer()
    bert = src.config or preset(cfg.preset, vocab_size=tok.get_vocab_size(), pad_token_id=tok.token_to_id("[PAD]"))
    max_length = cfg.data.max_length or spec.max_length
    check_model_fits(bert, spec, max_length)

    with main_process_first(accelerator):
        docs = corpus_documents(train_files, tok)
        if len(docs) == 0:
            raise ValueError(f"{source}: no text to pretrain on (every line is blank)")
        if held_files:
            held_docs = corpus_documents(held_files, tok)
        else:
            try:
                docs, held_docs = hold_out_documents(docs)
            except ValueError as e:  # too few documents: say which corpus
                raise ValueError(f"{source}: {e}") from None
            log.info(
                "no held-out text given: holding out %d of %d documents", len(held_docs), len(docs) + len(held_docs)
            )
        train_ds = make_pairs(docs, tok, max_length, cfg.seed)
        eval_ds = make_pairs(held_docs, tok, max_length, cfg.seed + 1, dupe_factor=1)
    if cfg.data.max_train_samples:
        train_ds = train_ds.select(range(min(cfg.data.max_train_samples, len(train_ds))))
    if cfg.data.max_eval_samples:
        eval_ds = eval_ds.select(range(min(cfg.data.max_eval_samples, len(eval_ds))))

    torch.manual_seed(cfg.seed)  # the weights depend on the seed alone
    model = BertForPreTraining(bert)
    if src.state_dict is not None:
        load_weights(model, src.state_dict, src.name)  # an HF BertForPreTraining dir brings its cls.* heads
    n_tokens = sum(D.column(train_ds, "length"))
    num_params = count_params(model)  # before prepare: under FSDP the module then holds this rank's shards
    log.info(
        "pretrain: %s parameters, %d documents -> %d pairs (%s tokens) / %d held-out pairs, max length %d, from %s",
        f"{num_params:,}",
        len(docs),
        len(train_ds),
        f"{n_tokens:,}",
        len(eval_ds),
        max_length,
        source,
    )
    # NSP's chance level: a corpus of one-sentence documents (a sentence per row of a .jsonl) gets only random Bs,
    # and short sequences many; its NSP accuracy then says little (a constant guess scores the majority share).
    def random_b(pairs: Any) -> float:  # the share of pairs whose B is random
        return float(np.mean(D.column(pairs, "next_sentence_label"))) if len(pairs) else 0.5

    random_share, held_share = random_b(train_ds), random_b(eval_ds)
    nsp_baseline = max(random_share, 1 - random_share)
    log.info("NSP pairs: %.0f%% with a random B (a constant guess scores %.0f%%)", 100 * random_share,
             100 * nsp_baseline)
    if nsp_baseline > 0.7:
        log.warning("%.0f%% of the NSP pairs have a %s B: most documents are too short to split in two (one "
                    "sentence, or one row each); separate documents with blank lines in a text file, or read "
                    "nsp_accuracy against nsp_baseline", 100 * nsp_baseline,
                    "random" if random_share > 0.5 else "following")

    specials = [i for t in SPECIAL_TOKENS if (i := tok.token_to_id(t)) is not None]
    collator_args = dict(
        mask_token_id=tok.token_to_id("[MASK]"),
        vocab_size=tok.get_vocab_size(),
        special_token_ids=specials,
        pad_token_id=tok.token_to_id("[PAD]"),
        mlm_probability=cfg.data.mlm_probability,
        pad_to_multiple_of=pad_multiple(cfg.data.pad_to_multiple_of, accelerator.mixed_precision),
        max_length=max_length,
    )
    collator = MLMCollator(**collator_args, seed=cfg.seed)
    eval_collator = MLMCollator(**collator_args, seed=cfg.seed + 1)  # never set_epoch: the same masks every eval
    loader, sampler = D.train_loader(train_ds, cfg.data, collator, cfg.seed)
    masked_per_row = math.ceil(2 * cfg.data.mlm_probability * max_length)  # twice the mean: a margin for the max
    eval_batch = max(1, min(cfg.data.eval_batch_size, EVAL_LOGITS_BUDGET // (masked_per_row * bert.vocab_size)))
    eval_cfg = dataclasses.replace(cfg.data, eval_batch_size=eval_batch)
    run = prepare_training(
        cfg, accelerator, model, loader, {"validation": D.eval_loader(eval_ds, eval_cfg, eval_collator)}, out_dir
    )
    if src.tokenizer is None and accelerator.is_main_process:  # trained here: saved once a previous run is gone
        save_tokenizer(tok, out_dir)

    def eval_fn(step: int) -> dict[str, float]:
        return mlm_metrics(evaluate(accelerator, run.model, run.eval_loaders["validation"], mlm_collect))

    def set_epoch(epoch: int) -> None:
        sampler.set_epoch(epoch)
        collator.set_epoch(epoch)

    def save() -> None:  # on every process (FSDP gathers the weights)
        weights = gather_state_dict(accelerator, run.model)
        if accelerator.is_main_process:
            meta = {"task": "pretrain", "kind": "pretrain", "max_length": max_length,
                    "mlm_probability": cfg.data.mlm_probability}
            save_run_model(weights, out_dir, bert, meta, tok)

    # --keep-best and early stopping go by the held-out MLM loss (the objective) unless --best-metric says otherwise.
    results = run.fit(accelerator=accelerator, cfg=cfg, out_dir=out_dir, eval_fn=eval_fn, main_metric="mlm_loss",
                      on_set_epoch=set_epoch, save=save, tokenizer=tok)
    if results.get("interrupted"):
        return results
    results.update(
        task="pretrain",
        init=cfg.init,
        num_params=num_params,
        max_length=max_length,
        main_metric="mlm_accuracy",
        nsp_baseline=round(max(held_share, 1 - held_share), 4),  # nsp_accuracy's chance level (held-out pairs)
        mfu=mfu(results.get("tokens_per_second", 0.0), bert, max_length, accelerator.device, accelerator.num_processes),
        train_pairs=len(train_ds),
        eval_pairs=len(eval_ds),
        vocab_size=tok.get_vocab_size(),
    )
    return results

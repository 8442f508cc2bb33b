"""The pretraining recipe: corpus -> WordPiece tokenizer -> prepared examples on disk -> BertForPreTraining -> train().

Also `--task tokenizer`, which stops after the tokenizer (tokenizer.json + vocab.txt in --output-dir). `bert-dist
prepare` (`bert_dist.data.pretraining.prepare_main`) stops after the prepared corpus: run it with the pretraining
run's own flags, and the run finds the corpus ready (a cache keyed by the corpus, the tokenizer and the settings).

Where the corpus comes from (first that applies):
    --train-file F[,F...]      files, globs or directories: text (a line a row), JSON Lines, Parquet, CSV/TSV; the text
                               is the `text` column, else the first string column (SST-2's `sentence`).
                               --validation-file F[,F...] gives the held-out text.
    --dataset NAME[:CONFIG]    a Hugging Face dataset (or a local dataset folder), streamed; its validation split is
                               the held-out text if it has one.
    --data-dir DIR             DIR/wikitext-2/{train,validation}.jsonl|txt|...
    --prepared-dir DIR         (alone) a corpus prepared before, with its tokenizer.
    (none)                     the hub's Salesforce/wikitext, wikitext-2-raw-v1, streamed.
Without held-out text, every 20th document is held out (`bert_dist.data.pretraining`).

Preparation runs once (in parallel processes, in bounded memory), on the first process of each machine, while the
others wait for it outside any collective; every process then reads the prepared shards memory-mapped.

The output directory has the fine-tuning layout (model.safetensors with the cls.* heads, config.json,
tokenizer.json, vocab.txt), so `--task sst2 --init <this run>` starts from the pretrained encoder and
tokenizer; the fine-tuning recipe reports the pretraining heads as unused and drops them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from bert_dist import data as D
from bert_dist.config import RunConfig, TaskSpec, check_model_fits, preset
from bert_dist.data.collate import MLMCollator, pad_multiple
from bert_dist.data.corpus import corpus_texts
from bert_dist.data.pretraining import (
    MANIFEST,
    corpus_splits,
    corpus_tokenizer,
    has_corpus_flags,
    open_prepared,
    prepared_corpus,
    read_manifest,
    tokenizer_sha,
)
from bert_dist.distributed import gather_state_dict, share_from_main
from bert_dist.model import BertForPreTraining, count_params
from bert_dist.perf import mfu
from bert_dist.rundir import discard_previous_run, run_inputs
from bert_dist.tokenizer import (
    SPECIAL_TOKENS,
    check_special_tokens,
    load_tokenizer,
    save_tokenizer,
    train_shared_tokenizer,
)
from bert_dist.train import evaluate, prepare_training
from bert_dist.weights import load_init, load_weights, save_run_model

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from bert_dist.weights import InitSource

log = logging.getLogger(__name__)

EVAL_LOGITS_BUDGET = 1 << 26
"""Most elements of one evaluation batch's (M, V) MLM logits, M about mlm_probability x T per example: the
evaluation batch is made small enough that this tensor stays near 256 MB (fp32)."""


# ---------------------------------------------------------------------------------------------
# Evaluation


def mlm_collect(batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-example sums, so only (B,)-sized tensors are gathered across processes, never (M, V).

    batch: masked_positions (B, Qm), masked_index and masked_labels (M,), next_sentence_label (B,) (mlm-nsp); out:
    mlm_logits (M, V), nsp_logits (B, 2). Returns mlm_loss_sum, mlm_count, mlm_correct (and nsp_correct with NSP
    labels), each (B,).
    """
    B, qm = batch["masked_positions"].shape
    rows = batch["masked_index"] // max(qm, 1)  # (M,) the example each masked token belongs to
    logits, target = out["mlm_logits"].float(), batch["masked_labels"]
    zeros = torch.zeros(B, device=logits.device)
    sums = {
        "mlm_loss_sum": zeros.index_add(0, rows, F.cross_entropy(logits, target, reduction="none")),
        "mlm_count": zeros.index_add(0, rows, torch.ones_like(target, dtype=zeros.dtype)).long(),
        "mlm_correct": zeros.index_add(0, rows, (logits.argmax(-1) == target).float()),
    }
    if "next_sentence_label" in batch:
        sums["nsp_correct"] = (out["nsp_logits"].argmax(-1) == batch["next_sentence_label"]).long()
    return sums


def mlm_metrics(sums: dict[str, Any]) -> dict[str, float | None]:
    """The MLM metrics over the masked positions of the held-out examples (and NSP accuracy over their pairs); None
    (not a perfect 0 loss) where no position was masked."""
    n = int(sums["mlm_count"].sum())
    nsp = {"nsp_accuracy": round(float(sums["nsp_correct"].mean()), 6)} if "nsp_correct" in sums else {}
    if n == 0:
        log.warning("evaluation: no token of the %d held-out examples was masked, so MLM loss, perplexity and "
                    "accuracy are not defined (null in the results); more --max-eval-samples or a higher "
                    "--mlm-probability give them", len(sums["mlm_count"]))
        return {"mlm_loss": None, "perplexity": None, "mlm_accuracy": None, **nsp}
    loss = float(sums["mlm_loss_sum"].sum()) / n
    return {
        "mlm_loss": round(loss, 6),
        "perplexity": round(math.exp(min(loss, 50.0)), 4),
        "mlm_accuracy": round(float(sums["mlm_correct"].sum()) / n, 6),
        **nsp,
    }


# ---------------------------------------------------------------------------------------------


def run_tokenizer(cfg: RunConfig, accelerator: Accelerator, out_dir: Path) -> dict[str, Any]:
    """`--task tokenizer`: WordPiece trained on the corpus of the flags, saved in out_dir."""
    train, _ = corpus_splits(cfg, D.get_task("pretrain"))
    tok = train_shared_tokenizer(lambda: corpus_texts(train), accelerator.is_main_process, share_from_main,
                                 cfg.data.vocab_size, cfg.data.lowercase)
    if cfg.overwrite:  # a previous run's model must not stay beside a tokenizer that is not its own
        discard_previous_run(accelerator, out_dir, cfg.to_dict(), run_inputs(cfg))
    if accelerator.is_main_process:
        save_tokenizer(tok, out_dir)
    log.info("wrote %s and vocab.txt (%d tokens) from %s", out_dir / "tokenizer.json", tok.get_vocab_size(),
             train.description)
    return {"vocab_size": tok.get_vocab_size(), "lowercase": cfg.data.lowercase, "source": train.description}


def tokenizer_and_corpus(cfg: RunConfig, spec: TaskSpec, src: InitSource, local_main: bool) -> tuple[Tokenizer, Path]:
    """The tokenizer and the prepared corpus directory of a run: --prepared-dir as given (its tokenizer, unless
    --init/--tokenizer brings one, which must be the same), or the corpus of the flags, prepared (or found in the
    cache) now."""
    given = cfg.data.prepared_dir if cfg.data.prepared_dir and not has_corpus_flags(cfg) else None
    if given is not None:  # a corpus prepared before: its tokenizer, objective and length, unless the flags differ
        prepared = Path(given)
        if not (prepared / MANIFEST).is_file():
            raise ValueError(f"--prepared-dir {prepared}: no prepared corpus there ({MANIFEST} missing); prepare it "
                             "with `bert-dist prepare` and the corpus flags, or give them here too")
        tok = src.tokenizer or load_tokenizer(prepared / "tokenizer.json")
        if tokenizer_sha(tok) != read_manifest(prepared)["tokenizer_sha256"]:
            raise ValueError(f"--prepared-dir {prepared} was prepared with another tokenizer than "
                             f"{cfg.tokenizer or cfg.init}'s; train with its own (drop --tokenizer) or prepare again")
    else:
        corpus = corpus_splits(cfg, spec)
        tok = src.tokenizer or corpus_tokenizer(cfg, corpus[0], local_main)
        if src.tokenizer is not None:
            check_special_tokens(tok, cfg.tokenizer or cfg.init, need_mask=True)  # MLM needs [MASK]
        prepared = prepared_corpus(cfg, spec, tok, local_main, corpus=corpus)
    return tok, prepared


def nsp_held_share(manifest: dict[str, Any], eval_ds: Any, max_eval_samples: int | None) -> float:
    """The share of held-out NSP pairs with a random B (nsp_accuracy's chance level is max(p, 1 - p)); warns where
    the training pairs are so one-sided that NSP accuracy says little."""
    # NSP's chance level: a corpus of one-sentence documents (a sentence per row of a .jsonl) gets only random
    # Bs, and short sequences many; its NSP accuracy then says little (a constant guess scores the majority share).
    counts = manifest["splits"]
    random_share = counts["train"]["random_next"] / max(1, counts["train"]["examples"])
    held_share = counts["validation"]["random_next"] / max(1, counts["validation"]["examples"])
    if max_eval_samples:
        held_share = float(eval_ds.with_format("arrow")["next_sentence_label"].to_numpy().mean())
    nsp_baseline = max(random_share, 1 - random_share)
    log.info("NSP pairs: %.0f%% with a random B (a constant guess scores %.0f%%)", 100 * random_share,
             100 * nsp_baseline)
    if nsp_baseline > 0.7:
        log.warning("%.0f%% of the NSP pairs have a %s B: most documents are too short to split in two (one "
                    "sentence, or one row each); separate documents with blank lines in a text file, or read "
                    "nsp_accuracy against nsp_baseline", 100 * nsp_baseline,
                    "random" if random_share > 0.5 else "following")
    return held_share


def run_pretrain(cfg: RunConfig, accelerator: Accelerator, out_dir: Path) -> dict[str, Any]:
    """`--task pretrain` (MLM + NSP, or MLM only) or `--task tokenizer` (WordPiece only); returns the run's results."""
    spec = D.get_task("pretrain")
    local_main = accelerator.is_local_main_process
    if cfg.task == "tokenizer":
        return run_tokenizer(cfg, accelerator, out_dir)
    src = load_init(cfg.init, cfg.tokenizer)
    t0 = time.perf_counter()
    tok, prepared = tokenizer_and_corpus(cfg, spec, src, local_main)
    train_ds, eval_ds, manifest = open_prepared(prepared)
    settings = manifest["settings"]
    objective, max_length = settings["objective"], settings["max_length"]
    for flag, value, theirs in (("--objective", cfg.data.objective, objective),
                                ("--max-length", cfg.data.max_length, max_length)):
        if value is not None and value != theirs:
            raise ValueError(f"{flag} {value}: the corpus in --prepared-dir {prepared} was prepared with {flag} "
                             f"{theirs}; drop {flag}, or prepare the corpus again")
    nsp = objective == "mlm-nsp"
    bert = src.config or preset(cfg.preset, vocab_size=tok.get_vocab_size(), pad_token_id=tok.token_to_id("[PAD]"))
    check_model_fits(bert, spec, max_length)
    if cfg.data.max_train_samples:
        train_ds = train_ds.select(range(min(cfg.data.max_train_samples, len(train_ds))))
    if cfg.data.max_eval_samples:
        eval_ds = eval_ds.select(range(min(cfg.data.max_eval_samples, len(eval_ds))))

    torch.manual_seed(cfg.seed)  # the weights depend on the seed alone
    model = BertForPreTraining(bert)
    if src.state_dict is not None:
        load_weights(model, src.state_dict, src.name)  # an HF BertForPreTraining dir brings its cls.* heads
    n_tokens = manifest["splits"]["train"]["tokens"] if not cfg.data.max_train_samples else \
        int(train_ds.with_format("arrow")["length"].to_numpy().sum())
    num_params = count_params(model)  # before prepare: under FSDP the module then holds this rank's shards
    log.info("pretrain (%s): %s parameters, %d training examples (%s tokens) / %d held-out, max length %d, from %s "
             "(%s, opened in %.1f s)", objective, f"{num_params:,}", len(train_ds), f"{n_tokens:,}", len(eval_ds),
             max_length, manifest.get("source", ""), prepared, time.perf_counter() - t0)
    held_share = nsp_held_share(manifest, eval_ds, cfg.data.max_eval_samples) if nsp else None
    specials = [i for t in SPECIAL_TOKENS if (i := tok.token_to_id(t)) is not None]
    collator_args = dict(
        mask_token_id=tok.token_to_id("[MASK]"),
        vocab_size=tok.get_vocab_size(),
        special_token_ids=specials,
        pad_token_id=tok.token_to_id("[PAD]"),
        mlm_probability=cfg.data.mlm_probability,
        pad_to_multiple_of=pad_multiple(cfg.data.pad_to_multiple_of, accelerator.mixed_precision),
        max_length=max_length,
        whole_word=cfg.data.whole_word_mask,
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
            meta = {"task": "pretrain", "kind": "pretrain", "max_length": max_length, "objective": objective,
                    "mlm_probability": cfg.data.mlm_probability}
            save_run_model(weights, out_dir, bert, meta, tok)

    # --keep-best and early stopping go by the held-out MLM loss (the objective) unless --best-metric says otherwise.
    results = run.fit(accelerator=accelerator, cfg=cfg, out_dir=out_dir, eval_fn=eval_fn, main_metric="mlm_loss",
                      on_set_epoch=set_epoch, save=save, tokenizer=tok)
    if results.get("interrupted"):
        return results
    results.update(
        task="pretrain",
        objective=objective,
        init=cfg.init,
        num_params=num_params,
        max_length=max_length,
        main_metric="mlm_accuracy",
        mfu=mfu(results.get("tokens_per_second", 0.0), bert, max_length, accelerator.device, accelerator.num_processes),
        train_examples=len(train_ds),
        eval_examples=len(eval_ds),
        prepared_dir=str(prepared),
        vocab_size=tok.get_vocab_size(),
    )
    if held_share is not None:  # nsp_accuracy's chance level (held-out pairs)
        results["nsp_baseline"] = round(max(held_share, 1 - held_share), 4)
    return results

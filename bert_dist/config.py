"""Configuration dataclasses: every default of a run lives here, and nowhere else.

`RunConfig` nests one dataclass per concern. The command line is generated from the fields (each
field's `help` metadata is its documentation), so a new option is one field. Validation raises
`ValueError` naming the flag, which the entry point turns into one clear line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, NoReturn, get_type_hints

MIN_MAX_LENGTH = 8  # --max-length: [CLS], [SEP] and a few tokens of text (training and predict)
LOWER_IS_BETTER = ("loss", "perplexity", "mse", "mae", "error")
"""Metric name endings for which lower is better (--best-mode's default)."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its documentation attached (used for --help)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class BertConfig:
    """BERT architecture (Google/Hugging Face field names, so config.json files map one to one)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    """Std of the normal init of every Linear and Embedding weight (heads included)."""
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    classifier_dropout: float | None = None
    """Dropout before a classification/QA head; None means hidden_dropout_prob."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_params(self, embeddings: bool = True) -> int:
        """Parameters of the encoder + pooler (no task head)."""
        h, i, n = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        layer = 4 * (h * h + h) + 2 * (h * i) + i + h + 4 * h
        emb = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * h + 2 * h
        return n * layer + (h * h + h) + (emb if embeddings else 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BertConfig:
        """Build from a Hugging Face or bert-dist config.json; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def check_model_fits(bert: BertConfig, spec: TaskSpec, max_length: int) -> None:
    """The task's inputs fit the model, else ValueError: `max_length` positions, and two segment (token type)
    embeddings where the task feeds pairs (GLUE pairs, SQuAD's question and context, NSP's two segments)."""
    if max_length > bert.max_position_embeddings:
        raise ValueError(f"--max-length {max_length} is above the model's {bert.max_position_embeddings} positions")
    if bert.type_vocab_size < 2 and (len(spec.text_columns) > 1 or spec.kind in ("qa", "pretrain")):
        raise ValueError(f"--init: the model has type_vocab_size {bert.type_vocab_size} (one segment embedding), "
                         f"but --task {spec.name} feeds text pairs (segments 0 and 1); use a BERT with two")


PRESETS: dict[str, dict[str, int]] = {
    # Tests and smoke runs: trains in milliseconds per step on a CPU.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
    # Google's compact BERTs (Turc et al. 2019): mini = L4/H256, small = L4/H512.
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    # sentence-transformers/all-MiniLM-L6-v2 (nreimers/MiniLM-L6-H384-uncased).
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def preset(name: str, **overrides: Any) -> BertConfig:
    """A `BertConfig` from a named preset; `overrides` win (e.g. vocab_size from a tokenizer)."""
    if name not in PRESETS:
        raise ValueError(f"--preset: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return BertConfig(**{**PRESETS[name], **overrides})


@dataclass
class DataConfig:
    """Where the data comes from and how it is batched."""

    data_dir: str | None = _f(None, "read DIR/<task>/<split>.jsonl|csv|tsv|parquet instead of the hub")
    train_file: str | None = _f(None, "custom training data (.csv, .tsv, .jsonl or .parquet)")
    validation_file: str | None = _f(None, "custom validation data (.csv, .tsv, .jsonl or .parquet)")
    dataset_name: str | None = _f(None, "own data (--task classification|multi_label|regression): a hub dataset id, or "
                                        "a directory in the hub's layout; with --data-dir DIR, read DIR/<name> offline")
    dataset_config: str | None = _f(None, "own data: the config (subset) of --dataset-name")
    text_columns: str | None = _f(None, "own data: the text column, or two comma-separated for pairs (default: text)")
    label_column: str | None = _f(None, "own data: the label column (default: label); for multi_label a list of "
                                        "labels per row")
    max_length: int | None = _f(None, "max tokens per sequence (default: 128, or 384 for SQuAD)")
    batch_size: int = _f(32, "training examples per process per micro-batch")
    eval_batch_size: int = _f(128, "evaluation examples per process per batch")
    group_by_length: bool = _f(False, "batch examples of similar length together (less padding)")
    pad_to_multiple_of: int | None = _f(None, "pad batches to a multiple of this (default: 8 under fp16/bf16; 0 = off)")
    num_workers: int | None = _f(None, "DataLoader worker processes per process (default: up to 4 with CUDA, 0 on "
                                       "the CPU, where they would take the step's cores)")
    max_train_samples: int | None = _f(None, "use only the first N training examples")
    max_eval_samples: int | None = _f(None, "use only the first N examples of each evaluation split")
    doc_stride: int = _f(128, "SQuAD: tokens of overlap between context windows")
    max_query_length: int = _f(64, "SQuAD: questions are truncated to this many tokens")
    n_best_size: int = _f(20, "SQuAD: start/end candidates per window in post-processing")
    max_answer_length: int = _f(30, "SQuAD: longest answer span in tokens")
    null_score_diff_threshold: float = _f(0.0, "SQuAD v2: predict no answer when null - best > this")
    mlm_probability: float = _f(0.15, "pretraining: fraction of tokens chosen for MLM")
    whole_word_mask: bool = _f(False, "pretraining: choose whole words for MLM (a word's pieces masked together)")
    objective: str | None = _f(None, "pretraining: mlm-nsp (Google's sentence pairs, MLM + next sentence prediction) "
                                     "| mlm (full-length sequences packed from consecutive documents, MLM only) "
                                     "(default: mlm-nsp, or the --prepared-dir's)")
    dataset: str | None = _f(None, "pretraining: a Hugging Face dataset to stream, NAME or NAME:CONFIG (a local "
                                   "dataset folder too); its validation split is held out if it has one")
    prepared_dir: str | None = _f(None, "pretraining: the prepared corpus's directory (default: a cache keyed by the "
                                        "corpus and settings, under HF_HOME); with no corpus flag, train on it")
    num_proc: int | None = _f(None, "pretraining: processes that prepare the corpus (default: the CPU count)")
    shard_mb: float = _f(8.0, "pretraining: MB of text per unit of preparation work (and per shard on disk)")
    dupe_factor: int | None = _f(None, "pretraining: passes over the corpus when preparing it: NSP pairs the "
                                       "documents anew each pass, MLM packs them in a new order (default: 5 for "
                                       "mlm-nsp, 1 for mlm)")
    vocab_size: int = _f(30522, "tokenizer training: vocabulary size")
    lowercase: bool = _f(True, "tokenizer training: lowercase and strip accents")


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (defaults: the BERT paper's fine-tuning recipe)."""

    lr: float = _f(2e-5, "peak learning rate")
    weight_decay: float = _f(0.01, "AdamW decoupled weight decay (never on bias or LayerNorm)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    warmup_ratio: float = _f(0.1, "fraction of optimizer steps with linear warmup")
    warmup_steps: int | None = _f(None, "warmup steps (overrides --warmup-ratio)")
    scheduler: str = _f("linear", "after warmup: linear | cosine | constant")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    fused: bool | None = _f(None, "fused AdamW kernel (default: on, for CUDA and the CPU)")


OWN_TASKS = ("classification", "multi_label", "regression")
"""--task values that build a task from flags on the user's own data (data/own.py)."""


@dataclass
class TrainConfig:
    """The loop, counted in optimizer steps."""

    epochs: float = _f(3.0, "passes over the training data")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (overrides --epochs)")
    grad_accum: int = _f(
        1, "micro-batches per optimizer step (a group cut short at an epoch's end weighs by its examples)")
    log_every: int = _f(50, "optimizer steps between log lines (the only host syncs of the loss)")
    eval_every: int | None = _f(None, "optimizer steps between evaluations (default: end only)")
    save_every: int | None = _f(None, "optimizer steps between resumable checkpoints (SIGTERM also saves one)")
    keep_checkpoints: int = _f(2, "keep the newest K checkpoints")
    resume: bool = _f(False, "resume from the newest complete checkpoint in --output-dir")
    resume_from: str | None = _f(None, "resume from this checkpoint directory")
    max_bad_steps: int = _f(20, "stop after this many optimizer steps in a row with a non-finite loss or gradient "
                                "(their updates are skipped; checked at log and save steps)")
    compile: bool = _f(False, "torch.compile the model")
    cpu_kernels: str = _f("auto", "the CPU's fast paths (bert_dist.kernels: oneDNN projections, dropout, attention in "
                                  "chunks): auto (on a CPU device) | off")
    cpu_threads: int | None = _f(None, "torch threads per CPU process (default: torch's own, except under accelerate "
                                        "launch's OMP_NUM_THREADS=1 default: the cores per process)")
    eval_only: bool = _f(False, "skip training: evaluate and predict with the --init weights")
    tf32: bool = _f(True, "TF32 tensor cores for fp32 matmuls on Ampere and newer GPUs (--no-tf32: full fp32, for "
                          "reference numbers)")
    dist_timeout: float = _f(30.0, "minutes a process waits in a collective for the others (the main process alone "
                                   "trains a tokenizer or prepares data meanwhile) before the run fails")
    keep_best: bool | None = _f(None, "end with the weights of the best evaluation (every --eval-every steps and the "
                                      "last step, by --best-metric) as the run's model, its results and predictions, "
                                      "not the last step's (default: on with --early-stopping-patience, else off)")
    best_metric: str | None = _f(None, "the evaluation metric --keep-best and early stopping go by (default: the "
                                       "task's main one: accuracy; f1 for MRPC, QQP and SQuAD; matthews_correlation "
                                       "for CoLA; pearson for STS-B; mlm_loss for pretraining)")
    best_mode: str | None = _f(None, "max | min: whether a higher --best-metric is better (default: min for losses, "
                                     "perplexity and errors: names ending in " + ", ".join(LOWER_IS_BETTER) + "; "
                                     "else max)")
    early_stopping_patience: int | None = _f(None, "stop training after this many evaluations in a row without an "
                                                   "improvement of --best-metric (needs --eval-every; implies "
                                                   "--keep-best unless --no-keep-best)")
    early_stopping_delta: float = _f(0.0, "early stopping: an evaluation improves on the best only by more than this "
                                          "(in --best-metric's units)")

    def keeps_best(self) -> bool:
        """--keep-best as resolved: given, else on with early stopping."""
        return self.keep_best if self.keep_best is not None else self.early_stopping_patience is not None

    def tracks_best(self) -> bool:
        """Whether evaluations are compared (for --keep-best, early stopping, or both)."""
        return self.keeps_best() or self.early_stopping_patience is not None

    def greater_is_better(self, metric: str) -> bool:
        """--best-mode as resolved for `metric` (a name such as mlm_loss or validation_matched/accuracy)."""
        if self.best_mode is not None:
            return self.best_mode == "max"
        return not metric.rsplit("/", 1)[-1].lower().endswith(LOWER_IS_BETTER)


@dataclass
class RunConfig:
    """Everything that reproduces a run; written to <output_dir>/run_config.json."""

    task: str = _f("sst2", "GLUE task (cola sst2 mrpc stsb qqp mnli qnli rte wnli), glue (every GLUE task, one "
                           "after another, each with the BERT paper's recipe unless a flag is given), squad, "
                           "squad_v2, pretrain, tokenizer (train a WordPiece vocabulary only), or a task on your own "
                           "data: classification (labels inferred from the training split), multi_label (a list of "
                           "labels per row), regression (a number per row)")
    tasks: str | None = _f(None, "--task glue: comma-separated GLUE tasks to run, e.g. cola,sst2 (implies --task glue; "
                                 "default: all nine)")
    seeds: str | None = _f(None, "comma-separated seeds, e.g. 1,2,3: one run per seed (and --lrs value), the learning "
                                 "rate picked by its mean dev score, mean and sd reported (--task glue: per task)")
    lrs: str | None = _f(None, "comma-separated peak learning rates to pick from by dev score, e.g. 2e-5,3e-5,5e-5 "
                               "(each run with every --seeds value)")
    init: str = _f("scratch", "weights: scratch | HF-format dir | bert-dist run dir | hub id")
    preset: str = _f("base", "architecture for --init scratch: " + " | ".join(PRESETS))
    tokenizer: str | None = _f(None, "tokenizer.json, vocab.txt or a dir holding one (default: from --init)")
    output_dir: str | None = _f(None, "where outputs go (default: runs/<task>-<timestamp>)")
    overwrite: bool = _f(False, "allow writing into a non-empty --output-dir")
    seed: int = _f(42, "seed for init, data order, dropout and masking")
    mixed_precision: str | None = _f(None, "no | fp16 | bf16 (default: from accelerate config)")
    smoke: bool = _f(False, "tiny preset on data the project makes itself, a few steps, offline")
    report_to: str | None = _f(None, "tracker for accelerate (tensorboard, wandb, ...)")
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"--mixed-precision must be no, fp16 or bf16, not {self.mixed_precision!r}")
        self._check_loop()
        self._check_optim()
        self._check_data()
        self._check_windows()
        self.check_best()
        self._check_mode()
        self._check_own_data()
        self._check_sweep()

    def _check_loop(self) -> None:
        d, o, t = self.data, self.optim, self.train
        for flag, value in (("--batch-size", d.batch_size), ("--eval-batch-size", d.eval_batch_size),
                            ("--grad-accum", t.grad_accum), ("--log-every", t.log_every)):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if not 0 < t.dist_timeout < math.inf:
            raise ValueError(f"--dist-timeout must be a positive number of minutes, got {t.dist_timeout}")
        if t.cpu_threads is not None and t.cpu_threads < 1:
            raise ValueError(f"--cpu-threads must be at least 1, got {t.cpu_threads}")
        if t.cpu_kernels not in ("auto", "off"):
            raise ValueError(f"--cpu-kernels must be auto or off, not {t.cpu_kernels!r}")
        if o.scheduler not in ("linear", "cosine", "constant"):
            raise ValueError(f"--scheduler must be linear, cosine or constant, not {o.scheduler!r}")
        if not 0 < t.epochs < math.inf:  # also refuses nan (with --max-steps too: a resume may drop it)
            raise ValueError(f"--epochs must be a positive finite number, got {t.epochs}")
        if t.max_steps is not None and t.max_steps < 1:
            raise ValueError(f"--max-steps must be at least 1, got {t.max_steps}")
        for flag, value in (("--save-every", t.save_every), ("--eval-every", t.eval_every)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if t.keep_checkpoints < 1:
            raise ValueError(f"--keep-checkpoints must be at least 1, got {t.keep_checkpoints}")
        if t.max_bad_steps < 1:
            raise ValueError(f"--max-bad-steps must be at least 1, got {t.max_bad_steps}")

    def _check_optim(self) -> None:
        o = self.optim
        if not 0 < o.lr < math.inf:  # also refuses nan
            raise ValueError(f"--lr must be a positive finite number, got {o.lr}")
        for flag, value, ok, what in (
                ("--adam-beta1", o.adam_beta1, 0 <= o.adam_beta1 < 1, "in [0, 1)"),
                ("--adam-beta2", o.adam_beta2, 0 <= o.adam_beta2 < 1, "in [0, 1)"),
                ("--adam-eps", o.adam_eps, 0 < o.adam_eps < math.inf, "a positive finite number"),
                ("--weight-decay", o.weight_decay, 0 <= o.weight_decay < math.inf, "0 or a positive finite number"),
                ("--max-grad-norm", o.max_grad_norm, 0 <= o.max_grad_norm <= math.inf, "0 (off) or positive")):
            if not ok:
                raise ValueError(f"{flag} must be {what}, got {value}")
        if o.warmup_steps is not None and o.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be 0 or more, got {o.warmup_steps}")
        if not 0 <= o.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {o.warmup_ratio}")

    def _check_mode(self) -> None:
        """Flags that contradict each other about what the run does."""
        t = self.train
        if not 0 <= self.seed < 2**32:  # numpy's range; torch and numpy would fail later without naming the flag
            raise ValueError(f"--seed must be in [0, 2**32), got {self.seed}")
        if t.resume and t.resume_from:
            raise ValueError("--resume and --resume-from contradict each other: give one")
        if (t.resume or t.resume_from) and self.overwrite:
            raise ValueError("--overwrite discards the run in --output-dir and --resume continues it: give one")
        if t.eval_only and (t.resume or t.resume_from):
            raise ValueError("--eval-only does not train, so there is nothing to resume: drop --resume/--resume-from "
                             "(evaluate a finished run with --init RUN_DIR)")
        if t.eval_only and self.init == "scratch":
            raise ValueError("--eval-only evaluates the --init weights: pass --init DIR (not scratch)")
        if self.tasks and self.task != "glue":
            raise ValueError(f"--tasks picks the tasks of --task glue, not of --task {self.task}: drop one of them")

    def _check_data(self) -> None:
        d = self.data
        if d.max_length is not None and d.max_length < MIN_MAX_LENGTH:
            raise ValueError(f"--max-length must be at least {MIN_MAX_LENGTH}, got {d.max_length}")
        if not math.isfinite(d.null_score_diff_threshold):
            raise ValueError(f"--null-score-diff-threshold must be a finite number, got {d.null_score_diff_threshold}")
        if d.train_file and d.data_dir:
            raise ValueError("--train-file/--validation-file and --data-dir both say where the data is: give one")
        if not 1 <= d.vocab_size <= 2**24:  # the tokenizers library allocates for it: 5e9 aborted the process
            raise ValueError(f"--vocab-size must be in [1, {2**24:,}], got {d.vocab_size}")
        if not 0 < d.mlm_probability < 1:
            raise ValueError(f"--mlm-probability must be in (0, 1), got {d.mlm_probability}")
        if d.objective not in (None, "mlm-nsp", "mlm"):
            raise ValueError(f"--objective must be mlm-nsp or mlm, not {d.objective!r}")
        if d.dataset and (d.train_file or d.validation_file or d.data_dir):
            raise ValueError("--dataset and --train-file/--validation-file/--data-dir all say where the corpus is: "
                             "give one")
        if not 0 < d.shard_mb < math.inf:
            raise ValueError(f"--shard-mb must be a positive number, got {d.shard_mb}")
        for flag, value in (("--num-proc", d.num_proc), ("--dupe-factor", d.dupe_factor)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")

    def _check_windows(self) -> None:
        """SQuAD windows, sample caps, padding and loading."""
        d = self.data
        if d.doc_stride < 0:
            raise ValueError(f"--doc-stride must be 0 (windows that do not overlap) or more, got {d.doc_stride}")
        for flag, value in (("--max-query-length", d.max_query_length),
                            ("--n-best-size", d.n_best_size), ("--max-answer-length", d.max_answer_length),
                            ("--max-train-samples", d.max_train_samples), ("--max-eval-samples", d.max_eval_samples)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if d.pad_to_multiple_of is not None and d.pad_to_multiple_of < 0:
            raise ValueError(f"--pad-to-multiple-of must be 0 (off) or more, got {d.pad_to_multiple_of}")
        if d.num_workers is not None and d.num_workers < 0:
            raise ValueError(f"--num-workers must be 0 (load in the main process) or more, got {d.num_workers}")

    def check_best(self) -> None:
        """--keep-best and early stopping: what they need, and flags that would do nothing."""
        t = self.train
        if t.early_stopping_patience is not None and t.early_stopping_patience < 1:
            raise ValueError(f"--early-stopping-patience must be at least 1, got {t.early_stopping_patience}")
        if not 0 <= t.early_stopping_delta < math.inf:
            raise ValueError(f"--early-stopping-delta must be 0 or a positive finite number, got "
                             f"{t.early_stopping_delta}")
        if t.best_mode not in (None, "max", "min"):
            raise ValueError(f"--best-mode must be max or min, not {t.best_mode!r}")
        if t.best_metric is not None and not t.best_metric.strip():
            raise ValueError("--best-metric is empty: name an evaluation metric (e.g. accuracy)")
        given = [flag for flag, on in (("--keep-best", t.keep_best), ("--early-stopping-patience",
                                                                       t.early_stopping_patience is not None)) if on]
        if t.early_stopping_delta and t.early_stopping_patience is None:
            raise ValueError("--early-stopping-delta applies to early stopping: add --early-stopping-patience K, or "
                             "drop it")
        for flag, value in (("--best-metric", t.best_metric), ("--best-mode", t.best_mode)):
            if value is not None and not t.tracks_best():
                raise ValueError(f"{flag} picks the best evaluation for --keep-best or --early-stopping-patience, "
                                 "and neither is given: add one, or drop it")
        if given and t.eval_only:
            raise ValueError(f"--eval-only does not train, so {' and '.join(given)} do not apply: drop them")
        if given and not t.eval_every:
            raise ValueError(f"{' and '.join(given)} compare the evaluations made every --eval-every steps: give "
                             "--eval-every N (without it the only evaluation is the last step's)")

    def _check_own_data(self) -> None:
        d = self.data
        own = [f for f, v in (("--text-columns", d.text_columns), ("--label-column", d.label_column),
                              ("--dataset-name", d.dataset_name), ("--dataset-config", d.dataset_config)) if v]
        if own and self.task not in OWN_TASKS:
            raise ValueError(f"{own[0]} describes your own data, for --task {' | '.join(OWN_TASKS)}; --task "
                             f"{self.task} has its own columns: drop {own[0]}")
        if d.dataset_config and not d.dataset_name:
            raise ValueError("--dataset-config picks a config of --dataset-name: give --dataset-name too")
        if d.dataset_name and (d.train_file or d.validation_file):
            raise ValueError("--dataset-name and --train-file/--validation-file both say where the data is: give one")
        if d.text_columns is not None:
            cols = d.text_columns.split(",")
            if not 1 <= len(cols) <= 2 or not all(c.strip() for c in cols):
                raise ValueError(f"--text-columns takes one column name, or two comma-separated (a pair), not "
                                 f"{d.text_columns!r}")
            if len({c.strip() for c in cols}) < len(cols):
                raise ValueError(f"--text-columns names {cols[0].strip()!r} twice; a pair is two columns")
        if d.label_column is not None and (not d.label_column.strip() or "," in d.label_column):
            raise ValueError(f"--label-column takes one column name, not {d.label_column!r}")
        text = [c.strip() for c in (d.text_columns or "text").split(",")]  # own.task_from_flags's default
        if d.label_column and d.label_column.strip() in text:
            raise ValueError(f"--label-column {d.label_column} is also one of --text-columns; the label is not text")

    def seed_list(self) -> list[int]:
        """--seeds as integers (just --seed without it)."""
        return _number_list(self.seeds, int, "--seeds") if self.seeds else [self.seed]

    def lr_list(self) -> list[float]:
        """--lrs as floats (just --lr without it)."""
        return _number_list(self.lrs, float, "--lrs") if self.lrs else [self.optim.lr]

    def is_sweep(self) -> bool:
        """Several runs of one recipe (--seeds, --lrs), summarised in one table."""
        return bool(self.seeds or self.lrs)

    def _check_sweep(self) -> None:
        if not self.is_sweep():
            return
        what = "--seeds" if self.seeds else "--lrs"
        for seed in self.seed_list():
            if not 0 <= seed < 2**32:
                raise ValueError(f"--seeds: {seed} is not in [0, 2**32)")
        for lr in self.lr_list():
            if not 0 < lr < math.inf:
                raise ValueError(f"--lrs: {lr} is not a positive finite learning rate")
        if self.task in ("pretrain", "tokenizer"):
            raise ValueError(f"{what} picks a fine-tuning run by its dev score; --task {self.task} has none: drop "
                             f"{what}")
        if self.train.eval_only:
            raise ValueError(f"{what} trains several runs to pick from; --eval-only trains none: drop one")
        if self.train.resume_from:
            raise ValueError(f"{what} runs several runs, each in its own directory: continue them with --resume "
                             "(not --resume-from one checkpoint)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        sub = {"data": DataConfig, "optim": OptimConfig, "train": TrainConfig}
        kw = {k: (sub[k](**v) if k in sub else v) for k, v in d.items()}
        return cls(**kw)


# ---------------------------------------------------------------------------------------------
# Command line: one flag per leaf field, --field-name, help from the field's metadata.


def _leaf_fields(cls: type) -> list[tuple[str | None, dataclasses.Field, Any]]:
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += [(f.name, g, t) for _, g, t in _leaf_fields(hints[f.name])]
        else:
            out.append((None, f, hints[f.name]))
    return out


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the whole usage block first: dozens of flags) from the launch's
    first process only (every process parses the same command line); exit status 2, as argparse's."""

    def error(self, message: str) -> NoReturn:
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write(f"{self.prog}: error: {message} (--help lists the flags)\n")
        sys.exit(2)


def build_parser(prog: str = "bert-dist") -> argparse.ArgumentParser:
    """The argparse parser generated from `RunConfig` (flags are field names with dashes)."""
    p = ArgumentParser(prog=prog, description="Fine-tune or pretrain BERT with Accelerate.",
                       epilog="commands: bert-dist [train] FLAGS (this list); bert-dist pretrain / tokenizer FLAGS "
                              "(--task pretrain / tokenizer); bert-dist prepare FLAGS (a pretraining run's corpus, "
                              "ahead of it); bert-dist predict | export | report | score-squad "
                              "(on a finished run: each has its own --help)")
    defaults = RunConfig()
    for group, f, typ in _leaf_fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(getattr(defaults, group) if group else defaults, f.name)
        shown = default is not None and default is not False  # 0 and 0.0 are defaults to show
        helptext = f.metadata.get("help", "") + (f" (default: {default})" if shown else "")
        if typ is bool or typ == (bool | None):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
            continue
        base = next((t for t in (int, float, str) if typ in (t, t | None)), str)
        p.add_argument(flag, dest=f.name, type=base, default=None, help=helptext)
    return p


def config_from_args(argv: list[str] | None = None) -> RunConfig:
    """Parse the command line into a validated `RunConfig`; only flags given override defaults."""
    args = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    given = {k: v for k, v in args.items() if v is not None}
    if "tasks" in given:
        given.setdefault("task", "glue")
    return config_from_overrides(given)


def flags_given(argv: list[str] | None = None) -> set[str]:
    """The settings the command line gives (field names), whatever their values: `--lr 2e-5` is given even where it
    equals the default (the GLUE suite's per-task recipe gives way to it)."""
    return {k for k, v in vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv)).items()
            if v is not None}


def config_from_overrides(given: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Apply flat {field_name: value} overrides to `base` (or the defaults), then validate."""
    d = (base or RunConfig()).to_dict()
    leaf_groups = {f.name: group for group, f, _ in _leaf_fields(RunConfig)}
    for k, v in given.items():
        if k not in leaf_groups:
            raise ValueError(f"unknown option {k!r}")
        (d[leaf_groups[k]] if leaf_groups[k] else d)[k] = v
    return RunConfig.from_dict(d)


def _number_list(text: str, kind: type, flag: str) -> list:
    """'1,2,3' -> [1, 2, 3] (ValueError naming `flag`); repeats are dropped, the order kept."""
    out = []
    for item in text.split(","):
        try:
            value = kind(item.strip())
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"{flag}: {item.strip()!r} is not {what} (give a comma-separated list, e.g. "
                             f"{'1,2,3' if kind is int else '2e-5,3e-5,5e-5'})") from None
        if value not in out:
            out.append(value)
    return out


def dump(cfg: Any) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=False)


@dataclass(frozen=True)
class TaskSpec:
    """A task as data: where its rows come from, which columns are text, and how it is scored."""

    name: str
    kind: str
    """classification | multi_label | regression | qa | pretrain: picks the head, the loss and the features."""
    hub_path: str
    """Hugging Face dataset id (nyu-mll/glue, rajpurkar/squad, ...)."""
    hub_config: str | None = None
    text_columns: tuple[str, ...] = ()
    label_column: str = "label"
    label_names: tuple[str, ...] = ()
    """Class names by label id; empty for regression."""
    metric: str = "glue"
    """A metric module of bert_dist/metrics."""
    metric_config: str | None = None
    main_metric: str = "accuracy"
    """The metric that goes in tables and picks the best run."""
    train_split: str = "train"
    eval_splits: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ("test",)
    submission_names: tuple[str, ...] = ()
    """GLUE submission file stem for each test split (SST-2, MNLI-m, ...)."""
    submission_label_names: bool = False
    """GLUE submissions of this task name the class (entailment) rather than give its id."""
    max_length: int = 128
    data_name: str | None = None
    """Folder name under --data-dir (default: the task name)."""
    other_splits: tuple[tuple[str, str, str], ...] = ()
    """Test splits kept in another hub config: (split name here, that config, its split there), read from
    --data-dir's folder of that name. MNLI's `ax`: GLUE's diagnostic set (AX.tsv), predicted by the MNLI model."""
    from_flags: bool = False
    """A task on the user's own data (data/own.py): its label names come from the training split, and labels are
    matched to them by value (a label 5 is the class named "5", not id 5)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskSpec:
        """The inverse of `to_dict` through JSON (lists back to tuples); unknown keys are ignored."""
        def tuples(v: Any) -> Any:
            return tuple(tuples(x) for x in v) if isinstance(v, list) else v

        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuples(v) for k, v in d.items() if k in names})

    def split_location(self, split: str) -> tuple[str, str]:
        """(--data-dir folder, file stem) of `split`: <task>/<split>, or another config's folder and split."""
        for name, config, theirs in self.other_splits:
            if name == split:
                return config, theirs
        return self.data_name or self.name, split

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == "regression" else len(self.label_names)

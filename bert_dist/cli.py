"""The `bert-dist` console script: `bert-dist [train] --task ...` runs a job (same flags as run.py).

`bert-dist pretrain ...` and `bert-dist tokenizer ...` are `--task pretrain` and `--task tokenizer`.
`bert-dist prepare ...` (the pretraining run's flags) prepares its corpus ahead of the run, and prints where.
After a run:

    bert-dist predict --model RUN_DIR [--text T [--text-pair P]] [--file F.jsonl|.csv|.tsv]   (or stdin)
    bert-dist export --model RUN_DIR --format hf --out DIR
    bert-dist report RUN_DIR
    bert-dist score-squad PREDICTIONS_JSON DEV_JSON [--na-prob-file F] [--na-prob-thresh T]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from bert_dist.config import MIN_MAX_LENGTH, ArgumentParser
from bert_dist.console import emit, fail, setup_logging

SUBCOMMANDS = {"train": None, "pretrain": "pretrain", "tokenizer": "tokenizer"}
"""First word -> the --task it implies (None: the flags say)."""


def predict_parser() -> ArgumentParser:
    p = ArgumentParser(prog="bert-dist predict", description="Predict with a finished run: JSON Lines "
                                "on stdout, one line per input (label and probabilities, a score, or an answer).")
    p.add_argument("--model", required=True, help="a bert-dist run directory (or its Hugging Face export)")
    p.add_argument("--text", action="append", help="a text (repeatable); the question for a SQuAD model")
    p.add_argument("--text-pair", action="append", help="its second text (pair tasks), or the SQuAD context")
    p.add_argument("--file", help=".jsonl, .csv or .tsv with the task's text columns (or text, text_pair); "
                   "default: JSON Lines or plain lines on stdin (a tab between the two texts of a pair)")
    p.add_argument("--batch-size", type=int, help="rows per forward pass (default: the run's --eval-batch-size)")
    p.add_argument("--max-length", type=int, help="tokens per sequence (default: the run's)")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                   help="autocast for the forward passes (default: no, fp32); the run's own precision gives back its "
                        "predictions_<split>.jsonl to the digit")
    return p


def predict(args: argparse.Namespace) -> int:
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--max-length", args.max_length, MIN_MAX_LENGTH)):
        if value is not None and value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    from bert_dist.predict import predict_main

    return predict_main(args.model, args.text, args.text_pair, args.file, args.batch_size, args.max_length,
                        mixed_precision=args.mixed_precision)


def export_parser() -> ArgumentParser:
    p = ArgumentParser(prog="bert-dist export", description="Write a run as a Hugging Face model "
                                "directory (config, safetensors, tokenizer files) that transformers loads.")
    p.add_argument("--model", required=True, help="a bert-dist run directory")
    p.add_argument("--format", default="hf", choices=["hf"], help="hf: Hugging Face transformers (the only one)")
    p.add_argument("--out", required=True, help="the directory to write (new or empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, replacing its model files")
    return p


def export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bert_dist.weights import export_hf

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} is not empty; give a new directory, or --overwrite to replace its model files")
    try:
        emit(str(export_hf(args.model, out)))
    except OSError as e:  # not writable, a file in the way, ...: the user's path, not our bug
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return 0


def prepare(argv: list[str]) -> int:
    """`bert-dist prepare`: the pretraining run's flags -> its prepared corpus
    (`bert_dist.data.pretraining.prepare_main`); its directory on stdout, progress on stderr."""
    from bert_dist.config import config_from_args

    setup_logging(True)  # progress: preparing a large corpus takes a while
    try:
        cfg = config_from_args([*argv, "--task", "pretrain"])  # last: this is a pretraining run's corpus
        if cfg.smoke:  # the corpus of `bert-dist pretrain --smoke`
            from bert_dist.data.synthetic import smoke_config

            cfg = smoke_config(cfg)
        from bert_dist.data.pretraining import prepare_main

        emit(str(prepare_main(cfg)))
    except ValueError as e:  # a bad flag or corpus: one red line, no traceback
        fail(str(e))
    return 0


def report_parser() -> ArgumentParser:
    p = ArgumentParser(prog="bert-dist report", description="(Re)write a run's report.html and README.md (model "
                                "card) from its files; a GLUE suite's, for every task.")
    p.add_argument("run_dir", help="a run's --output-dir (or a --task glue output dir: every task in it)")
    return p


def report(args: argparse.Namespace) -> int:
    from bert_dist.report import write_reports

    for path in write_reports(args.run_dir):
        emit(str(path))
    return 0


def score_squad_parser() -> ArgumentParser:
    p = ArgumentParser(prog="bert-dist score-squad", description="Score official-format SQuAD v1.1/v2.0 predictions "
                                "({id: answer text}) against an official dev JSON: metrics as JSON on stdout.")
    p.add_argument("predictions_json", help="official-format predictions file: {question_id: answer}")
    p.add_argument("dev_json", help="official SQuAD dev file, e.g. dev-v1.1.json or dev-v2.0.json")
    p.add_argument("--na-prob-file", help="SQuAD v2: JSON {question_id: no-answer probability}")
    p.add_argument("--na-prob-thresh", type=float, default=1.0,
                   help="SQuAD v2: predict no answer when the no-answer probability exceeds this (default: 1.0)")
    return p


def score_squad(args: argparse.Namespace) -> int:
    from bert_dist.metrics.score_squad import score_files

    emit(json.dumps(score_files(args.predictions_json, args.dev_json, args.na_prob_file, args.na_prob_thresh),
                    indent=2))
    return 0


TOOLS: dict[str, tuple[Callable[[], ArgumentParser], Callable[[argparse.Namespace], int]]] = {
    "predict": (predict_parser, predict), "export": (export_parser, export), "report": (report_parser, report),
    "score-squad": (score_squad_parser, score_squad)}
"""Commands that work on a finished run rather than train one: (their parser, what they do with its arguments)."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"]:  # before a run, with its flags
        return prepare(argv[1:])
    if argv[:1] and argv[0] in TOOLS:
        setup_logging(True, logging.WARNING)  # stdout is the output: only problems go to stderr
        parser, tool = TOOLS[argv[0]]
        args = parser().parse_args(argv[1:])
        try:
            return tool(args)
        except ValueError as e:  # a bad run dir, input file or flag: one red line, no traceback
            fail(str(e))
    if argv[:1] and argv[0] in SUBCOMMANDS:
        task = SUBCOMMANDS[argv[0]]
        argv = argv[1:] + (["--task", task] if task else [])  # last: the subcommand wins over a stray --task
    from bert_dist.run import launch

    launch(argv)
    return 0  # not reached: launch exits


if __name__ == "__main__":
    sys.exit(main())

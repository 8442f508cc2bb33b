"""The `bert-dist` console script: `bert-dist [train] --task ...` runs a job (same flags as run.py).

`bert-dist pretrain ...` and `bert-dist tokenizer ...` are `--task pretrain` and `--task tokenizer`.
"""

from __future__ import annotations

import sys

SUBCOMMANDS = {"train": None, "pretrain": "pretrain", "tokenizer": "tokenizer"}
"""First word -> the --task it implies (None: the flags say)."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in SUBCOMMANDS:
        task = SUBCOMMANDS[argv[0]]
        argv = argv[1:] + (["--task", task] if task else [])  # last: the subcommand wins over a stray --task
    from bert_dist.run import main as run_main

    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())

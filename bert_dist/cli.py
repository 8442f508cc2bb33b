"""The `bert-dist` console script: `bert-dist [train] --task ...` runs a job (same flags as run.py)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        argv = argv[1:]
    from bert_dist.run import main as run_main

    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())

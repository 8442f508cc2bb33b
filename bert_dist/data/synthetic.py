"""Small, learnable data that the project makes itself: smoke runs and tests, no network, no shared files.

Each task's rows follow its hub schema, with a rule a tiny model learns in a few dozen steps:
single sentences are labelled by which word list dominates; pairs by whether the second sentence
repeats the first; regression scores by word overlap.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from bert_dist.config import TaskSpec

POSITIVE = "good great fine lovely superb bright warm happy gentle clever".split()
NEGATIVE = "bad awful poor dull grim cold sad harsh clumsy boring".split()
FILLER = "the a film story it was and very but quite of this that plot cast".split()


def _sentence(rng: random.Random, words: list[str], n_key: int = 2) -> str:
    toks = rng.choices(FILLER, k=rng.randint(3, 8)) + rng.choices(words, k=n_key)
    rng.shuffle(toks)
    return " ".join(toks)


def make_rows(spec: TaskSpec, n: int, seed: int, with_labels: bool = True) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if len(spec.text_columns) == 1:
            label = rng.randrange(2) if spec.num_labels >= 2 else 0
            row = {spec.text_columns[0]: _sentence(rng, POSITIVE if label else NEGATIVE)}
            label = label % max(spec.num_labels, 1)
        else:
            a = _sentence(rng, POSITIVE + NEGATIVE)
            same = rng.randrange(2)
            b = " ".join(reversed(a.split())) if same else _sentence(rng, POSITIVE + NEGATIVE)
            row = {spec.text_columns[0]: a, spec.text_columns[1]: b}
            if spec.kind == "regression":
                sa, sb = set(a.split()), set(b.split())
                label = round(5.0 * len(sa & sb) / len(sa | sb), 2)
            else:
                # entailment-style tasks put "same" at id 0, paraphrase-style ones at id 1.
                label = (1 - same) if spec.label_names[:1] == ("entailment",) else same
        row[spec.label_column] = label if with_labels else (-1.0 if spec.kind == "regression" else -1)
        row["idx"] = i
        rows.append(row)
    return rows


def write_task_data(spec: TaskSpec, out_dir: Path, n_train: int = 512, n_eval: int = 97, n_test: int = 50,
                    seed: int = 0) -> Path:
    """Write <out_dir>/<task>/{train, eval splits, test splits}.jsonl; returns out_dir (a --data-dir)."""
    folder = Path(out_dir) / (spec.data_name or spec.name)
    folder.mkdir(parents=True, exist_ok=True)
    splits = [(spec.train_split, n_train, True), *[(s, n_eval, True) for s in spec.eval_splits],
              *[(s, n_test, False) for s in spec.test_splits]]
    for k, (split, n, labelled) in enumerate(splits):
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for row in make_rows(spec, n, seed + k, with_labels=labelled):
                fh.write(json.dumps(row) + "\n")
    return Path(out_dir)


def smoke_config(cfg):
    """--smoke: the tiny preset from scratch on synthetic data for the task, a few dozen steps, offline."""
    import os
    import tempfile

    from bert_dist.config import config_from_overrides
    from bert_dist.data import get_task

    spec = get_task(cfg.task)
    data_dir = Path(tempfile.gettempdir()) / f"bert-dist-smoke-{os.getuid()}" / f"seed{cfg.seed}"
    folder = data_dir / (spec.data_name or spec.name)
    if not (folder / f"{spec.train_split}.jsonl").exists():
        # Every process may get here at once: write privately, then move into place (same content).
        tmp = Path(tempfile.mkdtemp(dir=data_dir.parent if data_dir.parent.exists() else None))
        write_task_data(spec, tmp, seed=cfg.seed)
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp / (spec.data_name or spec.name), folder)
        except OSError:
            pass  # another process won the race with identical files
    overrides = {"init": "scratch", "preset": "tiny", "data_dir": str(data_dir), "vocab_size": 400,
                 "lr": max(cfg.optim.lr, 1e-3), "warmup_ratio": 0.0, "log_every": 10, "batch_size": 16,
                 "max_steps": cfg.train.max_steps or 60}
    if cfg.output_dir is None:
        overrides["output_dir"] = f"runs/smoke-{cfg.task}"
        overrides["overwrite"] = True
    return config_from_overrides(overrides, base=cfg)

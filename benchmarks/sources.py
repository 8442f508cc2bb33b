"""What the benchmarks run on: their options, and the data and tokenizer (real, or made on the spot).

Real data is the `--data-dir` layout of the package (`DIR/glue/sst2/train.jsonl`,
`DIR/squad/validation.jsonl`) and a Hugging Face model directory for the tokenizer. Where either is
missing, or with `--synthetic`, the package's synthetic rows and a tokenizer trained on them stand in,
so `python -m benchmarks --quick --synthetic` needs nothing but the repository.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_TOKENIZER = REPO.parent / "shared" / "models" / "all-MiniLM-L6-v2"


@dataclass
class Options:
    """One benchmark run: which sizes, how many rounds, on what."""

    device: torch.device
    quick: bool
    presets: list[str]
    shapes: list[tuple[int, int]]
    """(batch, sequence length) pairs of the step and inference suites."""
    precisions: list[str]
    """fp32 and/or bf16 (autocast)."""
    inputs: list[str]
    """full (every token real) and/or padded (each row 1/4 to all of T real, as after padding to max_length)."""
    rounds: int
    warmup: int
    pretrain_batch: int
    e2e_preset: str
    e2e_steps: int | None
    """Steps per side in the e2e suite; None = one epoch."""
    e2e_precision: str
    data_dir: Path
    tokenizer: Path
    synthetic: bool
    max_rows: int | None
    """Preprocess/e2e: use only the first N rows of each dataset (None = all)."""
    cpu_kernels: str = "auto"
    """--cpu-kernels for our model: auto (the CPU kernels on a CPU device) or off."""
    baseline_model: Path | None = None
    """Inference suite: another version of bert_dist/model.py, timed in the same rounds with the same weights."""


@dataclass
class Source:
    """Where the text comes from: a --data-dir, the tokenizer, and the directory transformers loads it from."""

    data_dir: Path
    tokenizer: Tokenizer
    hf_tokenizer_dir: Path
    synthetic: bool


def source(opts: Options, work_dir: Path) -> Source:
    """The real data and tokenizer when present (and not --synthetic), else synthetic stand-ins in `work_dir`."""
    from bert_dist.tokenizer import load_tokenizer

    real = (opts.data_dir / "glue" / "sst2" / "train.jsonl").is_file() and (
        opts.data_dir / "squad" / "validation.jsonl").is_file() and opts.tokenizer.is_dir()
    if real and not opts.synthetic:
        return Source(opts.data_dir, load_tokenizer(opts.tokenizer), opts.tokenizer, synthetic=False)
    return _synthetic(work_dir)


def _synthetic(work_dir: Path) -> Source:
    from bert_dist.data import get_task
    from bert_dist.data.synthetic import make_qa_rows, write_task_data
    from bert_dist.tokenizer import save_tokenizer, train_tokenizer

    data_dir = work_dir / "data"
    write_task_data(get_task("sst2"), data_dir / "glue", n_train=2000, n_eval=200)
    squad = data_dir / "squad"
    squad.mkdir(parents=True, exist_ok=True)
    rows = make_qa_rows(300, seed=0)
    (squad / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    texts = [json.loads(line)["sentence"] for line in (data_dir / "glue" / "sst2" / "train.jsonl").open()]
    tok = train_tokenizer(texts + [r["context"] for r in rows] + [r["question"] for r in rows], vocab_size=400)
    tok_dir = work_dir / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, tok_dir)
    return Source(data_dir, tok, tok_dir, synthetic=True)


def hf_tokenizer(src: Source):
    """transformers' fast BERT tokenizer over the same vocabulary (the reference's tokenizer)."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(src.hf_tokenizer_dir))


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="bert-dist-bench-"))

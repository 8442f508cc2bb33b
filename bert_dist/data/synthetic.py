"""Small, learnable data that the project makes itself: smoke runs and tests, no network, no shared files.

Each task's rows follow its hub schema, with a rule a tiny model learns in a few dozen steps:
single sentences are labelled by which word list dominates; pairs by whether the second sentence
repeats the first; regression scores by word overlap; SQuAD answers are the one "<colour> <animal>"
phrase of the context (v2: a third of the contexts have none, and the answer is empty).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from pathlib import Path

from bert_dist.config import TaskSpec

POSITIVE = ["good", "great", "fine", "lovely", "superb", "bright", "warm", "happy", "gentle", "clever"]
NEGATIVE = ["bad", "awful", "poor", "dull", "grim", "cold", "sad", "harsh", "clumsy", "boring"]
FILLER = ["the", "a", "film", "story", "it", "was", "and", "very", "but", "quite", "of", "this", "that", "plot", "cast"]
COLOURS = ["red", "blue", "green", "brown", "black", "white", "grey", "pink"]
ANIMALS = ["fox", "cat", "dog", "owl", "horse", "mouse", "tiger", "whale"]
QUESTIONS = ("which animal is in the story ?", "what did they see ?", "who came by ?")
SYNTHETIC_VERSION = 2
"""Part of the --smoke data folder's name: bump it when the rows change, so stale files are not reused."""


def _sentence(rng: random.Random, words: list[str], n_key: int = 2) -> str:
    toks = rng.choices(FILLER, k=rng.randint(3, 8)) + rng.choices(words, k=n_key)
    rng.shuffle(toks)
    return " ".join(toks)


def make_qa_rows(n: int, seed: int, unanswerable: bool = False, with_answers: bool = True) -> list[dict]:
    """SQuAD rows (id, title, context, question, answers) in the hub's schema.

    Contexts are 10-150 words of filler with one "<colour> <animal>" phrase somewhere (so long ones
    span several windows at --max-length 128); the answer is that phrase, at its true character
    offset. With `unanswerable`, a third of the contexts lack the phrase and have no answer.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.choices(FILLER, k=rng.randint(10, 150))
        answer = ""
        if not (unanswerable and rng.random() < 1 / 3):
            at = rng.randint(0, len(words))
            answer = f"{rng.choice(COLOURS)} {rng.choice(ANIMALS)}"
            words.insert(at, answer)
        context = " ".join(words) + "."
        answers: dict[str, list] = {"text": [], "answer_start": []}
        if answer and with_answers:
            # The phrase occurs once (filler holds no colour or animal), so index() is its true offset.
            answers = {"text": [answer], "answer_start": [context.index(answer)]}
        rows.append({"id": f"syn-{seed}-{i:05d}", "title": "synthetic", "context": context,
                     "question": rng.choice(QUESTIONS), "answers": answers})
    return rows


def make_rows(spec: TaskSpec, n: int, seed: int, with_labels: bool = True) -> list[dict]:
    if spec.kind == "qa":
        return make_qa_rows(n, seed, unanswerable=spec.metric == "squad_v2", with_answers=with_labels)
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
    """Write <out_dir>/<task>/{train, eval splits, test splits}.jsonl (a split of another config in its own folder:
    MNLI's ax as ax/test.jsonl); returns out_dir (a --data-dir)."""
    splits = [(spec.train_split, n_train, True), *[(s, n_eval, True) for s in spec.eval_splits],
              *[(s, n_test, False) for s in spec.test_splits]]
    for k, (split, n, labelled) in enumerate(splits):
        folder, stem = spec.split_location(split)
        path = Path(out_dir) / folder / f"{stem}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            for row in make_rows(spec, n, seed + k, with_labels=labelled):
                fh.write(json.dumps(row) + "\n")
    return Path(out_dir)


def smoke_config(cfg):
    """--smoke: the tiny preset from scratch on synthetic data for the task, a few dozen steps, offline."""
    import os
    import tempfile

    from bert_dist.config import config_from_overrides
    from bert_dist.data import get_task

    spec = get_task("pretrain" if cfg.task == "tokenizer" else cfg.task)  # a tokenizer trains on the corpus
    data_dir = Path(tempfile.gettempdir()) / f"bert-dist-smoke-{os.getuid()}" / f"v{SYNTHETIC_VERSION}-seed{cfg.seed}"
    folder = data_dir / (spec.data_name or spec.name)
    if not (folder / f"{spec.train_split}.jsonl").exists():
        # Every process may get here at once: write privately, then move into place (same content).
        tmp = Path(tempfile.mkdtemp(dir=data_dir.parent if data_dir.parent.exists() else None))
        if spec.kind == "pretrain":
            write_pretrain_corpus(tmp, seed=cfg.seed)
        else:
            write_task_data(spec, tmp, seed=cfg.seed)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # another process won the race with identical files
            os.replace(tmp / (spec.data_name or spec.name), folder)
        shutil.rmtree(tmp, ignore_errors=True)
    # An explicit --init (a pretrained run, say) is kept; the default is already scratch.
    overrides = {"preset": "tiny", "data_dir": str(data_dir), "vocab_size": 400,
                 "lr": max(cfg.optim.lr, 1e-3), "warmup_ratio": 0.0, "log_every": 10, "batch_size": 16,
                 "max_steps": cfg.train.max_steps or 60}
    if spec.kind == "qa":
        # Short windows keep the tiny model fast and still cut the longer contexts into several.
        overrides.update(max_length=128, doc_stride=32, max_query_length=16)
    if cfg.output_dir is None:
        overrides["output_dir"] = f"runs/smoke-{cfg.task}"
        overrides["overwrite"] = True
    return config_from_overrides(overrides, base=cfg)


TOPICS = [
    ["river", "boat", "water", "bridge", "fish", "stream", "bank", "mill"],
    ["king", "castle", "army", "crown", "siege", "throne", "knight", "realm"],
    ["train", "station", "rail", "engine", "track", "line", "carriage", "depot"],
    ["song", "album", "band", "guitar", "chart", "tour", "single", "singer"],
    ["storm", "wind", "rain", "coast", "cyclone", "flood", "pressure", "landfall"],
    ["church", "bishop", "abbey", "saint", "choir", "parish", "altar", "monk"],
]
"""Topic words of the synthetic pretraining corpus: each document keeps to one topic."""


def write_pretrain_corpus(out_dir: Path, n_train: int = 40, n_eval: int = 8, seed: int = 0) -> Path:
    """Write <out_dir>/wikitext-2/{train,validation}.jsonl in WikiText's row layout; returns out_dir.

    Each document is a ` = Title = ` heading, a ` = = Section = = ` heading and paragraphs of sentences
    mixing one topic's words with the GLUE sentences' words (so a tokenizer trained here also covers
    the --smoke SST-2 rows). A random second segment comes from another topic, so NSP is learnable,
    and topic words predict each other, so MLM is too.
    """
    folder = Path(out_dir) / "wikitext-2"
    folder.mkdir(parents=True, exist_ok=True)
    for k, (split, n_docs) in enumerate((("train", n_train), ("validation", n_eval))):
        rng = random.Random(seed * 1000 + k)
        rows = [""]
        for d in range(n_docs):
            topic = TOPICS[rng.randrange(len(TOPICS))]
            rows += [f" = {topic[0].title()} {d} = \n", "", f" = = {topic[1].title()} = = \n", ""]
            for _ in range(rng.randint(3, 6)):
                words = topic + rng.choice((POSITIVE, NEGATIVE))
                sentences = [_sentence(rng, words, n_key=3) for _ in range(rng.randint(3, 6))]
                rows += [" " + " ".join(s[0].upper() + s[1:] + " ." for s in sentences) + " \n", ""]
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"text": t}) + "\n" for t in rows)
    return Path(out_dir)

"""Pretraining data: a corpus (`bert_dist.data.corpus`) -> documents -> training examples in Arrow shards on disk.

`prepare` runs once per corpus and settings (`bert-dist prepare`, or the first `--task pretrain` on raw text), in
parallel over processes, one unit of the corpus (about --shard-mb of text) at a time, so its memory is bounded by
the units in flight, never by the corpus. Each unit's output is a function of the unit, the tokenizer and the
settings (its random draws are seeded from --seed and the unit's number), so the prepared corpus is the same
whatever the number of processes, and a preparation that stopped picks up at the first unit not done.
Training reads the shards memory-mapped (`open_prepared`): every process opens them in a second, and each reads
the rows of its own batches.

A unit's rows become documents under its document rule (`corpus.document_rule`); heading rows of WikiText
(` = = Section = = `) are dropped, as the BERT paper drops headers. A row is split into sentences at line breaks,
at [.!?] before an upper-case start, and after 。！？. Then, by --objective:

- mlm-nsp (Google's): pairs as google-research/bert create_pretraining_data.py makes them: a per-document
  target length (`max_length - 3`, or with `short_seq_prob` a random shorter one), sentences gathered into a
  chunk up to it, A = a random prefix of the chunk, B = the rest (label 0, "is next") or, half the time, a run
  of sentences from another document of the same unit (label 1, "random"; as LDDL draws it from its partition),
  whose unused sentences are put back; truncated longest-first, from a random end. --dupe-factor passes pair the
  same documents differently. A sentence longer than half a sequence (lower-case or unpunctuated text) is cut
  into pieces of that length, rather than filling a chunk alone and being truncated.
- mlm (RoBERTa's FULL-SENTENCES, as Hugging Face's run_mlm `group_texts`): the unit's documents joined with [SEP]
  between them and cut into full sequences of [CLS] + `max_length - 2` tokens + [SEP]; no token types, no NSP.

Held-out text: --validation-file's (or the hub dataset's validation split), prepared alike (one pass, its own
seed); without one, every 20th document of each part of a unit is held out (the last two of a part of 4 to 19).

Every example carries `word_start` (False on a token that continues a word, `##x`) for whole-word masking, its
`length`, and a corpus-wide `idx` (unit * 2**32 + row) that seeds its masks (`MLMCollator`).

The last section goes from the run's flags to a prepared directory (`prepare_main` is `bert-dist prepare`); none
of it imports torch, so the preparing processes stay small.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer

from bert_dist.config import RunConfig, TaskSpec
from bert_dist.data import _find_split_file
from bert_dist.data.corpus import (
    TEXT_SUFFIXES,
    Corpus,
    Unit,
    corpus_key,
    corpus_texts,
    cpu_count,
    document_rule,
    file_sources,
    hub_source,
    is_heading,
    is_title,
    open_hub,
    plan,
    unit_rows,
)
from bert_dist.tokenizer import check_special_tokens, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

IS_NEXT, IS_RANDOM = 0, 1
"""next_sentence_label values, as in Hugging Face's BertForPreTraining: 0 = B follows A."""
OBJECTIVES = ("mlm-nsp", "mlm")
FORMAT_VERSION = 1
"""Bumped whenever the examples made from the same corpus and settings change: a cache key part."""
HOLD_OUT_EVERY = 20
MANIFEST = "manifest.json"
SETTINGS = "settings.json"

# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets) before whitespace and
# an upper-case letter, a digit or an opening quote/bracket. Simple and fast; "Mr. Smith" splits too.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])"
                           r"|(?:(?<=[。！？])|(?<=[。！？][」』）〕】”’]))(?![。！？」』）〕】”’])\s*")
# ... and after 。！？ (with any closing bracket or quote after it; a run of them, ？！, ends one sentence).

__all__ = ["IS_NEXT", "IS_RANDOM", "is_heading", "is_title"]


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: line breaks always end one; so does [.!?] before an upper-case start, and 。！？."""
    out = []
    for line in text.splitlines():
        out += [s.strip() for s in _SENTENCE_END.split(line) if s.strip()]
    return out


@dataclass(frozen=True)
class PrepareSettings:
    """What the examples depend on besides the corpus and the tokenizer (all of it in the cache key)."""

    objective: str = "mlm-nsp"
    max_length: int = 128
    dupe_factor: int = 5
    """Passes over the training documents: NSP pairs them differently each time, MLM packs them in another order."""
    seed: int = 42
    shard_mb: float = 8.0
    short_seq_prob: float = 0.1

    @property
    def shard_bytes(self) -> int:
        return max(1, int(self.shard_mb * (1 << 20)))


# ---------------------------------------------------------------------------------------------
# Rows -> documents


Document = list[np.ndarray]
"""A document: its sentences (or for --objective mlm, its rows), each an int32 array of token ids (no specials)."""


def tokenize_rows(rows: list[str], tok: Tokenizer, sentences: bool = True) -> tuple[list[bool], list[bool], list]:
    """(blank, title, segments) per row: segments are the row's sentences' token ids (`sentences` False: the whole
    row as one segment); a heading row has none, nor a sentence of only characters the tokenizer drops."""
    blank = [not t.strip() for t in rows]
    heading = [not b and is_heading(t) for t, b in zip(rows, blank)]
    title = [h and is_title(t) for t, h in zip(rows, heading)]
    pieces = [[] if b or h else (split_sentences(t) if sentences else [t]) for t, b, h in zip(rows, blank, heading)]
    flat = [s for ss in pieces for s in ss]
    ids = [e.ids for e in tok.encode_batch_fast(flat, add_special_tokens=False)] if flat else []
    segments, k = [], 0
    for ss in pieces:
        segments.append([np.array(s, dtype=np.int32) for s in ids[k : k + len(ss)] if s])
        k += len(ss)
    return blank, title, segments


class Grouper:
    """Rows -> documents under a document rule, fed batch by batch (a document may span batches)."""

    def __init__(self, rule: str):
        self.rule, self.doc, self.prev_blank, self.title = rule, [], True, False

    def feed(self, blank: list[bool], title: list[bool], segments: list[Document]) -> list[Document]:
        """The documents that the rows complete."""
        out: list[Document] = []
        for b, t, segs in zip(blank, title, segments):
            # titles: a title row between blank rows starts an article (known at the blank row after it).
            if (self.rule == "titles" and self.title and b) or (self.rule == "blank" and b) or self.rule == "rows":
                self._close(out)
            self.title = t and self.prev_blank
            self.prev_blank = b
            self.doc += segs
        return out

    def finish(self) -> list[Document]:
        out: list[Document] = []
        self._close(out)
        return out

    def _close(self, out: list[Document]) -> None:
        if self.doc:
            out.append(self.doc)
            self.doc = []


def documents(rows: list[str], tok: Tokenizer, rule: str | None = None, lines: bool = True,
              sentences: bool = True) -> list[Document]:
    """Rows of text (one source, in memory) -> documents; `rule` defaults to the rows' own (`document_rule`)."""
    grouper = Grouper(rule or document_rule(rows, lines))
    return grouper.feed(*tokenize_rows(rows, tok, sentences)) + grouper.finish()


def hold_out(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """(train, held-out): every 20th document, so topics spread over both; the last two of 4 to 19 documents."""
    n = len(docs)
    held = [i for i in range(n) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
    if len(held) < 2:  # NSP draws B from another document: two held out at least, and two left to train on
        held = [n - 2, n - 1] if n >= 4 else []
    keep = set(held)
    return [d for i, d in enumerate(docs) if i not in keep], [docs[i] for i in held]


# ---------------------------------------------------------------------------------------------
# Documents -> NSP pairs


def _truncate_pair(a: np.ndarray, b: np.ndarray, max_tokens: int, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """Longest-first; each cut from the front or the back at random (as Google: less bias)."""
    a0, a1, b0, b1 = 0, len(a), 0, len(b)
    while (a1 - a0) + (b1 - b0) > max_tokens:
        if a1 - a0 > b1 - b0:
            a0, a1 = (a0 + 1, a1) if rng.random() < 0.5 else (a0, a1 - 1)
        else:
            b0, b1 = (b0 + 1, b1) if rng.random() < 0.5 else (b0, b1 - 1)
    return a[a0:a1], b[b0:b1]


def _join(sentences: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(sentences) if sentences else np.zeros(0, np.int32)


def document_pairs(docs: list[Document], doc_index: int, max_length: int, short_seq_prob: float,
                   rng: random.Random) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(tokens_a, tokens_b, next_sentence_label) for one document, Google's create_instances_from_document. A
    random B comes from another document (from this one only when it is the only one, as Google falls back to)."""
    document = docs[doc_index]
    max_tokens = max_length - 3  # [CLS] A [SEP] B [SEP]
    # Mostly full sequences; sometimes shorter ones, so fine-tuning's short inputs are not out of distribution.
    target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
    out = []
    chunk: list[np.ndarray] = []
    length = i = 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i])
        if i == len(document) - 1 or length >= target:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            a = _join(chunk[:a_end])
            if len(chunk) == 1 or rng.random() < 0.5:
                label = IS_RANDOM
                other = doc_index
                if len(docs) > 1:
                    other = rng.randrange(len(docs) - 1)
                    other += other >= doc_index  # any document but this one
                random_doc = docs[other]
                parts, n = [], 0
                for s in random_doc[rng.randrange(len(random_doc)) :]:
                    parts.append(s)
                    n += len(s)
                    if n >= target - len(a):
                        break
                b = _join(parts)
                i -= len(chunk) - a_end  # the chunk's unused sentences start the next chunk
            else:
                label = IS_NEXT
                b = _join(chunk[a_end:])
            a, b = _truncate_pair(a, b, max_tokens, rng)
            out.append((a, b, label))
            chunk, length = [], 0
        i += 1
    return out


def cut_long_sentences(doc: Document, max_length: int) -> Document:
    """Sentences longer than half a sequence cut into pieces of that length (alone in a chunk such a sentence would be
    truncated to it, most of its tokens lost, and its B always random)."""
    piece = max(1, (max_length - 3) // 2)
    return [s[i : i + piece] for s in doc for i in range(0, len(s), piece)]


def nsp_pairs(docs: list[Document], max_length: int, rng: random.Random, dupe_factor: int = 1,
              short_seq_prob: float = 0.1) -> Iterable[list[tuple[np.ndarray, np.ndarray, int]]]:
    """One list of pairs per pass over `docs` (sentences already cut: `cut_long_sentences`)."""
    for _ in range(dupe_factor):
        yield [p for d in range(len(docs)) for p in document_pairs(docs, d, max_length, short_seq_prob, rng)]


def packed_sequences(docs: list[Document], max_length: int, sep_id: int, rng: random.Random,
                     passes: int = 1) -> Iterable[list[np.ndarray]]:
    """One list of sequences' inner tokens (without [CLS]/[SEP]) per pass: the documents, in order on the first pass
    and shuffled on the others, joined with [SEP] between them and cut every `max_length - 2` tokens (the last
    piece shorter)."""
    size = max_length - 2
    flats = [_join(d) for d in docs]
    for p in range(passes):
        order = list(range(len(flats)))
        if p:
            rng.shuffle(order)
        sep = np.array([sep_id], np.int32)
        stream = _join([x for i in order for x in (flats[i], sep)][:-1])
        yield [stream[i : i + size] for i in range(0, len(stream), size)]


# ---------------------------------------------------------------------------------------------
# Examples -> Arrow


def vocab_tables(tok: Tokenizer) -> tuple[np.ndarray, Any]:
    """(continues, id type): a (V,) bool array, True for `##x` pieces (word_start is its negation), and the
    narrowest Arrow integer type that holds every id."""
    vocab = tok.get_vocab()
    continues = np.zeros(max(vocab.values()) + 1, dtype=bool)
    for t, i in vocab.items():
        continues[i] = t.startswith("##")
    return continues, pa.uint16() if len(continues) <= 1 << 16 else pa.uint32()


def schema(objective: str, id_type: Any) -> pa.Schema:
    fields = [("input_ids", pa.list_(id_type))]
    if objective == "mlm-nsp":
        fields.append(("token_type_ids", pa.list_(pa.int8())))
    fields.append(("word_start", pa.list_(pa.bool_())))
    if objective == "mlm-nsp":
        fields.append(("next_sentence_label", pa.int8()))
    return pa.schema([*fields, ("length", pa.int32()), ("idx", pa.int64())])


def pair_batch(pairs: list[tuple[np.ndarray, np.ndarray, int]], first_idx: int, cls_id: int, sep_id: int,
               continues: np.ndarray, sch: pa.Schema) -> pa.RecordBatch:
    """[CLS] A [SEP] B [SEP] rows, token types 0 then 1 from B on."""
    lengths = np.array([len(a) + len(b) + 3 for a, b, _ in pairs], dtype=np.int32)
    offsets = np.zeros(len(pairs) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.empty(offsets[-1], dtype=np.int32)
    types = np.zeros(offsets[-1], dtype=np.int8)
    for o, (a, b, _) in zip(offsets, pairs):
        sep = o + 1 + len(a)
        ids[o], ids[o + 1 : sep], ids[sep] = cls_id, a, sep_id
        ids[sep + 1 : sep + 1 + len(b)], ids[sep + 1 + len(b)] = b, sep_id
        types[sep + 1 : sep + 2 + len(b)] = 1
    labels = np.array([label for _, _, label in pairs], dtype=np.int8)
    return _record_batch(ids, offsets, lengths, first_idx, continues, sch, types, labels)


def packed_batch(pieces: list[np.ndarray], first_idx: int, cls_id: int, sep_id: int, continues: np.ndarray,
                 sch: pa.Schema) -> pa.RecordBatch:
    """[CLS] piece [SEP] rows."""
    lengths = np.array([len(p) + 2 for p in pieces], dtype=np.int32)
    offsets = np.zeros(len(pieces) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.full(offsets[-1], sep_id, dtype=np.int32)
    for o, p in zip(offsets, pieces):
        ids[o], ids[o + 1 : o + 1 + len(p)] = cls_id, p
    return _record_batch(ids, offsets, lengths, first_idx, continues, sch)


def _record_batch(ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, first_idx: int, continues: np.ndarray,
                  sch: pa.Schema, types: np.ndarray | None = None, labels: np.ndarray | None = None) -> pa.RecordBatch:
    off = pa.array(offsets, pa.int32())
    id_type = sch.field("input_ids").type.value_type
    columns = {"input_ids": pa.ListArray.from_arrays(off, pa.array(ids.astype(id_type.to_pandas_dtype())))}
    if types is not None:
        columns["token_type_ids"] = pa.ListArray.from_arrays(off, pa.array(types))
    columns["word_start"] = pa.ListArray.from_arrays(off, pa.array(~continues[ids]))
    if labels is not None:
        columns["next_sentence_label"] = pa.array(labels)
    columns["length"] = pa.array(lengths)
    columns["idx"] = pa.array(np.arange(first_idx, first_idx + len(lengths), dtype=np.int64))
    return pa.RecordBatch.from_pydict(columns, schema=sch)


# ---------------------------------------------------------------------------------------------
# One unit (in a worker process)


def _tmp(path: Path) -> Path:
    """A name of this process's own beside `path`: two machines may prepare one corpus on a shared disk at once (the
    same bytes: whichever rename comes last wins)."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def write_atomic(path: Path, text: str) -> None:
    tmp = _tmp(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass(frozen=True)
class Job:
    """A unit to prepare: number `index` of the corpus; `role` train (documents to train on), validation, or
    train+held (every 20th document held out)."""

    index: int
    unit: Unit
    role: str
    settings: PrepareSettings
    out_dir: str
    """Holds tokenizer.json, the tokenizer to use."""


_TOKENIZERS: dict[str, Tokenizer] = {}  # by tokenizer.json's text: a worker parses it once, not once per unit


def prepare_unit(job: Job) -> tuple[int, dict[str, Any]]:
    """Prepare one unit: its example files under out_dir/<split>/, then out_dir/done/<index>.json (its counts),
    which marks it done. Returns (index, counts)."""
    s, out = job.settings, Path(job.out_dir)
    text = (out / "tokenizer.json").read_text(encoding="utf-8")
    if text not in _TOKENIZERS:
        _TOKENIZERS[text] = Tokenizer.from_str(text)
    tok = _TOKENIZERS[text]
    continues, id_type = vocab_tables(tok)
    sch = schema(s.objective, id_type)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    nsp = s.objective == "mlm-nsp"
    splits = ["train", "validation"] if job.role == "train+held" else [job.role]
    rngs = {split: random.Random(f"{s.seed}/{job.index}/{split}") for split in splits}
    counts = ("documents", "examples", "tokens", "random_next")
    stats: dict[str, Any] = {"chars": 0, "files": {k: [] for k in splits},
                             **{k: dict.fromkeys(splits, 0) for k in counts}}

    def write(part: int, docs: list[Document]) -> None:
        by_split = dict(zip(["train", "validation"], hold_out(docs))) if job.role == "train+held" else {job.role: docs}
        for split, split_docs in by_split.items():
            if not split_docs:
                continue
            stats["documents"][split] += len(split_docs)
            rng, passes = rngs[split], s.dupe_factor if split == "train" else 1
            if nsp:
                split_docs = [cut_long_sentences(d, s.max_length) for d in split_docs]
                batches = nsp_pairs(split_docs, s.max_length, rng, passes, s.short_seq_prob)
            else:
                batches = packed_sequences(split_docs, s.max_length, sep_id, rng, passes)
            path = out / split / f"{job.index:06d}-{part:04d}.arrow"
            tmp = _tmp(path)
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, sch) as writer:
                for examples in batches:
                    if not examples:
                        continue
                    first = (job.index << 32) + stats["examples"][split]
                    batch = pair_batch(examples, first, cls_id, sep_id, continues, sch) if nsp else \
                        packed_batch(examples, first, cls_id, sep_id, continues, sch)
                    writer.write_batch(batch)
                    stats["examples"][split] += batch.num_rows
                    stats["tokens"][split] += pc.sum(batch.column("length")).as_py()
                    if nsp:
                        stats["random_next"][split] += pc.sum(batch.column("next_sentence_label")).as_py()
            os.replace(tmp, path)
            stats["files"][split].append(f"{split}/{path.name}")

    grouper = Grouper(job.unit.rule)
    docs: list[Document] = []
    chars = part = 0
    for rows in unit_rows(job.unit):
        chars += sum(map(len, rows))
        docs += grouper.feed(*tokenize_rows(rows, tok, sentences=nsp))
        if chars >= s.shard_bytes and docs:  # a hub shard is streamed in parts of about --shard-mb
            write(part, docs)
            stats["chars"] += chars
            docs, chars, part = [], 0, part + 1
    docs += grouper.finish()
    if docs:
        write(part, docs)
    stats["chars"] += chars
    done = out / "done" / f"{job.index:06d}.json"
    write_atomic(done, json.dumps(stats))
    return job.index, stats


# ---------------------------------------------------------------------------------------------
# The whole corpus


def _one_thread() -> None:
    """A preparation process tokenizes on one thread: the processes are the parallelism (one per core)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def tokenizer_sha(tok: Tokenizer) -> str:
    import hashlib

    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def prepare(train: Corpus, validation: Corpus | None, tok: Tokenizer, settings: PrepareSettings, out_dir: Path,
            num_proc: int | None = None, description: str = "") -> dict[str, Any]:
    """Prepare `train` (and `validation`, else hold out every 20th document) into `out_dir`, in `num_proc` processes
    (default: the CPU count), skipping the units already done; writes out_dir/manifest.json last and returns it.

    ValueError (one line) for a corpus that cannot be read or cannot be pretrained on."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    for d in ("train", "validation", "done"):
        (out_dir / d).mkdir(parents=True, exist_ok=True)
    if not (out_dir / "tokenizer.json").is_file():
        write_atomic(out_dir / "tokenizer.json", tok.to_str())
    roles = [(u, "train" if validation else "train+held") for u in plan(train, settings.shard_bytes)]
    if validation is not None:
        roles += [(u, "validation") for u in plan(validation, settings.shard_bytes)]
    jobs = [Job(i, u, role, settings, str(out_dir)) for i, (u, role) in enumerate(roles)]
    done = {j.index: json.loads(p.read_text()) for j in jobs
            if (p := out_dir / "done" / f"{j.index:06d}.json").is_file()}
    pending = [j for j in jobs if j.index not in done]
    workers = max(1, min(num_proc or cpu_count(), len(pending)))
    if done:
        log.info("preparing %s: %d of %d units already done in %s", description, len(done), len(jobs), out_dir)
    log.info("preparing %s into %s: %d units of about %s MB, %d process(es)", description, out_dir, len(pending),
             settings.shard_mb, workers)
    if workers == 1:
        results = map(prepare_unit, pending)
        pool = None
    else:
        import multiprocessing

        # spawn: the caller may be a training process with threads (a fork would copy their locks mid-use).
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_one_thread)
        results = pool.imap_unordered(prepare_unit, pending)
    try:
        last_log = time.perf_counter()
        for index, stats in results:
            done[index] = stats
            if time.perf_counter() - last_log > 30:
                last_log = time.perf_counter()
                mb = sum(d["chars"] for d in done.values()) / 1e6
                log.info("prepared %d/%d units (%.0f MB of text, %.0f s)", len(done), len(jobs), mb,
                         time.perf_counter() - t0)
    finally:
        if pool is not None:
            pool.terminate()
    manifest = _manifest(jobs, done, tok, settings, description, validation is not None)
    write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    log.info("prepared %s: %d training and %d held-out examples (%s tokens) in %.1f s", description,
             manifest["splits"]["train"]["examples"], manifest["splits"]["validation"]["examples"],
             f"{manifest['splits']['train']['tokens']:,}", time.perf_counter() - t0)
    return manifest


def _manifest(jobs: list[Job], done: dict[int, dict], tok: Tokenizer, settings: PrepareSettings, description: str,
              given_validation: bool) -> dict[str, Any]:
    splits: dict[str, dict[str, Any]] = {}
    for split in ("train", "validation"):
        counts = [done[j.index] for j in jobs]
        files = sorted(f for c in counts for f in c["files"].get(split, []))
        splits[split] = {"files": files, **{k: sum(c[k].get(split, 0) for c in counts)
                                            for k in ("documents", "examples", "tokens", "random_next")}}
    train, held = splits["train"], splits["validation"]
    if train["documents"] == 0 and held["documents"] == 0:
        raise ValueError(f"{description}: no text to pretrain on (every line is blank)")
    if held["examples"] == 0:
        raise ValueError(f"{description}: no held-out examples: " + (
            "the held-out text is blank" if given_validation else
            "with no held-out text given, pretraining needs at least 4 documents (2 to train on, 2 held out); "
            "separate documents with blank lines, or give --validation-file"))
    if settings.objective == "mlm-nsp" and train["documents"] < 2:
        raise ValueError(f"{description}: next sentence prediction needs at least 2 documents to train on; the corpus "
                         f"has {train['documents']} (separate documents with blank lines, or use --objective mlm)")
    return {"format_version": FORMAT_VERSION, "settings": asdict(settings), "tokenizer_sha256": tokenizer_sha(tok),
            "source": description, "units": len(jobs), "splits": splits}


def wait_for_manifest(out_dir: Path, what: str, poll: float = 1.0) -> dict[str, Any]:
    """Another process prepares `out_dir`: wait for its manifest (not in a collective, which would time out on a
    large corpus; the launcher stops this process if the preparing one fails)."""
    t0, said = time.perf_counter(), False
    while not (out_dir / MANIFEST).is_file():
        if not said and time.perf_counter() - t0 > 10:
            log.info("waiting for %s to be prepared in %s", what, out_dir)
            said = True
        time.sleep(poll)
    return read_manifest(out_dir)


def read_manifest(out_dir: Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / MANIFEST).read_text())


def check_prepared_dir(out_dir: Path, key: dict[str, Any], overwrite: bool, flag: str = "--prepared-dir") -> None:
    """`out_dir` holds this preparation (its settings.json matches `key`), or nothing yet (then it is claimed); a
    preparation of other data or settings is refused, or with `overwrite` removed."""
    out_dir = Path(out_dir)
    found = out_dir / SETTINGS
    if found.is_file() and not same_settings(out_dir, key):
        if not overwrite:
            raise ValueError(f"{flag} {out_dir} holds a corpus prepared from other data or settings; give another "
                             f"{flag}, or --overwrite to replace it")
        for name in ("train", "validation", "done"):
            shutil.rmtree(out_dir / name, ignore_errors=True)
        for name in (MANIFEST, SETTINGS, "tokenizer.json"):
            (out_dir / name).unlink(missing_ok=True)
    elif not found.is_file() and out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"{flag} {out_dir} is not empty and holds no prepared corpus; give a new directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not found.is_file():
        write_atomic(found, json.dumps(key, indent=1))


def same_settings(out_dir: Path, key: dict[str, Any]) -> bool:
    """Whether `out_dir` was prepared with `key` (its settings.json)."""
    found = Path(out_dir) / SETTINGS
    return found.is_file() and json.loads(found.read_text()) == json.loads(json.dumps(key))


def open_prepared(out_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    """(train, held-out, manifest): the prepared shards as `datasets.Dataset`s, memory-mapped (nothing is read until
    a row is)."""
    import datasets

    manifest = read_manifest(out_dir)

    def split(name: str) -> datasets.Dataset:
        parts = [datasets.Dataset.from_file(str(Path(out_dir) / f)) for f in manifest["splits"][name]["files"]]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

    return split("train"), split("validation"), manifest


# ---------------------------------------------------------------------------------------------
# From the flags: the corpus, its tokenizer, its prepared directory (`bert-dist prepare`, --task pretrain)


def _find_split(data_dir: Path, spec: TaskSpec, split: str) -> Path | None:
    found = _find_split_file(data_dir, spec, split)
    if found is None:
        for d in (data_dir / (spec.data_name or spec.name), data_dir):
            found = next((d / f"{split}{s}" for s in TEXT_SUFFIXES if (d / f"{split}{s}").is_file()), None)
            if found is not None:
                break
    return found


def corpus_splits(cfg: RunConfig, spec: TaskSpec) -> tuple[Corpus, Corpus | None]:
    """(training corpus, held-out corpus or None) from the flags; checks paths only (no file is read)."""
    d = cfg.data
    if d.train_file:
        held = Corpus(file_sources(d.validation_file, "--validation-file")) if d.validation_file else None
        return Corpus(file_sources(d.train_file, "--train-file")), held
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
        held = Corpus(file_sources(str(val_path), "--data-dir")) if val_path else None
        return Corpus(file_sources(str(train_path), "--data-dir")), held
    name, flag = (d.dataset, "--dataset") if d.dataset else (f"{spec.hub_path}:{spec.hub_config}", "")
    train = hub_source(name, spec.train_split, flag)
    held = hub_source(name, spec.eval_splits[0], flag)
    return Corpus([train]), Corpus([held]) if _has_split(held) else None


def _has_split(source) -> bool:
    """Whether a hub dataset has this split (asked of the hub, or read from a local folder's files)."""
    import datasets

    try:
        return source.split in datasets.get_dataset_split_names(source.hub, source.config)
    except Exception:
        open_hub(source)  # raises the one-line error that says why the dataset cannot be read
        return False


def cache_dir() -> Path:
    """Where prepared corpora and the tokenizers trained for them go: under the datasets cache (HF_HOME)."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "bert_dist"


def corpus_tokenizer(cfg: RunConfig, train: Corpus, is_local_main: bool):
    """The WordPiece tokenizer trained on `train` with --vocab-size/--lowercase: trained once by the first process of
    each machine, kept in the cache (training is deterministic, so a rerun would give the same one), and read by
    the others from there."""
    key = corpus_key("tokenizer", train.identity, cfg.data.vocab_size, cfg.data.lowercase)
    path = cache_dir() / "tokenizers" / key / "tokenizer.json"
    if not path.is_file():
        if is_local_main:
            log.info("training a WordPiece tokenizer on %s (vocab %d, %s)", train.description, cfg.data.vocab_size,
                     "lowercased" if cfg.data.lowercase else "cased")
            tok = train_tokenizer(lambda: corpus_texts(train), cfg.data.vocab_size, cfg.data.lowercase)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, tok.to_str())
        else:
            while not path.is_file():
                time.sleep(1.0)
    return load_tokenizer(path)


def prepare_settings(cfg: RunConfig, spec: TaskSpec) -> PrepareSettings:
    d = cfg.data
    objective = d.objective or "mlm-nsp"
    return PrepareSettings(objective=objective, max_length=d.max_length or spec.max_length,
                           dupe_factor=d.dupe_factor or (5 if objective == "mlm-nsp" else 1), seed=cfg.seed,
                           shard_mb=d.shard_mb)


def has_corpus_flags(cfg: RunConfig) -> bool:
    d = cfg.data
    return bool(d.train_file or d.validation_file or d.data_dir or d.dataset)


def prepared_corpus(cfg: RunConfig, spec: TaskSpec, tok, is_local_main: bool, overwrite: bool = False,
                    corpus: tuple[Corpus, Corpus | None] | None = None) -> Path:
    """The prepared corpus's directory for these flags and tokenizer, prepared here (on the first process of each
    machine; the others wait for its manifest) unless it already is."""
    train, held = corpus or corpus_splits(cfg, spec)
    settings = prepare_settings(cfg, spec)
    key = {"format_version": FORMAT_VERSION, "settings": dataclasses.asdict(settings),
           "tokenizer_sha256": tokenizer_sha(tok), "train": train.identity,
           "validation": held.identity if held else None}
    out = Path(cfg.data.prepared_dir) if cfg.data.prepared_dir else cache_dir() / "prepared" / corpus_key(key)
    if (out / MANIFEST).is_file() and same_settings(out, key):
        log.info("prepared corpus found: %s", out)
        return out
    if not is_local_main:
        wait_for_manifest(out, train.description)
        return out
    check_prepared_dir(out, key, overwrite)
    description = train.description + (f" (held out: {held.description})" if held else "")
    prepare(train, held, tok, settings, out, cfg.data.num_proc, description)
    return out


def prepare_main(cfg: RunConfig) -> Path:
    """`bert-dist prepare` (the pretraining run's flags): the tokenizer (given, or trained on the corpus), then the
    prepared corpus; returns its directory. --overwrite replaces a --prepared-dir that holds another preparation."""
    from bert_dist.data import get_task

    spec = get_task("pretrain")
    corpus = corpus_splits(cfg, spec)
    if cfg.tokenizer or cfg.init != "scratch":
        from bert_dist.weights import resolve_init

        source = cfg.tokenizer or resolve_init(cfg.init)
        tok = load_tokenizer(source)
        check_special_tokens(tok, str(source), need_mask=True)
    else:
        tok = corpus_tokenizer(cfg, corpus[0], True)
    return prepared_corpus(cfg, spec, tok, True, cfg.overwrite, corpus)

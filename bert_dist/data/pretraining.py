"""Pretraining data: a text corpus -> documents -> sentences -> token ids -> NSP pairs (as Google's BERT).

Three cached `datasets.map` passes, each deterministic from its arguments:

1. `tokenize_rows`: every row is split into sentences and each sentence tokenized (no special tokens);
   the row also records whether it is blank or a WikiText heading (batched, parallel, cached).
2. `group_documents`: rows -> one row per document, {"segments": [[ids of sentence 1], ...]}.
3. `make_pairs`: documents -> [CLS] A [SEP] B [SEP] instances with token types and next_sentence_label.

Document rule, decided per corpus file (a file's rule never leaks into another's):

- WikiText (the file holds ` = Title = ` heading rows, each between blank rows as WikiText writes them): a
  document starts at each level-1 heading; heading rows of every level (` = = Section = = `) are dropped, as
  the BERT paper drops headers. A lone `= x + y =` line inside a paragraph is text, not a title.
- Otherwise, in a text file (or the hub's WikiText rows: a row is a line, `CorpusFile.lines`): blank lines
  separate documents (Google's one-sentence-per-line format).
- Otherwise (a .jsonl/.csv/.parquet file: a row is a document) every non-empty row is one document, and an
  empty row is only a missing one. One sentence per row (as SST-2) makes one-sentence documents, which always
  get a random B, as in Google's code: the pretraining run reports the share of random B (NSP's chance level).

Sentences: a row is split at line breaks, at [.!?] before an upper-case start, and after 。！？. A sentence longer
than half a sequence (lower-case or unpunctuated text) is cut into pieces of that length when pairs are made,
rather than filling a chunk alone and being truncated (most of its tokens lost, its B always random).

Pairs follow google-research/bert create_pretraining_data.py: a per-document target length
(`max_length - 3`, or with `short_seq_prob` a random shorter one), sentences gathered into a chunk
up to it, A = a random prefix of the chunk, B = the rest of the chunk (label 0, "is next") or, half
the time, a run of sentences from another document (label 1, "random"), whose unused sentences are
put back. The pair is truncated longest-first, from a random end. Unlike Google, the random
document is never the current one (Google retries 10 times and then accepts it).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset
from tokenizers import Tokenizer

IS_NEXT, IS_RANDOM = 0, 1
"""next_sentence_label values, as in Hugging Face's BertForPreTraining: 0 = B follows A."""

TEXT_SUFFIXES = (".txt", ".text", ".raw", ".tokens")
"""Files read as plain text, one row per line (blank lines kept as empty rows)."""

_TITLE = re.compile(r"^= [^=].*[^=] =$|^= [^=] =$")  # ` = Title = ` once stripped; not ` = = Section = = `
_HEADING = re.compile(r"^(= )+.*( =)+$")
# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets) before whitespace and
# an upper-case letter, a digit or an opening quote/bracket. Simple and fast; "Mr. Smith" splits too.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])"
                           r"|(?:(?<=[。！？])|(?<=[。！？][」』）〕】”’]))(?![。！？」』）〕】”’])\s*")
# ... and after 。！？ (with any closing bracket or quote after it; a run of them, ？！, ends one sentence).


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: line breaks always end one; so does [.!?] before an upper-case start, and 。！？."""
    out = []
    for line in text.splitlines():
        out += [s.strip() for s in _SENTENCE_END.split(line) if s.strip()]
    return out


def is_title(line: str) -> bool:
    """A WikiText level-1 heading (` = Title = `): the start of an article."""
    return bool(_TITLE.match(line.strip()))


def is_heading(line: str) -> bool:
    """A WikiText heading of any level (` = Title = `, ` = = Section = = `, ...)."""
    return bool(_HEADING.match(line.strip()))


# ---------------------------------------------------------------------------------------------
# Reading a corpus


def text_column(ds: Dataset, preferred: str = "text") -> str:
    """`preferred` if the file has it, else its first string column (e.g. SST-2's `sentence`)."""
    if preferred in ds.column_names:
        return preferred
    for name, feature in ds.features.items():
        if getattr(feature, "dtype", None) in ("string", "large_string"):
            return name
    raise ValueError(f"no text column in {', '.join(ds.column_names)}: pretraining needs one column of text")


@dataclass
class CorpusFile:
    """One corpus file's rows (a Dataset with a `text` column), and whether a row is a line of running text (a text
    file, the hub's WikiText: blank lines separate documents) or a document of its own (.jsonl/.csv/.parquet)."""

    rows: Dataset
    lines: bool = True


def read_corpus_file(path: str | Path, split: str = "train", column: str = "text", flag: str = "") -> CorpusFile:
    """A text file (one row per line) or a .jsonl/.csv/.tsv/.parquet file (one row per document) -> its rows, with
    one `text` column.

    Problems are one ValueError naming `flag` and the file."""
    from bert_dist.data import DATA_SUFFIXES, _read_file

    p = Path(path)
    if not p.is_dir() and p.suffix.lower() not in (*TEXT_SUFFIXES, *DATA_SUFFIXES):
        raise ValueError(f"{flag} {p}: unsupported file type {p.suffix!r}; use .txt (a line a row), .jsonl, .csv, "
                         ".tsv or .parquet".strip())
    ds = _read_file(p, split, flag, kind="text" if p.suffix.lower() in TEXT_SUFFIXES else None)
    try:
        col = text_column(ds, column)
    except ValueError as e:
        raise ValueError(f"{flag} {p}: {e}".strip()) from None
    ds = ds.select_columns([col])
    return CorpusFile(ds.rename_column(col, "text") if col != "text" else ds, p.suffix.lower() in TEXT_SUFFIXES)


# ---------------------------------------------------------------------------------------------
# 1. rows -> sentences -> token ids


def _tokenize_rows(batch: dict[str, list], tokenizer: Tokenizer) -> dict[str, list]:
    texts = [t or "" for t in batch["text"]]
    heading = [is_heading(t) for t in texts]
    sentences = [[] if h else split_sentences(t) for t, h in zip(texts, heading)]
    flat = [s for ss in sentences for s in ss]
    ids = [e.ids for e in tokenizer.encode_batch(flat, add_special_tokens=False)] if flat else []
    segments, k = [], 0
    for ss in sentences:
        segments.append([s for s in ids[k : k + len(ss)] if s])  # a sentence of only stripped chars has no ids
        k += len(ss)
    return {
        "segments": segments,
        "title": [h and is_title(t) for t, h in zip(texts, heading)],
        "blank": [not t.strip() for t in texts],
    }


def tokenize_rows(ds: Dataset, tokenizer: Tokenizer, num_proc: int | None = None) -> Dataset:
    """Rows {"text"} -> {"segments": list of token-id lists (one per sentence), "title", "blank"}.

    Run under `accelerator.main_process_first()` so the other processes read the cache it writes.
    """
    return ds.map(_tokenize_rows, batched=True, batch_size=1000, fn_kwargs={"tokenizer": tokenizer},
                  remove_columns=ds.column_names, num_proc=num_proc, desc="splitting and tokenizing")


# ---------------------------------------------------------------------------------------------
# 2. rows -> documents


def _group_documents(batch: dict[str, list], lines: bool) -> dict[str, list]:
    # Called once with the whole file (batch_size=None): documents cross any batch boundary.
    titles, blanks, rows = batch["title"], batch["blank"], batch["segments"]
    n = len(rows)
    # WikiText writes a title between blank rows: a `= x + y =` line within a paragraph is no title.
    titles = [t and (i == 0 or blanks[i - 1]) and (i == n - 1 or blanks[i + 1]) for i, t in enumerate(titles)]
    if any(titles):
        starts = titles
    elif lines and any(blanks):
        starts = [False] + [b and not prev for prev, b in zip(blanks, blanks[1:])]  # first blank after text
    else:
        starts = [True] * len(rows)
    docs: list[list[list[int]]] = []
    current: list[list[int]] = []
    for start, segs in zip(starts, rows):
        if start and current:
            docs.append(current)
            current = []
        current += segs
    if current:
        docs.append(current)
    return {"segments": docs}


def group_documents(rows: Dataset, lines: bool = True) -> Dataset:
    """Tokenized rows of ONE corpus file -> one row per non-empty document, {"segments": [[ids], ...]}. `lines`: a
    row is a line of running text (blank ones separate documents), else a document (CorpusFile.lines)."""
    return rows.map(_group_documents, batched=True, batch_size=None, fn_kwargs={"lines": lines},
                    remove_columns=rows.column_names, desc="grouping documents")


def corpus_documents(files: list[CorpusFile | Dataset], tokenizer: Tokenizer, num_proc: int | None = None) -> Dataset:
    """Each file's rows -> documents (its own document rule), then all documents in file order. A bare Dataset is
    read as lines of running text."""
    files = [f if isinstance(f, CorpusFile) else CorpusFile(f) for f in files]
    docs = [group_documents(tokenize_rows(f.rows, tokenizer, num_proc), f.lines) for f in files]
    return docs[0] if len(docs) == 1 else datasets.concatenate_datasets(docs)


def hold_out_documents(docs: Dataset, fraction: float = 0.05) -> tuple[Dataset, Dataset]:
    """(train, held-out): every k-th document (k = 1 / fraction) is held out, so topics spread over both."""
    if len(docs) < 4:  # NSP draws B from another document: 2 on each side at least
        raise ValueError(f"with no held-out text given, pretraining needs at least 4 documents (2 to train on, 2 held "
                         f"out); the corpus has {len(docs)}: separate documents with blank lines, or give "
                         "--validation-file")
    k = max(2, round(1 / fraction))
    held = [i for i in range(len(docs)) if i % k == k - 1]
    if len(held) < 2:  # NSP needs two documents to draw a random B from
        held = list(range(len(docs) - 2, len(docs)))
    keep = sorted(set(range(len(docs))) - set(held))
    return docs.select(keep), docs.select(held)


# ---------------------------------------------------------------------------------------------
# 3. documents -> NSP pairs


def _truncate_pair(a: list[int], b: list[int], max_tokens: int, rng: random.Random) -> None:
    """Longest-first, in place; each cut from the front or the back at random (as Google: less bias)."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def document_pairs(documents: list[list[list[int]]], doc_index: int, max_length: int, short_seq_prob: float,
                   rng: random.Random) -> list[tuple[list[int], list[int], int]]:
    """(tokens_a, tokens_b, next_sentence_label) for one document, Google's create_instances_from_document.

    `documents[d]` is a list of sentences, each a list of token ids. Needs at least two documents.
    """
    document = documents[doc_index]
    max_tokens = max_length - 3  # [CLS] A [SEP] B [SEP]
    # Mostly full sequences; sometimes shorter ones, so fine-tuning's short inputs are not out of distribution.
    target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
    out = []
    chunk: list[list[int]] = []
    length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i])
        if i == len(document) - 1 or length >= target:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            a = [t for s in chunk[:a_end] for t in s]
            if len(chunk) == 1 or rng.random() < 0.5:
                label = IS_RANDOM
                other = rng.randrange(len(documents) - 1)
                other += other >= doc_index  # any document but this one
                random_doc = documents[other]
                b: list[int] = []
                for s in random_doc[rng.randrange(len(random_doc)) :]:
                    b += s
                    if len(b) >= target - len(a):
                        break
                i -= len(chunk) - a_end  # the chunk's unused sentences start the next chunk
            else:
                label = IS_NEXT
                b = [t for s in chunk[a_end:] for t in s]
            _truncate_pair(a, b, max_tokens, rng)
            out.append((a, b, label))
            chunk, length = [], 0
        i += 1
    return out


def _make_pairs(batch: dict[str, list], max_length: int, short_seq_prob: float,
                dupe_factor: int, seed: int, cls_id: int, sep_id: int) -> dict[str, list]:
    # Called once with every document (batch_size=None): B is drawn from any of them. A sentence longer than half a
    # sequence is cut into pieces of that length: alone in a chunk it would be truncated and always get a random B.
    piece = max(1, (max_length - 3) // 2)
    documents = [[s[i : i + piece] for s in doc for i in range(0, len(s), piece)] for doc in batch["segments"] if doc]
    if len(documents) < 2:
        raise ValueError(f"next sentence prediction needs at least 2 documents; this split has {len(documents)} "
                         "(documents are separated by blank lines)")
    rng = random.Random(seed)
    out: dict[str, list] = {"input_ids": [], "token_type_ids": [], "next_sentence_label": [], "length": []}
    for _ in range(dupe_factor):  # each pass pairs the same documents differently
        for d in range(len(documents)):
            for a, b, label in document_pairs(documents, d, max_length, short_seq_prob, rng):
                out["input_ids"].append([cls_id, *a, sep_id, *b, sep_id])
                out["token_type_ids"].append([0] * (len(a) + 2) + [1] * (len(b) + 1))
                out["next_sentence_label"].append(label)
                out["length"].append(len(a) + len(b) + 3)
    out["idx"] = list(range(len(out["length"])))
    return out


def make_pairs(docs: Dataset, tokenizer: Tokenizer, max_length: int, seed: int, dupe_factor: int = 5,
               short_seq_prob: float = 0.1) -> Dataset:
    """Documents -> {"input_ids", "token_type_ids", "next_sentence_label", "length", "idx"}, one row a pair.

    `dupe_factor` passes over the documents give that many different pairings (Google uses 10 with
    static masks; masks here are drawn per batch, so fewer suffice). Deterministic from `seed`;
    cached by `datasets` under a fingerprint of the documents and these arguments.
    """
    return docs.map(
        _make_pairs,
        batched=True,
        batch_size=None,
        fn_kwargs={"max_length": max_length, "short_seq_prob": short_seq_prob, "dupe_factor": dupe_factor,
                   "seed": seed, "cls_id": tokenizer.token_to_id("[CLS]"), "sep_id": tokenizer.token_to_id("[SEP]")},
        remove_columns=docs.column_names,
        desc="making NSP pairs",
    )


def pairs_from_texts(texts: list[str], tokenizer: Tokenizer, max_length: int = 128, seed: int = 0,
                     **kw: Any) -> Dataset:
    """Rows of text (one corpus) -> NSP pairs, in memory: for tests and notebooks."""
    docs = corpus_documents([Dataset.from_dict({"text": texts})], tokenizer)
    return make_pairs(docs, tokenizer, max_length, seed, **kw)

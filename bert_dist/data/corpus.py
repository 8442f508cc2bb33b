"""Pretraining corpora of any size: the sources, cut into units of bounded size, and the rows of a unit, streamed.

Sources (`corpus_sources`): local files named by --train-file/--validation-file (comma-separated paths, globs or
directories), --data-dir's wikitext-2 split files, or a dataset of the Hugging Face hub (--dataset NAME[:CONFIG], or
the pretrain task's WikiText by default), streamed. File types: text (.txt .text .raw .tokens: a line a row), JSON
Lines, Parquet (a row a row, the `text` column, else the first string column), CSV/TSV and .json (read whole).

A unit is the work of one preparation process: a byte range of a text or JSON Lines file (about --shard-mb of it,
cut where a document starts), a run of a Parquet file's row groups, a CSV/TSV/.json file, or a shard of a hub
dataset. The units are a function of the files and --shard-mb alone, never of the number of processes, so the
prepared corpus is too.

The document rule of a file (or of a hub dataset) is read from its first MiB of rows:
    titles   WikiText (` = Title = ` rows between blank rows): a document starts at each title;
    blank    a text file with blank lines (Google's one-sentence-per-line format): they separate documents;
    rows     otherwise every row is a document (a .jsonl/.parquet row, or a text file without blank lines).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".text", ".raw", ".tokens")
"""Files read as plain text, one row per line (blank lines kept as empty rows)."""
LINE_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl")
"""Files cut into byte ranges at line starts."""
WHOLE_SUFFIXES = (".csv", ".tsv", ".json")
"""Files read whole through `datasets` (a quoted CSV field may hold line breaks; a .json may be one array)."""
SUFFIXES = (*LINE_SUFFIXES, ".parquet", *WHOLE_SUFFIXES)
HEAD_BYTES = 1 << 20
"""What a file's document rule is read from."""
ROW_BATCH = 1000

_TITLE = re.compile(r"^= [^=].*[^=] =$|^= [^=] =$")  # ` = Title = ` once stripped; not ` = = Section = = `
_HEADING = re.compile(r"^(= )+.*( =)+$")


def is_title(line: str) -> bool:
    """A WikiText level-1 heading (` = Title = `): the start of an article."""
    return bool(_TITLE.match(line.strip()))


def is_heading(line: str) -> bool:
    """A WikiText heading of any level (` = Title = `, ` = = Section = = `, ...)."""
    return bool(_HEADING.match(line.strip()))


def document_rule(rows: list[str], lines: bool) -> str:
    """titles | blank | rows (the module docstring) for a source whose first rows are `rows`; `lines`: a row is a line
    of running text (a text file, a hub dataset) rather than a record (.jsonl, .parquet, .csv)."""
    blank = [not r.strip() for r in rows]
    n = len(rows)
    if any(is_title(r) and (i == 0 or blank[i - 1]) and (i == n - 1 or blank[i + 1]) for i, r in enumerate(rows)):
        return "titles"
    return "blank" if lines and any(blank) else "rows"


@dataclass(frozen=True)
class Source:
    """Where text comes from: a local file (`flag` names the option that gave it), or a hub dataset (`hub`)."""

    flag: str
    path: str = ""
    hub: str = ""
    config: str | None = None
    split: str = "train"

    @property
    def where(self) -> str:
        return f"{self.flag} {self.path or self.hub}".strip()

    @property
    def name(self) -> str:
        """The file, or the hub dataset (NAME:CONFIG)."""
        return self.path or (self.hub + (f":{self.config}" if self.config else ""))


@dataclass(frozen=True)
class Unit:
    """One unit of preparation work: rows `start:end` of `source` (bytes of a text/.jsonl file, row groups of a
    Parquet file, the shard `start` of `end` of a hub dataset; a whole CSV/TSV/.json file)."""

    source: Source
    kind: str  # text | jsonl | parquet | whole | hub
    start: int = 0
    end: int = 0
    column: str = "text"
    rule: str = "rows"


@dataclass
class Corpus:
    """A split's sources, and once `plan`ned their units. `identity` names the corpus for the cache (paths, sizes and
    modification times of the files; a hub dataset's name, config and split), cheaply: no file is read."""

    sources: list[Source]
    units: dict[int, list[Unit]] = field(default_factory=dict)
    """By the unit size they were planned for."""

    @property
    def identity(self) -> list:
        out = []
        for s in self.sources:
            local = Path(s.path or s.hub)
            files = sorted(f for f in local.rglob("*") if f.is_file()) if local.is_dir() else [local]
            out.append([s.hub, s.config, s.split] if s.hub else [])
            if s.path or local.is_dir():  # a local file, or a local dataset folder
                out[-1] += [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        return out

    @property
    def description(self) -> str:
        flags: dict[str, list[str]] = {}
        for s in self.sources:
            flags.setdefault(s.flag, []).append(s.name + (f" ({s.split} split)" if s.hub else ""))
        return ", ".join(f"{f} {','.join(v)}".strip() for f, v in flags.items())


# ---------------------------------------------------------------------------------------------
# Finding the files


def expand_paths(arg: str, flag: str) -> list[Path]:
    """--train-file's comma-separated paths, globs (`data/*.txt`, `**`) and directories (their files of a known
    type, recursively) -> files, in the order given, each pattern's matches sorted."""
    out: list[Path] = []
    for item in (p.strip() for p in arg.split(",")):
        if not item:
            continue
        if glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not found:
                raise ValueError(f"{flag} {item}: no file matches")
        elif Path(item).is_dir():
            found = sorted(p for p in Path(item).rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not found:
                raise ValueError(f"{flag} {item}: the directory holds no {', '.join(SUFFIXES)} file")
        else:
            found = [Path(item)]
        out += found
    if not out:
        raise ValueError(f"{flag}: no file given")
    return out


def check_source_file(path: Path, flag: str) -> None:
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give the data file(s) in it")
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{flag} {path}: unsupported file type {path.suffix!r}; use .txt (a line a row), .jsonl, "
                         ".parquet, .csv or .tsv")
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"{flag} {path}: the file is empty")


def file_sources(arg: str, flag: str) -> list[Source]:
    paths = expand_paths(arg, flag)
    for p in paths:
        check_source_file(p, flag)
    return [Source(flag, str(p)) for p in paths]


def hub_source(name: str, split: str, flag: str = "--dataset") -> Source:
    """`NAME` or `NAME:CONFIG` (a hub id, or a local dataset folder that `datasets.load_dataset` reads)."""
    hub, _, config = name.partition(":")
    return Source(flag, hub=hub, config=config or None, split=split)


# ---------------------------------------------------------------------------------------------
# Cutting into units


def plan(corpus: Corpus, shard_bytes: int) -> list[Unit]:
    """The units of `corpus` (kept in `corpus.units` by size), each about `shard_bytes` of text; reads only the files'
    heads (and a little past each cut) and the hub datasets' first rows."""
    if shard_bytes not in corpus.units:
        corpus.units[shard_bytes] = [u for s in corpus.sources
                                     for u in (_hub_units(s) if s.hub else _file_units(s, shard_bytes))]
    return corpus.units[shard_bytes]


def _file_units(s: Source, shard_bytes: int) -> list[Unit]:
    p = Path(s.path)
    suffix = p.suffix.lower()
    if suffix in WHOLE_SUFFIXES:
        rows = _column_rows(_read_whole(s), s)
        return [Unit(s, "whole", rule=document_rule(rows[: ROW_BATCH * 10], lines=False))]
    if suffix == ".parquet":
        return _parquet_units(s, shard_bytes)
    kind = "jsonl" if suffix == ".jsonl" else "text"
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(HEAD_BYTES)
        cut_short = len(head) == HEAD_BYTES  # its last line may be incomplete
        if kind == "jsonl":
            lines = head.split(b"\n")[:-1] if cut_short or head.endswith(b"\n") else head.split(b"\n")
            column = _jsonl_column(lines, s)
            rows = [_row(line, kind, column) for line in lines]
        else:
            column = "text"
            rows = head.decode("utf-8", errors="replace").splitlines()[: -1 if cut_short else None]
        rule = document_rule(rows, lines=kind == "text")
        cuts = [0]
        while cuts[-1] + shard_bytes < size:
            cut = _next_document(fh, cuts[-1] + shard_bytes, kind, column, rule, max(4 * shard_bytes, 1 << 20), size)
            if cut >= size:
                break
            cuts.append(cut)
    return [Unit(s, kind, a, b, column, rule) for a, b in zip(cuts, [*cuts[1:], size])]


def _row(line: bytes, kind: str, column: str) -> str:
    """A line of a text or JSON Lines file as its row's text, for finding cuts ("" where it cannot be read: the
    reading of the unit reports it)."""
    if kind == "text":
        return line.decode("utf-8", errors="replace").rstrip("\r")
    try:
        value = json.loads(line).get(column) if line.strip() else ""
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


def _next_document(fh: io.BufferedReader, offset: int, kind: str, column: str, rule: str, limit: int,
                   size: int) -> int:
    """The byte offset of the first row at or after `offset` (past the line it falls in) where a document starts under
    `rule`; where none comes within `limit` bytes (a very long document: a unit's text must fit in memory), the next
    line start there."""
    fh.seek(offset - 1)
    fh.readline()  # to the start of the next line (`offset` itself, if a line ends just before it)
    pos = fh.tell()
    prev_blank, title_at = False, None
    while pos < size:
        line = fh.readline()
        row = _row(line.rstrip(b"\n"), kind, column)
        blank = not row.strip()
        if rule == "rows" or (rule == "blank" and blank):
            return pos
        if rule == "titles":
            if title_at is not None and blank:
                return title_at
            title_at = pos if is_title(row) and prev_blank else None
        if pos - offset > limit and title_at is None:
            return pos
        prev_blank = blank
        pos += len(line)
    return size


def _jsonl_column(lines: list[bytes], s: Source) -> str:
    """`text`, else the first key with a string value, of the first row that can be read."""
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{s.where}: cannot be read as JSON Lines ({e}); fix or remove the malformed "
                             "rows") from None
        if not isinstance(row, dict):
            raise ValueError(f"{s.where}: a JSON Lines row must be an object with a text field, got {line[:60]!r}")
        if "text" in row:
            return "text"
        name = next((k for k, v in row.items() if isinstance(v, str)), None)
        if name is None:
            raise ValueError(f"{s.where}: no text column in {', '.join(row)}: pretraining needs one column of text")
        return name
    raise ValueError(f"{s.where}: the file has no rows")


def _parquet_units(s: Source, shard_bytes: int) -> list[Unit]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(s.path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise ValueError(f"{s.where}: cannot be read as Parquet ({str(e).splitlines()[0][:200]})") from None
    schema = meta.schema_arrow
    column = _string_column(schema.names, [str(t) for t in schema.types], s)
    rows = _column_rows(meta.read_row_group(0, columns=[column]), s, column)[: ROW_BATCH * 10] \
        if meta.num_row_groups else []
    rule = document_rule(rows, lines=False)
    units, start, size = [], 0, 0
    for i in range(meta.num_row_groups):
        size += meta.metadata.row_group(i).total_byte_size
        if size >= shard_bytes or i == meta.num_row_groups - 1:
            units.append(Unit(s, "parquet", start, i + 1, column, rule))
            start, size = i + 1, 0
    return units


def _string_column(names: list[str], types: list[str], s: Source) -> str:
    if "text" in names:
        return "text"
    for name, t in zip(names, types):
        if t in ("string", "large_string"):
            return name
    raise ValueError(f"{s.where}: no text column in {', '.join(names)}: pretraining needs one column of text")


def _read_whole(s: Source):
    """A CSV/TSV/.json file through `datasets` (the checks and messages of the other tasks' files)."""
    from bert_dist.data import _read_file

    return _read_file(Path(s.path), s.split, s.flag)


def _column_rows(table, s: Source, column: str | None = None) -> list[str]:
    """A datasets.Dataset or pyarrow.Table's text column as strings (None as "")."""
    if column is None:
        features = table.features
        column = _string_column(list(features), [getattr(f, "dtype", "") for f in features.values()], s)
        table = table.data.table
    return ["" if t is None else t for t in table.column(column).to_pylist()]


def _hub_units(s: Source) -> list[Unit]:
    stream = open_hub(s)
    first = list(stream.take(ROW_BATCH * 10))
    if not first:
        raise ValueError(f"{s.where}: the {s.split} split has no rows")
    names = list(first[0])
    column = _string_column(names, ["string" if isinstance(first[0][k], str) else "" for k in names], s)
    rule = document_rule([r[column] or "" for r in first], lines=True)
    n = stream.num_shards
    return [Unit(s, "hub", i, n, column, rule) for i in range(n)]


def open_hub(s: Source):
    """The split of a hub dataset (or a local dataset folder), streamed; ValueError in one line when it cannot be."""
    import datasets

    what = s.hub + (f" ({s.config})" if s.config else "")
    where = f"{s.flag}: " if s.flag else ""
    if not Path(s.hub).exists():
        from bert_dist.weights import hub_reachable

        if not hub_reachable():
            raise ValueError(f"{where}cannot reach the Hugging Face hub to stream {what}; pass --train-file "
                             "FILE[,FILE...] (text, JSON Lines, Parquet) or --data-dir DIR instead")
    try:
        return datasets.load_dataset(s.hub, s.config, split=s.split, streaming=True)
    except Exception as e:  # the hub's and datasets' errors have many types; each means this dataset cannot be read
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{where}cannot stream the {s.split} split of {what} ({msg})") from None


# ---------------------------------------------------------------------------------------------
# Reading a unit


def unit_rows(unit: Unit) -> Iterator[list[str]]:
    """The rows of `unit`, in order, in batches (None as ""); ValueError naming the file for one that cannot be read."""
    s = unit.source
    if unit.kind in ("text", "jsonl"):
        with open(s.path, "rb") as fh:
            fh.seek(unit.start)
            data = fh.read(unit.end - unit.start)
        if unit.kind == "text":
            try:
                rows = data.decode("utf-8").splitlines()
            except UnicodeDecodeError as e:
                raise ValueError(f"{s.where}: not UTF-8 text (byte {unit.start + e.start}); re-encode it as UTF-8") \
                    from None
        else:
            rows = _jsonl_rows(data, unit)
        for i in range(0, len(rows), ROW_BATCH):
            yield rows[i : i + ROW_BATCH]
    elif unit.kind == "parquet":
        import pyarrow.parquet as pq

        f = pq.ParquetFile(s.path)
        for batch in f.iter_batches(batch_size=ROW_BATCH, row_groups=range(unit.start, unit.end),
                                    columns=[unit.column]):
            yield _column_rows(batch, s, unit.column)
    elif unit.kind == "whole":
        rows = _column_rows(_read_whole(s), s)
        for i in range(0, len(rows), ROW_BATCH):
            yield rows[i : i + ROW_BATCH]
    else:
        batch: list[str] = []
        for row in open_hub(s).shard(num_shards=unit.end, index=unit.start):
            batch.append(row.get(unit.column) or "")
            if len(batch) == ROW_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch


def _jsonl_rows(data: bytes, unit: Unit) -> list[str]:
    import pyarrow as pa
    import pyarrow.json as pj

    opts = pj.ParseOptions(explicit_schema=pa.schema([(unit.column, pa.string())]),
                           unexpected_field_behavior="ignore", newlines_in_values=False)
    try:
        table = pj.read_json(io.BytesIO(data), parse_options=opts, read_options=pj.ReadOptions(block_size=1 << 24))
        return _column_rows(table, unit.source, unit.column)
    except UnicodeDecodeError:
        raise ValueError(f"{unit.source.where}: not UTF-8 text; re-encode it as UTF-8") from None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        msg = str(e).splitlines()[0][:200]
        if "utf" in msg.lower():
            raise ValueError(f"{unit.source.where}: not UTF-8 text; re-encode it as UTF-8") from None
        raise ValueError(f"{unit.source.where}: cannot be read as JSON Lines ({msg}); fix or remove the malformed "
                         "rows") from None


def corpus_texts(corpus: Corpus, shard_bytes: int = 1 << 24) -> Iterator[str]:
    """Every non-empty row of the corpus, streamed (for training a tokenizer)."""
    for unit in plan(corpus, shard_bytes):
        for rows in unit_rows(unit):
            yield from (t for t in rows if t and t.strip())


def corpus_key(*parts) -> str:
    """A short, stable name for JSON-able `parts`: a cache directory's name."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

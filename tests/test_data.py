"""Tasks as data: every GLUE TaskSpec preprocesses rows; tokenizers give real word pieces; collation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bert_dist import data as D
from bert_dist.config import DataConfig
from bert_dist.data.collate import BatchSampler, PadCollator
from bert_dist.data.glue import GLUE_TASKS
from bert_dist.data.synthetic import FILLER, NEGATIVE, POSITIVE, write_task_data
from bert_dist.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

MINILM = Path(__file__).resolve().parents[2] / "shared" / "models" / "all-MiniLM-L6-v2"
WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "the",
    "quick",
    "brown",
    "fox",
    "jump",
    "##s",
    "over",
    "lazy",
    "dog",
    ".",
    "un",
    "##aff",
    "##able",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([" ".join(POSITIVE + NEGATIVE + FILLER)] * 50, vocab_size=300)


def test_vocab_txt_tokenizes_to_expected_pieces(tmp_path):
    (tmp_path / "vocab.txt").write_text("".join(w + "\n" for w in WORDS))
    tok = load_tokenizer(tmp_path / "vocab.txt")
    enc = tok.encode("The quick brown fox jumps over the lazy dog.", "Unaffable!")
    assert enc.tokens == [
        "[CLS]",
        "the",
        "quick",
        "brown",
        "fox",
        "jump",
        "##s",
        "over",
        "the",
        "lazy",
        "dog",
        ".",
        "[SEP]",
        "un",
        "##aff",
        "##able",
        "[UNK]",
        "[SEP]",
    ]
    assert enc.type_ids == [0] * 13 + [1] * 5


@pytest.mark.skipif(not MINILM.is_dir(), reason="the shared MiniLM model is not beside this checkout")
def test_real_vocab_gives_word_pieces_not_unk():
    """The tutorials' failure: every word became [UNK] and SST-2 sat at 50.9%."""
    for path in (MINILM / "vocab.txt", MINILM / "tokenizer.json"):
        tok = load_tokenizer(path)
        enc = tok.encode("The film's unaffable charm")
        assert enc.tokens == ["[CLS]", "the", "film", "'", "s", "una", "##ffa", "##ble", "charm", "[SEP]"]
        assert tok.padding is None and tok.truncation is None  # the shipped file pads/truncates to 128


def test_vocab_txt_ids_are_line_numbers_and_tokenizer_config_flags_count(tmp_path):
    """As transformers' BertTokenizer reads a vocab.txt: a token on two lines has the later line's id, and every
    other token keeps its line number; tokenizer_config.json's strip_accents is honoured."""
    import json

    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "a", "cat", "film", "café", "cafe"]
    (tmp_path / "vocab.txt").write_text("".join(w + "\n" for w in words))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "strip_accents": False}))
    ours = load_tokenizer(tmp_path / "vocab.txt")
    ref = transformers.BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=True, strip_accents=False)
    for text in ("dog cat film a", "Café cafe"):
        assert ours.encode(text).ids == ref(text)["input_ids"]
    assert ours.encode("a cat").ids == [2, 7, 8, 3]
    (tmp_path / "again").mkdir()
    save_tokenizer(ours, tmp_path / "again")
    assert len((tmp_path / "again" / "vocab.txt").read_text().splitlines()) == len(words)  # no line lost


def test_tokenizer_without_special_tokens_is_refused(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\nb\n[UNK]\n")
    with pytest.raises(ValueError, match=r"\[PAD\].*\[CLS\].*\[SEP\]"):
        load_tokenizer(tmp_path / "vocab.txt")


def test_trained_tokenizer_roundtrip(tmp_path, tokenizer):
    save_tokenizer(tokenizer, tmp_path)
    for f in ("tokenizer.json", "vocab.txt"):
        again = load_tokenizer(tmp_path / f)
        assert again.encode("good film", "bad plot").ids == tokenizer.encode("good film", "bad plot").ids
    assert [tokenizer.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("name", sorted(GLUE_TASKS))
def test_every_glue_task_preprocesses(name, tmp_path, tokenizer):
    spec = GLUE_TASKS[name]
    write_task_data(spec, tmp_path, n_train=40, n_eval=9, n_test=7)
    raw = D.check_raw(D.load_raw(spec, DataConfig(data_dir=str(tmp_path))), spec, "test")
    assert set(raw) == {spec.train_split, *spec.eval_splits, *spec.test_splits}
    feats = D.tokenize_classification(raw, spec, tokenizer, max_length=12)
    row = feats[spec.train_split][0]
    assert row["input_ids"][0] == tokenizer.token_to_id("[CLS]") and row["input_ids"][-1] == tokenizer.token_to_id(
        "[SEP]"
    )
    assert max(D.column(feats[spec.train_split], "length")) <= 12
    if len(spec.text_columns) == 2:
        assert 1 in row["token_type_ids"]  # the second segment is marked
    collate = PadCollator(0, pad_to_multiple_of=8)
    b = collate([feats[spec.train_split][i] for i in range(5)])
    assert b["input_ids"].shape[1] % 8 == 0 and b["attention_mask"].shape == b["input_ids"].shape
    assert b["labels"].dtype == (torch.float32 if spec.kind == "regression" else torch.long)
    test_labels = D.column(feats[spec.test_splits[0]], "labels")
    assert set(test_labels) == {-1}



@pytest.mark.parametrize("longest, expected", [(10, 24), (480, 480), (481, 504), (505, 512), (512, 512)])
def test_padding_to_a_multiple_stops_at_the_max_length(longest, expected):
    """--pad-to-multiple-of 24 with --max-length 512: a batch of 505 tokens pads to 512, not 528 (past the model's
    positions)."""
    collate = PadCollator(0, pad_to_multiple_of=24, max_length=512)
    b = collate([{"input_ids": [5] * longest, "labels": 0}, {"input_ids": [5] * 3, "labels": 1}])
    assert b["input_ids"].shape == (2, expected)
    assert PadCollator(0, pad_to_multiple_of=24).padded_length(505) == 528  # no limit given: the multiple

def test_custom_files_with_label_names(tmp_path, tokenizer):
    spec = GLUE_TASKS["sst2"]
    for split in ("train", "validation"):
        (tmp_path / f"{split}.csv").write_text("sentence,label\ngood film,positive\nbad film,negative\n")
    cfg = DataConfig(train_file=str(tmp_path / "train.csv"), validation_file=str(tmp_path / "validation.csv"))
    raw = D.check_raw(D.load_raw(spec, cfg), spec, "csv")
    assert D.column(raw["train"], "label") == [1, 0]


def test_tsv_quotes_are_text(tmp_path):
    """A '"' in a .tsv is part of the sentence (GLUE's files are unquoted): no rows merge."""
    spec = GLUE_TASKS["sst2"]
    rows = ['sentence\tlabel', '" the movie is great\t1', 'bad , really bad\t0', 'he said "fine\t1']
    for split in ("train", "validation"):
        (tmp_path / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    cfg = DataConfig(train_file=str(tmp_path / "train.tsv"), validation_file=str(tmp_path / "validation.tsv"))
    raw = D.check_raw(D.load_raw(spec, cfg), spec, "tsv")
    assert D.column(raw["train"], "sentence") == ['" the movie is great', "bad , really bad", 'he said "fine']
    assert D.column(raw["train"], "label") == [1, 0, 1]


def test_csv_cells_are_text_as_written(tmp_path):
    """A CSV/TSV sentence that reads like a missing value ("None", "NA", "null", "") or a number ("1999") is text,
    as GLUE's own reader keeps it; labels written 1.0 are class 1; regression scores written as text are numbers."""
    spec = GLUE_TASKS["sst2"]
    (tmp_path / "train.csv").write_text("sentence,label\nNone,1.0\nNA,0\n,1\n1999,0\nnull,1\n")
    (tmp_path / "validation.tsv").write_text("sentence\tlabel\nN/A\t1\nnan\t0\n")
    cfg = DataConfig(train_file=str(tmp_path / "train.csv"), validation_file=str(tmp_path / "validation.tsv"))
    raw = D.check_raw(D.load_raw(spec, cfg), spec, "csv")
    assert D.column(raw["train"], "sentence") == ["None", "NA", "", "1999", "null"]
    assert D.column(raw["train"], "label") == [1, 0, 1, 0, 1]
    assert D.column(raw["validation"], "sentence") == ["N/A", "nan"]
    spec = GLUE_TASKS["stsb"]
    (tmp_path / "s.csv").write_text("sentence1,sentence2,label\na,b,3.5\nc,d,4\n")
    (tmp_path / "bad.csv").write_text("sentence1,sentence2,label\na,b,3.5\nc,d,high\n")
    raw = D.check_raw(D.load_raw(spec, DataConfig(train_file=str(tmp_path / "s.csv"),
                                                   validation_file=str(tmp_path / "s.csv"))), spec, "csv")
    assert D.column(raw["train"], "label") == [3.5, 4.0]
    with pytest.raises(ValueError, match="'high' at row 2"):
        D.check_raw(D.load_raw(spec, DataConfig(train_file=str(tmp_path / "s.csv"),
                                                validation_file=str(tmp_path / "bad.csv"))), spec, "csv")


def test_each_split_keeps_its_own_columns(tmp_path, tokenizer):
    """A training file with an extra column and a validation file without it tokenize (each split drops its own)."""
    spec = GLUE_TASKS["sst2"]
    (tmp_path / "train.jsonl").write_text('{"sentence": "good", "label": 1, "idx": 0, "note": "x"}\n')
    (tmp_path / "validation.jsonl").write_text('{"sentence": "bad", "label": 0}\n')
    cfg = DataConfig(train_file=str(tmp_path / "train.jsonl"), validation_file=str(tmp_path / "validation.jsonl"))
    feats = D.tokenize_classification(D.check_raw(D.load_raw(spec, cfg), spec, "jsonl"), spec, tokenizer, 32)
    assert set(feats["train"].column_names) == set(feats["validation"].column_names) == {
        "input_ids", "token_type_ids", "length", "labels"}


@pytest.mark.parametrize(
    "rows, message",
    [
        ('{"sentence": "a", "label": 2}\n', "outside 0..1"),
        ('{"text": "a", "label": 1}\n', "no text column 'sentence'"),
        ('{"sentence": "a"}\n', "no 'label' column"),
        ('{"sentence": "a", "label": 0.5}\n', "fractional"),
    ],
)
def test_bad_rows_are_named(tmp_path, rows, message):
    spec = GLUE_TASKS["sst2"]
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.jsonl").write_text(rows)
    (tmp_path / "sst2" / "validation.jsonl").write_text('{"sentence": "b", "label": 0}\n')
    with pytest.raises(ValueError, match=message):
        D.check_raw(D.load_raw(spec, DataConfig(data_dir=str(tmp_path))), spec, "test")


def _reference_batches(s: BatchSampler) -> list[list[int]]:
    """The batches as BatchSampler defines them, spelled out over a list of every batch."""
    g = torch.Generator().manual_seed(s.seed + s.epoch)
    order = torch.randperm(s.num_examples, generator=g) if s.shuffle else torch.arange(s.num_examples)
    if s.group_by_length:
        chunks = [order[i : i + s.batch_size * 50] for i in range(0, len(order), s.batch_size * 50)]
        order = torch.cat([c[torch.argsort(s.lengths[c], descending=True, stable=True)] for c in chunks])
    batches = list(torch.split(order, s.batch_size))
    if s.drop_last and batches and len(batches[-1]) < s.batch_size:
        batches.pop()
    if s.group_by_length and s.shuffle and batches:
        short = [batches.pop()] if len(batches[-1]) < s.batch_size else []
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        if batches:
            longest = max(range(len(batches)), key=lambda i: int(s.lengths[batches[i]].max()))
            batches[0], batches[longest] = batches[longest], batches[0]
        batches += short
    return [b.tolist() for b in batches]


@pytest.mark.parametrize("n, grouped, shuffle, drop_last", [
    (200, True, True, False), (200, True, True, True), (200, False, True, False), (200, True, False, False),
    (5000, True, True, False), (10, True, True, False), (10, True, True, True), (192, True, True, False)])
def test_batch_sampler_yields_the_batches_of_its_definition(n, grouped, shuffle, drop_last):
    lengths = [(i * 7919) % 101 for i in range(n)]  # many ties: the longest batch is the first of equals
    s = BatchSampler(n, 16, shuffle=shuffle, seed=5, lengths=lengths, group_by_length=grouped, drop_last=drop_last)
    for epoch in range(3):
        s.set_epoch(epoch)
        assert list(s) == _reference_batches(s)
        assert len(list(s)) == len(s)


def test_batch_sampler_is_a_function_of_seed_and_epoch():
    lengths = [i % 17 for i in range(200)]
    a = BatchSampler(200, 16, seed=3, lengths=lengths, group_by_length=True)
    b = BatchSampler(200, 16, seed=3, lengths=lengths, group_by_length=True)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    flat = sorted(i for batch in a for i in batch)
    assert flat == list(range(200))  # every example once per epoch
    first = next(iter(a))
    assert max(lengths[i] for i in first) == max(lengths)  # the longest batch first
    spread = [max(lengths[i] for i in bt) - min(lengths[i] for i in bt) for bt in a]
    assert sum(spread) / len(spread) < 8  # grouped: batches hold similar lengths
    # The short batch (200 = 12 x 16 + 8) is last in every epoch: accelerate's sharding across processes expects
    # only the final batch to be short (one mid-epoch went to one process, or made a whole round be skipped).
    for epoch in range(6):
        a.set_epoch(epoch)
        assert [len(bt) for bt in a] == [16] * 12 + [8]


def test_loader_workers_by_default_where_they_pay_and_the_batches_are_the_same(monkeypatch):
    """--num-workers by default: none on the CPU (they would take the step's cores), some with CUDA, persistent and
    pinned there; and with workers the batches (their order and MLM masks) are those of the main process alone."""
    import torch
    from datasets import Dataset

    from bert_dist import data as D
    from bert_dist.config import DataConfig
    from bert_dist.data.collate import MLMCollator

    assert D.loader_workers(None)["num_workers"] == 0 and not D.loader_workers(None)["pin_memory"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(D, "cpu_count", lambda: 8)
    on_gpu = D.loader_workers(None)
    assert on_gpu["num_workers"] == 4 and on_gpu["persistent_workers"] and on_gpu["pin_memory"]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # a core per process: none left for workers
    assert D.loader_workers(None)["num_workers"] == 0 and D.loader_workers(3)["num_workers"] == 3
    monkeypatch.undo()

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": [2, *torch.randint(5, 90, (int(n),), generator=g).tolist(), 3], "idx": i, "length": int(n)}
            for i, n in enumerate(torch.randint(3, 30, (70,), generator=g))]
    ds = Dataset.from_list(rows)
    collator = MLMCollator(4, 97, [1, 2, 3], seed=7)
    seen = []
    for workers in (0, 2):
        loader, sampler = D.train_loader(ds, DataConfig(batch_size=8, num_workers=workers, group_by_length=True),
                                         collator, seed=3)
        sampler.set_epoch(1)
        seen.append(list(loader))
    assert len(seen[0]) == len(seen[1]) == 9
    for a, b in zip(*seen):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

"""Preparing a pretraining corpus: file types and units, determinism over processes, restarts, the cache, the
`bert-dist prepare` command, bad corpora, and training on a prepared corpus (resume, two gloo processes).

CPU, tiny sizes, corpora the tests write themselves.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from safetensors.torch import load_file

from bert_dist.data.corpus import Corpus, file_sources, hub_source, plan, unit_rows
from bert_dist.data.pretraining import Grouper, PrepareSettings, open_prepared, prepare, tokenize_rows
from bert_dist.tokenizer import save_tokenizer, train_tokenizer

TOPICS = ["river boat water bridge", "king castle army crown", "train station rail engine", "song album band tour"]


def _docs(n: int, seed: int = 0) -> list[list[str]]:
    """n documents of 2-6 lines, each line one or two sentences on one topic."""
    rng = random.Random(seed)
    docs = []
    for d in range(n):
        words = TOPICS[d % len(TOPICS)].split()
        docs.append([" ".join(f"The {rng.choice(words)} of {rng.choice(words)} number {rng.randrange(99)} is here ."
                              for _ in range(rng.randint(1, 2))) for _ in range(rng.randint(2, 6))])
    return docs


def _write_text(path: Path, docs: list[list[str]], titles: bool = False) -> Path:
    """Google's format (a line a sentence group, blank lines between documents), or WikiText's rows."""
    lines = []
    for i, doc in enumerate(docs):
        if titles:
            lines += ["", f" = Article {i} = ", "", " = = Part = = ", ""] + [f" {ln} " for ln in doc]
        else:
            lines += [*doc, ""]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [ln for d in _docs(200) for ln in d]
    tok = train_tokenizer(texts, vocab_size=150)
    save_tokenizer(tok, tmp_path_factory.mktemp("tok"))
    return tok


def _rows(out: Path, split: str = "train") -> list[dict]:
    train, held, _ = open_prepared(out)
    return (train if split == "train" else held).to_list()


def test_every_file_type_gives_the_same_examples(tmp_path, tok):
    """A document as blank-separated lines of a .txt, or one row (lines joined by line breaks) of a .jsonl, .parquet,
    .csv, or of a local dataset folder streamed as a hub dataset: the same documents, so the same examples."""
    docs = _docs(60)
    texts = ["\n".join(d) for d in docs]
    files = {".txt": _write_text(tmp_path / "c.txt", docs)}
    files[".jsonl"] = tmp_path / "c.jsonl"
    files[".jsonl"].write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    files[".parquet"] = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": texts}), files[".parquet"], row_group_size=7)
    files[".csv"] = tmp_path / "c.csv"
    with open(files[".csv"], "w", newline="") as fh:  # quoted fields with line breaks inside
        csv.writer(fh).writerows([["text"], *([t] for t in texts)])
    hub = tmp_path / "hub"
    hub.mkdir()
    shutil.copy(files[".jsonl"], hub / "train.jsonl")
    settings = PrepareSettings(objective="mlm", max_length=32)
    seen = {}
    for suffix, f in [*files.items(), ("hub folder", hub)]:
        sources = [hub_source(str(f), "train")] if suffix == "hub folder" else file_sources(str(f), "--train-file")
        corpus = Corpus(sources)
        manifest = prepare(corpus, None, tok, settings, tmp_path / f"out-{suffix}", 1, suffix)
        assert manifest["splits"]["train"]["documents"] + manifest["splits"]["validation"]["documents"] == 60
        seen[suffix] = [r["input_ids"] for r in _rows(tmp_path / f"out-{suffix}")]
    assert len(seen[".txt"]) > 20
    assert all(v == seen[".txt"] for v in seen.values()), {k: len(v) for k, v in seen.items()}


@pytest.mark.parametrize("titles", [False, True])
def test_units_are_cut_where_documents_start(tmp_path, tok, titles):
    """A file cut into units of a few hundred bytes gives the documents of the whole file, each whole."""
    path = _write_text(tmp_path / "c.txt", _docs(80), titles)

    def documents(shard_bytes: int) -> list[list[list[int]]]:
        out = []
        for unit in plan(Corpus(file_sources(str(path), "--train-file")), shard_bytes):
            assert unit.rule == ("titles" if titles else "blank")
            grouper = Grouper(unit.rule)
            for rows in unit_rows(unit):
                out += grouper.feed(*tokenize_rows(rows, tok))
            out += grouper.finish()
        return [[s.tolist() for s in d] for d in out]

    small = plan(Corpus(file_sources(str(path), "--train-file")), 300)
    assert len(small) > 20
    assert documents(300) == documents(1 << 30)
    assert len(documents(300)) == 80


def test_preparation_is_the_same_in_any_number_of_processes_and_restarts_per_unit(tmp_path, tok):
    corpus_files = [_write_text(tmp_path / "a.txt", _docs(150, 1)), _write_text(tmp_path / "b.txt", _docs(90, 2))]
    flags = ",".join(map(str, corpus_files))
    settings = PrepareSettings(objective="mlm-nsp", max_length=48, dupe_factor=2, shard_mb=0.004)
    one, two = tmp_path / "one", tmp_path / "two"
    m1 = prepare(Corpus(file_sources(flags, "--train-file")), None, tok, settings, one, 1, "c")
    m2 = prepare(Corpus(file_sources(flags, "--train-file")), None, tok, settings, two, 2, "c")
    assert m1 == m2 and m1["units"] > 5
    files = sorted(str(p.relative_to(one)) for p in one.rglob("*.arrow"))
    assert files == sorted(str(p.relative_to(two)) for p in two.rglob("*.arrow"))
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)
    assert len(_rows(one)) == m1["splits"]["train"]["examples"] > 100
    assert len(_rows(one, "validation")) == m1["splits"]["validation"]["examples"] > 5

    # Stopped in unit 3 (its marker not written, its shard half written), and unit 4 never started: a rerun
    # prepares those two only, and the result is the same, byte for byte.
    (two / "done" / "000003.json").unlink()
    (two / "done" / "000004.json").unlink()
    shard = two / "train" / "000003-0000.arrow"
    shard.write_bytes(shard.read_bytes()[:100])
    (two / "train" / "000004-0000.arrow").unlink()
    (two / "manifest.json").unlink()
    before = {f: (two / f).stat().st_mtime_ns for f in files if not Path(f).name.startswith(("000003", "000004"))}
    assert prepare(Corpus(file_sources(flags, "--train-file")), None, tok, settings, two, 2, "c") == m1
    assert all((two / f).stat().st_mtime_ns == t for f, t in before.items())
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)


def test_a_tokenizer_trained_for_the_corpus_is_cached_and_the_units_keep_their_size(tmp_path, capsys):
    """Without --tokenizer, prepare trains one on the corpus (streamed through units of its own size), caches it, and
    still cuts the corpus into units of --shard-mb (they were once the tokenizer pass's 16 MB: one unit, one
    process)."""
    from bert_dist.cli import main as cli

    corpus = _write_text(tmp_path / "c.txt", _docs(200, 3))
    flags = ["prepare", "--train-file", str(corpus), "--vocab-size", "150", "--shard-mb", "0.002", "--num-proc", "2"]
    assert cli(flags) == 0
    prepared = Path(capsys.readouterr().out.strip())
    assert json.loads((prepared / "manifest.json").read_text())["units"] > 5
    ours = (prepared / "tokenizer.json").read_text()
    cached = [p for p in prepared.parent.parent.glob("tokenizers/*/tokenizer.json") if p.read_text() == ours]
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    assert cli(flags) == 0 and Path(capsys.readouterr().out.strip()) == prepared
    assert cached[0].stat().st_mtime_ns == stamp  # found, not trained again


def test_packed_sequences_hold_every_token_in_order(tmp_path, tok):
    docs = _docs(40)
    path = _write_text(tmp_path / "c.txt", docs)
    corpus = Corpus(file_sources(str(path), "--train-file"))
    prepare(corpus, Corpus(file_sources(str(path), "--validation-file")), tok,
            PrepareSettings(objective="mlm", max_length=24, dupe_factor=1), tmp_path / "out", 1, "c")
    rows = _rows(tmp_path / "out")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    assert all(r["length"] == 24 == len(r["input_ids"]) for r in rows[:-1]) and 2 < rows[-1]["length"] <= 24
    assert all(r["input_ids"][0] == cls and r["input_ids"][-1] == sep for r in rows)
    assert "token_type_ids" not in rows[0] and "next_sentence_label" not in rows[0]
    stream = [t for r in rows for t in r["input_ids"][1:-1]]
    expected = []
    for d in docs:
        expected += [t for line in d for t in tok.encode(line, add_special_tokens=False).ids] + [sep]
    assert stream == expected[:-1]  # the documents in order, a [SEP] between two
    vocab = {i: t for t, i in tok.get_vocab().items()}
    assert all(ws == (not vocab[t].startswith("##")) for r in rows for t, ws in zip(r["input_ids"], r["word_start"]))
    assert [r["idx"] for r in rows] == list(range(len(rows)))  # unit 0's rows


def test_the_prepare_command_and_the_run_share_one_prepared_corpus(tmp_path, tok, capsys):
    """`bert-dist prepare FLAGS` then `bert-dist pretrain FLAGS`: the run trains on that corpus (nothing prepared
    again), as does a run given only --prepared-dir; a run whose settings differ is refused."""
    from bert_dist.cli import main as cli
    from bert_dist.run import main

    corpus = _write_text(tmp_path / "c.txt", _docs(120))
    tok_dir = tmp_path / "tokdir"
    tok_dir.mkdir()
    save_tokenizer(tok, tok_dir)
    data = ["--train-file", str(corpus), "--tokenizer", str(tok_dir), "--max-length", "48", "--shard-mb", "0.002",
            "--objective", "mlm"]
    assert cli(["prepare", *data, "--num-proc", "2"]) == 0
    prepared = Path(capsys.readouterr().out.strip())
    assert (prepared / "manifest.json").is_file() and len(list((prepared / "done").iterdir())) > 3
    stamps = {p: p.stat().st_mtime_ns for p in prepared.rglob("*")}
    run = ["--preset", "tiny", "--max-steps", "2", "--batch-size", "8", "--max-eval-samples", "16"]
    assert main(["--task", "pretrain", *data, *run, "--output-dir", str(tmp_path / "pt")]) == 0
    results = json.loads((tmp_path / "pt" / "results.json").read_text())
    assert results["prepared_dir"] == str(prepared) and results["objective"] == "mlm"
    assert "nsp_accuracy" not in results and "nsp_baseline" not in results
    assert {p: p.stat().st_mtime_ns for p in prepared.rglob("*")} == stamps  # read, not prepared again
    assert main(["--task", "pretrain", "--prepared-dir", str(prepared), *run, "--output-dir",
                 str(tmp_path / "pt2")]) == 0
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("pt", "pt2"))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--task", "pretrain", "--prepared-dir", str(prepared), "--objective", "mlm-nsp", *run, "--output-dir",
              str(tmp_path / "pt3")])
    assert "--objective mlm-nsp: the corpus in --prepared-dir" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(SystemExit):  # the same directory named for another corpus
        main(["--task", "pretrain", *data[:-1], "mlm-nsp", "--prepared-dir", str(prepared), *run, "--output-dir",
              str(tmp_path / "pt4")])
    assert "holds a corpus prepared from other data or settings" in " ".join(capsys.readouterr().err.split())
    assert {p: p.stat().st_mtime_ns for p in prepared.rglob("*")} == stamps


@pytest.mark.parametrize("name, content, phrase", [
    ("bad.jsonl", b'{"text": "fine row"}\n{"text": "broken\n', "cannot be read as JSON Lines"),
    ("late.txt", b"ok line\n\n" * 400 + bytes(range(128, 256)) + b"\n", "not UTF-8 text (byte 3600)"),
    ("notext.jsonl", b'{"n": 1}\n', "no text column"),
    ("c.docx", b"x", "unsupported file type"),
], ids=["bad-json", "not-utf8-in-a-later-unit", "no-text-column", "unknown-type"])
def test_a_corpus_that_cannot_be_read_is_one_line_naming_the_file(tmp_path, capsys, name, content, phrase):
    from bert_dist.cli import main as cli

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SystemExit):
        cli(["prepare", "--train-file", str(path), "--shard-mb", "0.001", "--vocab-size", "100"])
    err = " ".join(capsys.readouterr().err.split())
    assert f"--train-file {path}" in err and phrase in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        cli(["prepare", "--train-file", str(tmp_path / "nothing-*.txt")])
    assert "no file matches" in capsys.readouterr().err


def test_a_dataset_folder_is_streamed_with_its_validation_split_held_out(tmp_path, tok, capsys):
    from bert_dist.cli import main as cli

    folder = tmp_path / "ds"
    folder.mkdir()
    for split, docs in (("train", _docs(50, 1)), ("validation", _docs(7, 2))):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": "\n".join(d)}) + "\n" for d in docs))
    tok_dir = tmp_path / "tokdir"
    tok_dir.mkdir()
    save_tokenizer(tok, tok_dir)
    assert cli(["prepare", "--dataset", str(folder), "--tokenizer", str(tok_dir), "--objective", "mlm"]) == 0
    manifest = json.loads((Path(capsys.readouterr().out.strip()) / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] == 50 and manifest["splits"]["validation"]["documents"] == 7
    assert "(validation split)" in manifest["source"]
    # No corpus flag: the task's WikiText on the hub, which this offline machine cannot reach: one line, at once.
    with pytest.raises(SystemExit):
        cli(["prepare", "--tokenizer", str(tok_dir)])
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot reach the Hugging Face hub to stream Salesforce/wikitext" in err and "Traceback" not in err


def _init_dir(root: Path, tok) -> Path:
    """A tiny BertForPreTraining without dropout (the one thing that must differ between processes)."""
    import torch

    from bert_dist.config import preset
    from bert_dist.model import BertForPreTraining
    from bert_dist.weights import save_run_model

    bert = preset("tiny", vocab_size=tok.get_vocab_size(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    save_run_model(BertForPreTraining(bert), root / "init", bert, {"task": "pretrain", "kind": "pretrain"}, tok)
    return root / "init"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tok):
    from bert_dist.config import config_from_args
    from bert_dist.data.pretraining import prepare_main

    root = tmp_path_factory.mktemp("prepared")
    corpus = _write_text(root / "c.txt", _docs(300, 5))
    init = _init_dir(root, tok)
    out = prepare_main(config_from_args(["--task", "pretrain", "--train-file", str(corpus), "--init", str(init),
                                         "--max-length", "64", "--shard-mb", "0.005", "--prepared-dir",
                                         str(root / "corpus"), "--whole-word-mask"]))
    flags = ["--task", "pretrain", "--prepared-dir", str(out), "--init", str(init), "--lr", "2e-3", "--warmup-ratio",
             "0", "--log-every", "3", "--eval-every", "3", "--max-eval-samples", "40", "--eval-batch-size", "8",
             "--seed", "3", "--whole-word-mask"]
    return root, flags


def test_a_resumed_pretraining_run_equals_the_uninterrupted_one(prepared):
    from bert_dist.run import main

    root, flags = prepared
    full, resumed = root / "full", root / "resumed"
    run = [*flags, "--batch-size", "8", "--max-steps", "6", "--save-every", "3"]
    assert main([*run, "--output-dir", str(full)]) == 0
    resumed.mkdir()
    shutil.copy(full / "run_config.json", resumed / "run_config.json")
    assert main([*run, "--output-dir", str(resumed), "--resume-from", str(full / "checkpoints" / "step-00000003")]) == 0
    a, b = (load_file(str(d / "model.safetensors")) for d in (full, resumed))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert json.loads((full / "results.json").read_text())["mlm_accuracy"] == \
        json.loads((resumed / "results.json").read_text())["mlm_accuracy"]


@pytest.mark.slow
def test_two_processes_read_their_share_and_train_as_one_with_the_same_global_batch(prepared):
    """2 gloo processes with batch 4 each, on a prepared corpus, against 1 process with 2 micro-batches of 4 per
    step: the batch order is a function of the seed, so rank r reads batches r, r + 2, ... (its own rows of the
    memory-mapped shards) and global step t holds the 1-process run's micro-batches 2t and 2t + 1; DDP averages the
    two ranks' losses as gradient accumulation averages the two micro-batches' (each a mean over its own masked
    tokens). The same weights and held-out metrics to fp32 rounding."""
    from accelerate.state import AcceleratorState, GradientState

    from bert_dist.run import main

    root, flags = prepared
    one, two = root / "one", root / "two"
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert main([*flags, "--batch-size", "4", "--grad-accum", "2", "--max-steps", "6", "--output-dir", str(one)]) == 0
    p = run_cli([*flags, "--batch-size", "4", "--max-steps", "6", "--output-dir", str(two)], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "pretrain on 2 process(es)" in " ".join(p.stderr.split())
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r1["steps"] == r2["steps"] == 6
    for k in ("mlm_loss", "mlm_accuracy", "nsp_accuracy"):
        assert r2[k] == pytest.approx(r1[k], abs=1e-4), k
    w1, w2 = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    for k in w1:
        np.testing.assert_allclose(w2[k].numpy(), w1[k].numpy(), rtol=1e-4, atol=1e-5, err_msg=k)

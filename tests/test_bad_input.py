"""Bad input ends in one clear line and exit status 1: no traceback, and nothing that looks like a finished run.

Most cases call `bert_dist.run.main` in this process (seconds, not an interpreter start each); two run the
real entry point in a subprocess to prove that no traceback reaches stderr there either.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import reset_accelerate, run_cli

from bert_dist.config import preset
from bert_dist.data import get_task
from bert_dist.data.synthetic import make_rows, write_task_data
from bert_dist.model import BertForSequenceClassification
from bert_dist.run import main
from bert_dist.tokenizer import train_tokenizer
from bert_dist.weights import save_run_model

REPO = Path(__file__).resolve().parents[1]
SST2, STSB = get_task("sst2"), get_task("stsb")


def _reset_accelerate() -> None:
    """Each main() builds its own Accelerator; accelerate keeps process-wide singletons between them."""
    reset_accelerate()


def fails(args: list[str], capsys, *phrases: str, out: Path | None = None) -> str:
    """main(args) exits 1 with one `error:` line (the last) holding each phrase; returns that line.

    With `out`: nothing there pretends to be a finished run, and a directory the run made is gone.
    """
    existed = out is not None and out.exists()
    _reset_accelerate()
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 1, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    for p in phrases:
        assert p in errors[0], errors[0]
    if out is not None:
        assert not (out / "results.json").exists() and not (out / "model.safetensors").exists()
        assert existed or not out.exists(), f"{out} was left behind: {list(out.iterdir())}"
    return errors[0]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_task_data(SST2, tmp_path_factory.mktemp("data"), n_train=48, n_eval=9, n_test=3)


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    texts = [json.loads(ln)["sentence"] for ln in (data_dir / "sst2" / "train.jsonl").read_text().splitlines()]
    return train_tokenizer(iter(texts), vocab_size=200)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny bert-dist run directory (config.json, model.safetensors, tokenizer.json), no training needed."""
    d = tmp_path_factory.mktemp("model")
    bert = preset("tiny", vocab_size=tokenizer.get_vocab_size())
    save_run_model(BertForSequenceClassification(bert, 2), d, bert, {"task": "sst2"}, tokenizer)
    return d


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def args(out: Path, *extra: str, data: Path | None = None, task: str = "sst2") -> list[str]:
    """A tiny run: the flags each case starts from (the case's own flags come last and win)."""
    base = ["--task", task, "--init", "scratch", "--preset", "tiny", "--vocab-size", "200", "--max-steps", "2",
            "--batch-size", "8", "--eval-batch-size", "16", "--log-every", "1", "--output-dir", str(out)]
    return base + (["--data-dir", str(data)] if data is not None else []) + list(extra)


# ---------------------------------------------------------------------------------------------
# Flags


def test_unknown_task(tmp_path, capsys):
    fails(args(tmp_path / "o", task="sst3"), capsys, "--task", "'sst3'", "sst2", "glue (every GLUE", "tokenizer",
          out=tmp_path / "o")


@pytest.mark.parametrize("extra, phrases", [
    (["--resume", "--resume-from", "x"], ["--resume", "--resume-from", "give one"]),
    (["--resume", "--overwrite"], ["--overwrite", "--resume"]),
    (["--eval-only", "--resume"], ["--eval-only", "--resume"]),
    (["--eval-only"], ["--eval-only", "--init"]),
    (["--train-file", "t.jsonl"], ["--train-file", "--validation-file"]),
    (["--train-file", "t.jsonl", "--validation-file", "v.jsonl"], ["--train-file", "--data-dir"]),
    (["--keep-checkpoints", "0"], ["--keep-checkpoints"]),
    (["--max-bad-steps", "0"], ["--max-bad-steps"]),
    (["--save-every", "0"], ["--save-every"]),
    (["--n-best-size", "0"], ["--n-best-size", "at least 1"]),
    (["--max-answer-length", "0"], ["--max-answer-length", "at least 1"]),
    (["--max-query-length", "0"], ["--max-query-length", "at least 1"]),
    (["--pad-to-multiple-of", "-8"], ["--pad-to-multiple-of", "0 (off)"]),
    (["--max-train-samples", "0"], ["--max-train-samples", "at least 1"]),
    (["--max-eval-samples", "-1"], ["--max-eval-samples", "at least 1"]),
    (["--num-workers", "-1"], ["--num-workers"]),
    (["--cpu-kernels", "on"], ["--cpu-kernels", "auto or off"]),
    (["--cpu-threads", "0"], ["--cpu-threads", "at least 1"]),
    (["--report-to", "nosuch"], ["--report-to nosuch", "unknown tracker"]),
    (["--mixed-precision", "fp16"], ["--mixed-precision fp16", "CPU", "bf16"]),
    (["--lr", "inf"], ["--lr", "positive finite"]),
    (["--lr", "nan"], ["--lr", "positive finite"]),
    (["--epochs", "inf"], ["--epochs", "positive finite"]),  # was a traceback, after --overwrite had discarded
    (["--epochs", "nan"], ["--epochs", "positive finite"]),
    (["--null-score-diff-threshold", "nan"], ["--null-score-diff-threshold", "finite"]),
    (["--adam-beta1", "1.5"], ["--adam-beta1", "[0, 1)"]),
    (["--adam-beta2", "1"], ["--adam-beta2", "[0, 1)"]),
    (["--adam-eps", "-1"], ["--adam-eps", "positive"]),
    (["--weight-decay", "-0.1"], ["--weight-decay"]),
    (["--max-grad-norm", "-1"], ["--max-grad-norm", "0 (off)"]),
    (["--warmup-steps", "-1"], ["--warmup-steps", "0 or more"]),
    (["--seed", "-5"], ["--seed", "-5"]),
    (["--resume-from", "o/checkpoints/step-00000002.tmp"], ["--resume-from", "incomplete checkpoint"]),
])
def test_contradictory_or_invalid_flags(tmp_path, capsys, data_dir, extra, phrases):
    data = None if "--train-file" in extra and "--validation-file" not in extra else data_dir
    fails(args(tmp_path / "o", *extra, data=data), capsys, *phrases, out=tmp_path / "o")


def test_max_length_above_the_models_positions(tmp_path, capsys, data_dir, model_dir):
    fails(args(tmp_path / "o", "--max-length", "1024", data=data_dir), capsys, "--max-length 1024", "512",
          out=tmp_path / "o")
    fails(args(tmp_path / "o", "--init", str(model_dir), "--max-length", "600", data=data_dir), capsys,
          "--max-length 600", out=tmp_path / "o")


@pytest.mark.parametrize("extra, phrases", [
    (["--max-length", "40"], ["--max-length 40", "--max-query-length 64"]),
    (["--max-length", "128", "--doc-stride", "64"], ["--doc-stride 64", "61"]),
])
def test_squad_windows_that_cannot_work(tmp_path, capsys, monkeypatch, extra, phrases):
    """Caught in preflight, before the scratch run trains its tokenizer (windowing would catch it only after)."""
    import bert_dist.finetune

    trained = []
    monkeypatch.setattr(bert_dist.finetune, "train_shared_tokenizer", lambda *a, **k: trained.append(a))
    data = write_task_data(get_task("squad"), tmp_path / "data", n_train=8, n_eval=4, n_test=0)
    fails(args(tmp_path / "o", *extra, data=data, task="squad"), capsys, *phrases, out=tmp_path / "o")
    assert trained == []


SQUAD_ROW = {"id": "a", "title": "t", "context": "Bob lives in Paris.", "question": "Where does Bob live?",
             "answers": {"text": ["Paris"], "answer_start": [13]}}


@pytest.mark.parametrize("answers, phrase", [
    ({"text": ["Paris"], "answer_start": []}, "row 2"),  # lists of different lengths
    ({"text": ["Paris"]}, "row 2"),  # no answer_start
])
def test_squad_malformed_answers(tmp_path, capsys, answers, phrase):
    train = write_jsonl(tmp_path / "train.jsonl", [SQUAD_ROW, {**SQUAD_ROW, "id": "b", "answers": answers}])
    val = write_jsonl(tmp_path / "val.jsonl", [SQUAD_ROW])
    fails(args(tmp_path / "o", "--train-file", str(train), "--validation-file", str(val), task="squad"), capsys,
          "--train-file", "answers", phrase, "'answer_start' list of integers", out=tmp_path / "o")


def test_squad_validation_ids_must_be_unique(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [SQUAD_ROW, SQUAD_ROW])  # repeated ids in training are harmless
    val = write_jsonl(tmp_path / "val.jsonl", [SQUAD_ROW, {**SQUAD_ROW, "question": "Who lives in Paris?"}])
    fails(args(tmp_path / "o", "--train-file", str(train), "--validation-file", str(val), task="squad"), capsys,
          "--validation-file", "'a'", "rows 1 and 2", out=tmp_path / "o")


def test_squad_v1_validation_question_without_an_answer_is_refused_before_training(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [SQUAD_ROW])
    val = write_jsonl(tmp_path / "val.jsonl", [SQUAD_ROW, {**SQUAD_ROW, "id": "b", "answers": {"text": [],
                                                                                               "answer_start": []}}])
    fails(args(tmp_path / "o", "--train-file", str(train), "--validation-file", str(val), task="squad"), capsys,
          "--validation-file", "'b'", "row 2", "has no answer", "--task squad_v2", out=tmp_path / "o")


def test_squad_integer_ids_are_read_as_text():
    """predictions.json is keyed by id as text; integer ids (a custom file) become "7"."""
    import datasets

    from bert_dist.data import check_raw

    rows = [{**SQUAD_ROW, "id": 7}, {**SQUAD_ROW, "id": 8}]
    raw = check_raw(datasets.DatasetDict(validation=datasets.Dataset.from_list(rows)), get_task("squad"), "rows")
    assert raw["validation"]["id"] == ["7", "8"]


def test_squad_answers_as_the_official_json_lists_them_are_read():
    """Per question, the official SQuAD JSON has answers as [{"text", "answer_start"}]: converted to the hub's form."""
    import datasets

    from bert_dist.data import check_raw

    rows = [{**SQUAD_ROW, "answers": [{"text": "Paris", "answer_start": 13}, {"text": "in Paris", "answer_start": 10}]},
            {**SQUAD_ROW, "id": "b", "answers": []}]
    raw = check_raw(datasets.DatasetDict(train=datasets.Dataset.from_list(rows)), get_task("squad_v2"), "rows")
    assert raw["train"]["answers"] == [{"text": ["Paris", "in Paris"], "answer_start": [13, 10]},
                                       {"text": [], "answer_start": []}]


@pytest.mark.parametrize("content, phrase", [
    (b"", "the file is empty"),
    (b"\n\n\n", "every line is blank"),
    (b"one line, one document\n", "at least 4 documents"),
    (bytes(range(128, 256)) * 4, "not UTF-8"),
])
def test_pretraining_corpus_that_cannot_work(tmp_path, capsys, content, phrase):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    fails(args(tmp_path / "o", "--train-file", str(corpus), task="pretrain"), capsys, "--train-file", str(corpus),
          phrase, out=tmp_path / "o")


def test_non_empty_output_dir_without_overwrite(tmp_path, capsys, data_dir):
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.json").write_text('{"accuracy": 0.9}')
    fails(args(out, data=data_dir), capsys, str(out), "--overwrite", "--resume")
    assert [f.name for f in out.iterdir()] == ["results.json"]  # untouched
    assert (out / "results.json").read_text() == '{"accuracy": 0.9}'


def test_overwrite_that_fails_on_its_input_keeps_the_previous_run(tmp_path, capsys, data_dir, model_dir):
    """--overwrite replaces a run only once the new run's data and model have loaded."""
    out = copy_dir(model_dir, tmp_path / "o")  # a run: config, weights, tokenizer
    (out / "results.json").write_text('{"accuracy": 0.9}')
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    (out / "run_config.json").write_text('{"the": "previous run"}')
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    bad = write_jsonl(tmp_path / "bad" / "sst2" / "train.jsonl", [{"text": "no sentence column", "label": 0}])
    write_jsonl(bad.parent / "validation.jsonl", [{"text": "x", "label": 1}])
    _reset_accelerate()
    with pytest.raises(SystemExit):
        main(args(out, "--overwrite", "--init", str(model_dir), data=bad.parent.parent))
    err = capsys.readouterr().err
    assert "error:" in err and "trained model" not in err  # the model there is the previous run's
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.name in before} == before
    assert (out / "checkpoints" / "step-00000002").is_dir()
    # --init and --output-dir the same run: its weights load before anything is removed.
    _reset_accelerate()
    assert main(args(out, "--overwrite", "--init", str(out), data=data_dir)) == 0
    assert not (out / "checkpoints").exists() and json.loads((out / "results.json").read_text())["steps"] == 2
    assert json.loads((out / "run_config.json").read_text())["init"] == str(out)


def test_resume_of_a_finished_run_without_checkpoints(tmp_path, capsys, data_dir, model_dir):
    out = copy_dir(model_dir, tmp_path / "o")
    (out / "results.json").write_text('{"accuracy": 0.9}')
    fails(args(out, "--resume", "--init", str(model_dir), data=data_dir), capsys, "--resume", "finished run",
          "--overwrite")
    assert (out / "results.json").read_text() == '{"accuracy": 0.9}'


def test_world_size_without_distributed_processes(tmp_path, capsys, data_dir, monkeypatch):
    # What `accelerate launch --config_file multi_cpu.yaml` does without ACCELERATE_USE_CPU=1: torchrun
    # starts 2 processes that each see one process, and each would run the whole job.
    monkeypatch.setenv("WORLD_SIZE", "2")
    fails(args(tmp_path / "o", data=data_dir), capsys, "WORLD_SIZE is 2",
          "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2", out=tmp_path / "o")


# ---------------------------------------------------------------------------------------------
# Data


def test_missing_data_dir_split_and_file(tmp_path, capsys, data_dir):
    fails(args(tmp_path / "o", data=tmp_path / "nowhere"), capsys, "--data-dir", "no such directory",
          out=tmp_path / "o")
    only_train = tmp_path / "d"
    write_jsonl(only_train / "sst2" / "train.jsonl", make_rows(SST2, 8, 0))
    fails(args(tmp_path / "o", data=only_train), capsys, "--data-dir", "no validation split", "sst2/validation",
          out=tmp_path / "o")
    train = data_dir / "sst2" / "train.jsonl"
    fails(args(tmp_path / "o", "--train-file", str(train), "--validation-file", str(tmp_path / "v.jsonl")), capsys,
          "--validation-file", "no such file", out=tmp_path / "o")
    fails(args(tmp_path / "o", "--train-file", str(train), "--validation-file", str(tmp_path / "v.xlsx")), capsys,
          "--validation-file", "unsupported file type", out=tmp_path / "o")


def custom(tmp_path: Path, train_rows: list[dict] | None = None, val_rows: list[dict] | None = None,
           spec=SST2) -> Path:
    """A --data-dir whose splits are the given rows (synthetic ones where not given)."""
    d = tmp_path / "custom"
    write_jsonl(d / spec.name / "train.jsonl", train_rows if train_rows is not None else make_rows(spec, 24, 0))
    write_jsonl(d / spec.name / "validation.jsonl", val_rows if val_rows is not None else make_rows(spec, 5, 1))
    return d


def test_missing_text_or_label_column(tmp_path, capsys):
    rows = [{"text": r["sentence"], "label": r["label"]} for r in make_rows(SST2, 8, 0)]
    fails(args(tmp_path / "o", data=custom(tmp_path, train_rows=rows)), capsys, "train.jsonl", "train split",
          "no text column 'sentence'", "columns: text, label", out=tmp_path / "o")
    rows = [{"sentence": r["sentence"]} for r in make_rows(SST2, 8, 0)]
    fails(args(tmp_path / "o", data=custom(tmp_path, val_rows=rows)), capsys, "validation.jsonl",
          "no 'label' column", out=tmp_path / "o")


@pytest.mark.parametrize("label, phrases", [
    (2, ["the label 2 at row 3", "outside 0..1"]),
    (-1, ["the label -1 at row 3", "outside 0..1"]),
    (0.5, ["the label 0.5 at row 3", "not a class id"]),
    ("maybe", ["the label 'maybe' at row 3", "negative, positive"]),
    (True, ["the label True at row 3", "not a class id or name"]),
    ([1], ["at row 3", "not a class id or name"]),
])
def test_labels_out_of_range_or_of_the_wrong_type(tmp_path, capsys, label, phrases):
    rows = make_rows(SST2, 8, 0)
    rows[2]["label"] = label
    fails(args(tmp_path / "o", data=custom(tmp_path, train_rows=rows)), capsys, "train.jsonl", *phrases,
          out=tmp_path / "o")


def test_regression_labels_must_be_finite_numbers(tmp_path, capsys):
    rows = make_rows(STSB, 8, 0)
    rows[1]["label"] = "high"
    fails(args(tmp_path / "o", data=custom(tmp_path, train_rows=rows, spec=STSB), task="stsb"), capsys,
          "regression", "'high' at row 2", out=tmp_path / "o")


def test_label_names_are_mapped_to_ids(tmp_path, capsys):
    rows = make_rows(SST2, 24, 0)
    for r in rows:
        r["label"] = SST2.label_names[r["label"]]
    _reset_accelerate()
    assert main(args(tmp_path / "o", "--max-steps", "1", data=custom(tmp_path, train_rows=rows))) == 0
    assert (tmp_path / "o" / "results.json").is_file()


def test_empty_files_and_datasets(tmp_path, capsys):
    d = custom(tmp_path)
    (d / "sst2" / "validation.jsonl").write_text("")
    fails(args(tmp_path / "o", data=d), capsys, "validation.jsonl", "empty", out=tmp_path / "o")
    (d / "sst2" / "validation.jsonl").unlink()
    (d / "sst2" / "validation.csv").write_text("sentence,label\n")
    fails(args(tmp_path / "o", data=d), capsys, "validation.csv", "no rows", out=tmp_path / "o")


def test_non_utf8_bytes(tmp_path, capsys):
    d = custom(tmp_path)
    f = d / "sst2" / "train.jsonl"
    f.write_bytes(f.read_bytes() + '{"sentence": "caf\u00e9 noir", "label": 1, "idx": 99}\n'.encode("latin-1"))
    fails(args(tmp_path / "o", data=d), capsys, "train.jsonl", "not UTF-8", "re-encode", out=tmp_path / "o")


def test_csv_with_malformed_rows(tmp_path, capsys):
    d = custom(tmp_path)
    (d / "sst2" / "validation.jsonl").unlink()
    f = d / "sst2" / "validation.csv"
    f.write_text("sentence,label\ngood film,1\nbad, bad film,0\n")  # a row with a field too many
    fails(args(tmp_path / "o", data=d), capsys, "validation.csv", "row 2 has 3 fields, the header 2", "quote",
          out=tmp_path / "o")
    f.write_text("sentence,label\ngood film,1\na row without its label\nbad film,0\n")  # a field too few
    fails(args(tmp_path / "o", data=d), capsys, "validation.csv", "row 2 has 1 field, the header 2",
          out=tmp_path / "o")


def test_texts_far_longer_than_the_model_are_truncated(tmp_path, capsys):
    rows = make_rows(SST2, 24, 0)
    rows[0]["sentence"] = " ".join(["good film"] * 3000)  # 6000 words against 512 positions
    val = make_rows(SST2, 5, 1)
    val[0]["sentence"] = rows[0]["sentence"]
    _reset_accelerate()
    assert main(args(tmp_path / "o", "--max-steps", "1", data=custom(tmp_path, rows, val))) == 0
    assert len((tmp_path / "o" / "predictions_validation.jsonl").read_text().splitlines()) == 5


# ---------------------------------------------------------------------------------------------
# Checkpoints and tokenizers


def test_init_whose_shapes_do_not_fit(tmp_path, capsys, data_dir, model_dir):
    bad = copy_dir(model_dir, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(hidden_size=128, intermediate_size=512)  # the weights are hidden_size 64
    (bad / "config.json").write_text(json.dumps(cfg))
    fails(args(tmp_path / "o", "--init", str(bad), data=data_dir), capsys, "--init", "does not fit", "(64,",
          out=tmp_path / "o")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_or_truncated_safetensors(tmp_path, capsys, data_dir, model_dir, damage):
    bad = copy_dir(model_dir, tmp_path / "bad")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2] if damage == "truncate" else b"not safetensors" * 100)
    fails(args(tmp_path / "o", "--init", str(bad), data=data_dir), capsys, "--init", "model.safetensors",
          "corrupt or truncated", out=tmp_path / "o")


def test_init_that_is_not_a_model_dir(tmp_path, capsys, data_dir, model_dir):
    fails(args(tmp_path / "o", "--init", str(tmp_path / "missing"), data=data_dir), capsys, "--init",
          "not a directory", out=tmp_path / "o")
    bad = copy_dir(model_dir, tmp_path / "bad")
    (bad / "config.json").write_text("{not json")
    fails(args(tmp_path / "o", "--init", str(bad), data=data_dir), capsys, "config.json", "not valid JSON",
          out=tmp_path / "o")
    (bad / "config.json").write_text("[1, 2]")
    fails(args(tmp_path / "o", "--init", str(bad), data=data_dir), capsys, "config.json", "not a config object",
          out=tmp_path / "o")


class _Code:
    def __reduce__(self):
        return print, ("this ran",)


def test_init_weights_that_hold_code_are_refused(tmp_path, capsys, data_dir, model_dir):
    import torch

    bad = copy_dir(model_dir, tmp_path / "bad")
    (bad / "model.safetensors").unlink()
    torch.save({"bert.embeddings.word_embeddings.weight": _Code()}, bad / "pytorch_model.bin")
    fails(args(tmp_path / "o", "--init", str(bad), data=data_dir), capsys, "pytorch_model.bin", "not loaded",
          out=tmp_path / "o")
    assert "this ran" not in capsys.readouterr().out


def test_output_dir_that_cannot_be_made(tmp_path, capsys, data_dir):
    (tmp_path / "afile").write_text("x")
    fails(args(tmp_path / "afile" / "sub", data=data_dir), capsys, "--output-dir", "is a file, not a directory")
    fails(args(Path("/proc/bert-dist-cannot-be-here"), data=data_dir), capsys, "--output-dir", "choose another")


def _tokenizer_without(tmp_path: Path, missing: str, texts: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t != missing]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    f = tmp_path / f"no-{missing.strip('[]').lower()}" / "tokenizer.json"
    f.parent.mkdir()
    tok.save(str(f))
    return f


def test_tokenizer_without_special_tokens(tmp_path, capsys, data_dir):
    texts = [r["sentence"] for r in make_rows(SST2, 50, 0)]
    no_sep = _tokenizer_without(tmp_path, "[SEP]", texts)
    fails(args(tmp_path / "o", "--tokenizer", str(no_sep), data=data_dir), capsys, "--tokenizer", str(no_sep),
          "lacks [SEP]", out=tmp_path / "o")
    no_mask = _tokenizer_without(tmp_path, "[MASK]", texts)
    _reset_accelerate()  # fine-tuning needs no [MASK]: this one trains
    assert main(args(tmp_path / "ft", "--tokenizer", str(no_mask), "--max-steps", "1", data=data_dir)) == 0
    fails(args(tmp_path / "o", "--tokenizer", str(no_mask), task="pretrain"), capsys, "lacks [MASK]",
          "pretrain", out=tmp_path / "o")


def test_resume_from_a_checkpoint_that_does_not_fit(tmp_path, capsys, data_dir, tokenizer):
    out = tmp_path / "o"
    (out / "checkpoints" / "step-00000001").mkdir(parents=True)
    (out / "checkpoints" / "step-00000001" / "model.safetensors").write_bytes(b"\0" * 64)
    tok = tmp_path / "tokenizer.json"
    tokenizer.save(str(tok))
    fails(args(out, "--resume", "--tokenizer", str(tok), data=data_dir), capsys, "cannot resume from",
          "step-00000001", out=out)
    fails(args(out, "--resume", data=data_dir), capsys, "--resume", "tokenizer.json", "--tokenizer", out=out)
    fails(args(tmp_path / "p", "--resume-from", str(tmp_path / "nowhere"), data=data_dir), capsys,
          "--resume-from", "no such checkpoint directory", out=tmp_path / "p")


def test_resume_with_other_flags(tmp_path, capsys, data_dir):
    from bert_dist.config import config_from_args

    out = tmp_path / "o"
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps(config_from_args(args(out, data=data_dir)).to_dict()))
    fails(args(out, "--resume", "--batch-size", "16", data=data_dir), capsys, "--resume", "--batch-size is 16",
          "8 in the run being resumed")


@pytest.mark.parametrize("content, phrase", [("{not json", "unreadable"), ("[1, 2]", "JSON list")])
def test_resume_with_a_corrupt_run_config(tmp_path, capsys, data_dir, content, phrase):
    out = tmp_path / "o"
    out.mkdir()
    (out / "run_config.json").write_text(content)
    fails(args(out, "--resume", data=data_dir), capsys, str(out / "run_config.json"), phrase)


def test_resume_needs_an_output_dir(tmp_path, capsys, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a default runs/<task>-<timestamp> would appear
    base = args(tmp_path / "unused", "--resume", data=data_dir)
    i = base.index("--output-dir")
    fails(base[:i] + base[i + 2:], capsys, "--resume", "--output-dir")
    assert not (tmp_path / "runs").exists()


def test_a_resume_from_a_tmp_checkpoint_keeps_it(tmp_path, capsys, data_dir):
    tmp = tmp_path / "o" / "checkpoints" / "step-00000002.tmp"
    tmp.mkdir(parents=True)
    fails(args(tmp_path / "o", "--resume-from", str(tmp), data=data_dir), capsys, str(tmp), "incomplete")
    assert tmp.is_dir()


def test_a_second_run_into_a_locked_output_dir_is_refused(tmp_path, capsys, data_dir):
    """Two runs into one directory (two --resume of one job) would write over each other: the main process holds
    a flock on <output-dir>/.lock for the run. A lock file whose holder died blocks nothing, and it does not make the
    directory count as non-empty."""
    import fcntl

    out = tmp_path / "o"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # as a live run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fails(args(out, "--resume", data=data_dir), capsys, str(out), "in use by another bert-dist run")
    assert [f.name for f in out.iterdir()] == [".lock"]
    _reset_accelerate()
    assert main(args(out, data=data_dir)) == 0  # released (as by a killed holder), and the dir counts as empty
    assert (out / "results.json").is_file()


@pytest.mark.parametrize("where", ["checkpoint", "final model"])
def test_a_full_disk_is_one_line(tmp_path, capsys, data_dir, monkeypatch, where):
    """No space left while saving: one line that says where, exit 1 (it was a SafetensorError traceback)."""
    import errno

    from accelerate import Accelerator
    from safetensors import SafetensorError

    import bert_dist.finetune as F

    out = tmp_path / "o"
    if where == "checkpoint":
        def full(self, output_dir=None, **kw):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        monkeypatch.setattr(Accelerator, "save_state", full)
        extra = ["--save-every", "1"]
    else:
        def full(model, out_dir, *a, **kw):
            raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "model.safetensors"))
        monkeypatch.setattr(F, "save_run_model", full)
        extra = []
    line = fails(args(out, *extra, data=data_dir), capsys, "no space left", "--output-dir")
    assert str(out) in line


def test_overwrite_removes_everything_the_previous_run_left(tmp_path, capsys, data_dir):
    """Predictions, submission TSVs, report, logs...: nothing of the previous run stays beside the new one's."""
    out = tmp_path / "o"
    _reset_accelerate()
    assert main(args(out, "--save-every", "1", data=data_dir)) == 0
    (out / "nbest_predictions.json").write_text("{}")  # as a SQuAD run writes
    (out / "logs" / "bert-dist").mkdir(parents=True)
    (out / "logs" / "bert-dist" / "events.out").write_text("old")
    before = {p.relative_to(out) for p in out.rglob("*")}
    _reset_accelerate()
    started = time.time()
    assert main(args(out, "--overwrite", "--max-train-samples", "16", "--max-eval-samples", "4", data=data_dir)) == 0
    after = {p.relative_to(out) for p in out.rglob("*")}
    assert not (out / "nbest_predictions.json").exists() and not (out / "logs").exists()
    assert not (out / "checkpoints").exists()
    for p in after & before - {Path(".lock")}:  # what both runs write is this run's
        assert (out / p).is_dir() or (out / p).stat().st_mtime >= started, p
    assert len((out / "predictions_validation.jsonl").read_text().splitlines()) == 4


def test_overwrite_removes_only_a_previous_runs_outputs(tmp_path):
    """discard_previous_run removes the run outputs the directory held when the run took its lock, and only where a
    bert-dist run was (its run_config.json): never a user's own files, a link's target, this run's inputs (its own
    tokenizer.json passed back with --tokenizer), or what the run wrote since (tracker logs)."""
    import os

    from accelerate import Accelerator

    from bert_dist.rundir import PREVIOUS_FILES, discard_previous_run, list_previous_files

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "precious.txt").parent.mkdir(parents=True)
    (elsewhere / "precious.txt").write_text("x")
    out = tmp_path / "o"
    run = ("run_config.json", "results.json", "logs/bert-dist/old.events",
           "checkpoints/step-00000001/model.safetensors", "SST-2.tsv", "predictions_validation.jsonl",
           "submission/RTE.tsv", "tokenizer.json")
    users = ("notes.txt", "mydata/keep.csv", "data.tsv", "logs/app.log", "checkpoints/mine.txt", ".git/HEAD")
    for f in (*run, *users, ".lock"):
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        (out / f).write_text("x")
    os.symlink(elsewhere, out / "checkpoints" / "step-00000002")
    _reset_accelerate()
    accelerator = Accelerator(cpu=True)
    PREVIOUS_FILES[out.resolve()] = list_previous_files(out)
    (out / "logs" / "bert-dist" / "new.events").write_text("this run's")
    # Inputs: the run's own tokenizer passed back, and a data dir holding the output dir (it protects its own
    # files, not the previous run's outputs inside it).
    discard_previous_run(accelerator, out, {"task": "sst2"}, (str(out / "tokenizer.json"), str(tmp_path)))
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if not str(p.relative_to(out)).startswith(".git"))
    assert left == [".lock", "checkpoints", "checkpoints/mine.txt", "data.tsv", "logs", "logs/app.log",
                    "logs/bert-dist", "logs/bert-dist/new.events", "mydata", "mydata/keep.csv", "notes.txt",
                    "run_config.json", "tokenizer.json"]
    assert (elsewhere / "precious.txt").is_file() and (out / ".git" / "HEAD").is_file()
    # A directory that holds no bert-dist run: nothing of it is the previous run's.
    (out / "run_config.json").unlink()
    (out / "results.json").write_text("the user's")
    PREVIOUS_FILES[out.resolve()] = list_previous_files(out)
    discard_previous_run(accelerator, out, {"task": "sst2"})
    assert (out / "results.json").read_text() == "the user's" and (out / "notes.txt").is_file()


# ---------------------------------------------------------------------------------------------
# The real entry point, in a subprocess


@pytest.mark.parametrize("case", ["unknown-task", "corrupt-init"])
def test_subprocess_shows_one_line_and_no_traceback(tmp_path, data_dir, model_dir, case, offline_env):
    out = tmp_path / "o"
    if case == "unknown-task":
        argv = args(out, task="sst3", data=data_dir)
    else:
        bad = copy_dir(model_dir, tmp_path / "bad")
        (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:1000])
        argv = args(out, "--init", str(bad), data=data_dir)
    p = subprocess.run([sys.executable, str(REPO / "bert_dist" / "run.py"), *argv], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:") and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not out.exists()


def test_resume_from_a_moved_checkpoint_of_a_scratch_run_uses_its_tokenizer_copy(tmp_path, data_dir):
    """A checkpoint holds its run's tokenizer: moved out of its run (no run dir's tokenizer.json beside it), an
    --init scratch checkpoint still resumes, into a new directory whose own checkpoints then carry the copy."""
    import shutil

    _reset_accelerate()
    assert main(args(tmp_path / "a", "--save-every", "2", "--max-steps", "4", data=data_dir)) == 0
    moved = tmp_path / "moved" / "x" / "step-00000002"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000002", moved)
    _reset_accelerate()
    assert main(args(tmp_path / "b", "--resume-from", str(moved), "--save-every", "3", "--max-steps", "4",
                     data=data_dir)) == 0
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert (tmp_path / "b" / "checkpoints" / "step-00000003" / "tokenizer.json").is_file()


def test_eval_only_needs_no_train_split(tmp_path, capsys, data_dir, model_dir):
    """--eval-only reads no train split: a --data-dir with validation (and test) only, or --validation-file alone.
    A head --init does not have is warned about (its scores are a random head's)."""
    only_eval = tmp_path / "data" / "sst2"
    only_eval.mkdir(parents=True)
    for split in ("validation", "test"):
        (only_eval / f"{split}.jsonl").write_bytes((data_dir / "sst2" / f"{split}.jsonl").read_bytes())
    _reset_accelerate()
    assert main(args(tmp_path / "a", "--eval-only", "--init", str(model_dir), data=only_eval.parent)) == 0
    assert json.loads((tmp_path / "a" / "results.json").read_text())["steps"] == 0
    evals = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(evals) == 1 and evals[0]["step"] == 0 and "accuracy" in evals[0]  # as every run writes it
    assert "random head" not in capsys.readouterr().err  # the run's own head
    from safetensors.torch import load_file, save_file

    headless = copy_dir(model_dir, tmp_path / "headless")
    sd = load_file(headless / "model.safetensors")
    save_file({k: v for k, v in sd.items() if not k.startswith("classifier.")}, headless / "model.safetensors")
    _reset_accelerate()
    assert main(args(tmp_path / "h", "--eval-only", "--init", str(headless), data=only_eval.parent)) == 0
    assert "random head" in " ".join(capsys.readouterr().err.split())
    _reset_accelerate()
    assert main(args(tmp_path / "b", "--eval-only", "--init", str(model_dir), "--validation-file",
                     str(only_eval / "validation.jsonl"))) == 0
    fails(args(tmp_path / "c", "--init", str(model_dir), data=only_eval.parent), capsys, "no train split",
          out=tmp_path / "c")


def test_report_to_a_tracker_that_is_not_installed(tmp_path, capsys, data_dir, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [])  # as where wandb is not installed
    fails(args(tmp_path / "o", "--report-to", "wandb", data=data_dir), capsys, "--report-to wandb", "not installed",
          "pip install wandb", out=tmp_path / "o")


@pytest.mark.parametrize("argv", [["bert_dist/run.py", "--task", "sst2", "--nosuch", "1"],
                                  ["-m", "bert_dist.cli", "predict", "--bogus"],
                                  ["-m", "bert_dist.cli", "report"]])
def test_a_flag_error_is_one_line_without_the_usage_block(argv):
    repo = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, *argv], cwd=repo, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0] and "--help" in lines[0], p.stderr


def test_a_regression_eval_split_of_one_row_is_refused_before_training(tmp_path, capsys):
    d = custom(tmp_path, spec=STSB)
    fails(args(tmp_path / "o", "--max-eval-samples", "1", data=d, task="stsb"), capsys, "stsb",
          "validation split has 1 row", "--max-eval-samples", out=tmp_path / "o")


def test_an_evaluation_that_fails_after_training_keeps_the_trained_model(tmp_path, capsys, data_dir, monkeypatch):
    """The model is saved before the final evaluation: an error there (any, here a planted one) loses no training,
    and the error line says where the model is."""
    import bert_dist.train as T

    real = T.run_eval

    def failing(*, state, **kw):
        if state.step == 2:
            raise ValueError("the metric could not be computed")
        return real(state=state, **kw)

    monkeypatch.setattr(T, "run_eval", failing)
    out = tmp_path / "o"
    _reset_accelerate()
    with pytest.raises(SystemExit) as e:
        main(args(out, data=data_dir))
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 1 and "the metric could not be computed" in err and "--eval-only --init" in err
    assert (out / "model.safetensors").is_file() and not (out / "results.json").exists()
    monkeypatch.setattr(T, "run_eval", real)
    _reset_accelerate()
    assert main(args(tmp_path / "e", "--eval-only", "--init", str(out), data=data_dir)) == 0  # it evaluates


def test_overwrite_that_fails_after_training_its_tokenizer_keeps_the_previous_run_whole(tmp_path, capsys,
                                                                                       monkeypatch, data_dir):
    """A scratch run trains its tokenizer before its model is checked: with --overwrite, a failure there must leave
    the previous run's tokenizer beside its model (the new one is written only once the previous run is gone)."""
    import bert_dist.finetune

    out = tmp_path / "o"
    p = run_cli(args(out, data=data_dir))
    assert p.returncode == 0, p.stderr[-2000:]
    before = {f: (out / f).read_bytes() for f in ("tokenizer.json", "vocab.txt", "model.safetensors")}

    def fails_late(*a, **k):
        raise ValueError("the model does not fit")

    monkeypatch.setattr(bert_dist.finetune, "check_max_length", fails_late)
    _reset_accelerate()
    with pytest.raises(SystemExit) as e:
        main(args(out, "--overwrite", "--vocab-size", "120", data=data_dir))
    assert e.value.code == 1 and "the model does not fit" in capsys.readouterr().err
    assert {f: (out / f).read_bytes() for f in before} == before


def test_ctrl_c_is_one_line_and_status_130(tmp_path, capsys, monkeypatch, data_dir):
    import bert_dist.run

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bert_dist.run, "run_task", interrupted)
    _reset_accelerate()
    with pytest.raises(SystemExit) as e:
        main(args(tmp_path / "o", data=data_dir))
    assert e.value.code == 130 and "error: interrupted" in capsys.readouterr().err


def test_a_crash_before_training_leaves_no_output_dir_behind(tmp_path, monkeypatch, data_dir):
    """A bug's traceback (not a user error) before anything was trained: the directory this run made goes too, so
    the rerun into the same --output-dir is not refused as not empty (it held only run_config.json and .lock)."""
    import bert_dist.finetune as F

    def broken(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(F, "run_finetune", broken)
    _reset_accelerate()
    with pytest.raises(RuntimeError, match="a bug"):
        main(args(tmp_path / "o", data=data_dir))
    assert not (tmp_path / "o").exists()

    def broken_later(cfg, accelerator, out_dir):  # a crash mid-training: its logs say how far it got, and stay
        (out_dir / "train_log.jsonl").write_text('{"step": 1}\n')
        raise RuntimeError("out of memory")

    monkeypatch.setattr(F, "run_finetune", broken_later)
    _reset_accelerate()
    with pytest.raises(RuntimeError, match="out of memory"):
        main(args(tmp_path / "p", data=data_dir))
    assert (tmp_path / "p" / "train_log.jsonl").is_file()


def test_a_csv_row_with_a_field_too_many_is_refused(tmp_path, capsys, data_dir):
    """An unquoted comma in a sentence: pandas made the first field an index and shifted the rest (sentence1 became
    the second half, the label the next sentence) without a word."""
    bad = tmp_path / "t.csv"
    bad.write_text("sentence,label\ngood film,1\nhe said, fine,0\n")
    fails(args(tmp_path / "o", "--train-file", str(bad), "--validation-file", str(bad)), capsys,
          str(bad), "row 2 has 3 fields, the header 2", out=tmp_path / "o")

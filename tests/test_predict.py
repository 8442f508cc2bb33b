"""`bert-dist predict`: a run's own validation rows give back its own predictions, through the same code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from bert_dist.predict import Predictor, read_rows


def _smoke(tmp_path_factory, task: str, steps: int, *extra: str) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp(task) / "run"
    p = run_cli(["--task", task, "--smoke", "--max-steps", str(steps), "--output-dir", str(out), *extra])
    assert p.returncode == 0, p.stderr[-3000:]
    data_dir = Path(json.loads((out / "run_config.json").read_text())["data"]["data_dir"])
    return out, data_dir / task


@pytest.fixture(scope="module")
def sst2(tmp_path_factory):
    return _smoke(tmp_path_factory, "sst2", 30)


def _predict_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bert_dist.cli", "predict", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_predict_reproduces_the_runs_validation_predictions(sst2):
    run, data = sst2
    p = _predict_cli("--model", str(run), "--file", str(data / "validation.jsonl"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout == (run / "predictions_validation.jsonl").read_text()  # byte for byte


@pytest.mark.slow
def test_predict_in_a_bf16_runs_precision_reproduces_its_predictions(tmp_path_factory):
    run, data = _smoke(tmp_path_factory, "sst2", 10, "--mixed-precision", "bf16")
    p = _predict_cli("--model", str(run), "--file", str(data / "validation.jsonl"), "--mixed-precision", "bf16")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout == (run / "predictions_validation.jsonl").read_text()  # byte for byte
    p = _predict_cli("--model", str(run), "--text", "x", "--mixed-precision", "fp16")
    assert p.returncode == 1 and "fp16 does nothing on the CPU" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_predict_texts_stdin_and_batching_agree(sst2):
    run, data = sst2
    rows = [json.loads(line) for line in (data / "validation.jsonl").read_text().splitlines()[:9]]
    texts = [r["sentence"] for r in rows]
    want = [json.loads(line) for line in (run / "predictions_validation.jsonl").read_text().splitlines()[:9]]
    predictor = Predictor(run, batch_size=4)  # other batches, other padding: the same classes
    got = list(predictor.predict(read_rows(texts, None, None)))
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert all(abs(a - b) < 1e-5 for g, w in zip(got, want) for a, b in zip(g["probabilities"], w["probabilities"]))
    assert set(got[0]) == {"prediction", "label", "probabilities"}  # no idx: the input had none
    p = _predict_cli("--model", str(run), stdin="\n".join(texts[:3]) + "\n")  # plain lines on stdin
    assert p.returncode == 0, p.stderr[-3000:]
    assert [json.loads(line)["label"] for line in p.stdout.splitlines()] == [w["label"] for w in want[:3]]
    # A blank line is an empty text: output line n answers input line n (stdin, and a .txt file alike).
    lines = f"{texts[0]}\n\n{texts[1]}\n"
    p = _predict_cli("--model", str(run), stdin=lines)
    txt = run.parent / "lines.txt"
    txt.write_text(lines)
    q = _predict_cli("--model", str(run), "--file", str(txt))
    # A pipe (bash's --file <(...)) has no suffix to go by: its lines are read as stdin's are.
    r = subprocess.run(["bash", "-c", f'"{sys.executable}" -m bert_dist.cli predict --model "{run}" '
                                      f'--file <(cat "{txt}")'], capture_output=True, text=True, timeout=300)
    for out in (p, q, r):
        assert out.returncode == 0, out.stderr[-3000:]
        got = [json.loads(line)["label"] for line in out.stdout.splitlines()]
        assert len(got) == 3 and got[0] == want[0]["label"] and got[2] == want[1]["label"]


@pytest.mark.slow
def test_predict_regression_gives_the_runs_scores(tmp_path_factory):
    run, data = _smoke(tmp_path_factory, "stsb", 10)
    p = _predict_cli("--model", str(run), "--file", str(data / "validation.jsonl"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout == (run / "predictions_validation.jsonl").read_text()
    assert isinstance(json.loads(p.stdout.splitlines()[0])["prediction"], float)


@pytest.mark.slow
def test_predict_squad_answers_match_the_runs_predictions(tmp_path_factory):
    run, data = _smoke(tmp_path_factory, "squad_v2", 40)
    p = _predict_cli("--model", str(run), "--file", str(data / "validation.jsonl"))
    assert p.returncode == 0, p.stderr[-3000:]
    want = json.loads((run / "predictions.json").read_text())
    rows = [json.loads(line) for line in (data / "validation.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in p.stdout.splitlines()]
    assert [g["id"] for g in got] == [r["id"] for r in rows]
    assert {g["id"]: g["answer"] for g in got} == want
    for g, r in zip(got, rows):
        if g["answer"]:
            assert r["context"][g["start"]:g["end"]] == g["answer"] and 0 < g["score"] <= 1 and not g["no_answer"]
        else:
            assert g["start"] is None and g["no_answer"]
    assert any(g["answer"] for g in got) and any(not g["answer"] for g in got)  # v2: both kinds occur
    # --text is the question, --text-pair the context
    r = next(r for r, g in zip(rows, got) if g["answer"])
    one = _predict_cli("--model", str(run), "--text", r["question"], "--text-pair", r["context"])
    assert json.loads(one.stdout)["answer"] == want[r["id"]]
    # A context with nothing in it (every row of the batch): no answer, not a crash.
    for ctx in ("", "   "):
        none = _predict_cli("--model", str(run), "--text", r["question"], "--text-pair", ctx)
        assert none.returncode == 0, none.stderr[-2000:]
        assert json.loads(none.stdout)["no_answer"] is True
    # A --max-length too short for the run's windows: one line naming the length that works (predict has no
    # --doc-stride to change).
    short = _predict_cli("--model", str(run), "--text", r["question"], "--text-pair", r["context"], "--max-length", "8")
    assert short.returncode == 1 and "too short for this run's SQuAD windows" in short.stderr, short.stderr[-2000:]
    assert "use at least" in short.stderr and "Traceback" not in short.stderr


@pytest.mark.slow
def test_predict_bad_input_is_one_line(sst2, tmp_path):
    run, _ = sst2
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"sentence": "fine"}\n{"premise": "wrong column"}\n')
    p = _predict_cli("--model", str(run), "--file", str(bad))
    assert p.returncode == 1 and "row 2" in p.stderr and "sentence" in p.stderr and "Traceback" not in p.stderr
    p = _predict_cli("--model", str(tmp_path), "--text", "x")
    assert p.returncode == 1 and "--model" in p.stderr and "Traceback" not in p.stderr
    p = _predict_cli("--model", str(run), "--text", "x", "--batch-size", "0")
    assert p.returncode == 1 and "--batch-size must be at least 1" in p.stderr and "Traceback" not in p.stderr
    p = _predict_cli("--model", str(run), "--text", "x", "--max-length", "1")  # as training: room for the text
    assert p.returncode == 1 and "--max-length must be at least 8" in p.stderr and "Traceback" not in p.stderr
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"sentence": "caf\u00e9"}\n'.encode("latin-1"))
    p = _predict_cli("--model", str(run), "--file", str(latin))
    assert p.returncode == 1 and f"--file {latin}: not UTF-8" in p.stderr and "Traceback" not in p.stderr
    with pytest.raises(ValueError, match="nothing to predict"):
        list(read_rows(None, None, None, None))


def test_predict_reads_what_training_reads(tmp_path):
    """A CSV with a byte-order mark, a .json array, JSON Lines in a .json file; a .txt pair line with a third field
    is refused rather than cut."""
    (tmp_path / "bom.csv").write_bytes("\ufeffsentence,label\ngood film,1\n".encode())
    assert list(read_rows(None, None, str(tmp_path / "bom.csv"))) == [{"sentence": "good film", "label": "1"}]
    (tmp_path / "rows.json").write_text('  [{"sentence": "a"}, {"sentence": "b"}]')
    assert list(read_rows(None, None, str(tmp_path / "rows.json"))) == [{"sentence": "a"}, {"sentence": "b"}]
    (tmp_path / "lines.json").write_text('{"sentence": "a"}\n{"sentence": "b"}\n')
    assert list(read_rows(None, None, str(tmp_path / "lines.json"))) == [{"sentence": "a"}, {"sentence": "b"}]
    (tmp_path / "bad.json").write_text('[{"sentence": "a"}, 3]')
    with pytest.raises(ValueError, match="item 2"):
        list(read_rows(None, None, str(tmp_path / "bad.json")))
    (tmp_path / "pairs.txt").write_text("a\tb\na\tb\tc\n")
    with pytest.raises(ValueError, match="line 2: 3 tab-separated fields"):
        list(read_rows(None, None, str(tmp_path / "pairs.txt"), pair_task=True))
    assert list(read_rows(None, None, str(tmp_path / "pairs.txt")))[1] == {"text": "a\tb\tc"}  # one text


def test_predict_into_a_closed_pipe_stops_quietly(sst2):
    """`bert-dist predict ... | head -1`: no BrokenPipeError traceback once the reader has gone."""
    run, _ = sst2
    p = subprocess.run(f"yes 'a fine film' | head -3000 | {sys.executable} -m bert_dist.cli predict --model {run} "
                       "--batch-size 8 | head -1", shell=True, capture_output=True, text=True, timeout=300)
    assert len(p.stdout.splitlines()) == 1 and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_predict_on_an_export_uses_the_runs_settings(sst2, tmp_path):
    """An export has no run_config.json: the settings predict reads (max length, SQuAD windows, batch) go into its
    config.json's bert_dist block, so the export predicts as the run does (it took the defaults before)."""
    import shutil

    from bert_dist.weights import export_hf

    run, data = sst2
    short = tmp_path / "short"
    shutil.copytree(run, short)
    config = json.loads((short / "run_config.json").read_text())
    config["data"]["max_length"] = 8  # as if the run had been trained with --max-length 8
    (short / "run_config.json").write_text(json.dumps(config))
    export_hf(short, tmp_path / "export")
    rows = [json.loads(line) for line in (data / "validation.jsonl").read_text().splitlines()[:20]]
    want, got = (list(Predictor(d).predict(iter(rows))) for d in (short, tmp_path / "export"))
    assert Predictor(tmp_path / "export").data.max_length == 8
    assert [g["probabilities"] for g in got] == [w["probabilities"] for w in want]


@pytest.mark.slow
def test_predict_reads_braces_as_text_and_refuses_ragged_csv_rows(sst2, tmp_path):
    run, _ = sst2
    p = _predict_cli("--model", str(run), stdin="{curly} text\n{\"text\": \"fine\"}\n")
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(p.stdout.splitlines()) == 2  # the first line is no JSON object: a text
    ragged = tmp_path / "r.csv"
    ragged.write_text("sentence\nfine\nhe said, hello\n")  # an unquoted comma: a field the header lacks
    p = _predict_cli("--model", str(run), "--file", str(ragged))
    assert p.returncode == 1 and "row 2 has 2 fields, the header 1" in p.stderr and "Traceback" not in p.stderr

"""SQuAD v1.1 / v2.0 end to end through the real entry point: tiny preset, synthetic data, CPU, offline.

`bert_dist.run.main(["--task", "squad", "--smoke", ...])` trains a few steps from scratch on the rows
`bert_dist.data.synthetic` writes, evaluates, and writes the official-format prediction files; a
2-process gloo run of the same weights (--eval-only --init <run dir>) must predict the same answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli

from bert_dist.metrics import load_metric
from bert_dist.run import main

STEPS = 15
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def hf_env(tmp_path_factory):
    """Offline, with a private datasets/evaluate cache, for the whole module (the runs are module fixtures).

    One intra-op thread: the tiny model gains nothing from more, and on a busy CI box threads waiting
    on each other make it several times slower (results are the same).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**OFFLINE, "HF_HOME": str(tmp_path_factory.mktemp("hf_home"))}.items():
            mp.setenv(k, v)
        yield
    torch.set_num_threads(threads)


def train_run(task: str, out: Path) -> Path:
    # Small eval batches: several batches per process, and an uneven last one in the 2-process run.
    argv = ["--task", task, "--smoke", "--max-steps", str(STEPS), "--eval-batch-size", "16", "--output-dir",
            str(out)]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def squad_run(hf_env, tmp_path_factory) -> Path:
    return train_run("squad", tmp_path_factory.mktemp("squad") / "run")


@pytest.fixture(scope="module")
def squad_v2_run(hf_env, tmp_path_factory) -> Path:
    return train_run("squad_v2", tmp_path_factory.mktemp("squad_v2") / "run")


def read(path: Path):
    return json.loads(path.read_text())


def references(run: Path) -> list[dict]:
    """The validation rows the run scored (the smoke data folder is in its run_config.json)."""
    cfg = read(run / "run_config.json")
    folder = Path(cfg["data"]["data_dir"]) / cfg["task"]
    rows = [json.loads(line) for line in (folder / "validation.jsonl").read_text().splitlines()]
    return [{"id": r["id"], "answers": r["answers"]} for r in rows]


def check_official_files(run: Path, refs: list[dict]) -> dict[str, str]:
    preds = read(run / "predictions.json")
    assert isinstance(preds, dict) and set(preds) == {r["id"] for r in refs}
    assert all(isinstance(v, str) for v in preds.values())
    nbest = read(run / "nbest_predictions.json")
    assert set(nbest) == set(preds)
    for qid, entries in nbest.items():
        assert entries and set(entries[0]) == {"text", "start_logit", "end_logit", "probability"}
        assert abs(sum(e["probability"] for e in entries) - 1) < 1e-6
        if preds[qid]:
            assert preds[qid] in {e["text"] for e in entries}
    for name in ("model.safetensors", "config.json", "tokenizer.json", "results.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    return preds


def test_squad_v1_end_to_end(squad_run):
    refs = references(squad_run)
    preds = check_official_files(squad_run, refs)
    assert not (squad_run / "null_odds.json").exists()
    res = read(squad_run / "results.json")
    assert res["steps"] == STEPS and res["task"] == "squad" and res["main_metric"] == "f1"
    assert res["max_length"] == 128  # the smoke windows, not the SQuAD default of 384
    assert 0 <= res["exact_match"] <= res["f1"] <= 100
    # results.json is the official scoring of predictions.json.
    official = load_metric("squad").compute(
        predictions=[{"id": k, "prediction_text": v} for k, v in preds.items()], references=refs)
    assert res["exact_match"] == pytest.approx(official["exact_match"], abs=1e-4)
    assert res["f1"] == pytest.approx(official["f1"], abs=1e-4)
    assert read(squad_run / "config.json")["bert_dist"]["kind"] == "qa"  # reloadable with --init


def test_squad_v2_end_to_end(squad_v2_run):
    refs = references(squad_v2_run)
    preds = check_official_files(squad_v2_run, refs)
    odds = read(squad_v2_run / "null_odds.json")
    assert set(odds) == set(preds)
    res = read(squad_v2_run / "results.json")
    for key in ("exact", "f1", "total", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_f1",
                "best_f1_thresh", "best_exact"):
        assert key in res, key
    assert res["total"] == len(refs)
    assert res["HasAns_total"] + res["NoAns_total"] == len(refs) and res["NoAns_total"] > 0
    # With --null-score-diff-threshold 0 (the default), a question is answered "" when its null odds are > 0.
    assert all(preds[q] == "" for q, d in odds.items() if d > 0)
    # The official v2 script scoring predictions.json alone (no --na-prob-file) agrees with results.json.
    official = load_metric("squad_v2").compute(
        predictions=[{"id": k, "prediction_text": v, "no_answer_probability": 0.0} for k, v in preds.items()],
        references=refs)
    assert res["exact"] == pytest.approx(official["exact"], abs=1e-4)
    assert res["f1"] == pytest.approx(official["f1"], abs=1e-4)
    assert res["best_f1"] >= res["f1"] - 1e-6


@pytest.mark.slow
def test_two_processes_predict_what_one_does(squad_v2_run, tmp_path):
    """2 gloo processes (sharded eval batches, padded gathers, duplicates dropped) = the 1-process answers."""
    cfg = read(squad_v2_run / "run_config.json")
    out = tmp_path / "two"
    proc = run_cli(["--task", "squad_v2", "--eval-only", "--init", str(squad_v2_run), "--data-dir",
                    cfg["data"]["data_dir"], "--max-length", "128", "--doc-stride", "32", "--max-query-length", "16",
                    "--eval-batch-size", "16", "--output-dir", str(out)],
                   nproc=2, cwd=REPO, env={**OFFLINE, "HF_HOME": str(tmp_path / "hf_home")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout + proc.stderr
    assert read(out / "predictions.json") == read(squad_v2_run / "predictions.json")
    one, two = read(squad_v2_run / "null_odds.json"), read(out / "null_odds.json")
    assert two.keys() == one.keys()
    assert max(abs(one[k] - two[k]) for k in one) < 1e-3
    res_one, res_two = read(squad_v2_run / "results.json"), read(out / "results.json")
    assert res_two["exact"] == res_one["exact"] and res_two["f1"] == res_one["f1"]

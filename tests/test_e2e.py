"""End to end through the real entry point: train the tiny preset, save, reload with --init, same scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, run_cli


def _results(d):
    return json.loads((d / "results.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "sst2"
    p = run_cli(["--task", "sst2", "--smoke", "--output-dir", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


@pytest.mark.slow
def test_smoke_run_writes_a_complete_run(trained):
    out, p = trained
    for f in ("run_config.json", "config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "results.json",
              "metrics.jsonl", "predictions_validation.jsonl", "predictions_test.jsonl", "SST-2.tsv"):
        assert (out / f).is_file(), f
    r = _results(out)
    assert r["steps"] == 60 and r["examples_per_second"] > 0 and r["tokens_per_second"] > 0
    assert r["accuracy"] > 0.8, r  # the synthetic rule is learnable in 60 steps
    tsv = (out / "SST-2.tsv").read_text().splitlines()
    assert tsv[0] == "index\tprediction" and len(tsv) == 1 + 50
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_reload_with_init_gives_the_same_evaluation(trained, tmp_path):
    out, _ = trained
    data_dir = json.loads((out / "run_config.json").read_text())["data"]["data_dir"]
    again = tmp_path / "reloaded"
    p = run_cli(["--task", "sst2", "--init", str(out), "--data-dir", data_dir, "--eval-only",
                 "--output-dir", str(again)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert _results(again)["accuracy"] == _results(out)["accuracy"]
    assert (again / "predictions_validation.jsonl").read_text() == (out / "predictions_validation.jsonl").read_text()
    assert "new head" not in p.stderr  # the classifier came back from the run dir


@pytest.mark.slow
def test_bf16_run_evaluating_during_training_scores_like_its_reload(tmp_path):
    """bf16 with evaluations between training steps: the last evaluation must see the trained weights (the CPU keeps
    bf16 weight copies for inference, which training must invalidate), so it equals --eval-only of the saved model."""
    out = tmp_path / "bf16"
    p = run_cli(["--task", "sst2", "--smoke", "--mixed-precision", "bf16", "--max-steps", "30", "--eval-every", "10",
                 "--output-dir", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    data_dir = json.loads((out / "run_config.json").read_text())["data"]["data_dir"]
    again = tmp_path / "reloaded"
    p = run_cli(["--task", "sst2", "--init", str(out), "--data-dir", data_dir, "--eval-only", "--mixed-precision",
                 "bf16", "--output-dir", str(again)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert (again / "predictions_validation.jsonl").read_text() == (out / "predictions_validation.jsonl").read_text()


@pytest.mark.slow
def test_compiled_run_saves_a_model_that_reloads(tmp_path):
    """--compile: the saved weights carry the model's own names (torch.compile's wrapper adds `_orig_mod.`), so the
    run's model reloads for prediction and as --init."""
    from safetensors import safe_open

    from bert_dist.weights import load_run_model

    out = tmp_path / "compiled"
    p = run_cli(["--task", "sst2", "--smoke", "--compile", "--max-steps", "2", "--output-dir", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "_orig_mod" in k]  # noqa: SIM118 (safe_open is not iterable)
    load_run_model(out)  # every tensor of the head and encoder, else ValueError


def test_refuses_a_non_empty_output_dir(trained):
    out, _ = trained
    before = (out / "results.json").read_text()
    p = run_cli(["--task", "sst2", "--smoke", "--output-dir", str(out)])
    assert p.returncode == 1 and "--overwrite" in p.stderr and "Traceback" not in p.stderr
    assert (out / "results.json").read_text() == before


def test_unreachable_hub_fails_fast_and_names_data_dir(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens on the discard port: refused at once
    env["HF_HOME"] = str(tmp_path / "hf")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(REPO / "bert_dist" / "run.py"), "--task", "rte", "--output-dir",
                        str(tmp_path / "o"), "--init", "scratch"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert "--data-dir" in p.stderr and "hub" in p.stderr and "Traceback" not in p.stderr
    assert time.monotonic() - t0 < 60  # seconds, not datasets' minute of retries (the goal is < 10 s)


@pytest.mark.slow
def test_console_script_and_accelerate_launch(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "bert-dist")
    if not os.path.exists(exe):
        pytest.skip("bert-dist console script not installed (pip install -e .)")
    p = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--task" in p.stdout
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                        str(REPO / "bert_dist" / "run.py"), "--task", "cola", "--smoke", "--max-steps", "5",
                        "--output-dir", str(tmp_path / "cola")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "matthews_correlation" in _results(tmp_path / "cola")

"""The speed benchmarks run end to end (`python -m benchmarks --quick`): exit 0, every table printed.

No speed is asserted anywhere: --quick sizes are smoke sizes, and CI machines are shared.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from bert_dist.config import preset
from bert_dist.perf import mfu, peak_flops

TABLES = ("### step:", "### inference:", "### e2e:", "### preprocess:", "### pretrain:")


@pytest.mark.slow
def test_quick_benchmarks_run_and_print_every_table(tmp_path):
    out = tmp_path / "quick.json"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--synthetic", "--out", str(out)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    for title in TABLES:
        assert title in p.stdout, title
    assert "speed-up" in p.stdout and "Traceback" not in p.stderr
    results = json.loads(out.read_text())
    assert set(results["suites"]) == {"step", "inference", "e2e", "preprocess", "pretrain"}
    assert all(rows for rows in results["suites"].values())
    assert results["machine"]["torch"] == torch.__version__


@pytest.mark.slow
def test_quick_fastpaths_run_with_every_path(tmp_path):
    """The suite named on demand (each fast path off and on) runs too, so that it cannot rot either."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "benchmarks", "fastpaths", "--quick", "--shapes", "4x32",
                        "--precisions", "fp32,bf16"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    for path in ("unpad", "last layer on read rows", "cpu kernels", "cpu kernels: OneDNNLinear alone",
                 "cpu kernels: CpuDropout alone", "cpu kernels: CpuSelfAttention alone", "varlen attention", "adamw"):
        assert re.search(rf"\| {re.escape(path)} +\|", p.stdout), path
    assert "pretrain step" in p.stdout


@pytest.mark.slow
def test_inference_against_a_baseline_model_file(tmp_path):
    """--baseline-model times another bert_dist/model.py (here this one) in the same rounds, same weights: inference
    and the training step."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "benchmarks", "inference", "--quick", "--shapes", "2x16", "--precisions",
                        "bf16", "--inputs", "padded", "--baseline-model", str(REPO / "bert_dist" / "model.py"),
                        "--out", str(tmp_path / "r.json")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "ours vs baseline" in p.stdout
    (row,) = json.loads((tmp_path / "r.json").read_text())["suites"]["inference"]
    assert row["baseline_ms"] > 0 and row["vs_baseline"] > 0
    p = subprocess.run([sys.executable, "-m", "benchmarks", "step", "--quick", "--shapes", "2x16", "--precisions",
                        "bf16", "--inputs", "full", "--baseline-model", str(REPO / "bert_dist" / "model.py"),
                        "--out", str(tmp_path / "s.json")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    (row,) = json.loads((tmp_path / "s.json").read_text())["suites"]["step"]
    assert row["baseline_ms"] > 0 and row["vs_baseline"] > 0
    p = subprocess.run([sys.executable, "-m", "benchmarks", "inference", "--quick", "--baseline-model",
                        str(tmp_path / "none.py")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--baseline-model" in p.stderr and "Traceback" not in p.stderr


def test_unknown_suite_is_refused():
    p = subprocess.run([sys.executable, "-m", "benchmarks", "nosuch", "--quick"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "unknown suite 'nosuch'" in p.stderr


def test_no_peak_and_no_mfu_on_the_cpu():
    assert peak_flops("cpu") is None
    assert mfu(1e5, preset("tiny"), 128, "cpu") is None

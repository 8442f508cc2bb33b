"""Every run ends with report.html (inline SVG charts) and a model card; `bert-dist report` writes them again."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import run_cli

from bert_dist.report import line_chart, nice_ticks, tick_labels, write_report


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "sst2"
    p = run_cli(["--task", "sst2", "--smoke", "--max-steps", "40", "--eval-every", "10", "--cpu-kernels", "off",
                 "--output-dir", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_train_log_has_a_line_per_log_step(run):
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]  # --smoke logs every 10 steps
    assert {"loss", "lr", "examples/s", "tokens/s", "grad_norm", "train_seconds"} <= set(rows[0])


def test_run_writes_a_self_contained_report(run):
    page = (run / "report.html").read_text()
    for section in ("Training loss", "Learning rate", "Evaluation metric: accuracy", "Throughput",
                    "Gradient norm", "<h2>Results</h2>", "<h2>Model</h2>", "<h2>Hardware</h2>", "Configuration"):
        assert section in page, section
    assert page.count("<svg") == 5 and page.count("<polyline") == 5
    assert not re.search(r"<script|<link|src=|(?<!xmlns=\")https?://", page)  # nothing to fetch: opens offline
    results = json.loads((run / "results.json").read_text())
    assert results["hardware"]["num_processes"] == 1 and results["hardware"]["device_type"] == "cpu"
    assert results["hardware"]["cpu_kernels"] == []  # --cpu-kernels off, as the run was given


def test_run_writes_a_model_card(run):
    card = (run / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag: text-classification" in card
    for section in ("## Results", "## Training", "## Hardware", "## How to use", "| accuracy |", "learning rate",
                    f"bert-dist predict --model {run}", "bert-dist export --model",
                    "AutoModelForSequenceClassification"):
        assert section in card, section


def test_report_command_rewrites_both(run):
    (run / "report.html").unlink()
    (run / "README.md").unlink()
    p = subprocess.run([sys.executable, "-m", "bert_dist.cli", "report", str(run)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert (run / "report.html").is_file() and (run / "README.md").is_file()
    p = subprocess.run([sys.executable, "-m", "bert_dist.cli", "report", str(run / "nope")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1 and "not a bert-dist run" in p.stderr and "Traceback" not in p.stderr


def test_report_of_a_run_without_train_log(run, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for f in ("run_config.json", "results.json", "config.json", "metrics.jsonl"):
        (old / f).write_bytes((run / f).read_bytes())
    write_report(old)
    page = (old / "report.html").read_text()
    assert "Evaluation metric" in page and "Training loss" not in page and "No train_log.jsonl" in page


def test_report_marks_the_preset_unused_when_init_gives_the_model(run, tmp_path):
    assert "unused" not in (run / "report.html").read_text()  # --smoke: from scratch, the preset is the model
    other = tmp_path / "from_init"
    other.mkdir()
    for f in ("run_config.json", "results.json", "config.json", "metrics.jsonl"):
        (other / f).write_bytes((run / f).read_bytes())
    cfg = json.loads((other / "run_config.json").read_text())
    (other / "run_config.json").write_text(json.dumps({**cfg, "init": "../shared/models/all-MiniLM-L6-v2"}))
    write_report(other)
    assert "(unused: the model comes from --init)" in (other / "report.html").read_text()


def test_axis_ticks_are_round_and_cover_the_data():
    assert nice_ticks(0.0, 1.0) == [0.0, 0.25, 0.5, 0.75, 1.0]
    ticks = nice_ticks(0.43, 0.97)
    assert ticks[0] <= 0.43 and ticks[-1] >= 0.97 and len(ticks) <= 7
    assert tick_labels([0.0, 0.0005, 0.001, 0.0015]) == ["0", "5e-4", "1e-3", "1.5e-3"]
    assert tick_labels([0.0, 500.0, 1000.0]) == ["0", "500", "1,000"]
    svg = line_chart("t", {"a": [(1, 0.5), (2, 0.9)], "b": [(1, 0.4)]})
    assert svg.count("<polyline") == 2 and ">a</text>" in svg and ">b</text>" in svg  # a legend for 2 series
    assert line_chart("empty", {"a": []}) == ""

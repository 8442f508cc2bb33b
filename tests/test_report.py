"""Every run ends with report.html (matplotlib charts, inline SVG) and a model card; `bert-dist report` writes them
again."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import run_cli

from bert_dist.report import chart_id, line_chart, write_report, write_reports


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "sst2"
    p = run_cli(["--task", "sst2", "--smoke", "--max-steps", "40", "--eval-every", "10", "--cpu-kernels", "off",
                 "--output-dir", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.mark.slow
def test_train_log_has_a_line_per_log_step(run):
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]  # --smoke logs every 10 steps
    assert {"loss", "lr", "examples/s", "tokens/s", "grad_norm", "train_seconds"} <= set(rows[0])


def test_run_writes_a_self_contained_report(run):
    page = (run / "report.html").read_text()
    for section in ("Training loss", "Learning rate", "Evaluation metric: accuracy", "Throughput",
                    "Gradient norm", "<h2>Results</h2>", "<h2>Model</h2>", "<h2>Hardware</h2>", "Configuration"):
        assert section in page, section
    assert page.count("<svg") == 5 and page.count("optimizer step</text>") == 5  # x axis labels, as text
    assert not re.search(r"<script|<link|src=|(?<!xmlns=\")(?<!xmlns:xlink=\")https?://", page)  # opens offline
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page  # each SVG inline, not a document of its own
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


def test_report_of_a_glue_suite_is_each_tasks(run, tmp_path):
    tasks = {}
    for task in ("sst2", "rte"):
        (tmp_path / task).mkdir()
        for f in ("run_config.json", "results.json", "config.json", "metrics.jsonl", "model.safetensors"):
            (tmp_path / task / f).write_bytes((run / f).read_bytes())
        tasks[task] = {"output_dir": str(tmp_path / task)}
    (tmp_path / "glue_results.json").write_text(json.dumps({"tasks": tasks}))
    written = write_reports(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "rte/README.md", "rte/report.html", "sst2/README.md", "sst2/report.html"]


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


def points(page: str, title: str, name: str) -> list[tuple[float, float]]:
    """The (x, y) vertices of series `name`'s line in the chart `title` of an SVG page."""
    group = re.search(rf'<g id="{re.escape(chart_id(title, name))}">\s*<path d="([^"]*)"', page)
    assert group, f"no series {name!r} in chart {title!r}"
    return [(float(x), float(y)) for x, y in re.findall(r"[ML] ([-\d.]+) ([-\d.]+)", group[1])]


def assert_drawn(drawn: list[tuple[float, float]], data: list[tuple[float, float]]) -> None:
    """Every data point is a vertex, in order, at a position linear in its value (SVG's y grows downwards)."""
    assert len(drawn) == len(data)
    (x0, y0), (x1, y1) = data[0], data[-1]
    (px0, py0), (px1, py1) = drawn[0], drawn[-1]
    for (x, y), (px, py) in zip(data, drawn):
        assert px == pytest.approx(px0 + (x - x0) / (x1 - x0) * (px1 - px0), abs=0.01)
        if y1 != y0:
            assert py == pytest.approx(py0 + (y - y0) / (y1 - y0) * (py1 - py0), abs=0.01)
    assert px1 > px0 and (py1 - py0) * (y1 - y0) <= 0


def test_charts_draw_every_logged_and_evaluated_point(run):
    page = (run / "report.html").read_text()
    logs = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for title, name, rows in (("Training loss", "loss", logs), ("Learning rate", "lr", logs),
                              ("Throughput (examples / s)", "examples/s", logs),
                              ("Gradient norm (before clipping)", "grad_norm", logs),
                              ("Evaluation metric: accuracy", "accuracy", evals)):
        assert_drawn(points(page, title, name), [(r["step"], r[name]) for r in rows])
        assert f">{title}</text>" in page
    assert len(evals) == 4 and "Every evaluation (4)" in page  # the numbers behind the evaluation chart
    assert f"<td class='n'>{evals[1]['accuracy']:.4f}</td>" in page


def test_charts_leave_the_callers_matplotlib_settings_alone():
    import matplotlib

    a = [(i, 0.5 + 0.4 * (i % 7) / 6) for i in range(1, 51)]
    with matplotlib.rc_context({"svg.fonttype": "path", "font.size": 20.0, "axes.grid": False}):
        before = dict(matplotlib.rcParams)
        svg = line_chart("t", {"a": a, "b": [(1, 0.4)]}, x_label="epoch")
        assert dict(matplotlib.rcParams) == before
    assert ">epoch</text>" in svg and ">t</text>" in svg  # the chart's own settings: text as text
    assert ">a</text>" in svg and ">b</text>" in svg  # a legend for 2 series
    assert_drawn(points(svg, "t", "a"), a)
    assert len(points(svg, "t", "b")) == 1
    group = lambda name: svg.split(f'id="t.{name}"')[1].split('<g id="')[0]
    assert "<use " not in group("a") and "<use " in group("b")  # 50 points: a line; one point: a marker
    assert line_chart("t", {"a": a, "b": [(1, 0.4)]}, x_label="epoch") == svg
    assert line_chart("empty", {"a": []}) == ""


def test_report_is_the_same_when_written_again(run, tmp_path):
    again = tmp_path / "again"
    again.mkdir()
    for f in ("run_config.json", "results.json", "config.json", "metrics.jsonl", "train_log.jsonl"):
        (again / f).write_bytes((run / f).read_bytes())
    write_report(again)
    first = (again / "report.html").read_text()
    write_report(again)
    assert (again / "report.html").read_text() == first

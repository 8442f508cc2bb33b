"""`--task glue`: every GLUE task one after another, scored as the leaderboard does; missing data is skipped."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from bert_dist.config import config_from_args, flags_given
from bert_dist.data import get_task
from bert_dist.data.synthetic import write_task_data
from bert_dist.glue_suite import RECIPE, markdown_table, suite_tasks, task_config, task_score

TINY = ["--preset", "tiny", "--vocab-size", "400", "--batch-size", "16", "--lr", "1e-3", "--max-steps", "5"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("glue") / "suite"
    p = run_cli(["--task", "glue", "--tasks", "stsb,cola", "--smoke", "--max-steps", "10", "--output-dir", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


@pytest.mark.slow
def test_smoke_suite_runs_each_task_into_its_own_dir(smoke):
    out, _ = smoke
    for task, tsv in (("cola", "CoLA.tsv"), ("stsb", "STS-B.tsv")):
        for f in ("results.json", "model.safetensors", "predictions_validation.jsonl", "report.html", "README.md",
                  tsv):
            assert (out / task / f).is_file(), (task, f)
        assert json.loads((out / task / "results.json").read_text())["steps"] == 10
        assert (out / "submission" / tsv).read_text() == (out / task / tsv).read_text()


def test_smoke_suite_scores_as_the_leaderboard(smoke):
    out, p = smoke
    summary = json.loads((out / "glue_results.json").read_text())
    assert list(summary["tasks"]) == ["cola", "stsb"]  # the benchmark's order, not the flag's
    stsb = json.loads((out / "stsb" / "results.json").read_text())
    assert summary["tasks"]["stsb"]["score"] == pytest.approx(50 * (stsb["pearson"] + stsb["spearmanr"]))
    assert summary["average"] == pytest.approx((summary["tasks"]["cola"]["score"] + summary["tasks"]["stsb"]["score"])
                                               / 2)
    md = (out / "glue_results.md").read_text()
    assert "| CoLA | MCC" in md and "| STS-B | Pearson" in md and "**average** (2 tasks)" in md
    assert "AX.tsv" in md  # named as missing from a full submission
    assert "GLUE (dev sets, %)" in p.stderr


def test_resume_keeps_finished_tasks(smoke):
    out, _ = smoke
    before = (out / "glue_results.json").read_text()
    p = run_cli(["--task", "glue", "--tasks", "stsb,cola", "--smoke", "--max-steps", "10", "--output-dir", str(out),
                 "--resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.count("finished earlier") == 2
    assert json.loads((out / "glue_results.json").read_text()) == json.loads(before)


@pytest.mark.slow
def test_tasks_without_data_are_skipped_and_named(tmp_path):
    data = write_task_data(get_task("rte"), tmp_path / "data", n_train=64, n_eval=32, n_test=16)
    write_task_data(get_task("qnli"), data, n_train=64, n_eval=32, n_test=16)
    (data / "qnli" / "train.jsonl").unlink()  # as in ../shared/data: QNLI without its training split
    out = tmp_path / "suite"
    p = run_cli(["--tasks", "rte,qnli,mnli", "--data-dir", str(data), "--output-dir", str(out), *TINY])
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "glue_results.json").read_text())
    assert {k: v["status"] for k, v in summary["tasks"].items()} == {"mnli": "skipped", "qnli": "skipped",
                                                                     "rte": "done"}
    assert "no train split for qnli" in summary["tasks"]["qnli"]["reason"]
    assert summary["averaged_over"] == ["rte"]
    assert "| QNLI | skipped:" in (out / "glue_results.md").read_text()
    assert not (out / "qnli" / "results.json").exists()


def test_no_task_with_data_is_one_error(tmp_path):
    (tmp_path / "empty").mkdir()
    p = run_cli(["--tasks", "mnli,qqp", "--data-dir", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "o"),
                 *TINY])
    assert p.returncode == 1 and "no GLUE task could run" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


def test_recipe_applies_where_the_flag_is_left_at_its_default(tmp_path):
    cfg = config_from_args(["--task", "glue"])
    assert suite_tasks(cfg) == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
    for task in ("rte", "sst2"):
        t = task_config(cfg, task, tmp_path)
        assert (t.task, t.optim.lr, t.data.batch_size, t.train.epochs) == (task, RECIPE[task]["lr"], 32, 3.0)
        assert t.output_dir == str(tmp_path / task) and t.tasks is None
    mine = config_from_args(["--tasks", "rte,sst2", "--lr", "5e-5", "--epochs", "2"])
    assert mine.task == "glue"  # --tasks implies it
    assert {task_config(mine, t, tmp_path).optim.lr for t in ("rte", "sst2")} == {5e-5}
    assert task_config(mine, "rte", tmp_path).train.epochs == 2.0
    # A flag given at the global default's value is given all the same (rte's recipe has 3e-5).
    argv = ["--tasks", "rte", "--lr", "2e-5"]
    assert task_config(config_from_args(argv), "rte", tmp_path, flags_given(argv)).optim.lr == 2e-5


def test_bad_task_lists_name_the_flag():
    with pytest.raises(ValueError, match="--tasks: 'sst3'"):
        suite_tasks(config_from_args(["--tasks", "sst2,sst3"]))
    with pytest.raises(ValueError, match="--tasks"):
        config_from_args(["--task", "rte", "--tasks", "rte"])


def test_scores_follow_the_leaderboard():
    _, s = task_score("mrpc", {"f1": 0.9, "accuracy": 0.8})
    assert s == pytest.approx(85.0)
    _, s = task_score("mnli", {"validation_matched/accuracy": 0.84, "validation_mismatched/accuracy": 0.83})
    assert s == pytest.approx(83.5)
    metrics, s = task_score("cola", {"matthews_correlation": 0.5, "accuracy": 0.9})
    assert metrics == {"matthews_correlation": 50.0} and s == 50.0
    md = markdown_table({"tasks": {"cola": {"status": "done", "metrics": metrics, "score": s},
                                   "qqp": {"status": "skipped", "reason": "no data | here"}},
                         "average": s, "averaged_over": ["cola"]})
    assert "| QQP | skipped: no data / here |  |" in md and "**50.0**" in md


@pytest.mark.slow
def test_a_failing_task_is_scored_around_and_exits_1(tmp_path):
    """One task's data is broken: the others still run and are summarised, and the exit status says it failed."""
    data = tmp_path / "data"
    for task in ("stsb", "cola"):
        write_task_data(get_task(task), data, n_train=48, n_eval=16, n_test=4)
    train = data / "cola" / "train.jsonl"
    train.write_text(train.read_text().replace('"sentence"', '"sent"'))
    out = tmp_path / "suite"
    p = run_cli(["--task", "glue", "--tasks", "stsb,cola", *TINY, "--data-dir", str(data), "--output-dir", str(out)])
    assert p.returncode == 1, p.stderr[-3000:]
    assert "GLUE task(s) failed: cola" in " ".join(p.stderr.split())
    summary = json.loads((out / "glue_results.json").read_text())
    assert summary["tasks"]["cola"]["status"] == "failed" and summary["averaged_over"] == ["stsb"]
    assert "no text column 'sentence'" in summary["tasks"]["cola"]["reason"]


def test_submission_folder_holds_this_suites_tasks_only(tmp_path):
    """A previous suite's RTE.tsv (say, before --overwrite --tasks wnli) does not stay beside this suite's files."""
    from bert_dist.glue_suite import collect_submission

    (tmp_path / "submission").mkdir()
    (tmp_path / "submission" / "RTE.tsv").write_text("old")
    (tmp_path / "wnli").mkdir()
    (tmp_path / "wnli" / "WNLI.tsv").write_text("index\tprediction\n")
    got = collect_submission(tmp_path, {"wnli": tmp_path / "wnli"})
    assert got["files"] == ["WNLI.tsv"] and sorted(p.name for p in (tmp_path / "submission").iterdir()) == ["WNLI.tsv"]


@pytest.mark.slow
def test_mnli_also_predicts_glues_diagnostic_set_ax(tmp_path):
    """AX (the hub's `ax` config: a test split with MNLI's columns, --data-dir's ax/test.jsonl) is predicted by the
    MNLI model into AX.tsv, the eleventh file of a GLUE submission; a suite with MNLI then has them all for it."""
    data = write_task_data(get_task("mnli"), tmp_path / "data", n_train=64, n_eval=20, n_test=9)
    assert (data / "ax" / "test.jsonl").is_file()
    out = tmp_path / "glue"
    p = run_cli(["--task", "glue", "--tasks", "mnli", "--data-dir", str(data), "--output-dir", str(out), *TINY])
    assert p.returncode == 0, p.stderr[-3000:]
    rows = (out / "submission" / "AX.tsv").read_text().splitlines()
    assert rows[0] == "index\tprediction" and len(rows) == 10
    assert [r.split("\t")[0] for r in rows[1:]] == [str(i) for i in range(9)]
    assert {r.split("\t")[1] for r in rows[1:]} <= {"entailment", "neutral", "contradiction"}
    assert "AX.tsv" not in json.loads((out / "glue_results.json").read_text())["submission"]["missing"]

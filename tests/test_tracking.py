"""--report-to tensorboard writes train loss, lr, throughput and eval metrics to an event file in the output dir;
without a tracker the console and results.json work as ever."""

from __future__ import annotations

import json

import pytest
from conftest import reset_accelerate

from bert_dist.data import get_task
from bert_dist.data.synthetic import write_task_data
from bert_dist.run import main


def _main(argv: list[str]) -> int:
    reset_accelerate()
    return main(argv)


@pytest.fixture(scope="module")
def flags(tmp_path_factory) -> list[str]:
    data = write_task_data(get_task("sst2"), tmp_path_factory.mktemp("data"), n_train=64, n_eval=17, n_test=3)
    return ["--task", "sst2", "--data-dir", str(data), "--init", "scratch", "--preset", "tiny", "--vocab-size", "200",
            "--batch-size", "8", "--max-steps", "6", "--log-every", "2", "--eval-every", "3", "--lr", "1e-3"]


def test_tensorboard_event_file_has_the_scalars(tmp_path, flags):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert _main([*flags, "--output-dir", str(out), "--report-to", "tensorboard"]) == 0
    logdir = out / "logs" / "bert-dist"
    assert list(logdir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(logdir))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/examples_per_s", "train/tokens_per_s", "train/grad_norm",
                "eval/accuracy"):
        assert tag in scalars, sorted(scalars)
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert all(e.value > 0 for e in events.Scalars("train/tokens_per_s"))
    evals = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("eval/accuracy")] == \
        [(m["step"], m["accuracy"]) for m in evals] == [(3, evals[0]["accuracy"]), (6, evals[1]["accuracy"])]
    assert (out / "results.json").is_file()


def test_without_a_tracker_console_and_results_json_still_work(tmp_path, flags, capsys):
    out = tmp_path / "run"
    assert _main([*flags, "--output-dir", str(out)]) == 0
    assert not (out / "logs").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 6 and "accuracy" in results and results["tokens_per_second"] > 0
    err = " ".join(capsys.readouterr().err.split())
    assert "step=6" in err and "loss=" in err and "eval step 6: accuracy=" in err

"""The model you would keep: --keep-best ends a run with the weights of its best evaluation, and
--early-stopping-patience ends the training after K evaluations in a row without improvement; both survive a kill -9
and --resume (the resumed run ends with the uninterrupted run's model, best step and stopping step), pruning, and
several processes.

The comparison rule itself is tested on `BestModel` directly (fast); the runs use tests/test_resume.py's driver
(faults injected from outside the library) on the synthetic SST-2 data, whose accuracy sits at a constant guess for
a dozen steps, then climbs to 1.0 and stays there, so the best evaluation comes in the middle of the run and early
stopping fires before its end.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_resume import assert_same_run, copy_unfinished, launch, lines, run

from bert_dist.checkpointing import BEST_FILE, BestModel, TrainState, saved_step
from bert_dist.config import RunConfig, TrainConfig, config_from_args
from bert_dist.data import get_task
from bert_dist.data.synthetic import write_task_data
from bert_dist.tokenizer import save_tokenizer, train_tokenizer

# ---------------------------------------------------------------------------------------------
# The comparison rule


@pytest.fixture
def tracker(tmp_path):
    """tracker(metric, **TrainConfig fields) -> (BestModel over a 1-weight model, the model, a TrainState)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # accelerate's state is fresh for every test (conftest)

    def make(metric: str = "accuracy", **train):
        cfg = RunConfig(train=TrainConfig(eval_every=1, **train)).train  # validated as the command line is
        model = torch.nn.Linear(1, 1, bias=False)
        return BestModel(accelerator=accelerator, model=model, out_dir=tmp_path, cfg=cfg, metric=metric), model, \
            TrainState()

    return make


def evaluate_steps(best: BestModel, model: torch.nn.Module, state: TrainState, values: list, key: str = "accuracy"):
    """Evaluations at steps 1, 2, ...: the model's weight is the step, its metric the next value."""
    waited = []
    for value in values:
        state.step += 1
        model.weight.data.fill_(state.step)
        best.observe(state, {key: value})
        waited.append(state.evals_without_improvement)
    return waited


def test_the_best_is_the_first_of_the_highest_and_its_weights_come_back(tracker):
    best, model, state = tracker(keep_best=True, early_stopping_patience=3)
    waited = evaluate_steps(best, model, state, [0.5, 0.6, 0.7, 0.6, 0.7, 0.65])
    assert (state.best_step, state.best_value, state.best_metrics) == (3, 0.7, {"accuracy": 0.7})
    assert waited == [0, 0, 0, 1, 2, 3]  # an equal value is no improvement
    assert best.exhausted(state)
    assert saved_step(best.path) == 3
    assert best.restore(state) and model.weight.item() == 3.0
    assert best.results(state) == {"best_metric": "accuracy", "best_step": 3, "best_value": 0.7}


def test_without_keep_best_early_stopping_writes_no_weights(tracker):
    best, model, state = tracker(keep_best=False, early_stopping_patience=2)
    evaluate_steps(best, model, state, [0.5, 0.4, 0.45])
    assert best.exhausted(state) and state.best_step == 1
    assert not best.path.exists() and not best.restore(state) and model.weight.item() == 3.0


def test_losses_are_lower_is_better_unless_told(tracker):
    best, model, state = tracker("mlm_loss", keep_best=True)
    evaluate_steps(best, model, state, [3.0, 2.5, 2.7], key="mlm_loss")
    assert state.best_step == 2
    cfg = TrainConfig()
    assert [cfg.greater_is_better(m) for m in ("accuracy", "validation_matched/accuracy", "pearson", "mlm_loss",
                                               "perplexity", "eval/mse", "f1")] == [1, 1, 1, 0, 0, 0, 1]
    best, model, state = tracker("mlm_loss", keep_best=True, best_mode="max")
    evaluate_steps(best, model, state, [3.0, 2.5, 2.7], key="mlm_loss")
    assert state.best_step == 1


def test_the_patience_counts_from_the_last_improvement_by_more_than_the_delta(tracker):
    """Each evaluation beats the best by 0.02 (each becomes the best), but only the 4th is more than 0.05 above the
    value the patience counts from: the wait grows to 2, then starts again."""
    best, model, state = tracker(early_stopping_patience=3, early_stopping_delta=0.05)
    waited = evaluate_steps(best, model, state, [0.50, 0.52, 0.54, 0.56, 0.58])
    assert state.best_step == 5 and waited == [0, 1, 2, 0, 1] and not best.exhausted(state)


def test_a_metric_that_is_not_a_number_is_never_the_best(tracker):
    best, model, state = tracker(keep_best=True, early_stopping_patience=3)
    assert evaluate_steps(best, model, state, [None, 0.5, math.nan, 0.4]) == [1, 0, 1, 2]
    assert state.best_step == 2


def test_an_evaluation_redone_after_a_resume_is_compared_once(tracker):
    best, model, state = tracker(early_stopping_patience=3)
    evaluate_steps(best, model, state, [0.5, 0.4])
    best.observe(state, {"accuracy": 0.4})  # the same step again
    assert state.evals_without_improvement == 1


def test_a_metric_of_several_splits_is_the_first_splits_and_an_unknown_one_is_named(tracker):
    best, _, _ = tracker()
    metrics = {"validation_matched/accuracy": 0.8, "validation_mismatched/accuracy": 0.7}
    assert best.key(metrics) == "validation_matched/accuracy"
    best, _, _ = tracker(keep_best=True, best_metric="f1")
    with pytest.raises(ValueError, match=r"--best-metric f1: .*validation_matched/accuracy, "
                                         r"validation_mismatched/accuracy"):
        best.key(metrics)


@pytest.mark.parametrize("flags, phrases", [
    (["--keep-best"], ["--keep-best compare the evaluations", "--eval-every N"]),
    (["--early-stopping-patience", "3"], ["--early-stopping-patience compare", "--eval-every N"]),
    (["--eval-every", "5", "--early-stopping-patience", "0"], ["--early-stopping-patience must be at least 1"]),
    (["--eval-every", "5", "--best-metric", "f1"], ["--best-metric picks the best", "neither is given"]),
    (["--eval-every", "5", "--keep-best", "--best-mode", "median"], ["--best-mode must be max or min"]),
    (["--eval-every", "5", "--early-stopping-delta", "0.1"], ["--early-stopping-delta applies to early stopping"]),
    (["--eval-every", "5", "--early-stopping-patience", "2", "--early-stopping-delta", "-1"],
     ["--early-stopping-delta must be 0 or a positive"]),
    (["--eval-every", "5", "--keep-best", "--eval-only", "--init", "x"], ["--eval-only does not train",
                                                                          "--keep-best do not apply"]),
])
def test_flags_that_cannot_work_are_refused_in_one_line(flags, phrases, capsys):
    with pytest.raises(ValueError) as e:
        config_from_args(flags)
    assert all(p in str(e.value) for p in phrases) and "\n" not in str(e.value), str(e.value)


def test_early_stopping_keeps_the_best_unless_told_not_to():
    assert config_from_args(["--eval-every", "5", "--early-stopping-patience", "2"]).train.keeps_best()
    assert not config_from_args(["--eval-every", "5", "--early-stopping-patience", "2",
                                 "--no-keep-best"]).train.keeps_best()
    assert not config_from_args([]).train.keeps_best()


def test_overwrite_removes_the_best_weights_of_the_previous_run(tmp_path):
    from bert_dist.rundir import list_previous_files

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "run_config.json").write_text("{}")
    (tmp_path / "checkpoints" / BEST_FILE).write_bytes(b"x")
    assert tmp_path / "checkpoints" / BEST_FILE in list_previous_files(tmp_path)


# ---------------------------------------------------------------------------------------------
# Runs

# Seed 2: a constant guess for the first evaluations, then the task learnt in the middle of the run; with a patience of
# 8 evaluations the training stops before step 40. The tests read the best and stopping steps from the run itself.
EVERY, PATIENCE = 2, 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("best")
    data = write_task_data(get_task("sst2"), root / "data", n_train=72, n_eval=33, n_test=7, seed=5)
    texts = [json.loads(ln)["sentence"] for ln in (data / "sst2" / "train.jsonl").read_text().splitlines()]
    (root / "tok").mkdir()
    save_tokenizer(train_tokenizer(iter(texts), vocab_size=200), root / "tok")
    flags = ["--task", "sst2", "--data-dir", str(data), "--init", "scratch", "--preset", "tiny", "--tokenizer",
             str(root / "tok" / "tokenizer.json"), "--max-steps", "40", "--batch-size", "8", "--grad-accum", "2",
             "--log-every", "5", "--eval-every", str(EVERY), "--save-every", str(EVERY), "--lr", "3e-3",
             "--warmup-ratio", "0.2", "--seed", "2", "--early-stopping-patience", str(PATIENCE)]
    return root, flags


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")


def evals(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in lines(out / "metrics.jsonl")]


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def expected_stop(accuracies: list[tuple[int, float]]) -> tuple[int, int]:
    """(best step, stopping step) of a sequence of (step, accuracy) by the rule: the first of the highest is the best;
    PATIENCE evaluations in a row that do not beat the best stop the training."""
    best_step, best, waited = None, -1.0, 0
    for step, acc in accuracies:
        if acc > best:
            best_step, best, waited = step, acc, 0
        else:
            waited += 1
            if waited == PATIENCE:
                return best_step, step
    raise AssertionError(f"early stopping should have fired: {accuracies}")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(setup):
    out = setup[0] / "uninterrupted"
    assert run(setup, out, "--keep-checkpoints", "30") == 0
    return out


@pytest.mark.slow
def test_the_run_ends_with_the_best_evaluations_model_and_stops_early(setup, uninterrupted):
    out, res = uninterrupted, results(uninterrupted)
    scored = [(e["step"], e["accuracy"]) for e in evals(out)]
    best_step, stop = expected_stop(scored)
    assert (res["best_step"], res["early_stopped_at"], res["steps"]) == (best_step, stop, stop)
    assert 2 < best_step < stop < 40, scored  # the data makes the best one in the middle
    assert [s for s, _ in scored] == list(range(EVERY, stop + 1, EVERY))  # no evaluation after the stop
    best_line = next(e for e in evals(out) if e["step"] == best_step)
    assert res["accuracy"] == res["best_value"] == best_line["accuracy"] and res["best_metric"] == "accuracy"
    # The run's model is the best step's weights (as its checkpoint holds them), not the last step's.
    model = weights(out / "model.safetensors")
    assert same_weights(model, weights(out / "checkpoints" / f"step-{best_step:08d}" / "model.safetensors"))
    assert not same_weights(model, weights(out / "checkpoints" / f"step-{stop:08d}" / "model.safetensors"))
    # Its predictions are the best evaluation's.
    data = Path(setup[1][setup[1].index("--data-dir") + 1])
    gold = [json.loads(ln)["label"] for ln in lines(data / "sst2" / "validation.jsonl")]
    predicted = [json.loads(ln)["prediction"] for ln in lines(out / "predictions_validation.jsonl")]
    assert round(sum(p == g for p, g in zip(predicted, gold)) / len(gold), 6) == best_line["accuracy"]
    assert len(lines(out / "predictions_test.jsonl")) == 7
    # Each checkpoint holds the best weights as of its step.
    for ckpt in sorted((out / "checkpoints").glob("step-*")):
        state = json.loads((ckpt / "train_state.json").read_text())
        assert saved_step(ckpt / BEST_FILE) == state["best_step"], ckpt
    # The early stop's step is logged and timed like a last step.
    assert json.loads(lines(out / "train_log.jsonl")[-1])["step"] == stop and res["train_seconds"] > 0


@pytest.mark.slow
def test_a_kill_after_a_newer_best_resumes_to_the_same_model(setup, uninterrupted, capsys):
    """Killed in the step after the evaluation that wrote a new best.safetensors (the best step B's): the resume, from
    step B - 2, takes the best weights of its checkpoint (an earlier step's), evaluates step B again and ends as the
    uninterrupted run."""
    scored = [(e["step"], e["accuracy"]) for e in evals(uninterrupted)]
    best_step, _ = expected_stop(scored)
    before = -max((acc, -step) for step, acc in scored if step <= best_step - EVERY)[1]  # the first of the highest
    out = setup[0] / "killed-after-best"
    p = run(setup, out, fault={"kill_after_save": best_step - EVERY, "forwards": 2 * EVERY + 1}, child=True)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert saved_step(out / "checkpoints" / BEST_FILE) == best_step and saved_step(
        out / "checkpoints" / f"step-{best_step - EVERY:08d}" / BEST_FILE) == before
    assert run(setup, out, "--resume", trace="resumed") == 0
    assert_same_run(out, uninterrupted, "resumed")


@pytest.mark.slow
def test_a_kill_with_the_best_checkpoint_pruned_resumes_to_the_same_model(setup, uninterrupted):
    """Killed 3 evaluations after the best step B, with the newest 2 checkpoints kept (B + 4 and B + 6): the best
    step's checkpoint is long gone, and 3 evaluations have not improved; the resume finds the best weights and the wait
    in the newest checkpoint, and stops at the same step with the same model."""
    best_step, stop = expected_stop([(e["step"], e["accuracy"]) for e in evals(uninterrupted)])
    last = best_step + 3 * EVERY
    assert last < stop  # PATIENCE > 3
    out = setup[0] / "killed-pruned"
    p = run(setup, out, "--keep-checkpoints", "2", fault={"kill_after_save": last, "forwards": 3}, child=True)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert sorted(c.name for c in (out / "checkpoints").iterdir()) == [
        BEST_FILE, f"step-{last - EVERY:08d}", f"step-{last:08d}"]
    state = json.loads((out / "checkpoints" / f"step-{last:08d}" / "train_state.json").read_text())
    assert (state["best_step"], state["evals_without_improvement"]) == (best_step, 3)
    assert run(setup, out, "--keep-checkpoints", "2", "--resume", trace="resumed") == 0
    assert_same_run(out, uninterrupted, "resumed")


@pytest.mark.slow
def test_resuming_an_early_stopped_run_does_not_train_on(setup, uninterrupted, tmp_path):
    """Its last checkpoint is the stopping step's: a resume finishes the run (the evaluation that stopped it is redone,
    and logged once) instead of training to --max-steps."""
    out = copy_unfinished(uninterrupted, tmp_path / "stopped")
    assert run(setup, out, "--resume", "--keep-checkpoints", "30", trace="resumed") == 0
    assert not (tmp_path / "stopped.resumed").exists()  # no training step
    assert (out / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    assert lines(out / "metrics.jsonl") == lines(uninterrupted / "metrics.jsonl")
    assert results(out)["early_stopped_at"] == results(uninterrupted)["early_stopped_at"]


@pytest.mark.slow
def test_a_resume_that_changes_the_best_metric_is_refused(setup, uninterrupted, tmp_path, capsys):
    from test_resume import refused

    out = copy_unfinished(uninterrupted, tmp_path / "changed")
    err = refused(capsys, setup, out, "--resume", "--best-mode", "min")
    assert "--best-mode is min here but unset" in err, err


@pytest.mark.slow
def test_an_unknown_best_metric_is_one_line_naming_the_metrics(setup, tmp_path, capsys):
    from test_resume import refused

    err = refused(capsys, setup, tmp_path / "unknown", "--best-metric", "f1", "--max-steps", "2")
    assert "--best-metric f1: the evaluation has no such metric (it has accuracy)" in err, err


TWO = ("--eval-batch-size", "4")


@pytest.mark.slow
def test_two_processes_agree_and_resume_to_the_same_best_model(setup, tmp_path):
    """2 gloo processes: one decision on both (the run ends, no rank left waiting), the best model saved; SIGTERM to
    rank 0 mid-run saves a checkpoint with the best weights, and the resume (2 processes) ends with the uninterrupted
    run's model, best step and stopping step."""
    ref = tmp_path / "two"
    p = launch(setup, ref, *TWO, "--keep-checkpoints", "30")
    assert p.returncode == 0, p.stderr[-3000:]
    res = results(ref)
    best_step, stop = expected_stop([(e["step"], e["accuracy"]) for e in evals(ref)])
    assert (res["best_step"], res["early_stopped_at"]) == (best_step, stop) and best_step < stop
    assert same_weights(weights(ref / "model.safetensors"),
                        weights(ref / "checkpoints" / f"step-{best_step:08d}" / "model.safetensors"))
    out = tmp_path / "two-sigterm"
    # A micro-batch of step best + 3 (2 micro-batches a step), past the best.
    p = launch(setup, out, *TWO, fault={"sigterm_at_forward": 2 * (best_step + 3) - 1})
    assert p.returncode == 0, p.stderr[-3000:]
    assert not (out / "results.json").exists()
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert saved_step(newest / BEST_FILE) == best_step
    p = launch(setup, out, *TWO, "--resume", trace="resumed")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert lines(out / "metrics.jsonl") == lines(ref / "metrics.jsonl")
    assert {k: results(out)[k] for k in ("best_step", "best_value", "early_stopped_at", "accuracy")} == \
        {k: res[k] for k in ("best_step", "best_value", "early_stopped_at", "accuracy")}


FSDP_WORKER = '''
import functools, json
import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from bert_dist.config import preset
from bert_dist.distributed import load_whole_state_dict
from bert_dist.model import BertForSequenceClassification, BertLayer
import types

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = BertForSequenceClassification(preset("tiny"), num_labels=2)
torch.manual_seed(1)
best = {k: v.clone() for k, v in BertForSequenceClassification(preset("tiny"), num_labels=2).state_dict().items()}
policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={BertLayer})  # as fsdp.yaml
wrapped = FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
acc = types.SimpleNamespace(distributed_type=DistributedType.FSDP)
missing = load_whole_state_dict(acc, wrapped, best)  # every rank, as BestModel.restore calls it
with FSDP.summon_full_params(wrapped):
    now = {k: v.clone() for k, v in model.state_dict().items()}
same = all(torch.equal(now[k], best[k]) for k in best)
print(json.dumps({"rank": rank, "same": same, "missing": missing}))
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_fsdp_loads_the_best_weights_into_every_ranks_shards(tmp_path):
    import subprocess
    import sys

    from conftest import free_port

    worker = tmp_path / "fsdp_worker.py"
    worker.write_text(FSDP_WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(worker)],
                          capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert sorted(d["rank"] for d in found) == [0, 1] and all(d["same"] and d["missing"] == [] for d in found), found


def test_safe_open_reads_the_step_of_a_best_file(tmp_path):
    from bert_dist.weights import save_weights

    save_weights({"w": torch.ones(2)}, tmp_path / BEST_FILE, {"step": "7"})
    assert saved_step(tmp_path / BEST_FILE) == 7 and saved_step(tmp_path / "none.safetensors") is None
    with safe_open(str(tmp_path / BEST_FILE), "pt") as f:
        assert f.metadata()["format"] == "pt"

"""Fault tolerance: a run killed (SIGKILL) mid-epoch, or while saving, and resumed with --resume ends with weights
bitwise equal to an uninterrupted run's (CPU, fp32, dropout on), and the same metrics and predictions; SIGTERM
saves a checkpoint and exits 0; non-finite losses never reach the weights and --max-bad-steps stops the run.

The kills are real: each run is a child process whose faults (a SIGKILL a few micro-batches after a checkpoint,
one halfway through writing a checkpoint, a SIGTERM) are injected by the small driver below, so the library
carries no test hooks. The driver also records, before every training forward pass, a digest of the global RNG
(what dropout draws from) and of the batch: the resumed run's records must be the uninterrupted run's last ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate
from safetensors.torch import load_file

from bert_dist.data import get_task
from bert_dist.data.synthetic import write_task_data
from bert_dist.tokenizer import save_tokenizer, train_tokenizer


def install_faults(fault: dict, trace: Path) -> Callable[[], None]:  # noqa: C901 - one branch per fault kind
    """Record the trajectory to `trace` and inject `fault`; returns the function that undoes the patches.

    Before each training forward pass, one line: a digest of the global RNG (what dropout draws from) and of
    the batch. Faults: {"kill_after_save": N, "forwards": k} SIGKILLs on the k-th micro-batch after the
    step-N checkpoint (mid-step); {"kill_in_save": N} SIGKILLs halfway through writing step N's checkpoint;
    {"sigterm_at_forward": k} sends SIGTERM on the k-th micro-batch; {"sigterm_in_final_eval": True} sends it as
    the evaluation after the last step starts; {"sigterm_before_results": True} once training has returned, before
    results.json and the report are written; {"slow_eval": s} makes each evaluation forward pass take s seconds more,
    {"sigterm_at_eval_forward": k} sends SIGTERM on the k-th one (and writes the time to `trace`.sigterm). With
    several processes the faults strike the process of rank {"rank": r} (0) alone. Each model built writes a digest of
    its initial weights to `trace`.init.
    """
    from accelerate import Accelerator

    import bert_dist.train as T
    from bert_dist.checkpointing import Checkpointer
    from bert_dist.model import BertForSequenceClassification

    seen = {"forwards": 0, "countdown": None, "eval_forwards": 0}
    forward, save, save_state = BertForSequenceClassification.forward, Checkpointer.save, Accelerator.save_state
    init = BertForSequenceClassification.__init__
    struck = int(os.environ.get("RANK", "0")) == fault.get("rank", 0)

    def traced_init(self, *args, **kw):
        init(self, *args, **kw)
        weights = b"".join(t.detach().numpy().tobytes() for t in self.state_dict().values())
        with open(f"{trace}.init", "a") as fh:
            fh.write(hashlib.sha1(weights).hexdigest()[:16] + "\n")

    def traced_forward(self, *args, **kw):
        if not self.training:
            seen["eval_forwards"] += 1
            if struck and fault.get("sigterm_at_eval_forward") == seen["eval_forwards"]:
                Path(f"{trace}.sigterm").write_text(str(time.time()))
                os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(fault.get("slow_eval", 0))
        if self.training:
            rng = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]
            ids = hashlib.sha1(kw["input_ids"].numpy().tobytes()).hexdigest()[:16]
            with open(trace, "a") as fh:
                fh.write(f"{rng} {ids}\n")
            seen["forwards"] += 1
            if seen["countdown"] is not None:
                seen["countdown"] -= 1
                if seen["countdown"] == 0:
                    os.kill(os.getpid(), signal.SIGKILL)  # mid-step: this micro-batch never finishes
            if struck and fault.get("sigterm_at_forward") == seen["forwards"]:
                os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *args, **kw)

    def save_checkpoint(self, state):
        path = save(self, state)
        if fault.get("kill_after_save") == state.step:
            seen["countdown"] = fault["forwards"]
        return path

    run_eval = T.run_eval

    def signalled_eval(*, state, **kw):
        if fault.get("sigterm_in_final_eval") and state.step == STEPS:
            os.kill(os.getpid(), signal.SIGTERM)
        return run_eval(state=state, **kw)

    T.run_eval = signalled_eval
    import bert_dist.report as R

    describe_hardware = R.describe_hardware

    def signalled_describe(accelerator):
        if fault.get("sigterm_before_results"):
            os.kill(os.getpid(), signal.SIGTERM)
        return describe_hardware(accelerator)

    R.describe_hardware = signalled_describe

    def killed_save_state(self, output_dir=None, **kw):
        out = save_state(self, output_dir, **kw)
        if output_dir and output_dir.endswith(f"step-{fault.get('kill_in_save', -1):08d}.tmp"):
            weights = os.path.join(output_dir, "model.safetensors")
            with open(weights, "r+b") as w:
                w.truncate(os.path.getsize(weights) // 2)  # as if the kill came halfway through the write
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    BertForSequenceClassification.forward, Checkpointer.save = traced_forward, save_checkpoint
    BertForSequenceClassification.__init__, Accelerator.save_state = traced_init, killed_save_state

    def undo() -> None:
        BertForSequenceClassification.forward, Checkpointer.save, Accelerator.save_state = forward, save, save_state
        BertForSequenceClassification.__init__ = init
        T.run_eval, R.describe_hardware = run_eval, describe_hardware

    return undo


# 72 examples in micro-batches of 8: 9 per epoch, so with --grad-accum 2 an epoch is 5 optimizer steps, the
# last one a single micro-batch (accelerate syncs at the end of the loader). 14 steps cross two epoch ends;
# checkpoints at 4, 8 and 12 are all mid-epoch (micro-batch 8 of 9, 6 of 9, 4 of 9).
STEPS, SAVE_EVERY = 14, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    spec = get_task("sst2")
    data = write_task_data(spec, root / "data", n_train=72, n_eval=33, n_test=7, seed=5)
    # One tokenizer for every run: WordPiece training is not deterministic (huggingface/tokenizers#1794).
    texts = [json.loads(ln)["sentence"] for ln in (data / "sst2" / "train.jsonl").read_text().splitlines()]
    (root / "tok").mkdir()
    save_tokenizer(train_tokenizer(iter(texts), vocab_size=200), root / "tok")
    flags = ["--task", "sst2", "--data-dir", str(data), "--init", "scratch", "--preset", "tiny", "--tokenizer",
             str(root / "tok" / "tokenizer.json"), "--max-steps", str(STEPS), "--batch-size", "8", "--grad-accum",
             "2", "--save-every", str(SAVE_EVERY), "--log-every", "3", "--eval-every", "5", "--lr", "3e-3",
             "--warmup-ratio", "0.2", "--seed", "7"]
    return root, flags


def run(setup, out: Path, *extra: str, fault: dict | None = None, trace: str = "trace",
        child: bool = False) -> subprocess.CompletedProcess | int:
    """One run with `fault`: in a child process (this file is its driver) when it will be killed, else here.

    Both use one thread, so they run the same kernels: their weights are bitwise comparable.
    """
    root, flags = setup
    argv = [*flags, "--output-dir", str(out), *extra]
    trace_file = out.parent / f"{out.name}.{trace}"
    if child:
        env = {**os.environ, "FAULT": json.dumps(fault or {}), "TRACE": str(trace_file), "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True,
                              timeout=300)
    from bert_dist.run import main

    reset_accelerate()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    undo = install_faults(fault or {}, trace_file)
    try:
        return main(argv)
    finally:
        undo()
        torch.set_num_threads(threads)


def lines(p: Path) -> list[str]:
    return p.read_text().splitlines()


@pytest.fixture(scope="module")
def uninterrupted(setup):
    out = setup[0] / "uninterrupted"
    assert run(setup, out) == 0
    assert (out / "results.json").is_file()
    return out


def assert_same_run(resumed: Path, reference: Path, trace: str) -> None:
    """Bitwise weights, and the same metrics, predictions and (resumed part of the) trajectory."""
    assert (resumed / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert lines(resumed / "metrics.jsonl") == lines(reference / "metrics.jsonl")  # no eval logged twice
    assert lines(resumed / "predictions_validation.jsonl") == lines(reference / "predictions_validation.jsonl")
    drop = ("train_seconds", "examples_per_second", "tokens_per_second")
    r, ref = (json.loads((d / "results.json").read_text()) for d in (resumed, reference))
    assert {k: v for k, v in r.items() if k not in drop} == {k: v for k, v in ref.items() if k not in drop}
    after = lines(resumed.parent / f"{resumed.name}.{trace}")
    assert after == lines(reference.parent / f"{reference.name}.trace")[-len(after):]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich would wrap (and fold long paths in) log lines at 80


def logged(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def test_sigkill_mid_epoch_then_resume_is_bitwise_equal(setup, uninterrupted, capsys):
    out = setup[0] / "killed"
    # Killed on the 5th micro-batch after the step-8 checkpoint: step 11, in the next epoch, after the
    # step-10 evaluation was logged.
    p = run(setup, out, fault={"kill_after_save": 8, "forwards": 5}, child=True)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert [c.name for c in sorted((out / "checkpoints").iterdir())] == ["step-00000004", "step-00000008"]
    assert not (out / "results.json").exists() and not (out / "model.safetensors").exists()
    assert [json.loads(ln)["step"] for ln in lines(out / "metrics.jsonl")] == [5, 10]
    capsys.readouterr()
    assert run(setup, out, "--resume", trace="resumed") == 0
    assert f"resumed from {out}/checkpoints/step-00000008 at step 8 (epoch 1, batch 6)" in logged(capsys)
    assert_same_run(out, uninterrupted, "resumed")


def test_kill_during_a_save_resumes_from_the_previous_checkpoint(setup, uninterrupted, capsys):
    out = setup[0] / "killed-saving"
    p = run(setup, out, fault={"kill_in_save": 12}, child=True)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    names = sorted(c.name for c in (out / "checkpoints").iterdir())
    assert names == ["step-00000004", "step-00000008", "step-00000012.tmp"]
    capsys.readouterr()
    assert run(setup, out, "--resume", trace="resumed") == 0
    err = logged(capsys)
    assert "removing" in err and "step-00000012.tmp" in err and "resumed from" in err and "step-00000008" in err
    assert_same_run(out, uninterrupted, "resumed")
    assert sorted(c.name for c in (out / "checkpoints").iterdir()) == ["step-00000008", "step-00000012"]


def test_sigterm_saves_exits_0_and_resumes_bitwise_equal(setup, uninterrupted, capsys):
    out = setup[0] / "sigterm"
    # The signal lands on the 13th micro-batch, the first half of step 7: the run finishes that step,
    # saves step-7 (an accumulation boundary, off the --save-every grid) and returns 0 without results.
    capsys.readouterr()
    assert run(setup, out, fault={"sigterm_at_forward": 13}) == 0
    err = logged(capsys)
    assert "SIGTERM at step 7" in err and "rerun with --resume" in err
    assert (out / "checkpoints" / "step-00000007").is_dir()
    assert not (out / "results.json").exists() and not (out / "model.safetensors").exists()
    assert run(setup, out, "--resume", trace="resumed") == 0
    assert_same_run(out, uninterrupted, "resumed")


@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_finishes_the_run(setup, uninterrupted):
    """SIGTERM after the last step (the model saved, the final evaluation under way): the run finishes, exits 0,
    and is the uninterrupted run (it used to die from the signal a step from its end)."""
    out = setup[0] / "sigterm_final"
    p = run(setup, out, fault={"sigterm_in_final_eval": True}, child=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "SIGTERM after the last step" in " ".join(p.stderr.split())
    assert (out / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    assert json.loads((out / "results.json").read_text())["accuracy"] == \
        json.loads((uninterrupted / "results.json").read_text())["accuracy"]


@pytest.mark.slow
def test_sigterm_while_the_outputs_are_written_finishes_the_run(setup, uninterrupted):
    """SIGTERM once training is over but before results.json, the test predictions and the report are written: the
    run still writes them and exits 0 (it used to die with 143, with no results.json)."""
    out = setup[0] / "sigterm_results"
    p = run(setup, out, fault={"sigterm_before_results": True}, child=True)
    assert p.returncode == 0, p.stderr[-3000:]
    for f in ("results.json", "report.html", "predictions_test.jsonl"):
        assert (out / f).is_file(), f
    assert (out / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()


# Evaluations of 9 batches of 4, each forward pass a second longer: 9 s an evaluation.
SLOW_EVAL = {"slow_eval": 1.0, "sigterm_at_eval_forward": 2}


def test_sigterm_during_a_long_evaluation_stops_it_and_saves_at_once(setup, uninterrupted, capsys):
    """SIGTERM on the 2nd batch of the step-5 evaluation: the evaluation stops there, unscored (no metrics.jsonl
    line), a step-5 checkpoint is saved and the run exits 0 within seconds (torchrun and SLURM kill 30 s after
    SIGTERM; it used to finish the evaluation first, 7 s more here, minutes on a real one). The resume runs that
    evaluation first, then trains on: the uninterrupted run's weights, bit for bit, and evaluations."""
    out = setup[0] / "sigterm_eval"
    capsys.readouterr()
    assert run(setup, out, "--eval-batch-size", "4", fault=SLOW_EVAL) == 0
    took = time.time() - float((out.parent / f"{out.name}.trace.sigterm").read_text())
    assert took < 4, took
    assert not (out / "metrics.jsonl").exists() or not lines(out / "metrics.jsonl")
    err = logged(capsys)
    assert "SIGTERM during the evaluation at step 5" in err and "SIGTERM at step 5" in err, err[-2000:]
    assert json.loads((out / "checkpoints" / "step-00000005" / "train_state.json").read_text())["eval_pending"]
    assert not (out / "results.json").exists()
    assert run(setup, out, "--eval-batch-size", "4", "--resume", trace="resumed") == 0
    assert (out / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    assert [json.loads(ln)["step"] for ln in lines(out / "metrics.jsonl")] == [5, 10, 14]
    after = lines(out.parent / f"{out.name}.resumed")
    assert after == lines(uninterrupted.parent / f"{uninterrupted.name}.trace")[-len(after):]


def launch(setup, out: Path, *extra: str, fault: dict | None = None, trace: str = "trace",
           nproc: int = 2) -> subprocess.CompletedProcess:
    """One run in `nproc` gloo processes (`accelerate launch` of this file): process r records its trajectory to
    `trace`.r, and `fault` strikes the process of rank fault["rank"] (0) alone."""
    from conftest import free_port

    root, flags = setup
    env = {**os.environ, "FAULT": json.dumps(fault or {}), "TRACE": str(out.parent / f"{out.name}.{trace}"),
           "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), __file__, *flags, "--output-dir", str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


TWO = ("--eval-batch-size", "2")  # 33 examples: 9 evaluation batches per process


@pytest.fixture(scope="module")
def two_uninterrupted(setup):
    out = setup[0] / "two-uninterrupted"
    p = launch(setup, out, *TWO)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.mark.slow
def test_each_process_draws_its_own_dropout_masks(setup, two_uninterrupted):
    """With 2 processes every training forward pass starts from another RNG state on each (dropout: seed + rank, as
    NVIDIA's BERT seeds), where every process used to draw the same masks; the model each process builds is the same
    (its init is the seed's alone). The data order stays the seed's: tests/test_distributed.py, 2 processes = 1."""
    traces = [lines(two_uninterrupted.parent / f"{two_uninterrupted.name}.trace.{rank}") for rank in (0, 1)]
    assert len(traces[0]) == len(traces[1]) > 0
    rng = [[ln.split()[0] for ln in t] for t in traces]
    assert all(a != b for a, b in zip(*rng)), [a == b for a, b in zip(*rng)]
    inits = [lines(two_uninterrupted.parent / f"{two_uninterrupted.name}.trace.{rank}.init") for rank in (0, 1)]
    assert inits[0] == inits[1] and len(inits[0]) == 1


@pytest.mark.slow
def test_sigterm_to_one_process_during_an_evaluation_stops_both_at_once(setup, two_uninterrupted):
    """2 processes, SIGTERM to rank 0 alone on its 2nd batch of the step-5 evaluation: both stop that evaluation at
    the same batch (they agree before each one; a lone process leaving would hang the other in the next gather),
    save step 5 and exit 0 within seconds. Resumed with its 2 processes, the run ends with the uninterrupted run's
    weights, bit for bit, each process on the uninterrupted one's trajectory."""
    out = setup[0] / "two-sigterm-eval"
    p = launch(setup, out, *TWO, fault=SLOW_EVAL)
    assert p.returncode == 0, p.stderr[-3000:]
    sent = float((out.parent / f"{out.name}.trace.0.sigterm").read_text())
    took = [float((out.parent / f"{out.name}.trace.{rank}.done").read_text()) - sent for rank in (0, 1)]
    assert max(took) < 4, took
    assert not (out / "metrics.jsonl").exists() or not lines(out / "metrics.jsonl")
    err = " ".join(p.stderr.split())
    assert "SIGTERM during the evaluation at step 5" in err and "SIGTERM at step 5" in err, err[-3000:]
    assert json.loads((out / "checkpoints" / "step-00000005" / "train_state.json").read_text())["eval_pending"]
    p = launch(setup, out, *TWO, "--resume", trace="resumed")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "model.safetensors").read_bytes() == (two_uninterrupted / "model.safetensors").read_bytes()
    assert [json.loads(ln)["step"] for ln in lines(out / "metrics.jsonl")] == [5, 10, 14]
    for rank in (0, 1):
        after = lines(out.parent / f"{out.name}.resumed.{rank}")
        full = lines(two_uninterrupted.parent / f"{two_uninterrupted.name}.trace.{rank}")
        assert after and after == full[-len(after):]


def copy_unfinished(src: Path, dst: Path) -> Path:
    """A copy of a finished run without its results and model: a run killed after its last checkpoint."""
    import shutil

    shutil.copytree(src, dst)
    for f in ("results.json", "model.safetensors"):
        (dst / f).unlink()
    return dst


def refused(capsys, setup, out: Path, *extra: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(setup, out, *extra)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 1 and err[-1].startswith("error:") and "Traceback" not in "".join(err), err[-5:]
    return " ".join(err[-1].split())


def test_a_resume_that_changes_a_setting_is_refused(setup, uninterrupted, tmp_path, capsys):
    """--lr on a resume would be overridden by the checkpoint's optimizer and scheduler while run_config.json said
    otherwise; a checkpoint moved out of its run directory is checked against its own copy of the run's config."""
    out = copy_unfinished(uninterrupted, tmp_path / "changed")
    err = refused(capsys, setup, out, "--resume", "--lr", "1e-3")
    assert "--lr is 0.001 here but 0.003" in err and "step-00000012" in err, err
    err = refused(capsys, setup, out, "--resume", "--max-steps", "10")
    assert "--max-steps" in err and "before the step 12" in err, err
    (tmp_path / "moved").mkdir()
    moved = (out / "checkpoints" / "step-00000012").rename(tmp_path / "moved" / "step-00000012")
    err = refused(capsys, setup, tmp_path / "elsewhere", "--resume-from", str(moved), "--seed", "8")
    assert "--seed is 8 here but 7" in err and str(moved / "run_config.json") in err, err
    assert (moved / "train_state.json").is_file()
    # What may change: how often it logs, evaluates and saves, and how long it trains.
    assert run(setup, tmp_path / "elsewhere", "--resume-from", str(moved), "--log-every", "1", "--eval-every", "7",
               "--max-steps", "15") == 0
    assert json.loads((tmp_path / "elsewhere" / "results.json").read_text())["steps"] == 15


def test_a_resume_compares_what_ran_not_how_it_was_spelled(setup, uninterrupted, tmp_path, capsys):
    """Paths compare as the files they name (a trailing slash), the precision as what ran (unset = no here), the
    tokenizer by content (a copy is the same tokenizer; another one is refused: the embeddings fit only its ids),
    and what only evaluation reads may change."""
    import shutil

    root, _ = setup
    data = setup[1][setup[1].index("--data-dir") + 1]
    other = tmp_path / "tok2"
    other.mkdir()
    save_tokenizer(train_tokenizer(iter(["a completely different corpus of words"] * 20), vocab_size=60), other)
    out = copy_unfinished(uninterrupted, tmp_path / "spelled")
    err = refused(capsys, setup, out, "--resume", "--tokenizer", str(other / "tokenizer.json"))
    assert "is not the one of the run being resumed" in err, err
    shutil.copy(root / "tok" / "tokenizer.json", tmp_path / "same.json")
    assert run(setup, out, "--resume", "--data-dir", data + "/", "--mixed-precision", "no", "--tokenizer",
               str(tmp_path / "same.json"), "--max-eval-samples", "20") == 0


def test_a_tokenizer_file_edited_since_the_checkpoint_is_refused(setup, uninterrupted, tmp_path, capsys):
    """A checkpoint holds a copy of its run's tokenizer: a resume is compared with that copy, not with the file its
    run config names as that file is now (edited in place, both sides would read the new content and agree)."""
    import shutil

    root, _ = setup
    out = copy_unfinished(uninterrupted, tmp_path / "edited")
    ckpt = out / "checkpoints" / "step-00000012"
    from bert_dist.tokenizer import load_tokenizer

    assert load_tokenizer(ckpt / "tokenizer.json").to_str() == load_tokenizer(root / "tok" / "tokenizer.json").to_str()
    mine = tmp_path / "mine.json"  # the run's tokenizer, at a path of this test's own (the fixture's is shared)
    shutil.copy(root / "tok" / "tokenizer.json", mine)
    for config in (out / "run_config.json", ckpt / "run_config.json"):
        config.write_text(json.dumps({**json.loads(config.read_text()), "tokenizer": str(mine)}))
    save_tokenizer(train_tokenizer(iter(["a completely different corpus of words"] * 20), vocab_size=60), tmp_path)
    shutil.copy(tmp_path / "tokenizer.json", mine)  # edited in place since the checkpoint
    err = refused(capsys, setup, out, "--resume", "--tokenizer", str(mine))
    assert "is not the one of the run being resumed" in err, err


def test_a_resume_onto_other_training_data_is_refused(setup, uninterrupted, tmp_path, capsys):
    """A data file edited under the same path (settings all equal) moves what the checkpoint's data position points
    at: a checkpoint records its batches per epoch, and a resume that has other data is refused."""
    out = copy_unfinished(uninterrupted, tmp_path / "data-changed")
    ckpt = out / "checkpoints" / "step-00000012"
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["batches_per_epoch"] > 0
    (ckpt / "train_state.json").write_text(json.dumps({**state, "batches_per_epoch": state["batches_per_epoch"] + 3}))
    err = refused(capsys, setup, out, "--resume")
    assert "the training data changed since the checkpoint" in err, err


def test_a_resume_with_another_number_of_processes_is_refused(setup, uninterrupted, tmp_path, capsys):
    """The data position (micro-batches consumed) and the random states are per process. (2 real processes:
    tests/test_distributed.py.)"""
    out = copy_unfinished(uninterrupted, tmp_path / "procs")
    ckpt = out / "checkpoints" / "step-00000012"
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["num_processes"] == 1
    (ckpt / "train_state.json").write_text(json.dumps({**state, "num_processes": 2}))
    err = refused(capsys, setup, out, "--resume")
    assert "written by 2 process(es), this run has 1" in err and "same number of processes" in err, err


def test_resume_from_an_older_checkpoint_while_newer_ones_exist_is_refused(setup, uninterrupted, tmp_path, capsys):
    """Keeping the newest K checkpoints by step, the run would delete its own new ones and keep the abandoned
    run's, which a later --resume would then pick up."""
    out = copy_unfinished(uninterrupted, tmp_path / "older")
    err = refused(capsys, setup, out, "--resume-from", str(out / "checkpoints" / "step-00000008"))
    assert "step-00000012" in err and "move or delete them" in err, err
    assert sorted(c.name for c in (out / "checkpoints").iterdir()) == ["step-00000008", "step-00000012"]


def test_resume_of_a_run_whose_last_checkpoint_is_its_last_step(setup, tmp_path, capsys):
    """The final evaluation is redone, and logged once (it was appended a second time to metrics.jsonl)."""
    out = tmp_path / "last"
    assert run(setup, out, "--max-steps", "12") == 0
    evals, logs = lines(out / "metrics.jsonl"), lines(out / "train_log.jsonl")
    assert run(setup, out, "--max-steps", "12", "--resume") == 0
    assert [json.loads(ln)["step"] for ln in lines(out / "metrics.jsonl")] == [5, 10, 12]
    assert lines(out / "metrics.jsonl") == evals and lines(out / "train_log.jsonl") == logs


@pytest.mark.parametrize("damage", ["missing", "unreadable"])
def test_a_checkpoint_without_its_random_states_is_refused(setup, uninterrupted, capsys, damage):
    """accelerate only logs (at INFO) random states it could not load, and the resumed run would then draw other
    dropout masks: refused, with one line."""
    import shutil

    out = setup[0] / f"rng_{damage}"
    shutil.copytree(uninterrupted, out)
    for f in ("results.json", "model.safetensors"):
        (out / f).unlink()
    for ckpt in (out / "checkpoints").iterdir():
        rng = ckpt / "random_states_0.pkl"
        rng.unlink() if damage == "missing" else rng.write_bytes(b"not a pickle")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(setup, out, "--resume")
    err = logged(capsys)
    assert e.value.code == 1 and "cannot resume from" in err and "random_states_0.pkl" in err, err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Non-finite losses


@pytest.fixture
def nan_at(monkeypatch):
    """nan_at(steps): the training loss is NaN on those micro-batches (1-based), and so the gradients."""
    from bert_dist.model import BertForSequenceClassification

    forward = BertForSequenceClassification.forward
    bad: set[int] = set()
    seen = [0]

    def patched(self, *args, **kw):
        out = forward(self, *args, **kw)
        if self.training:
            seen[0] += 1
            if seen[0] in bad:
                out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(BertForSequenceClassification, "forward", patched)
    return bad.update


def test_a_few_nan_steps_leave_the_weights_finite(setup, nan_at, capsys):
    out = setup[0] / "nan-few"
    nan_at({3, 4})  # steps 3 and 4; step 4 is a --save-every step
    assert run(setup, out, "--grad-accum", "1", "--max-steps", "6", "--max-bad-steps", "3", "--log-every", "1") == 0
    assert "step 4: not saving a checkpoint while the loss is not finite" in logged(capsys)
    assert not (out / "checkpoints" / "step-00000004").exists()
    assert json.loads((out / "results.json").read_text())["nonfinite_steps"] == 2
    logged_loss = {json.loads(ln)["step"]: json.loads(ln)["loss"] for ln in lines(out / "train_log.jsonl")}
    assert math.isnan(logged_loss[3]) and math.isnan(logged_loss[4]) and logged_loss[5] > 0  # not a perfect 0.0
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_max_bad_steps_stops_the_run_and_keeps_the_last_good_checkpoint(setup, nan_at, capsys):
    out = setup[0] / "nan-diverged"
    nan_at(set(range(6, 100)))  # from step 6 on
    with pytest.raises(SystemExit) as e:
        run(setup, out, "--grad-accum", "1", "--max-steps", "30", "--max-bad-steps", "3", "--log-every", "5")
    assert e.value.code == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err[-1].startswith("error:") and sum(ln.startswith("error:") for ln in err) == 1
    # Found at the next sync point (the step-8 checkpoint, which is not written), not on every step.
    assert "3 optimizer steps in a row" in err[-1] and "--max-bad-steps" in err[-1] and "at step 8" in err[-1]
    assert "step-00000004" in err[-1]
    assert sorted(c.name for c in (out / "checkpoints").iterdir()) == ["step-00000004"]
    assert not (out / "results.json").exists() and not (out / "model.safetensors").exists()
    weights = load_file(str(out / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())

if __name__ == "__main__":  # the child process of `run(..., child=True)`, or each process of `launch`
    torch.set_num_threads(1)
    trace = Path(os.environ["TRACE"])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        trace = Path(f"{trace}.{os.environ['RANK']}")
    install_faults(json.loads(os.environ["FAULT"]), trace)
    from bert_dist.run import main

    status = main(sys.argv[1:])
    Path(f"{trace}.done").write_text(str(time.time()))  # the run's end (2 gloo processes take seconds more to exit)
    sys.exit(status)


class _Trap:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_a_checkpoint_is_data_resume_runs_no_code_from_it(setup, uninterrupted, tmp_path, capsys):
    """Training state and scheduler are JSON / tensors loaded with weights_only=True, nothing is registered with
    accelerate's pickled objects (custom_checkpoint_N.pkl, which it loads with weights_only=False): a pickle planted
    there is refused with one line and never runs."""
    import shutil

    out = tmp_path / "planted"
    shutil.copytree(uninterrupted, out)
    newest = sorted((out / "checkpoints").iterdir())[-1]
    assert {"train_state.json", "lr_scheduler.pt"} <= {p.name for p in newest.iterdir()}
    assert not list(newest.glob("custom_checkpoint_*"))
    marker = tmp_path / "code-ran"
    torch.save(_Trap(marker), newest / "custom_checkpoint_0.pkl")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(setup, out, "--resume", trace="resumed")
    assert e.value.code == 1 and "cannot resume from" in logged(capsys)
    assert not marker.exists()

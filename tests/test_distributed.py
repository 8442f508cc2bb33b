"""Two gloo processes on the CPU (`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`) with
batch 8 each train like one process with batch 16, and evaluation counts each example of an odd-sized split once.

Why the runs agree: the batch order is a function of (seed, epoch) alone, so with 2 processes rank r gets batches
r, r+2, ... of the 8-example order, and global step t sees exactly the 16 examples of the 1-process run's batch t
(the training set is a multiple of 16 and the run stays inside one epoch); DDP averages the two means, which is
the mean over 16. Dropout is the one thing that must differ between processes, so the model starts from an
--init directory whose config.json sets it to 0 (no extra flag needed: that is where Hugging Face configs keep it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import reset_accelerate, run_cli
from safetensors.torch import load_file

from bert_dist.config import preset
from bert_dist.data import get_task
from bert_dist.data.synthetic import write_task_data
from bert_dist.model import BertForSequenceClassification
from bert_dist.tokenizer import train_tokenizer
from bert_dist.weights import save_run_model

N_EVAL, N_TEST = 97, 7  # odd, and not a multiple of 2 processes x the eval batch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    spec = get_task("sst2")
    data = write_task_data(spec, root / "data", n_train=160, n_eval=N_EVAL, n_test=N_TEST, seed=11)
    texts = [json.loads(ln)["sentence"] for ln in (data / "sst2" / "train.jsonl").read_text().splitlines()]
    tok = train_tokenizer(iter(texts), vocab_size=200)
    bert = preset("tiny", vocab_size=tok.get_vocab_size(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  classifier_dropout=0.0)
    import torch

    torch.manual_seed(0)
    save_run_model(BertForSequenceClassification(bert, 2), root / "init", bert, {"task": "sst2"}, tok)
    flags = ["--task", "sst2", "--data-dir", str(data), "--init", str(root / "init"), "--max-steps", "8",
             "--log-every", "4", "--eval-every", "4", "--eval-batch-size", "8", "--lr", "2e-3", "--warmup-ratio", "0",
             "--seed", "3"]
    return root, flags


def predictions(out: Path, split: str = "validation") -> list[dict]:
    return [json.loads(ln) for ln in (out / f"predictions_{split}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(setup):
    """The reference: one process, batch 16 (in this process: the comparison has an fp32 tolerance anyway)."""
    from bert_dist.run import main

    root, flags = setup
    out = root / "one"
    reset_accelerate()
    assert main([*flags, "--batch-size", "16", "--output-dir", str(out)]) == 0
    return out


@pytest.mark.slow
def test_two_processes_of_8_equal_one_process_of_16(setup, one_process):
    root, flags = setup
    out = root / "two"
    p = run_cli([*flags, "--batch-size", "8", "--output-dir", str(out)], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "sst2 on 2 process(es)" in " ".join(p.stderr.split())
    one, two = (json.loads((d / "results.json").read_text()) for d in (one_process, out))
    assert two["steps"] == one["steps"] == 8
    assert two["accuracy"] == pytest.approx(one["accuracy"], abs=1e-9)
    assert [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()] == \
        [json.loads(ln) for ln in (one_process / "metrics.jsonl").read_text().splitlines()]
    w1, w2 = load_file(str(one_process / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        np.testing.assert_allclose(w2[k].numpy(), w1[k].numpy(), rtol=1e-4, atol=1e-5, err_msg=k)
    for split, n in (("validation", N_EVAL), ("test", N_TEST)):
        p1, p2 = predictions(one_process, split), predictions(out, split)
        assert len(p2) == len(p1) == n  # every example once: none dropped, none doubled by the padding
        assert [r["idx"] for r in p2] == [r["idx"] for r in p1] == list(range(n))
        assert [r["prediction"] for r in p2] == [r["prediction"] for r in p1]
        np.testing.assert_allclose([r["probabilities"] for r in p2], [r["probabilities"] for r in p1], atol=1e-4)


@pytest.mark.slow
def test_two_processes_with_grad_accum_and_group_by_length_count_each_example_once(setup, one_process):
    root, flags = setup
    out = root / "two-accum-grouped"
    p = run_cli([*flags, "--batch-size", "8", "--grad-accum", "2", "--group-by-length", "--output-dir", str(out)],
                nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    for split, n in (("validation", N_EVAL), ("test", N_TEST)):
        rows = predictions(out, split)
        assert len(rows) == n
        assert [r["idx"] for r in rows] == [r["idx"] for r in predictions(one_process, split)]
    assert json.loads((out / "results.json").read_text())["steps"] == 8


@pytest.mark.slow
def test_two_processes_resume_from_a_checkpoint_bitwise(setup, capsys):
    """2 processes save (train_state.json and lr_scheduler.pt by the main process, accelerate's files by both) and
    resume from the step-4 checkpoint: the same final weights as their uninterrupted run."""
    import shutil

    root, flags = setup
    full, resumed = root / "two-full", root / "two-resumed"
    p = run_cli([*flags, "--batch-size", "8", "--save-every", "4", "--output-dir", str(full)], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = full / "checkpoints" / "step-00000004"
    assert (ckpt / "train_state.json").is_file() and (ckpt / "lr_scheduler.pt").is_file()
    assert json.loads((ckpt / "train_state.json").read_text())["step"] == 4
    resumed.mkdir()
    shutil.copy(full / "run_config.json", resumed / "run_config.json")
    p = run_cli([*flags, "--batch-size", "8", "--save-every", "4", "--output-dir", str(resumed), "--resume-from",
                 str(ckpt)], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in " ".join(p.stderr.split())
    a, b = (load_file(d / "model.safetensors") for d in (full, resumed))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)

    # The same checkpoint with one process: refused (its data position counts each process's micro-batches; it
    # used to resume silently, training batches twice at half the global batch).
    from bert_dist.run import main

    reset_accelerate()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*flags, "--batch-size", "8", "--output-dir", str(root / "one-from-two"), "--resume-from", str(ckpt)])
    assert e.value.code == 1 and not (root / "one-from-two").exists()
    assert "written by 2 process(es), this run has 1" in " ".join(capsys.readouterr().err.split())


@pytest.mark.slow
def test_a_one_process_checkpoint_is_refused_by_two_processes(setup, capfd):
    """1 -> 2 processes: one line naming both counts (it was a missing random_states_1.pkl)."""
    from bert_dist.run import main

    root, flags = setup
    reset_accelerate()
    assert main([*flags, "--batch-size", "8", "--max-steps", "2", "--save-every", "2", "--output-dir",
                 str(root / "one-ckpt")]) == 0
    ckpt = root / "one-ckpt" / "checkpoints" / "step-00000002"
    p = run_cli([*flags, "--batch-size", "8", "--output-dir", str(root / "two-from-one"), "--resume-from", str(ckpt)],
                nproc=2)
    assert p.returncode != 0
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "written by 1 process(es), this run has 2" in errors[0], p.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_warn_once(setup):
    """A warning (here: --max-eval-samples cuts the test split) comes from the main process only, not once per
    process."""
    root, flags = setup
    p = run_cli([*flags, "--batch-size", "8", "--max-steps", "2", "--max-eval-samples", "5", "--output-dir",
                 str(root / "warn")], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert " ".join(p.stderr.split()).count("the test predictions cover 5 of its") == 1, p.stderr[-3000:]


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_the_run_at_the_next_step_with_a_checkpoint(setup, tmp_path, nproc):
    """`kill -TERM` of `accelerate launch` (what a scheduler or a user does). With 2 processes the launcher forwards
    it and kills the workers 30 s later: they must agree to stop at the next step, not at the next log step (here
    never). With 1 process the launcher does not forward it and exits: the run hears of it as its launcher's death
    (prctl's death signal), rather than training on, orphaned. Either way a checkpoint is saved, and no results."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, free_port

    root, flags = setup
    out = tmp_path / "o"
    multi = ["--multi_gpu", "--main_process_port", str(free_port())] if nproc > 1 else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "bert_dist" / "run.py"), *flags, "--max-steps", "100000", "--log-every", "100000",
           "--eval-every", "100000", "--output-dir", str(out)]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "parameters," not in log.read_text() and time.time() < deadline and p.poll() is None:
            time.sleep(0.5)  # the model is built: training starts
        time.sleep(3)
        p.send_signal(signal.SIGTERM)
        while "rerun with --resume" not in log.read_text() and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(2)
        text = log.read_text()
        assert "rerun with --resume" in text, text[-3000:]
        saved = [d for d in (out / "checkpoints").iterdir() if (d / "train_state.json").is_file()]
        assert len(saved) == 1 and not (out / "results.json").exists()
        assert json.loads((saved[0] / "train_state.json").read_text())["num_processes"] == nproc
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the launcher's session: its workers too, whatever happened


def test_only_a_launcher_parent_makes_the_run_stop_with_it():
    """The parent-death signal is asked for under a launcher only: a run started from a shell, or nohup, outlives
    the shell, whatever words (an output dir named accelerate_x) its command line holds."""
    from bert_dist.run import launched_by

    for argv in (["/usr/bin/python3", "/venv/bin/accelerate", "launch", "-q", "run.py"], ["accelerate", "launch"],
                 ["/venv/bin/torchrun", "--nproc_per_node", "2", "run.py"],
                 ["python", "-m", "accelerate.commands.launch", "run.py"], ["python3", "-m", "torch.distributed.run"],
                 ["/venv/bin/python", "/venv/bin/accelerate-launch", "run.py"]):
        assert launched_by(argv), argv
    for argv in (["bash", "-c", "nohup python run.py --output-dir accelerate_x &"], ["bash", "train_accelerate.sh"],
                 ["/venv-accelerate/bin/python", "run.py"], ["accelerate", "config"], ["-bash"], []):
        assert not launched_by(argv), argv


FSDP_WORKER = '''
import functools, json, sys, types
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from bert_dist.config import preset
from bert_dist.model import BertForSequenceClassification, BertLayer
from bert_dist.distributed import gather_state_dict

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = BertForSequenceClassification(preset("tiny"), num_labels=2)
full = {k: v.clone() for k, v in model.state_dict().items()}
policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={BertLayer})  # as fsdp.yaml
wrapped = FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
# What accelerate's get_state_dict reads of an Accelerator prepared for FSDP (its FSDP plugin refuses the CPU, so
# the Accelerator itself cannot be built here): the real method, on those attributes.
acc = types.SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False, is_main_process=rank == 0)
acc.get_state_dict = functools.partial(Accelerator.get_state_dict, acc)
# accelerate asks FSDP to offload the gathered weights to the CPU; from CPU tensors that crashes torch 2.13's FSDP1
# (SIGSEGV): off here, where they are on the CPU already.
import torch.distributed.fsdp as fsdp_module
cpu_config = fsdp_module.FullStateDictConfig
fsdp_module.FullStateDictConfig = lambda offload_to_cpu, rank0_only: cpu_config(False, rank0_only)
weights = gather_state_dict(acc, wrapped)  # every rank, as the recipes' save() calls it
ids = torch.randint(5, 100, (2, 8))
with torch.no_grad():  # the next collective every rank meets: the final evaluation
    wrapped(input_ids=ids, attention_mask=torch.ones_like(ids))
if rank == 0:
    same = sorted(weights) == sorted(full) and all(torch.equal(weights[k], full[k]) for k in full)
    print(json.dumps({"same": same, "keys": len(weights)}))
else:
    print(json.dumps({"none": weights is None}))
dist.destroy_process_group()
'''


def test_fsdp_model_save_gathers_every_shard_on_every_process(tmp_path):
    """Under FSDP the saved model is the whole one (not rank 0's shards), and saving it leaves no rank waiting in a
    collective the others skipped (the main process alone calling state_dict() hung, or aborted with gloo's
    "collective mismatch", when the other rank went on to the final evaluation)."""
    import subprocess
    import sys

    from conftest import free_port

    worker = tmp_path / "fsdp_worker.py"
    worker.write_text(FSDP_WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(worker)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert {"none": True} in lines
    assert any(d.get("same") is True and d["keys"] > 20 for d in lines), proc.stdout


@pytest.mark.parametrize("n_train", [37, 45])  # last group one short micro-batch / two micro-batches, one short
def test_grad_accum_equals_one_batch_of_the_group_when_the_epoch_ends_short(setup, n_train):
    """--batch-size 8 --grad-accum 2 is --batch-size 16, also at each epoch's end: the last group, cut short, is the
    mean over its examples (its gradient was k/N of that, and a short micro-batch outweighed its examples)."""
    from bert_dist.run import main

    root, flags = setup
    flags = [*flags[:flags.index("--max-steps")], *flags[flags.index("--max-steps") + 2:]]
    common = [*flags, "--max-train-samples", str(n_train), "--epochs", "2", "--max-grad-norm", "0", "--log-every", "1"]
    outs = []
    for extra in (["--batch-size", "16"], ["--batch-size", "8", "--grad-accum", "2"]):
        out = root / f"accum-{n_train}-{len(extra)}"
        reset_accelerate()
        assert main([*common, *extra, "--output-dir", str(out)]) == 0
        outs.append(out)
    logs = [[json.loads(ln) for ln in (o / "train_log.jsonl").read_text().splitlines()] for o in outs]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == list(range(1, 7))
    # The logged lr is the one the step ran at (no warmup, linear decay over 6 steps), not the next step's.
    assert [r["lr"] for r in logs[0]] == pytest.approx([2e-3 * (6 - s) / 6 for s in range(6)])
    np.testing.assert_allclose([r["grad_norm"] for r in logs[1]], [r["grad_norm"] for r in logs[0]], rtol=1e-4)
    w1, w2 = (load_file(str(o / "model.safetensors")) for o in outs)
    for k in w1:
        np.testing.assert_allclose(w2[k].numpy(), w1[k].numpy(), rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_two_processes_keep_one_model_when_a_short_batch_falls_mid_epoch(setup, tmp_path):
    """--group-by-length puts the epoch's short batch anywhere, on one process only: each process weighed its own
    examples, so the processes' copies of the model drifted apart (only the main one's is saved; the others scored
    their shards of the evaluation). Now: the model the run saved gives the run's own predictions."""
    from bert_dist.run import main

    root, flags = setup
    flags = [*flags[:flags.index("--max-steps")], *flags[flags.index("--max-steps") + 2:]]
    flags = [*flags[:flags.index("--lr")], *flags[flags.index("--lr") + 2:]]
    out = tmp_path / "two"
    p = run_cli([*flags, "--max-train-samples", "45", "--batch-size", "4", "--grad-accum", "2", "--group-by-length",
                 "--epochs", "5", "--lr", "5e-3", "--output-dir", str(out)], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    reset_accelerate()
    data = flags[flags.index("--data-dir") + 1]
    assert main(["--task", "sst2", "--data-dir", data, "--init", str(out), "--eval-only", "--eval-batch-size", "8",
                 "--output-dir", str(tmp_path / "again")]) == 0
    mine, again = predictions(out), predictions(tmp_path / "again")
    np.testing.assert_allclose([r["probabilities"] for r in mine], [r["probabilities"] for r in again], atol=2e-6)

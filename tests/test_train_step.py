"""One training step (train.train_step), profiled on the CPU with torch.profiler: it reads nothing from the device
(no .item(), nonzero, ...: on a GPU each would stall the queue), and its non-finite guard is a few ops whatever the
number of parameter tensors; a non-finite step is skipped whole, with the fused optimizer and without it.

Op counts are the step's top-level aten ops (what the Python side launches; a foreach op is one, as its CUDA kernel
is) minus those of the same forward and backward alone: what the loop itself adds.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from conftest import reset_accelerate
from torch import nn

from bert_dist.config import OptimConfig, preset
from bert_dist.data.collate import PadCollator
from bert_dist.model import BertForSequenceClassification
from bert_dist.optim import build_optimizer, build_scheduler

SYNCS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero"}
# torch's CPU kernel of the fused Adam/AdamW reads each parameter's step count with item(); the CUDA one reads none.
CPU_KERNELS_THAT_READ_SCALARS = {"aten::_fused_adamw_", "aten::_fused_adam_"}


class NaNGradient(torch.autograd.Function):
    """The identity forward; a NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


class Stack(nn.Module):
    """K linear layers over the token ids (as floats), mean-pooled over the real tokens, a 2-way loss: a model with
    no host sync of its own, and as many parameter tensors as wanted (2K + 2)."""

    def __init__(self, k: int, width: int = 16, nan_backward: bool = False):
        super().__init__()
        self.nan_backward = nan_backward
        self.inp = nn.Linear(1, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(k - 1))
        self.out = nn.Linear(width, 2)

    def forward(self, input_ids, attention_mask, labels, token_type_ids=None, scale=None, indices=None,
                cu_seqlens=None):
        x = self.inp(input_ids.unsqueeze(-1).float() / 100)  # (B, T, W)
        if scale is not None:  # a test's way to a NaN loss
            x = x * scale
        if self.nan_backward:
            x = NaNGradient.apply(x)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        m = attention_mask.unsqueeze(-1).float()
        logits = self.out((x * m).sum(1) / m.sum(1))  # (B, 2)
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


def bert(layers: int) -> nn.Module:
    torch.manual_seed(0)
    return BertForSequenceClassification(preset("tiny", vocab_size=60, num_hidden_layers=layers), num_labels=2)


def batches(n: int = 8) -> list[dict[str, torch.Tensor]]:
    """`n` padded batches of 4 (rows of 3 to 9 tokens), from the project's collator; made before any profiling (the
    collator runs on the host, in the DataLoader)."""
    g = torch.Generator().manual_seed(0)
    collate = PadCollator(pad_token_id=0)
    return [collate([{"input_ids": torch.randint(5, 60, (int(k),), generator=g).tolist(), "labels": i % 2}
                     for i, k in enumerate(torch.randint(3, 10, (4,), generator=g))]) for _ in range(n)]


class Loop:
    """What train() builds around train_step, for one model, on a fresh one-process Accelerator."""

    def __init__(self, model: nn.Module, fused: bool | None = None, grad_accum: int = 1):
        from accelerate import Accelerator

        from bert_dist.checkpointing import TrainState
        from bert_dist.train import StepMetrics

        reset_accelerate()
        self.accelerator = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum)
        opt = OptimConfig(lr=1e-3, fused=fused, warmup_steps=0)
        self.model, self.optimizer = self.accelerator.prepare(model, build_optimizer(model, opt, "cpu"))
        self.scheduler = build_scheduler(self.optimizer, opt, 100)
        self.metrics = StepMetrics(accelerator=self.accelerator, out_dir=None, state=TrainState(), log_every=10**9,
                                   num_steps=100)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.batches = iter(batches())
        self.model.train()

    def step(self, batches=None) -> float:
        from bert_dist.train import train_step

        return train_step(accelerator=self.accelerator, model=self.model, optimizer=self.optimizer,
                          scheduler=self.scheduler, params=self.params, micro_batches=batches or self.batches,
                          metrics=self.metrics, max_grad_norm=1.0, full_batch=None)

    def forward_backward(self) -> None:
        from bert_dist.train import forward_backward

        forward_backward(accelerator=self.accelerator, model=self.model, batch=next(self.batches), full_batch=None)
        self.optimizer.zero_grad(set_to_none=True)


def profiled(fn) -> tuple[Counter, Counter]:
    """(top-level aten ops, all aten ops at any depth) that `fn()` runs; the host syncs among the latter are its
    device reads, but for those of a CPU kernel that reads its own CPU scalars."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def top(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return False
            p = p.cpu_parent
        return True

    def in_cpu_kernel(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name in CPU_KERNELS_THAT_READ_SCALARS:
                return True
            p = p.cpu_parent
        return False

    events = [e for e in prof.events() if e.name.startswith("aten::")]
    return (Counter(e.name for e in events if top(e)),
            Counter(e.name for e in events if e.name not in SYNCS or not in_cpu_kernel(e)))


def loop_ops(model: nn.Module, fused: bool | None = None) -> tuple[Counter, Counter, Loop]:
    """The ops a train_step adds to its forward and backward: (top-level, all). Not counted: torch's
    clip_grad_norm_ moves each tensor's norm to the first one's device (`norm.to(device)`), one `aten::to` per
    parameter tensor that launches nothing where they are all on one device."""
    loop = Loop(model, fused)
    loop.step()  # the optimizer's state is made on the first step
    step_top, step_all = profiled(loop.step)
    fb_top, fb_all = profiled(loop.forward_backward)
    added = step_top - fb_top
    del added["aten::to"]
    return added, step_all - fb_all, loop


def n_tensors(loop: Loop) -> int:
    return len(loop.params)


@pytest.mark.parametrize("make, few, many", [(Stack, 1, 16), (bert, 1, 4)], ids=["linear-stack", "bert-tiny"])
def test_the_loop_adds_the_same_ops_whatever_the_number_of_parameter_tensors(make, few, many):
    few_top, few_all, small = loop_ops(make(few))
    many_top, many_all, large = loop_ops(make(many))
    assert n_tensors(large) >= n_tensors(small) + 20
    assert "aten::_fused_adamw_" in few_top  # the default optimizer (OptimConfig.fused) on the CPU
    assert "aten::masked_fill_" not in few_top, few_top  # a guard of one op per parameter tensor
    assert few_top == many_top, (few_top, many_top)
    assert sum(few_top.values()) < 80, few_top
    assert not SYNCS & set(few_all) and not SYNCS & set(many_all), (few_all, many_all)


def bert_batches(recipe: str, padded: bool, n: int = 4) -> list[dict[str, torch.Tensor]]:
    """`n` collated batches of 4 for `recipe`: rows of 3 to 9 tokens (padded) or all of 9 (full)."""
    from bert_dist.data.collate import MLMCollator

    g = torch.Generator().manual_seed(0)
    if recipe == "pretraining":
        collate = MLMCollator(mask_token_id=4, vocab_size=60, special_token_ids=[1, 2, 3], mlm_probability=0.3)
    else:
        collate = PadCollator(pad_token_id=0)
    out = []
    for _ in range(n):
        sizes = torch.randint(3, 10, (4,), generator=g).tolist() if padded else [9] * 4
        out.append(collate([{"input_ids": torch.randint(5, 60, (k,), generator=g).tolist(), "labels": i % 2,
                             "next_sentence_label": i % 2, "token_type_ids": [0] * k} for i, k in enumerate(sizes)]))
    return out


@pytest.mark.parametrize("cpu_kernels", ["auto", "off"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "full"])
@pytest.mark.parametrize("recipe", ["classification", "pretraining"])
def test_a_bert_training_step_reads_nothing_from_the_device(recipe, padded, cpu_kernels):
    """BERT's whole training step (forward on the collated batch's layout, backward, guard, fused AdamW), fine-tuning
    and pretraining, padded and full rows, with the CPU kernels and without: no host sync anywhere in it."""
    from bert_dist import kernels
    from bert_dist.model import BertForPreTraining

    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=60)
    model = BertForSequenceClassification(cfg, num_labels=2) if recipe == "classification" else BertForPreTraining(cfg)
    kernels.apply(model, cpu_kernels, "cpu")
    loop = Loop(model)
    loop.batches = iter(bert_batches(recipe, padded))
    loop.step()
    _, every = profiled(loop.step)
    assert "aten::_fused_adamw_" in every and "aten::scaled_dot_product_attention" in every or cpu_kernels == "auto"
    assert not SYNCS & set(every), {k: every[k] for k in SYNCS & set(every)}


def test_a_training_step_reads_nothing_from_the_device():
    """A model with no sync of its own: the whole step, forward and backward included, has none."""
    loop = Loop(Stack(4))
    loop.step()
    _, every = profiled(loop.step)
    assert "aten::_fused_adamw_" in every
    assert not SYNCS & set(every), {k: every[k] for k in SYNCS & set(every)}


def snapshot(loop: Loop) -> list[torch.Tensor]:
    opt = loop.optimizer.optimizer
    return [t.detach().clone() for p in loop.params for t in (p, *opt.state[p].values())]


@pytest.mark.parametrize("fused", [None, False], ids=["fused", "unfused"])
def test_a_nonfinite_step_is_skipped_whole(fused):
    """Weights, Adam's moments and its step count stay as they were (a zero-gradient step would still decay the
    moments and move the weights by their momentum); the schedule counts the step; the step is counted as bad. The
    fused optimizer does it on the device; any other reads the flag on the host: one sync per step."""
    loop = Loop(Stack(3), fused)
    assert bool(loop.optimizer.optimizer.defaults["fused"]) is (fused is None)
    loop.step()
    loop.step()
    before, lr_before = snapshot(loop), loop.scheduler.get_last_lr()[0]
    good = next(loop.batches)
    bad = {**good, "scale": torch.tensor(float("nan"))}  # a NaN loss and NaN gradients
    _, every = profiled(lambda: loop.step(iter([bad])))
    after = snapshot(loop)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert loop.scheduler.get_last_lr()[0] != lr_before
    assert int(loop.metrics.bad_run) == 1 and int(loop.metrics.bad_steps) == 1
    assert bool(SYNCS & set(every)) is (fused is False)
    loop.step(iter([good]))  # and the next good step updates again
    assert not all(torch.equal(a, b) for a, b in zip(after, snapshot(loop)))
    assert int(loop.metrics.bad_run) == 0 and all(torch.isfinite(p).all() for p in loop.params)


def test_train_step_takes_the_micro_batches_of_one_optimizer_step():
    """With --grad-accum 3 a step takes three micro-batches from the iterator, and leaves the rest."""
    loop = Loop(Stack(2), grad_accum=3)
    it = iter(batches(7))
    for _ in range(2):
        loop.step(it)
    assert len(list(it)) == 1


def test_fp16_steps_the_gradient_scaler_skips_are_bad_steps(tmp_path):
    """fp16 with a backward that yields NaN every step (the loss itself finite): the gradient scaler skips every step
    and halves its scale, and --max-bad-steps stops the run; it used to train on, skipping every step while the scale
    sank toward 0. A CPU GradScaler stands in for CUDA's (accelerate makes none on the CPU)."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from bert_dist.config import DataConfig, RunConfig, TrainConfig
    from bert_dist.train import TrainingDiverged, prepare_training

    reset_accelerate()
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.scaler = torch.amp.GradScaler("cpu")  # before prepare: the prepared optimizer steps through it
    cfg = RunConfig(data=DataConfig(batch_size=4), optim=OptimConfig(lr=1e-3, warmup_steps=0),
                    train=TrainConfig(max_steps=40, max_bad_steps=5, log_every=1))
    rows = [{"input_ids": list(range(5, 5 + n)), "labels": n % 2} for n in range(3, 19)]
    loader = DataLoader(rows, batch_size=4, collate_fn=PadCollator(), generator=torch.Generator().manual_seed(0))
    run = prepare_training(cfg, accelerator, Stack(2, nan_backward=True), loader, {}, tmp_path)
    accelerator.native_amp = True  # after prepare (no fp16 autocast on the CPU): clipping unscales the gradients
    with pytest.raises(TrainingDiverged, match="5 optimizer steps in a row"):
        run.fit(accelerator=accelerator, cfg=cfg, out_dir=tmp_path, eval_fn=None, on_set_epoch=None,
                save=lambda: None)
    logged = [json.loads(ln) for ln in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in logged] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) for r in logged)
    assert accelerator.scaler.get_scale() == 2.0**16 / 2**5


def test_training_time_leaves_out_evaluations_and_only_them(tmp_path):
    """results' train_seconds (and the log's throughput) is the time of the steps, evaluations left out: an evaluation
    between two log lines used to restart the window's clock, dropping the steps before it as well."""
    import time

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from torch.utils.data import DataLoader

    from bert_dist.config import DataConfig, RunConfig, TrainConfig
    from bert_dist.train import prepare_training

    class Slow(Stack):
        def forward(self, *args, **kw):
            time.sleep(0.05)  # a training step's compute
            return super().forward(*args, **kw)

    def evaluate(step: int) -> dict[str, float]:
        time.sleep(0.3)
        return {"accuracy": 0.5}

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    cfg = RunConfig(data=DataConfig(batch_size=4), train=TrainConfig(max_steps=10, log_every=100, eval_every=1))
    rows = [{"input_ids": list(range(5, 5 + n)), "labels": n % 2} for n in range(3, 19)]
    loader = DataLoader(rows, batch_size=4, collate_fn=PadCollator(), generator=torch.Generator().manual_seed(0))
    run = prepare_training(cfg, accelerator, Slow(2), loader, {}, tmp_path)
    results = run.fit(accelerator=accelerator, cfg=cfg, out_dir=tmp_path, eval_fn=evaluate, on_set_epoch=None,
                      save=lambda: None)
    assert 10 * 0.05 <= results["train_seconds"] < 10 * 0.05 + 1.5, results  # the evaluations took 3 s


PROFILE_WORKER = r'''
import json, os, sys
import torch
from accelerate import Accelerator
from torch.profiler import ProfilerActivity, profile

from bert_dist import kernels
from bert_dist.checkpointing import TrainState
from bert_dist.config import OptimConfig, preset
from bert_dist.data.collate import MLMCollator, PadCollator
from bert_dist.model import BertForPreTraining, BertForSequenceClassification
from bert_dist.optim import build_optimizer, build_scheduler
from bert_dist.train import StepMetrics, train_step

recipe, out = sys.argv[1], sys.argv[2]
accelerator = Accelerator()
torch.manual_seed(0)
cfg = preset("tiny", vocab_size=60)
model = BertForSequenceClassification(cfg, num_labels=2) if recipe == "classification" else BertForPreTraining(cfg)
kernels.apply(model, "auto", accelerator.device)
opt = OptimConfig(lr=1e-3, warmup_steps=0)
model, optimizer = accelerator.prepare(model, build_optimizer(model, opt, accelerator.device.type))
scheduler = build_scheduler(optimizer, opt, 100)
metrics = StepMetrics(accelerator=accelerator, out_dir=None, state=TrainState(), log_every=10**9, num_steps=100)
collate = PadCollator(0) if recipe == "classification" else MLMCollator(4, 60, [1, 2, 3], mlm_probability=0.3)
g = torch.Generator().manual_seed(accelerator.process_index)
batches = iter([collate([{"input_ids": torch.randint(5, 60, (k,), generator=g).tolist(), "labels": k % 2,
                          "next_sentence_label": k % 2, "token_type_ids": [0] * k}
                         for k in torch.randint(3, 10, (4,), generator=g).tolist()]) for _ in range(3)])
params = [p for p in model.parameters() if p.requires_grad]
model.train()
step = lambda: train_step(accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, params=params,
                          micro_batches=batches, metrics=metrics, max_grad_norm=1.0, full_batch=None)
step()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    step()
kernel_reads = {"aten::_fused_adamw_", "aten::_fused_adam_"}  # torch's CPU kernel reads its own step counts

def in_kernel(e):
    p = e.cpu_parent
    while p is not None:
        if p.name in kernel_reads:
            return True
        p = p.cpu_parent
    return False

names = [e.name for e in prof.events() if e.name.startswith("aten::") and not in_kernel(e)]
with open(f"{out}.{accelerator.process_index}", "w") as fh:
    json.dump({"ops": sorted(set(names)), "world": accelerator.num_processes}, fh)
os._exit(0)  # as run.py leaves a multi-process run: a gloo thread alive at interpreter teardown can abort it
'''


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["classification", "pretraining"])
def test_a_two_process_training_step_reads_nothing_from_the_device(tmp_path, recipe):
    """Two gloo processes (DDP's gradient all-reduce in the backward): each one's profiled training step has no
    host sync, fine-tuning and pretraining, on padded batches with the CPU kernels."""
    import os
    import subprocess
    import sys

    from conftest import free_port

    worker = tmp_path / "worker.py"
    worker.write_text(PROFILE_WORKER)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(worker), recipe, str(tmp_path / "ops")]
    p = subprocess.run(cmd, env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"ops.{rank}").read_text())
        assert seen["world"] == 2 and "aten::_fused_adamw_" in seen["ops"]
        assert not SYNCS & set(seen["ops"]), (rank, SYNCS & set(seen["ops"]))

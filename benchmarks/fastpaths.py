"""Each fast path of ours switched off and on in the same run: `python -m benchmarks fastpaths` (and `compile`).

- cpu kernels: `--cpu-kernels off` vs `auto` (bert_dist.kernels: every CPU kernel at once), then each kernel alone
  against none: onednn projections (`OneDNNLinear`: fp32 projections through oneDNN's GEMM, and bf16 inference on
  kept, prepacked bf16 weights), cpu dropout (`CpuDropout`: its own keep mask), attention in chunks
  (`CpuSelfAttention`: bf16 or dropout attention as matmuls and a softmax on a few rows at a time).
- unpad: a padded batch with its layout (the encoder on real tokens only, `bert_dist.padding`) vs without (every
  position computed).
- last layer on read rows: the last layer computes only the rows its head reads (`keep`: [CLS] for
  classification, [CLS] + the masked positions for pretraining) vs every row (what transformers computes).
- varlen attention: one attention call (forward + backward) over a padded batch's real tokens, as torch's nested
  jagged tensors with SDPA vs re-padded to (B, T) for SDPA with a key mask (what the model does).
- adamw: one AdamW step over the model's parameters: torch's CPU default (a per-tensor loop),
  `foreach=True`, and `fused=True` (what `build_optimizer` picks on CUDA and the CPU).
- compile (a suite of its own, minutes of compiling): `torch.compile(model)` vs eager, the first
  (compiling) step's time and the steady-state step.

"off" is the baseline, "on" the fast path; speed-up = off time / on time. Neither is in the default suites.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from benchmarks.harness import fmt, interleave, print_table, progress, ratio, synchronizer, times
from benchmarks.sources import Options, Source
from benchmarks.speed import forward_fn, make_batch, ours_batch, train_step_fn, without_layout
from bert_dist import kernels
from bert_dist import model as M
from bert_dist.config import OptimConfig, preset
from bert_dist.optim import build_optimizer, param_groups
from bert_dist.padding import rows_at

KERNELS = ("OneDNNLinear", "CpuDropout", "CpuSelfAttention")


def _switched(fn, switch):
    """fn run inside the context `switch()` (a fresh one per call)."""

    def run():
        with switch():
            return fn()

    return run


@contextlib.contextmanager
def _kernels(model: torch.nn.Module, only: tuple[str, ...] | None) -> Iterator[None]:
    """The model with these CPU kernels only (None: every one; (): none) for the duration, then all of them."""
    device = next(model.parameters()).device
    kernels.apply(model, "auto" if only != () else "off", device, only=only)
    try:
        yield
    finally:
        kernels.apply(model, "auto", device)


@contextlib.contextmanager
def _replaced(owner: object, name: str, value: object) -> Iterator[None]:
    """owner.name set to value for the duration, then restored."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


_bert_forward = M.BertModel.forward


def _every_row_forward(self, input_ids, attention_mask=None, token_type_ids=None, keep=None, indices=None,
                       cu_seqlens=None):
    x, pooled = _bert_forward(self, input_ids, attention_mask, token_type_ids, None, indices, cu_seqlens)
    return (x if keep is None else rows_at(x, keep)), pooled


def every_row():
    """BertModel.forward given no `keep`: the last layer computes every row, the heads then pick theirs."""
    return _replaced(M.BertModel, "forward", _every_row_forward)


def _varlen_attention_fns(B: int, T: int, nh: int, hs: int, device: torch.device) -> dict:
    """One attention forward + backward over the real tokens of a padded (B, T) batch (lengths T/4 .. T): nested
    jagged tensors with SDPA ("on") vs re-padded with a key mask ("off")."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(1, T // 4), T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None] < lengths[:, None]
    index = mask.view(-1).nonzero().squeeze(1).to(device)
    offsets = torch.zeros(B + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    offsets, key_mask = offsets.to(device), mask[:, None, None, :].to(device)
    n = int(lengths.sum())
    q, k, v = (torch.randn(n, nh, hs, generator=g).to(device).requires_grad_() for _ in range(3))

    def jagged():
        nest = lambda t: torch.nested.nested_tensor_from_jagged(t, offsets=offsets, max_seqlen=T).transpose(1, 2)
        F.scaled_dot_product_attention(nest(q), nest(k), nest(v)).transpose(1, 2).values().sum().backward()

    def repadded():
        def pad(t):
            return t.new_zeros(B * T, nh, hs).index_copy(0, index, t).view(B, T, nh, hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=key_mask)
        y.transpose(1, 2).reshape(B * T, nh, hs).index_select(0, index).sum().backward()

    return {"off": repadded, "on": jagged}


def fastpaths_suite(opts: Options, src: Source | None = None) -> list[dict]:
    device, sync = opts.device, synchronizer(opts.device)
    name = opts.presets[0]
    cfg = preset(name)
    rows: list[dict] = []

    def add(path: str, what: str, shape: str, precision: str, res: dict, unit_s: float = 1.0) -> None:
        off, on = res["off"], res["on"]
        rows.append({"path": path, "what": what, "shape": shape, "precision": precision,
                     "off_ms": 1e3 * off.median() / unit_s, "on_ms": 1e3 * on.median() / unit_s,
                     "speedup": ratio(off.median(), on.median()),
                     "cpu_time_speedup": ratio(off.median("cpu"), on.median("cpu")), "rounds": len(on.wall)})
        progress(rows[-1])

    def off_on(path, what, shape, precision, fn, switch, on_switch=None):
        fns = {"off": _switched(fn, switch), "on": _switched(fn, on_switch) if on_switch else fn}
        add(path, what, shape, precision, interleave(fns, opts.rounds, opts.warmup, sync))

    torch.manual_seed(0)
    model = M.BertForSequenceClassification(cfg, num_labels=2).to(device)
    kernels.apply(model, "auto", device)
    optimizer = build_optimizer(model, OptimConfig(), device.type)
    on_cpu = device.type == "cpu"
    for B, T in opts.shapes:
        for precision in opts.precisions:
            for inputs in opts.inputs:
                batch = ours_batch(make_batch(cfg, B, T, inputs, "classification", device))
                shape = f"{B}x{T} {inputs}"
                model.train()
                step = train_step_fn(model, optimizer, batch, device, precision, sync)
                model.eval()
                fwd = forward_fn(model, batch, device, precision)
                for what, fn, train in (("train step", step, True), ("inference", fwd, False)):
                    model.train(train)
                    if on_cpu:
                        off_on("cpu kernels", what, shape, precision, fn, lambda: _kernels(model, ()))
                        for k in KERNELS:
                            off_on(f"cpu kernels: {k} alone", what, shape, precision, fn,
                                   lambda: _kernels(model, ()), lambda k=k: _kernels(model, (k,)))
                    if inputs == "padded":
                        plain = train_step_fn(model, optimizer, without_layout(batch), device, precision, sync) \
                            if train else forward_fn(model, without_layout(batch), device, precision)
                        add("unpad", what, shape, precision,
                            interleave({"off": plain, "on": fn}, opts.rounds, opts.warmup, sync))
                    else:
                        off_on("last layer on read rows", what, shape, precision, fn, every_row)
        add("varlen attention", "one layer's attention fwd+bwd", f"{opts.shapes[0][0]}x{opts.shapes[0][1]} padded",
            "fp32", interleave(_varlen_attention_fns(*opts.shapes[0], cfg.num_attention_heads, cfg.head_dim, device),
                               opts.rounds, opts.warmup, sync))

    # last layer on read rows, pretraining: [CLS] + the ~15% masked positions.
    torch.manual_seed(0)
    pt_model = M.BertForPreTraining(cfg).to(device).train()
    kernels.apply(pt_model, "auto", device)
    pt_optimizer = build_optimizer(pt_model, OptimConfig(), device.type)
    for B, T in opts.shapes:
        for precision in opts.precisions:
            batch = ours_batch(make_batch(cfg, B, T, "full", "pretraining", device))
            step = train_step_fn(pt_model, pt_optimizer, batch, device, precision, sync)
            off_on("last layer on read rows", "pretrain step", f"{B}x{T} full", precision, step, every_row)
    del pt_model, pt_optimizer

    # adamw: the optimizer step alone, on gradients of the model's shapes.
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    kinds = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    if device.type == "cuda":
        kinds.pop("loop")  # torch's CUDA default is already foreach
    optims = {k: torch.optim.AdamW(param_groups(model, 0.01), lr=1e-5, **kw) for k, kw in kinds.items()}
    res = interleave({k: o.step for k, o in optims.items()}, opts.rounds, opts.warmup, sync)
    base, size = next(iter(kinds)), f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params"
    for k in list(kinds)[1:]:
        add("adamw", f"optimizer step: {base} -> {k}", size, "fp32", {"off": res[base], "on": res[k]})
    del optims

    _print(f"fastpaths: each switched off and on ({name})", rows, opts)
    return rows


def compile_suite(opts: Options, src: Source | None = None) -> list[dict]:
    rows = _compile_rows(opts, preset(opts.presets[0]), synchronizer(opts.device))
    for r in rows:
        progress(r)
    _print(f"compile: torch.compile vs eager ({opts.presets[0]}, BertForSequenceClassification)", rows, opts)
    return rows


def _print(title: str, rows: list[dict], opts: Options) -> None:
    device = opts.device
    print_table(
        title,
        ["path", "measured", "shape", "precision", "off ms", "on ms", "speed-up"] + (
            ["CPU-time x"] if device.type == "cpu" else []),
        [[r["path"], r["what"], r["shape"], r["precision"], fmt(r["off_ms"]), fmt(r["on_ms"]), times(r["speedup"])]
         + ([times(r["cpu_time_speedup"])] if device.type == "cpu" else []) for r in rows],
        note=f"median of {opts.rounds} interleaved rounds; speed-up = off / on",
    )


def _compile_rows(opts: Options, cfg, sync) -> list[dict]:
    """torch.compile on the first shape and precision, full rows: compile time, then eager vs compiled steps."""
    device, (B, T), precision = opts.device, opts.shapes[0], opts.precisions[0]
    batch = ours_batch(make_batch(cfg, B, T, "full", "classification", device))
    models, steps = {}, {}
    for k in ("off", "on"):
        torch.manual_seed(0)
        m = M.BertForSequenceClassification(cfg, num_labels=2).to(device).train()
        models[k] = torch.compile(m) if k == "on" else m
        steps[k] = train_step_fn(models[k], build_optimizer(m, OptimConfig(), device.type), batch, device,
                                 precision, sync)
    t0 = time.perf_counter()
    steps["on"]()  # compiles forward and backward
    sync()
    first = time.perf_counter() - t0
    res = interleave(steps, opts.rounds, opts.warmup, sync)
    return [
        {"path": "compile", "what": "first step (compiles)", "shape": f"{B}x{T} full", "precision": precision,
         "off_ms": 1e3 * res["off"].median(), "on_ms": 1e3 * first, "speedup": ratio(res["off"].median(), first),
         "cpu_time_speedup": float("nan"), "rounds": 1},
        {"path": "compile", "what": "train step", "shape": f"{B}x{T} full", "precision": precision,
         "off_ms": 1e3 * res["off"].median(), "on_ms": 1e3 * res["on"].median(),
         "speedup": ratio(res["off"].median(), res["on"].median()),
         "cpu_time_speedup": ratio(res["off"].median("cpu"), res["on"].median("cpu")), "rounds": opts.rounds},
    ]

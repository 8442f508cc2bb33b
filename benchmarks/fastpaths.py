"""Each fast path of ours switched off and on in the same run: `python -m benchmarks fastpaths` (and `compile`).

- last layer on read rows: the last layer computes only the rows its head reads (`keep`: [CLS] for
  classification, [CLS] + the masked positions for pretraining) vs every row (what transformers computes).
- dropout attention: training on the CPU, attention with dropout as scores/softmax/dropout/matmul (`model.attend`)
  vs SDPA with dropout_p (which leaves its fused CPU kernel for its reference path when dropout is on). In bf16
  only since session 5 (fp32 measured 0.96x - 0.97x and calls SDPA): an fp32 row compares SDPA with SDPA.
- attention by rows: bf16 inference on the CPU, attention as bf16 matmuls and a softmax on a few batch rows at a
  time, each row over its real keys only (`model._attend_in_chunks`) vs SDPA (its CPU flash kernel).
- onednn matmul: fp32 projections on the CPU through oneDNN's linear (`model.linear`, `--cpu-matmul auto`) vs
  F.linear (`--cpu-matmul torch`: MKL in the x86 wheels). In bf16 inference, `model.Linear`'s kept bf16 weight
  copies through oneDNN's linear vs autocast's F.linear. bf16 training stays on F.linear: oneDNN's linear measured
  0.99x there (session 5).
- unpad: the encoder on real tokens only (`model.Unpadding`, CPU) vs the padded encoder.
- no mask: on full rows, no attention mask at all (on the CPU knowing it costs no sync; transformers drops
  it too, after a host sync) vs our all-True mask. Not in the model (no gain measured): a variant here.
- adamw: one AdamW step over the model's parameters: torch's CPU default (a per-tensor loop),
  `foreach=True`, and `fused=True` (what `build_optimizer` picks on CUDA and the CPU).
- qkv: one projection on the concatenated query/key/value weights (`torch.cat` per forward) vs three.
  Not in the model (no gain measured): the variant lives here so the measurement can be repeated.
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
from benchmarks.speed import forward_fn, make_batch, padded_encoder, train_step_fn
from bert_dist import model as M
from bert_dist.config import OptimConfig, preset
from bert_dist.optim import build_optimizer, param_groups

_self_attention_forward = M.BertSelfAttention.forward


def _fused_qkv_forward(self: M.BertSelfAttention, x: torch.Tensor, mask: torch.Tensor | None,
                       unpad: M.Unpadding | None = None, xq: torch.Tensor | None = None) -> torch.Tensor:
    """BertSelfAttention.forward with one (H, 3H) projection built from the three weights each call (not in a last
    layer that runs on its head's rows only: there queries and keys come from different rows)."""
    assert unpad is None, "the qkv variant is measured on the padded path"
    if xq is not None:
        return _self_attention_forward(self, x, mask, unpad, xq)
    B, T, H = x.shape
    w = torch.cat([self.query.weight, self.key.weight, self.value.weight])  # (3H, H)
    b = torch.cat([self.query.bias, self.key.bias, self.value.bias])
    q, k, v = F.linear(x, w, b).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0)
    return y.transpose(1, 2).reshape(B, T, H)


def _switched(fn, switch):
    """fn run inside the context `switch()` (a fresh one per call)."""

    def run():
        with switch():
            return fn()

    return run


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


def _unmasked_forward(self, input_ids, attention_mask=None, token_type_ids=None, keep=None):
    if attention_mask is not None and attention_mask.device.type == "cpu" and bool(attention_mask.all()):
        attention_mask = None
    return _bert_forward(self, input_ids, attention_mask, token_type_ids, keep)


def _every_row_forward(self, input_ids, attention_mask=None, token_type_ids=None, keep=None):
    x, pooled = _bert_forward(self, input_ids, attention_mask, token_type_ids)
    return (x if keep is None else M.rows_at(x, keep)), pooled


def unmasked_full_rows():
    """BertModel.forward given no attention mask when the batch has no padding (CPU)."""
    return _replaced(M.BertModel, "forward", _unmasked_forward)


def every_row():
    """BertModel.forward given no `keep`: the last layer computes every row, the heads then pick theirs."""
    return _replaced(M.BertModel, "forward", _every_row_forward)


def sdpa_always():
    """`model.attend` replaced by SDPA with dropout_p, what transformers' sdpa attention calls (off for both the
    dropout-attention and the attention-by-rows paths)."""
    return _replaced(M, "attend", lambda q, k, v, mask, p: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                         dropout_p=p))


def torch_matmul():
    """`--cpu-matmul torch`: every projection through F.linear."""
    return _replaced(M, "_cpu_matmul", {"mode": "torch", "onednn": False})


def _projection_fn(m: int, k: int, n: int):
    """One `model.linear` forward and backward: x (m, k), weight (n, k), bias (n,)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g, requires_grad=True)
    w, b = torch.randn(n, k, generator=g, requires_grad=True), torch.randn(n, generator=g, requires_grad=True)
    dy = torch.randn(m, n, generator=g)

    def run():
        torch.autograd.grad(M.linear(x, w, b), (x, w, b), dy)

    return run


def fused_qkv():
    return _replaced(M.BertSelfAttention, "forward", _fused_qkv_forward)


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

    torch.manual_seed(0)
    model = M.BertForSequenceClassification(cfg, num_labels=2).to(device)
    optimizer = build_optimizer(model, OptimConfig(), device.type)
    for B, T in opts.shapes:
        for precision in opts.precisions:
            # unpad: only a batch with padding takes the unpadded path (a full one is never touched).
            if device.type == "cpu":
                batch = make_batch(cfg, B, T, "padded", "classification", device)
                model.train()
                step = train_step_fn(model, optimizer, batch, device, precision, sync)
                add("unpad", "train step", f"{B}x{T} padded", precision,
                    interleave({"off": _switched(step, padded_encoder), "on": step}, opts.rounds, opts.warmup, sync))
                model.eval()
                fwd = forward_fn(model, batch, device, precision)
                add("unpad", "inference", f"{B}x{T} padded", precision,
                    interleave({"off": _switched(fwd, padded_encoder), "on": fwd}, opts.rounds, opts.warmup, sync))
            # qkv, on full rows (the padded path, where the projections see (B, T, H)).
            batch = make_batch(cfg, B, T, "full", "classification", device)
            model.train()
            step = train_step_fn(model, optimizer, batch, device, precision, sync)
            add("last layer on read rows", "train step", f"{B}x{T} full", precision,
                interleave({"off": _switched(step, every_row), "on": step}, opts.rounds, opts.warmup, sync))
            if device.type == "cpu" and precision == "fp32":
                for k, n in ((cfg.hidden_size, cfg.intermediate_size), (cfg.intermediate_size, cfg.hidden_size)):
                    proj = _projection_fn(B * T, k, n)
                    add("onednn matmul", f"one projection fwd+bwd, ({B * T}, {k}) -> {n}", f"{B}x{T}", precision,
                        interleave({"off": _switched(proj, torch_matmul), "on": proj}, opts.rounds, opts.warmup,
                                   sync))
                add("onednn matmul", "train step", f"{B}x{T} full", precision,
                    interleave({"off": _switched(step, torch_matmul), "on": step}, opts.rounds, opts.warmup, sync))
            if device.type == "cpu":
                add("dropout attention", "train step", f"{B}x{T} full", precision,
                    interleave({"off": _switched(step, sdpa_always), "on": step}, opts.rounds, opts.warmup, sync))
                add("no mask (not kept)", "train step", f"{B}x{T} full", precision,
                    interleave({"off": step, "on": _switched(step, unmasked_full_rows)}, opts.rounds, opts.warmup,
                               sync))
            add("qkv (not kept)", "train step", f"{B}x{T} full", precision,
                interleave({"off": step, "on": _switched(step, fused_qkv)}, opts.rounds, opts.warmup, sync))
            model.eval()
            fwd = forward_fn(model, batch, device, precision)
            add("last layer on read rows", "inference", f"{B}x{T} full", precision,
                interleave({"off": _switched(fwd, every_row), "on": fwd}, opts.rounds, opts.warmup, sync))
            if device.type == "cpu" and precision == "bf16":
                add("attention by rows", "inference", f"{B}x{T} full", precision,
                    interleave({"off": _switched(fwd, sdpa_always), "on": fwd}, opts.rounds, opts.warmup, sync))
                padded_fwd = forward_fn(model, make_batch(cfg, B, T, "padded", "classification", device), device,
                                        precision)
                add("attention by rows", "inference", f"{B}x{T} padded", precision,
                    interleave({"off": _switched(padded_fwd, sdpa_always), "on": padded_fwd}, opts.rounds,
                               opts.warmup, sync))
            if device.type == "cpu":  # bf16: the kept bf16 weight copies (`model.Linear`)
                add("onednn matmul", "inference", f"{B}x{T} full", precision,
                    interleave({"off": _switched(fwd, torch_matmul), "on": fwd}, opts.rounds, opts.warmup, sync))
            if device.type == "cpu":
                add("no mask (not kept)", "inference", f"{B}x{T} full", precision,
                    interleave({"off": fwd, "on": _switched(fwd, unmasked_full_rows)}, opts.rounds, opts.warmup,
                               sync))
            add("qkv (not kept)", "inference", f"{B}x{T} full", precision,
                interleave({"off": fwd, "on": _switched(fwd, fused_qkv)}, opts.rounds, opts.warmup, sync))

    # last layer on read rows, pretraining: [CLS] + the ~15% masked positions.
    torch.manual_seed(0)
    pt_model = M.BertForPreTraining(cfg).to(device).train()
    pt_optimizer = build_optimizer(pt_model, OptimConfig(), device.type)
    for B, T in opts.shapes:
        for precision in opts.precisions:
            batch = make_batch(cfg, B, T, "full", "pretraining", device)
            step = train_step_fn(pt_model, pt_optimizer, batch, device, precision, sync)
            add("last layer on read rows", "pretrain step", f"{B}x{T} full", precision,
                interleave({"off": _switched(step, every_row), "on": step}, opts.rounds, opts.warmup, sync))
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
    batch = make_batch(cfg, B, T, "full", "classification", device)
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

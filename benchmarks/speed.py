"""Model speed side by side with transformers: training step, inference, pretraining, and end to end.

Both sides get the same random weights (ours, loaded into transformers' model), the same batch, the
same precision and, for training, the same AdamW hyper-parameters and parameter groups. Ours is built
as a run builds it (`build_optimizer`); the reference is `torch.optim.AdamW` with torch's defaults, as
a hand-written loop or the accelerate examples make it. (transformers' Trainer picks the fused kernel
itself since torch 2.8, `optim="adamw_torch_fused"`: the optimizer column shows what that part is worth.)

Shape legend: B batch size, T sequence length.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.harness import Samples, fmt, interleave, print_table, progress, ratio, synchronizer, times
from benchmarks.sources import Options, Source
from bert_dist import kernels
from bert_dist.config import BertConfig, OptimConfig, preset
from bert_dist.data.collate import masked_positions
from bert_dist.model import BertForPreTraining, BertForSequenceClassification
from bert_dist.optim import build_optimizer, param_groups
from bert_dist.padding import layout_of
from bert_dist.perf import flops_per_token, mfu, peak_flops

REF = "transformers"


# ---------------------------------------------------------------------------------------------
# Shared pieces


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


LAYOUT = ("indices", "cu_seqlens")
TARGETS = ("labels", "next_sentence_label", "masked_labels")


def ours_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch as our collators make it (transformers' keys in `batch`): with the real tokens' layout, and the
    pretraining labels (B, T) as the masked positions."""
    out = {k: v for k, v in batch.items() if k != "labels" or v.dim() == 1}
    out.update({k: v.to(batch["input_ids"].device) for k, v in layout_of(batch["attention_mask"].cpu()).items()})
    if "labels" in batch and batch["labels"].dim() == 2:
        labels = batch["labels"]
        out.update(masked_positions(labels != -100, labels))
    return out


def without_layout(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without its layout: our encoder then runs padded, every position computed (as transformers')."""
    return {k: v for k, v in batch.items() if k not in LAYOUT}


def model_pair(cfg: BertConfig, head: str, device: torch.device, seed: int = 0,
               cpu_kernels: str = "auto") -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours (with --cpu-kernels as given) and transformers' model (attn_implementation="sdpa") holding the same
    random weights."""
    import transformers

    torch.manual_seed(seed)
    if head == "classification":
        ours, ref_cls = BertForSequenceClassification(cfg, num_labels=2), transformers.BertForSequenceClassification
    else:
        ours, ref_cls = BertForPreTraining(cfg), transformers.BertForPreTraining
    fields = {k: v for k, v in cfg.to_dict().items() if k != "classifier_dropout"}
    ref = ref_cls(transformers.BertConfig(**fields, num_labels=2, attn_implementation="sdpa"))
    ref.load_state_dict(ours.state_dict(), strict=False)  # strict=False: transformers' tied aliases
    theirs = ref.state_dict()
    for k, v in ours.state_dict().items():  # a silent miss would time two different models
        assert torch.equal(theirs[k], v), f"{k} did not load into the reference"
    kernels.apply(ours, cpu_kernels, device)
    return ours.to(device), ref.to(device)


def baseline_classifier(path: Path, cfg: BertConfig, like: torch.nn.Module) -> torch.nn.Module:
    """BertForSequenceClassification from another version of bert_dist/model.py at `path`, holding `like`'s weights
    (it must take the same parameter names)."""
    spec = importlib.util.spec_from_file_location("bert_dist_baseline_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    model = module.BertForSequenceClassification(cfg, num_labels=2)
    model.load_state_dict(like.state_dict())
    return model.to(next(like.parameters()).device)


def reference_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """The same AdamW settings and groups as ours, with torch's default implementation choice."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps)


def make_batch(cfg: BertConfig, B: int, T: int, inputs: str, head: str, device: torch.device,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Random (B, T) sentence pairs. inputs="full": every token real; "padded": row i has a length drawn
    uniformly from [T/4, T] (the first row has T) and [PAD] after it, as a pad-to-max_length pipeline gives.

    Classification adds labels (B,); pretraining adds labels (B, T) (15% of real tokens, -100 elsewhere)
    and next_sentence_label (B,).
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(1000, cfg.vocab_size // 2), cfg.vocab_size, (B, T), generator=g)
    lengths = torch.full((B,), T)
    if inputs == "padded":
        lengths = torch.randint(max(1, T // 4), T + 1, (B,), generator=g)
        lengths[0] = T
    pos = torch.arange(T)[None]
    mask = (pos < lengths[:, None]).long()
    batch = {"input_ids": ids.masked_fill(mask == 0, cfg.pad_token_id), "attention_mask": mask,
             "token_type_ids": ((pos >= lengths[:, None] // 2) & (mask == 1)).long()}
    if head == "classification":
        batch["labels"] = torch.randint(0, 2, (B,), generator=g)
    else:
        chosen = (torch.rand(B, T, generator=g) < 0.15) & (mask == 1)
        chosen[:, 1] = True  # at least one masked token per row
        batch["labels"] = torch.where(chosen, ids, -100)
        batch["next_sentence_label"] = torch.randint(0, 2, (B,), generator=g)
    return {k: v.to(device) for k, v in batch.items()}


def train_step_fn(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                  device: torch.device, precision: str, sync: Callable[[], None]) -> Callable[[], dict[str, float]]:
    """One optimizer step: forward + backward, then AdamW; reports the two phases' seconds."""

    def step() -> dict[str, float]:
        t0 = time.perf_counter()
        with autocast(device, precision):
            loss = model(**batch)["loss"]  # transformers' ModelOutput is a dict too
        loss.backward()
        sync()
        t1 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return {"fwd_bwd": t1 - t0, "optim": time.perf_counter() - t1}

    return step


def forward_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
               precision: str) -> Callable[[], None]:
    inputs = {k: v for k, v in batch.items() if k not in TARGETS}

    def forward() -> None:
        with torch.inference_mode(), autocast(device, precision):
            model(**inputs)

    return forward


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _speedups(res: dict[str, Samples], device: torch.device) -> dict[str, float]:
    """Reference time / our time (> 1: ours is faster), by wall clock and, on the CPU, by CPU time."""
    out = {"speedup": ratio(res[REF].median(), res["ours"].median())}
    if device.type == "cpu":
        out["cpu_time_speedup"] = ratio(res[REF].median("cpu"), res["ours"].median("cpu"))
    return out


# ---------------------------------------------------------------------------------------------
# Suites


def step_suite(opts: Options, src: Source | None = None) -> list[dict]:
    """Forward + backward + AdamW step at fixed shapes: BertForSequenceClassification, ours vs transformers."""
    device, sync, rows = opts.device, synchronizer(opts.device), []
    for name in opts.presets:
        cfg = preset(name)
        ours, ref = model_pair(cfg, "classification", device, cpu_kernels=opts.cpu_kernels)
        ours.train(), ref.train()
        opt_cfg = OptimConfig()
        optims = {"ours": build_optimizer(ours, opt_cfg, device.type), REF: reference_optimizer(ref, opt_cfg)}
        models = {"ours": ours, REF: ref}
        if opts.baseline_model:
            models["baseline"] = baseline_classifier(opts.baseline_model, cfg, ours).train()
            optims["baseline"] = build_optimizer(models["baseline"], opt_cfg, device.type)
        for B, T in opts.shapes:
            for precision in opts.precisions:
                for inputs in opts.inputs:
                    batch = make_batch(cfg, B, T, inputs, "classification", device)
                    fns = {k: train_step_fn(m, optims[k], ours_batch(batch) if k == "ours" else batch, device,
                                            precision, sync) for k, m in models.items()}
                    res = interleave(fns, opts.rounds, opts.warmup, sync)
                    o, r = res["ours"], res[REF]
                    rows.append({"preset": name, "batch": B, "seq": T, "precision": precision, "inputs": inputs,
                                 "ours_ms": 1e3 * o.median(), "ref_ms": 1e3 * r.median(),
                                 "ours_examples_per_s": B / o.median(), "ref_examples_per_s": B / r.median(),
                                 "fwd_bwd_speedup": ratio(r.median("fwd_bwd"), o.median("fwd_bwd")),
                                 "ours_optim_ms": 1e3 * o.median("optim"), "ref_optim_ms": 1e3 * r.median("optim"),
                                 **_speedups(res, device), "rounds": opts.rounds})
                    _baseline_columns(rows[-1], res)
                    progress(rows[-1])
        del ours, ref, optims, models
        _free(device)
    _print_model_table("step: forward + backward + AdamW (BertForSequenceClassification)", rows, device,
                       extra=(("fwd+bwd x", "fwd_bwd_speedup", None), ("optim ms ours/ref", None, 0))
                       + _baseline_header(opts))
    return rows


def inference_suite(opts: Options, src: Source | None = None) -> list[dict]:
    """Eval-mode forward under inference_mode at fixed shapes, ours vs transformers."""
    device, sync, rows = opts.device, synchronizer(opts.device), []
    for name in opts.presets:
        cfg = preset(name)
        ours, ref = model_pair(cfg, "classification", device, cpu_kernels=opts.cpu_kernels)
        ours.eval(), ref.eval()
        base = baseline_classifier(opts.baseline_model, cfg, ours).eval() if opts.baseline_model else None
        for B, T in opts.shapes:
            for precision in opts.precisions:
                for inputs in opts.inputs:
                    batch = make_batch(cfg, B, T, inputs, "classification", device)
                    fns = {"ours": forward_fn(ours, ours_batch(batch), device, precision),
                           REF: forward_fn(ref, batch, device, precision)}
                    if base is not None:
                        fns["baseline"] = forward_fn(base, batch, device, precision)
                    res = interleave(fns, opts.rounds, opts.warmup, sync)
                    o, r = res["ours"], res[REF]
                    rows.append({"preset": name, "batch": B, "seq": T, "precision": precision, "inputs": inputs,
                                 "ours_ms": 1e3 * o.median(), "ref_ms": 1e3 * r.median(),
                                 "ours_examples_per_s": B / o.median(), "ref_examples_per_s": B / r.median(),
                                 **_speedups(res, device), "rounds": opts.rounds})
                    _baseline_columns(rows[-1], res)
                    progress(rows[-1])
        del ours, ref, base
        _free(device)
    _print_model_table("inference: eval forward, inference_mode (BertForSequenceClassification)", rows, device,
                       _baseline_header(opts))
    return rows


def _baseline_columns(row: dict, res: dict[str, Samples]) -> None:
    """--baseline-model: its time, its speed-up over the reference, and ours over it, added to `row`."""
    if "baseline" in res:
        b, o, r = res["baseline"].median(), res["ours"].median(), res[REF].median()
        row.update(baseline_ms=1e3 * b, vs_baseline=ratio(b, o), baseline_speedup=ratio(r, b))


def _baseline_header(opts: Options) -> tuple[tuple[str, str, int | None], ...]:
    return ((("baseline ms", "baseline_ms", 1), (f"baseline vs {REF}", "baseline_speedup", None),
             ("ours vs baseline", "vs_baseline", None)) if opts.baseline_model else ())


def pretrain_suite(opts: Options, src: Source | None = None) -> list[dict]:
    """BertForPreTraining (MLM + NSP) training steps at T = 128: tokens/s and MFU, ours vs transformers.

    Ours runs the vocabulary projection on the masked positions only; transformers on every token.
    """
    device, sync, rows = opts.device, synchronizer(opts.device), []
    B, T = opts.pretrain_batch, 128
    peak = peak_flops(device)
    for name in opts.presets:
        cfg = preset(name)
        ours, ref = model_pair(cfg, "pretraining", device, cpu_kernels=opts.cpu_kernels)
        ours.train(), ref.train()
        opt_cfg = OptimConfig(lr=1e-4)
        optims = {"ours": build_optimizer(ours, opt_cfg, device.type), REF: reference_optimizer(ref, opt_cfg)}
        flops = flops_per_token(cfg, T)
        for precision in opts.precisions:
            batch = make_batch(cfg, B, T, "full", "pretraining", device)
            fns = {"ours": train_step_fn(ours, optims["ours"], ours_batch(batch), device, precision, sync),
                   REF: train_step_fn(ref, optims[REF], batch, device, precision, sync)}
            res = interleave(fns, opts.rounds, opts.warmup, sync)
            tps = {k: B * T / s.median() for k, s in res.items()}
            rows.append({"preset": name, "batch": B, "seq": T, "precision": precision,
                         "ours_tokens_per_s": tps["ours"], "ref_tokens_per_s": tps[REF],
                         "ours_mfu": mfu(tps["ours"], cfg, T, device), "ref_mfu": mfu(tps[REF], cfg, T, device),
                         "peak_flops": peak, **_speedups(res, device), "rounds": opts.rounds})
            progress(rows[-1])
        del ours, ref, optims
        _free(device)
    peak_note = f"peak {peak / 1e12:.0f} TFLOP/s (dense bf16)" if peak else "no known peak for this device: MFU n/a"
    print_table(
        f"pretrain: BertForPreTraining (MLM + NSP), T = {T}",
        ["preset", "B", "precision", "ours tok/s", f"{REF} tok/s", "speed-up", "MFU ours", f"MFU {REF}"],
        [[r["preset"], r["batch"], r["precision"], fmt(r["ours_tokens_per_s"], 0), fmt(r["ref_tokens_per_s"], 0),
          f"{r['speedup']:.2f}x", _pct(r["ours_mfu"]), _pct(r["ref_mfu"])] for r in rows],
        note=f"median of {opts.rounds} interleaved rounds; {peak_note}; "
             f"{flops / 1e6:.0f} MFLOP per token at T = {T} (6N + attention) for the last preset",
    )
    return rows


def e2e_suite(opts: Options, src: Source) -> list[dict]:
    """SST-2 training through our data pipeline vs padding every example to max_length, same model.

    Ours: dynamic padding (to a multiple of 8 under bf16) + length-grouped batches, as `--group-by-length`.
    The common recipe: shuffled batches, every row padded to 128 (`padding="max_length"`). Our model skips most
    of the padding's cost by itself (the unpadded encoder), so a third side shows the common recipe with the
    encoder held padded (the batches without their layout), as transformers' model runs.
    Each side has its own copy of the model and optimizer; the steps alternate, each timed from fetching
    its batch to the end of its optimizer step.
    """
    from torch.utils.data import DataLoader

    from bert_dist import data as D
    from bert_dist.config import DataConfig
    from bert_dist.data.collate import BatchSampler, PadCollator

    device, sync, precision = opts.device, synchronizer(opts.device), opts.e2e_precision
    max_length, batch_size = 128, 32
    spec = D.get_task("sst2")
    raw = D.load_raw(spec, DataConfig(data_dir=str(src.data_dir)))
    if opts.max_rows:
        raw[spec.train_split] = raw[spec.train_split].select(range(min(opts.max_rows, len(raw[spec.train_split]))))
    train = D.tokenize_classification(raw, spec, src.tokenizer, max_length)[spec.train_split]
    lengths = D.column(train, "length")
    pad_id = src.tokenizer.token_to_id("[PAD]")
    grouped = BatchSampler(len(train), batch_size, seed=0, lengths=lengths, group_by_length=True)
    sides = {"ours": (grouped, PadCollator(pad_id, 8 if precision != "fp32" else None), False),
             "pad-128": (BatchSampler(len(train), batch_size, seed=0), PadCollator(pad_id, max_length), False),
             "pad-128, padded encoder": (BatchSampler(len(train), batch_size, seed=0),
                                         PadCollator(pad_id, max_length), True)}
    cfg = preset(opts.e2e_preset, vocab_size=src.tokenizer.get_vocab_size())
    steppers, counts = {}, {}
    for name, (sampler, collator, padded) in sides.items():
        torch.manual_seed(0)
        model = BertForSequenceClassification(cfg, num_labels=2).to(device).train()
        kernels.apply(model, opts.cpu_kernels, device)
        optimizer = build_optimizer(model, OptimConfig(), device.type)
        it = iter(DataLoader(train, batch_sampler=sampler, collate_fn=collator))
        counts[name] = {"examples": 0, "tokens": torch.zeros((), dtype=torch.long, device=device), "padded": 0}
        steppers[name] = _e2e_stepper(model, optimizer, it, counts[name], device, precision, padded)
    n_batches = len(grouped)
    steps = min(opts.e2e_steps or n_batches, n_batches) - opts.warmup
    res = interleave(steppers, rounds=steps, warmup=opts.warmup, sync=sync)
    rows = []
    for name, s in res.items():
        c = counts[name]
        seconds = sum(s.wall)
        # The counts include the warm-up steps; scale them to the timed ones (same rows in expectation).
        share = len(s.wall) / (len(s.wall) + opts.warmup)
        rows.append({"pipeline": name, "preset": opts.e2e_preset, "precision": precision, "steps": len(s.wall),
                     "examples_per_s": c["examples"] * share / seconds,
                     "tokens_per_s": int(c["tokens"]) * share / seconds,
                     "padding": 1 - int(c["tokens"]) / c["padded"], "seconds": seconds})
    for r in rows:
        r["ours_speedup"] = rows[0]["examples_per_s"] / r["examples_per_s"]
    epoch = "one epoch" if steps + opts.warmup == n_batches else f"{steps} timed steps per side"
    print_table(
        f"e2e: SST-2 fine-tuning, {opts.e2e_preset}, {precision}, batch {batch_size}, {epoch}"
        f"{' (synthetic data)' if src.synthetic else ''}",
        ["pipeline", "examples/s", "real tokens/s", "padding", "ours is x faster"],
        [[r["pipeline"], fmt(r["examples_per_s"]), fmt(r["tokens_per_s"], 0), f"{100 * r['padding']:.0f}%",
          f"{r['ours_speedup']:.2f}x"] for r in rows],
        note="same model and optimizer on every side: the difference is the data pipeline (and, on the third "
             "row, the padded encoder)",
    )
    return rows


def _e2e_stepper(model, optimizer, it, counts, device, precision, padded) -> Callable[[], None]:
    def step() -> None:
        batch = {k: v.to(device, non_blocking=True) for k, v in next(it).items()}
        with autocast(device, precision):
            loss = model(**(without_layout(batch) if padded else batch))["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        counts["examples"] += batch["input_ids"].shape[0]
        counts["padded"] += batch["input_ids"].numel()
        counts["tokens"] += batch["attention_mask"].sum()  # stays on the device: no sync per step

    return step


# ---------------------------------------------------------------------------------------------
# Tables


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _print_model_table(title: str, rows: list[dict], device: torch.device,
                       extra: tuple[tuple[str, str | None, int | None], ...] = ()) -> None:
    header = ["preset", "B x T", "precision", "inputs", "ours ms", f"{REF} ms", "speed-up"]
    if device.type == "cpu":
        header.append("CPU-time x")
    header += [h for h, _, _ in extra]
    table = []
    for r in rows:
        line = [r["preset"], f"{r['batch']}x{r['seq']}", r["precision"], r["inputs"], fmt(r["ours_ms"]),
                fmt(r["ref_ms"]), f"{r['speedup']:.2f}x"]
        if device.type == "cpu":
            line.append(f"{r['cpu_time_speedup']:.2f}x")
        for _, key, digits in extra:  # key None: the AdamW "ours/reference" ms column; digits None: a ratio
            if key is None:
                line.append(f"{fmt(r['ours_optim_ms'], digits)}/{fmt(r['ref_optim_ms'], digits)}")
            else:
                line.append(times(r[key]) if digits is None else fmt(r[key], digits))
        table.append(line)
    rounds = rows[0]["rounds"] if rows else 0
    print_table(title, header, table, note=f"median of {rounds} interleaved rounds; speed-up = {REF} time / ours "
                                           "(> 1: ours is faster)")

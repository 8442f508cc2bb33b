"""SQuAD accuracy side by side: bert-dist's real entry point vs transformers' BertForQuestionAnswering.

Both sides start from the same weights and train on the same features in the same order: the reference
gets bert-dist's context windows (`prepare_train_features`, from the same tokenizer, which the script
checks transformers' tokenizer agrees with), bert-dist's batch sampler and collator, the same optimizer
groups, linear warmup + decay schedule, clipping and bf16 autocast, and its logits go through the same
post-processing and official metric. What differs is the model code and the training loop: ours is
`python -m bert_dist.run`. The training data is the by-article split of the dev set in
/work/shared/data/squad_dev_split (the SQuAD training set is not available offline), so scores are
for comparing the two implementations, not with published SQuAD numbers.

    python benchmarks/squad_accuracy.py --init /work/shared/models/all-MiniLM-L6-v2 \
        --data-root /work/shared/data --versions 1,2 --out benchmarks/results/squad_minilm.json

    # a timing probe: a few dozen optimizer steps of one side, no evaluation
    python benchmarks/squad_accuracy.py --side ref --max-steps 30 --no-eval --out /tmp/probe.json

Prints a markdown table: EM/F1 ours / reference / difference, train features/s ours / reference / ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import torch

from bert_dist import data as D
from bert_dist.config import DataConfig, OptimConfig
from bert_dist.data.collate import BatchSampler, PadCollator
from bert_dist.data.squad import postprocess_predictions, prepare_eval_features, prepare_train_features
from bert_dist.metrics import load_metric
from bert_dist.optim import param_groups, warmup_steps
from bert_dist.tokenizer import load_tokenizer

TASKS = {1: ("squad", "squad_dev_split"), 2: ("squad_v2", "squad_v2_dev_split")}
BATCH, EVAL_BATCH, MAX_LEN, DOC_STRIDE, SEED, WARMUP = 32, 128, 384, 128, 42, 0.1
MAIN_KEYS = {1: ("exact_match", "f1"),
             2: ("exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1", "answerable_span_exact", "answerable_span_f1")}


def run_ours(task: str, data_dir: Path, args: argparse.Namespace) -> dict:
    out = Path(args.work_dir) / f"{task}-ours"
    cmd = [sys.executable, "-m", "bert_dist.run", "--task", task, "--init", args.init, "--data-dir", str(data_dir),
           "--output-dir", str(out), "--overwrite", "--lr", str(args.lr), "--batch-size", str(BATCH),
           "--eval-batch-size", str(EVAL_BATCH), "--max-length", str(MAX_LEN), "--doc-stride", str(DOC_STRIDE),
           "--seed", str(SEED), "--warmup-ratio", str(WARMUP), "--mixed-precision", args.mixed_precision,
           "--group-by-length", "--log-every", "25"]
    cmd += ["--max-steps", str(args.max_steps)] if args.max_steps else ["--epochs", str(args.epochs)]
    if args.no_eval:
        cmd += ["--max-eval-samples", "8"]  # the recipe always scores its eval split: keep that trivial
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    res = json.loads((out / "results.json").read_text())
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return {**res, **ours_span_scores(task, data_dir, out)}


def answerable_span_scores(rows, nbest: dict[str, list[dict]]) -> dict:
    """EM/F1 over the answerable questions of `rows` (eval rows: id, answers) of the best non-null span in each
    n-best list ({id: [{"text", ...}, ...]}, best first).

    Threshold-free: early in training both sides can put the null answer first everywhere (150 steps did),
    which makes every official v2 score the share of unanswerable questions on both sides. This still
    compares how well each side ranks spans.
    """
    answerable = [(i, a) for i, a in zip(D.column(rows, "id"), D.column(rows, "answers")) if a["text"]]
    preds = [{"id": i, "prediction_text": next((e["text"] for e in nbest[i] if e["text"]), "")} for i, _ in answerable]
    refs = [{"id": i, "answers": a} for i, a in answerable]
    scores = load_metric("squad").compute(predictions=preds, references=refs)
    return {"answerable_span_exact": round(scores["exact_match"], 6), "answerable_span_f1": round(scores["f1"], 6)}


def ours_span_scores(task: str, data_dir: Path, run_dir: Path) -> dict:
    """v2 only: `answerable_span_scores` of an ours run, from its nbest_predictions.json."""
    if task != "squad_v2":
        return {}
    spec = D.get_task(task)
    rows = D.load_raw(spec, DataConfig(data_dir=str(data_dir)))[spec.eval_splits[0]]
    return answerable_span_scores(rows, json.loads((run_dir / "nbest_predictions.json").read_text()))


def _train_windows(examples: dict, **kw) -> dict:
    out = prepare_train_features(examples, **kw)
    out["length"] = [len(x) for x in out["input_ids"]]
    return out


def run_reference(task: str, data_dir: Path, args: argparse.Namespace) -> dict:
    from transformers import BertForQuestionAnswering, BertTokenizerFast, get_linear_schedule_with_warmup

    spec = D.get_task(task)
    raw = D.check_raw(D.load_raw(spec, DataConfig(data_dir=str(data_dir))), spec, str(data_dir))
    tok = load_tokenizer(args.init)
    hf_tok = BertTokenizerFast.from_pretrained(args.init)
    contexts = D.column(raw[spec.train_split], "context")[:300]
    same = sum(tok.encode(c, add_special_tokens=False).ids == hf_tok(c, add_special_tokens=False)["input_ids"]
               for c in contexts)
    print(f"[{task}] transformers and bert-dist tokenize {same}/{len(contexts)} contexts identically", flush=True)
    assert same == len(contexts), "tokenizers disagree: the comparison would not be on the same features"

    kw = {"tokenizer": tok, "max_length": MAX_LEN, "doc_stride": DOC_STRIDE, "max_query_length": 64}
    train = raw[spec.train_split].map(_train_windows, batched=True, fn_kwargs=kw,
                                      remove_columns=raw[spec.train_split].column_names)
    ev_rows = raw[spec.eval_splits[0]]
    ev = ev_rows.map(prepare_eval_features, batched=True, fn_kwargs=kw, remove_columns=ev_rows.column_names)

    torch.manual_seed(SEED)
    model = BertForQuestionAnswering.from_pretrained(args.init, attn_implementation="sdpa")
    ocfg = OptimConfig(lr=args.lr, warmup_ratio=WARMUP)
    optimizer = torch.optim.AdamW(param_groups(model, ocfg.weight_decay), lr=ocfg.lr,
                                  betas=(ocfg.adam_beta1, ocfg.adam_beta2), eps=ocfg.adam_eps)
    sampler = BatchSampler(len(train), BATCH, shuffle=True, seed=SEED, lengths=D.column(train, "length"),
                           group_by_length=True)
    collate = PadCollator(0, 8 if args.mixed_precision != "no" else None,
                          scalar_keys=("start_positions", "end_positions"))
    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=collate)
    steps = args.max_steps or max(1, math.ceil(args.epochs * len(sampler)))
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps(ocfg, steps), steps)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where ours runs too
    model.to(device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")
    step, examples, t_train, epoch = 0, 0, 0.0, 0
    model.train()
    while step < steps:
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(**amp):
                out = model(**batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), ocfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            examples += batch["input_ids"].shape[0]
            if step % 25 == 0:
                rate = examples / (t_train + time.perf_counter() - t0)
                print(f"[{task} ref] step {step}/{steps} loss {out.loss.item():.4f} {rate:.1f} features/s", flush=True)
            if step >= steps:
                break
        t_train += time.perf_counter() - t0
        epoch += 1
    res = {"steps": step, "train_seconds": round(t_train, 2), "examples_per_second": round(examples / t_train, 2)}
    if args.no_eval:
        return res

    model.eval()
    starts, ends = [], []
    inputs = ev.select_columns(["input_ids", "token_type_ids"])
    with torch.no_grad(), torch.autocast(**amp):
        for batch in torch.utils.data.DataLoader(inputs, batch_size=EVAL_BATCH, collate_fn=collate):
            out = model(**{k: v.to(device) for k, v in batch.items()})
            starts.append(out.start_logits.float().cpu().numpy())
            ends.append(out.end_logits.float().cpu().numpy())
    width = max(x.shape[1] for x in starts)
    start, end = (np.concatenate([np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=-1e4) for x in xs])
                  for xs in (starts, ends))
    dcfg = DataConfig()
    v2 = spec.metric == "squad_v2"
    preds, nbest, odds = postprocess_predictions(ev_rows, ev, start, end, n_best_size=dcfg.n_best_size,
                                             max_answer_length=dcfg.max_answer_length, version_2=v2,
                                             null_score_diff_threshold=dcfg.null_score_diff_threshold)
    ids, answers = D.column(ev_rows, "id"), D.column(ev_rows, "answers")
    refs = [{"id": i, "answers": a} for i, a in zip(ids, answers)]
    metric = load_metric(spec.metric)
    if v2:
        scores = metric.compute(predictions=[{"id": i, "prediction_text": preds[i], "no_answer_probability": odds[i]}
                                             for i in ids], references=refs,
                                no_answer_threshold=dcfg.null_score_diff_threshold)
    else:
        scores = metric.compute(predictions=[{"id": i, "prediction_text": preds[i]} for i in ids], references=refs)
    return {**{k: round(float(v), 6) for k, v in scores.items()}, **res,
            **(answerable_span_scores(ev_rows, nbest) if v2 else {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", default="/work/shared/models/all-MiniLM-L6-v2")
    p.add_argument("--data-root", default="/work/shared/data", help="holds squad_dev_split/, squad_v2_dev_split/")
    p.add_argument("--versions", default="1,2")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-steps", type=int, default=None, help="timing probe: stop after N optimizer steps")
    p.add_argument("--no-eval", action="store_true", help="timing probe: skip (ref) or trivialize (ours) eval")
    p.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16"])
    p.add_argument("--side", default="both", choices=["both", "ours", "ref"])
    p.add_argument("--work-dir", default="runs/squad_accuracy")
    p.add_argument("--out", default="benchmarks/results/squad_minilm.json")
    args = p.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["machine"] = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for version in (int(v) for v in args.versions.split(",")):
        task, folder = TASKS[version]
        data_dir = Path(args.data_root) / folder
        recipe = {"epochs": args.epochs, "max_steps": args.max_steps, "lr": args.lr, "batch_size": BATCH,
                  "max_length": MAX_LEN, "doc_stride": DOC_STRIDE, "warmup_ratio": WARMUP, "seed": SEED,
                  "mixed_precision": args.mixed_precision, "data": str(data_dir)}
        entry = results.setdefault(task, {})
        if entry.get("recipe") != recipe:
            entry.clear()  # results of another recipe are not comparable with this run's
        entry["recipe"] = recipe
        if args.side in ("both", "ours"):
            entry["ours"] = run_ours(task, data_dir, args)
            save(out, results)
        elif "ours" in entry and (Path(args.work_dir) / f"{task}-ours").is_dir():
            # the n-best file of the ours run of this recipe: its threshold-free scores, without retraining
            entry["ours"].update(ours_span_scores(task, data_dir, Path(args.work_dir) / f"{task}-ours"))
        if args.side in ("both", "ref"):
            entry["reference"] = run_reference(task, data_dir, args)
            save(out, results)
    print_table(results)


def save(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


def print_table(results: dict) -> None:
    print("| task | metric | ours | transformers | diff | ours features/s | transformers features/s | speed ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for task, e in results.items():
        if not isinstance(e, dict) or "ours" not in e or "reference" not in e:
            continue
        o, r = e["ours"], e["reference"]
        ratio = o["examples_per_second"] / r["examples_per_second"]
        version = 2 if task == "squad_v2" else 1
        for m in [k for k in MAIN_KEYS[version] if k in o and k in r]:
            print(f"| {task} | {m} | {o[m]:.2f} | {r[m]:.2f} | {o[m] - r[m]:+.2f} | "
                  f"{o['examples_per_second']:.1f} | {r['examples_per_second']:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()

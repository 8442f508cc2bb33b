"""GLUE (and own-data) accuracy side by side: bert-dist's real entry point vs transformers'
BertForSequenceClassification.

Both sides start from the same weights and see the same batches in the same order (the reference
uses bert-dist's batch sampler and collator on features from transformers' own tokenizer, which the
script checks are identical to ours), the same optimizer groups, schedule, clipping and precision.
What differs is the model code and the training loop: ours is `python -m bert_dist.run`.

    python benchmarks/glue_accuracy.py --init ../shared/models/all-MiniLM-L6-v2 --data-dir ../shared/data \
        --tasks sst2,cola,mrpc,stsb,rte --mixed-precision bf16 --out benchmarks/results/glue_minilm.json
    # more seeds of the small, noisy tasks (added to the same file, one entry per seed)
    python benchmarks/glue_accuracy.py ... --tasks mrpc,rte --seeds 43,44 --out benchmarks/results/glue_minilm.json
    # a task on own data (OWN_TASKS: STS-B's scores cut into 5 classes), through --task classification
    python benchmarks/glue_accuracy.py ... --tasks stsb5 --out benchmarks/results/own_stsb5_minilm.json

The seed sets the classifier head's initialisation and the batch order, the same on both sides.
Prints a markdown table: per task and metric, the mean over the seeds that have both sides (ours /
reference / difference, with the seed count), and train examples/s ours / reference / ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bert_dist import data as D
from bert_dist.config import DataConfig, OptimConfig, TaskSpec
from bert_dist.data.collate import BatchSampler, PadCollator
from bert_dist.metrics import load_metric
from bert_dist.optim import param_groups
from bert_dist.tokenizer import load_tokenizer

# Per-task recipe (both sides). SST-2 is large: 800 steps (25,600 examples, 38% of an epoch) keep a
# side under 10 minutes on 2 CPU cores; the smaller tasks get the BERT paper's 3 epochs.
RECIPES = {
    "sst2": dict(epochs=1, lr=5e-5, max_steps=800),
    "cola": dict(epochs=3, lr=5e-5),
    "mrpc": dict(epochs=3, lr=5e-5),
    "stsb": dict(epochs=3, lr=5e-5),
    "rte": dict(epochs=3, lr=5e-5),
    "wnli": dict(epochs=3, lr=5e-5),
    "qnli": dict(epochs=1, lr=5e-5),
}
BATCH, MAX_LEN, WARMUP = 32, 128, 0.1

OWN_TASKS = {
    # STS-B's similarity scores (0-5) cut into 5 classes by their integer part: [0, 1) is "0-1", ..., [4, 5] is "4-5"
    # (a score of 5 joins [4, 5)). Train 891 / 882 / 982 / 1,588 / 1,406, validation 344 / 254 / 273 / 365 / 264.
    "stsb5": dict(source="stsb", text_columns=("sentence1", "sentence2"), label_column="similarity"),
}
"""Tasks on own data: files written from ../shared data, run as `--task classification` on both sides."""
RECIPES["stsb5"] = dict(epochs=3, lr=5e-5)


def stsb5_row(row: dict) -> dict:
    b = min(int(row["label"]), 4)
    return {"sentence1": row["sentence1"], "sentence2": row["sentence2"], "similarity": f"{b}-{b + 1}"}


def own_files(task: str, args: argparse.Namespace) -> dict[str, Path]:
    """Write the own-data task's train/validation JSON Lines (from --data-dir's copy of its source) once."""
    src = Path(args.data_dir) / "glue" / OWN_TASKS[task]["source"]
    if not src.is_dir():
        src = Path(args.data_dir) / OWN_TASKS[task]["source"]
    out = Path(args.work_dir) / f"{task}-data"
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in ("train", "validation"):
        files[split] = out / f"{split}.jsonl"
        rows = [stsb5_row(json.loads(line)) for line in (src / f"{split}.jsonl").read_text().splitlines()]
        files[split].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return files


def task_data(task: str, args: argparse.Namespace) -> tuple[TaskSpec, object, list[str]]:
    """(the task's spec, its checked rows, the flags that give ours the same data)."""
    if task not in OWN_TASKS:
        spec = D.get_task(task)
        raw = D.check_raw(D.load_raw(spec, DataConfig(data_dir=args.data_dir)), spec, args.data_dir)
        return spec, raw, ["--task", task, "--data-dir", args.data_dir]
    own = OWN_TASKS[task]
    files = own_files(task, args)
    cfg = DataConfig(train_file=str(files["train"]), validation_file=str(files["validation"]),
                     text_columns=",".join(own["text_columns"]), label_column=own["label_column"])
    spec = D.own.task_from_flags("classification", cfg)
    raw = D.load_raw(spec, cfg)
    spec = D.own.settle_labels(raw, spec, str(files["train"]))
    raw = D.check_raw(raw, spec, str(files["train"]))
    return spec, raw, ["--task", "classification", "--train-file", cfg.train_file, "--validation-file",
                       cfg.validation_file, "--text-columns", cfg.text_columns, "--label-column", cfg.label_column]


def run_ours(task: str, args: argparse.Namespace, recipe: dict, seed: int) -> dict:
    out = Path(args.work_dir) / f"{task}-ours-seed{seed}"
    cmd = [
        sys.executable,
        "-m",
        "bert_dist.run",
        *task_data(task, args)[2],
        "--init",
        args.init,
        "--output-dir",
        str(out),
        "--overwrite",
        "--epochs",
        str(recipe["epochs"]),
        "--lr",
        str(recipe["lr"]),
        "--batch-size",
        str(BATCH),
        "--max-length",
        str(MAX_LEN),
        "--seed",
        str(seed),
        "--warmup-ratio",
        str(WARMUP),
        "--mixed-precision",
        args.mixed_precision,
        "--group-by-length",
        "--log-every",
        "100",
    ]
    if recipe.get("max_steps"):
        cmd += ["--max-steps", str(recipe["max_steps"])]
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    res = json.loads((out / "results.json").read_text())
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return res


def run_reference(task: str, args: argparse.Namespace, recipe: dict, seed: int) -> dict:
    from transformers import AutoTokenizer, BertForSequenceClassification, get_linear_schedule_with_warmup

    spec, raw, _ = task_data(task, args)
    hf_tok = AutoTokenizer.from_pretrained(args.init)
    ours_tok = load_tokenizer(args.init)
    ours_feats = D.tokenize_classification(raw, spec, ours_tok, MAX_LEN)

    def hf_encode(batch: dict) -> dict:
        cols = [batch[c] for c in spec.text_columns]
        enc = hf_tok(*cols, truncation=True, max_length=MAX_LEN, padding=False)
        return {
            "input_ids": enc["input_ids"],
            "token_type_ids": enc["token_type_ids"],
            "length": [len(x) for x in enc["input_ids"]],
            "labels": batch[spec.label_column],
        }

    feats = raw.map(hf_encode, batched=True, remove_columns=raw[spec.train_split].column_names)
    for split in (spec.train_split, spec.eval_splits[0]):
        a, b = D.column(feats[split], "input_ids"), D.column(ours_feats[split], "input_ids")
        same = sum(x == y for x, y in zip(a, b))
        print(f"[{task}] {split}: transformers and bert-dist tokenize {same}/{len(a)} examples identically", flush=True)
        assert same == len(a), "tokenizers disagree: the comparison would not be on the same batches"
    unk = hf_tok.unk_token_id
    pieces = sum(x != unk for ids in D.column(feats[spec.train_split], "input_ids")[:500] for x in ids)
    print(f"[{task}] real word pieces in the first 500 training examples: {pieces}", flush=True)

    torch.manual_seed(seed)
    regression = spec.kind == "regression"
    model = BertForSequenceClassification.from_pretrained(
        args.init,
        num_labels=spec.num_labels,
        problem_type="regression" if regression else "single_label_classification",
        attn_implementation="sdpa",
    )
    ocfg = OptimConfig(lr=recipe["lr"])
    optimizer = torch.optim.AdamW(param_groups(model, ocfg.weight_decay), lr=ocfg.lr, betas=(0.9, 0.999), eps=1e-8)
    train = feats[spec.train_split]
    sampler = BatchSampler(
        len(train), BATCH, shuffle=True, seed=seed, lengths=D.column(train, "length"), group_by_length=True
    )
    collate = PadCollator(0, 8 if args.mixed_precision != "no" else None)
    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=collate)
    steps = recipe.get("max_steps") or int(recipe["epochs"] * len(sampler) + 0.999)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(WARMUP * steps + 0.999), steps)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where ours runs too
    model.to(device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")
    step, examples, t_train = 0, 0, 0.0
    model.train()
    epoch = 0
    while step < steps:
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(**amp):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), ocfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            examples += batch["input_ids"].shape[0]
            if step % 100 == 0:
                print(f"[{task} ref] step {step}/{steps} loss {loss.item():.4f}", flush=True)
            if step >= steps:
                break
        t_train += time.perf_counter() - t0
        epoch += 1
    model.eval()
    metric = load_metric(spec.metric, spec.metric_config)
    ev = feats[spec.eval_splits[0]]
    preds, refs = [], []
    with torch.no_grad(), torch.autocast(**amp):
        for batch in torch.utils.data.DataLoader(ev, batch_size=128, collate_fn=collate):
            labels = batch.pop("labels")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
            preds += (logits.squeeze(-1) if regression else logits.argmax(-1)).tolist()
            refs += labels.tolist()
    scores = metric.compute(predictions=preds, references=refs)
    return {
        **{k: float(v) for k, v in scores.items()},
        "steps": step,
        "train_seconds": round(t_train, 2),
        "examples_per_second": round(examples / t_train, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--tasks", default="sst2,cola,mrpc,stsb,rte")
    p.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16"])
    p.add_argument("--side", default="both", choices=["both", "ours", "ref"])
    p.add_argument("--seeds", default="42", help="comma-separated; each seed is one run per side")
    p.add_argument("--work-dir", default="runs/glue_accuracy")
    p.add_argument("--out", default="benchmarks/results/glue_accuracy.json")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["machine"] = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    for entry in results.values():  # a file from before --seeds: its runs used seed 42
        if isinstance(entry, dict) and ("ours" in entry or "reference" in entry):
            entry["seeds"] = {"42": {k: entry.pop(k) for k in ("ours", "reference") if k in entry}}
    for task in args.tasks.split(","):
        recipe = RECIPES[task]
        entry = results.setdefault(
            task,
            {"recipe": {**recipe, "batch_size": BATCH, "max_length": MAX_LEN, "mixed_precision": args.mixed_precision}},
        )
        for seed in [int(x) for x in args.seeds.split(",")]:
            run = entry.setdefault("seeds", {}).setdefault(str(seed), {})
            if args.side in ("both", "ours"):
                run["ours"] = run_ours(task, args, recipe, seed)
            if args.side in ("both", "ref"):
                run["reference"] = run_reference(task, args, recipe, seed)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def print_table(results: dict) -> None:
    """Per task and metric: means over the seeds run on both sides, and the per-seed values."""
    print(
        "| task | metric | seeds | ours (mean) | transformers (mean) | diff | ours per seed | transformers per seed "
        "| ours ex/s | transformers ex/s | speed ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for task, e in results.items():
        if not isinstance(e, dict):
            continue
        runs = [r for _, r in sorted(e.get("seeds", {}).items()) if "ours" in r and "reference" in r]
        if not runs:
            continue
        main_metric = "accuracy" if task in OWN_TASKS else D.get_task(task).main_metric
        skip = ("steps", "train_seconds", "examples_per_second")
        metrics = [k for k in runs[0]["reference"] if k in runs[0]["ours"] and k not in skip]
        ours_speed = statistics.mean(r["ours"]["examples_per_second"] for r in runs)
        ref_speed = statistics.mean(r["reference"]["examples_per_second"] for r in runs)
        for m in metrics:
            o = [100 * r["ours"][m] for r in runs]
            f = [100 * r["reference"][m] for r in runs]
            print(
                f"| {task} | {m}{' (main)' if m == main_metric else ''} | {len(runs)} | {statistics.mean(o):.2f} | "
                f"{statistics.mean(f):.2f} | {statistics.mean(o) - statistics.mean(f):+.2f} | "
                f"{' / '.join(f'{x:.2f}' for x in o)} | {' / '.join(f'{x:.2f}' for x in f)} | "
                f"{ours_speed:.1f} | {ref_speed:.1f} | {ours_speed / ref_speed:.2f}x |"
            )


if __name__ == "__main__":
    main()

"""Preprocessing speed side by side with transformers' recipes, cold (a fresh datasets cache) and cached.

- GLUE: SST-2 train through `tokenize_classification` vs `tokenizer(sentence, truncation=True,
  max_length=128)` in `Dataset.map(batched=True)` (the run_glue recipe, no padding).
- SQuAD: the v1.1 dev questions windowed by `prepare_train_features` / `prepare_eval_features` vs
  run_qa.py's functions of the same names (reproduced below; run_qa pads to max_length by default).

Each timing is of the `map` call alone: loading the JSON is the same on both sides.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.harness import fmt, interleave, print_table, ratio
from benchmarks.sources import Options, Source, hf_tokenizer

REF = "transformers"


# ---------------------------------------------------------------------------------------------
# transformers' recipes (examples/pytorch/question-answering/run_qa.py, text-classification/run_glue.py)


def hf_glue_encode(examples: dict, tokenizer, text_column: str, max_length: int) -> dict:
    return tokenizer(examples[text_column], padding=False, max_length=max_length, truncation=True)


def hf_squad_train_features(examples: dict, tokenizer, max_length: int, doc_stride: int) -> dict:
    """run_qa.py's prepare_train_features (pad_on_right, pad_to_max_length=True: its defaults for BERT)."""
    examples["question"] = [q.lstrip() for q in examples["question"]]
    tokenized = tokenizer(examples["question"], examples["context"], truncation="only_second", max_length=max_length,
                          stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                          padding="max_length")
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    offset_mapping = tokenized.pop("offset_mapping")
    tokenized["start_positions"], tokenized["end_positions"] = [], []
    for i, offsets in enumerate(offset_mapping):
        input_ids = tokenized["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        sequence_ids = tokenized.sequence_ids(i)
        answers = examples["answers"][sample_mapping[i]]
        if len(answers["answer_start"]) == 0:
            tokenized["start_positions"].append(cls_index)
            tokenized["end_positions"].append(cls_index)
            continue
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        token_start_index = 0
        while sequence_ids[token_start_index] != 1:
            token_start_index += 1
        token_end_index = len(input_ids) - 1
        while sequence_ids[token_end_index] != 1:
            token_end_index -= 1
        if not (offsets[token_start_index][0] <= start_char and offsets[token_end_index][1] >= end_char):
            tokenized["start_positions"].append(cls_index)
            tokenized["end_positions"].append(cls_index)
        else:
            while token_start_index < len(offsets) and offsets[token_start_index][0] <= start_char:
                token_start_index += 1
            tokenized["start_positions"].append(token_start_index - 1)
            while offsets[token_end_index][1] >= end_char:
                token_end_index -= 1
            tokenized["end_positions"].append(token_end_index + 1)
    return tokenized


def hf_squad_eval_features(examples: dict, tokenizer, max_length: int, doc_stride: int) -> dict:
    """run_qa.py's prepare_validation_features."""
    examples["question"] = [q.lstrip() for q in examples["question"]]
    tokenized = tokenizer(examples["question"], examples["context"], truncation="only_second", max_length=max_length,
                          stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                          padding="max_length")
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    tokenized["example_id"] = []
    for i in range(len(tokenized["input_ids"])):
        sequence_ids = tokenized.sequence_ids(i)
        tokenized["example_id"].append(examples["id"][sample_mapping[i]])
        tokenized["offset_mapping"][i] = [o if sequence_ids[k] == 1 else None
                                          for k, o in enumerate(tokenized["offset_mapping"][i])]
    return tokenized


# ---------------------------------------------------------------------------------------------


def _fresh_cache(made: list[Path]) -> None:
    """Point datasets at an empty cache (remembered in `made`, to delete): the next load and map start cold."""
    import datasets

    made.append(Path(tempfile.mkdtemp(prefix="bert-dist-bench-cache-")))
    datasets.config.HF_DATASETS_CACHE = made[-1]


def _contestant(load: Callable[[], object], do_map: Callable[[object], object], cold: bool,
                made: list[Path]) -> Callable[[], dict[str, float]]:
    """cold: load into a fresh cache, then map; cached: map again data already mapped once (a cache hit)."""
    warm = None
    if not cold:
        _fresh_cache(made)
        warm = load()
        do_map(warm)  # fills the cache the timed calls read

    def run() -> dict[str, float]:
        if cold:
            _fresh_cache(made)
        data = load() if cold else warm
        t0 = time.perf_counter()
        out = do_map(data)
        return {"map": time.perf_counter() - t0, "rows": len(out)}

    return run


def preprocess_suite(opts: Options, src: Source) -> list[dict]:
    import datasets

    from bert_dist import data as D
    from bert_dist.config import DataConfig
    from bert_dist.data.squad import prepare_eval_features, prepare_train_features

    hf_tok = hf_tokenizer(src)
    spec = D.get_task("sst2")
    max_length, squad_length, stride = 128, 384, 128
    datasets.disable_progress_bars()

    def load_sst2() -> datasets.DatasetDict:
        raw = D.load_raw(spec, DataConfig(data_dir=str(src.data_dir)))
        ds = {spec.train_split: raw[spec.train_split]}
        if opts.max_rows:
            ds = {k: v.select(range(min(opts.max_rows, len(v)))) for k, v in ds.items()}
        return datasets.DatasetDict(ds)

    def load_squad() -> datasets.Dataset:
        ds = datasets.load_dataset("json", data_files=str(src.data_dir / "squad" / "validation.jsonl"), split="train")
        return ds.select(range(min(opts.max_rows, len(ds)))) if opts.max_rows else ds

    squad_kw = {"tokenizer": src.tokenizer, "max_length": squad_length, "doc_stride": stride, "max_query_length": 64}
    hf_squad_kw = {"tokenizer": hf_tok, "max_length": squad_length, "doc_stride": stride}
    glue_kw = {"tokenizer": hf_tok, "max_length": max_length, "text_column": "sentence"}
    jobs = {
        "SST-2 train": (load_sst2, {
            "ours": lambda raw: D.tokenize_classification(raw, spec, src.tokenizer, max_length)[spec.train_split],
            REF: lambda raw: raw.map(hf_glue_encode, batched=True, fn_kwargs=glue_kw,
                                     remove_columns=raw[spec.train_split].column_names)[spec.train_split],
        }),
        "SQuAD dev, train windows": (load_squad, {
            "ours": lambda ds: ds.map(prepare_train_features, batched=True, fn_kwargs=squad_kw,
                                      remove_columns=ds.column_names),
            REF: lambda ds: ds.map(hf_squad_train_features, batched=True, fn_kwargs=hf_squad_kw,
                                   remove_columns=ds.column_names),
        }),
        "SQuAD dev, eval windows": (load_squad, {
            "ours": lambda ds: ds.map(prepare_eval_features, batched=True, fn_kwargs=squad_kw,
                                      remove_columns=ds.column_names),
            REF: lambda ds: ds.map(hf_squad_eval_features, batched=True, fn_kwargs=hf_squad_kw,
                                   remove_columns=ds.column_names),
        }),
    }
    rows, made = [], []
    rounds = max(1, opts.rounds // 2)  # a cold run is seconds long: fewer rounds than the model suites
    cache_before = datasets.config.HF_DATASETS_CACHE
    try:
        for job, (load, maps) in jobs.items():
            n_in = len(load()[spec.train_split]) if job.startswith("SST") else len(load())
            for cold in (True, False):
                fns = {side: _contestant(load, do_map, cold, made) for side, do_map in maps.items()}
                res = interleave(fns, rounds, warmup=0)
                o, r = res["ours"], res[REF]
                rows.append({"job": job, "cache": "cold" if cold else "cached", "rows_in": n_in,
                             "rows_out_ours": int(o.phases["rows"][0]), "rows_out_ref": int(r.phases["rows"][0]),
                             "ours_s": o.median("map"), "ref_s": r.median("map"),
                             "ours_rows_per_s": n_in / o.median("map"), "ref_rows_per_s": n_in / r.median("map"),
                             "speedup": ratio(r.median("map"), o.median("map")), "rounds": rounds})
    finally:
        datasets.config.HF_DATASETS_CACHE = cache_before
        for d in made:
            shutil.rmtree(d, ignore_errors=True)
    print_table(
        f"preprocess: tokenization and windowing{' (synthetic data)' if src.synthetic else ''}",
        ["job", "cache", "rows in", "ours s", f"{REF} s", "ours rows/s", "speed-up", "features ours/ref"],
        [[r["job"], r["cache"], r["rows_in"], fmt(r["ours_s"], 2), fmt(r["ref_s"], 2), fmt(r["ours_rows_per_s"], 0),
          f"{r['speedup']:.2f}x", f"{r['rows_out_ours']}/{r['rows_out_ref']}"] for r in rows],
        note=f"median of {rounds} interleaved rounds of the Dataset.map call alone; cold = a fresh datasets cache",
    )
    return rows

"""A task on one's own data, from flags: classification, multi-label and regression, from files or a named dataset;
each trains, evaluates, predicts and exports, and transformers reads the export with the same logits and labels."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from test_bad_input import fails

from bert_dist.config import RunConfig, config_from_args
from bert_dist.data import check_raw, own
from bert_dist.metrics import load_metric
from bert_dist.model import BertForSequenceClassification
from bert_dist.weights import load_run_model

transformers = pytest.importorskip("transformers")

TINY = ["--preset", "tiny", "--vocab-size", "300", "--batch-size", "16", "--lr", "2e-3", "--warmup-ratio", "0",
        "--log-every", "10"]
MOODS = {"terrible": ["awful", "dreadful", "hated"], "bad": ["dull", "weak", "boring"],
         "okay": ["fine", "average", "plain"], "good": ["nice", "solid", "enjoyed"],
         "great": ["superb", "brilliant", "loved"]}
TOPICS = {"sports": ["goal", "match", "striker"], "politics": ["vote", "senate", "party"],
          "science": ["atom", "telescope", "genome"]}
FILLER = ["the", "a", "story", "was", "and", "it", "really", "film", "today", "news"]


def _sentence(rng: random.Random, keys: list[str]) -> str:
    words = keys + rng.sample(FILLER, 4)
    rng.shuffle(words)
    return " ".join(words)


def write_reviews_csv(path: Path, n: int, seed: int) -> Path:
    """A 5-class CSV: `review` text, `mood` a class name (one name holds a comma, so it is quoted)."""
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "review", "mood"])
        for i in range(n):
            mood = rng.choice(list(MOODS))
            w.writerow([i, _sentence(rng, rng.sample(MOODS[mood], 2)), mood if mood != "okay" else "okay, fine"])
    return path


def write_topics_jsonl(path: Path, n: int, seed: int) -> Path:
    """Multi-label JSON Lines: `text`, `topics` a list of 0 to 3 topic names."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            topics = [t for t in TOPICS if rng.random() < 0.45]
            keys = [rng.choice(TOPICS[t]) for t in topics]
            fh.write(json.dumps({"text": _sentence(rng, keys), "topics": topics}) + "\n")
    return path


def write_similarity_tsv(path: Path, n: int, seed: int) -> Path:
    """Regression TSV: a pair (`first`, `second`) and `score`, the share of the first's mood words in the second."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("first\tsecond\tscore\n")
        for _ in range(n):
            a, b = rng.sample(list(MOODS), 2)
            same = rng.randint(0, 3)
            words = rng.sample(MOODS[a], same) + rng.sample(MOODS[b], 3 - same)
            fh.write(f"{_sentence(rng, MOODS[a][:2])}\t{_sentence(rng, words)}\t{same * 5 / 3:.3f}\n")
    return path


def _rows(path: Path, delimiter: str = ",") -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter=delimiter))


def _train(out: Path, *args: str, steps: int = 40) -> Path:
    p = run_cli([*args, *TINY, "--max-steps", str(steps), "--output-dir", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def _predict(run: Path, file: Path) -> list[dict]:
    p = subprocess.run([sys.executable, "-m", "bert_dist.cli", "predict", "--model", str(run), "--file", str(file)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(line) for line in p.stdout.splitlines()]


def _export(run: Path, out: Path) -> Path:
    p = subprocess.run([sys.executable, "-m", "bert_dist.cli", "export", "--model", str(run), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def _our_logits(run: Path, texts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (N, T), logits) of the run's own model and tokenizer, padded by hand."""
    model, src = load_run_model(run)
    enc = src.tokenizer.encode_batch(texts)
    T = max(len(e.ids) for e in enc)
    ids = torch.tensor([e.ids + [0] * (T - len(e.ids)) for e in enc])
    types = torch.tensor([e.type_ids + [0] * (T - len(e.ids)) for e in enc])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (T - len(e.ids)) for e in enc])
    with torch.no_grad():
        return ids, model(input_ids=ids, attention_mask=mask, token_type_ids=types)["logits"]


def _check_export(run: Path, hf_dir: Path, texts: list, names: list[str], problem_type: str) -> None:
    """transformers loads the export (no key missing), tokenizes as we do, and gives our logits and label names."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["problem_type"] == problem_type
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(str(hf_dir),
                                                                                  output_loading_info=True)
    assert not any(info.values()), info
    model.eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    batch = tok(*zip(*texts) if isinstance(texts[0], tuple) else (texts,), padding=True, return_tensors="pt")
    ids, ours = _our_logits(run, texts)
    assert torch.equal(batch["input_ids"], ids)
    with torch.no_grad():
        theirs = model(**batch).logits
    torch.testing.assert_close(theirs.squeeze(-1) if problem_type == "regression" else theirs, ours, atol=1e-5,
                               rtol=0)
    if names:
        assert model.config.id2label == dict(enumerate(names))
        assert model.config.label2id == {n: i for i, n in enumerate(names)}


@pytest.mark.slow
def test_five_class_csv_trains_predicts_and_exports(tmp_path):
    train = write_reviews_csv(tmp_path / "train.csv", 400, 0)
    valid = write_reviews_csv(tmp_path / "validation.csv", 60, 1)
    run = _train(tmp_path / "run", "--task", "classification", "--train-file", str(train), "--validation-file",
                 str(valid), "--text-columns", "review", "--label-column", "mood", steps=60)
    names = ["bad", "good", "great", "okay, fine", "terrible"]  # sorted: a function of the training data alone
    meta = json.loads((run / "config.json").read_text())["bert_dist"]
    assert meta["label_names"] == names and meta["num_labels"] == 5 and meta["kind"] == "classification"
    results = json.loads((run / "results.json").read_text())
    assert {"accuracy", "macro_f1"} <= set(results) and results["main_metric"] == "accuracy"
    assert results["accuracy"] > 0.4  # five classes: chance is 0.2, and the mood words say the class

    # predict gives the run's own validation predictions, row for row, with the class names
    written = [json.loads(line) for line in (run / "predictions_validation.jsonl").read_text().splitlines()]
    predicted = _predict(run, valid)
    assert predicted == [{k: v for k, v in r.items() if k != "idx"} for r in written]
    gold = [r["mood"] for r in _rows(valid)]
    assert np.mean([p["label"] == g for p, g in zip(predicted, gold)]) == pytest.approx(results["accuracy"], abs=1e-6)

    # --eval-only takes the label names from the model, not from a training split
    p = run_cli(["--task", "classification", "--validation-file", str(valid), "--text-columns", "review",
                 "--label-column", "mood", "--init", str(run), "--eval-only", "--output-dir", str(tmp_path / "eval")])
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["accuracy"] == results["accuracy"]
    bad = _csv(tmp_path / "bad.csv", ["review", "mood"], [["superb film", "great"], ["so so", "meh"]])
    p = run_cli(["--task", "classification", "--validation-file", str(bad), "--text-columns", "review",
                 "--label-column", "mood", "--init", str(run), "--eval-only", "--output-dir", str(tmp_path / "e2")])
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"the label 'meh' at row 2 is not among the 5 labels of the model {run}" in p.stderr

    hf_dir = _export(run, tmp_path / "hf")
    texts = [r["review"] for r in _rows(valid)][:8]
    _check_export(run, hf_dir, texts, names, "single_label_classification")
    pipe = transformers.pipeline("text-classification", model=str(hf_dir), device="cpu")
    assert [o["label"] for o in pipe(texts)] == [p["label"] for p in predicted[:8]]
    assert _predict(hf_dir, valid) == predicted  # the export keeps the task (columns, label names) for predict too


@pytest.mark.slow
def test_multi_label_jsonl_trains_predicts_and_exports(tmp_path):
    train = write_topics_jsonl(tmp_path / "train.jsonl", 400, 0)
    valid = write_topics_jsonl(tmp_path / "validation.jsonl", 60, 1)
    run = _train(tmp_path / "run", "--task", "multi_label", "--train-file", str(train), "--validation-file",
                 str(valid), "--label-column", "topics", steps=80)
    names = ["politics", "science", "sports"]
    assert json.loads((run / "config.json").read_text())["bert_dist"]["label_names"] == names
    results = json.loads((run / "results.json").read_text())
    assert {"micro_f1", "macro_f1", "exact_match"} <= set(results) and results["main_metric"] == "micro_f1"
    card = (run / "README.md").read_text()  # the report and model card, as for a GLUE run
    assert (run / "report.html").is_file() and "pipeline_tag: text-classification" in card
    assert "Labels (3, by id): `politics`, `science`, `sports`" in card and "sigmoid > 0.5" in card

    written = [json.loads(line) for line in (run / "predictions_validation.jsonl").read_text().splitlines()]
    predicted = _predict(run, valid)
    assert predicted == [{k: v for k, v in r.items() if k != "idx"} for r in written]
    for p in predicted:  # a label is on where its sigmoid passes 0.5
        assert p["label"] == [names[i] for i in p["prediction"]]
        assert p["prediction"] == [i for i, x in enumerate(p["probabilities"]) if x > 0.5]
    gold = [json.loads(line)["topics"] for line in valid.read_text().splitlines()]
    pred = np.array([[int(n in p["label"]) for n in names] for p in predicted])
    ref = np.array([[int(n in g) for n in names] for g in gold])
    assert (pred == ref).all(axis=1).mean() == pytest.approx(results["exact_match"], abs=1e-6)

    hf_dir = _export(run, tmp_path / "hf")
    texts = [json.loads(line)["text"] for line in valid.read_text().splitlines()][:8]
    _check_export(run, hf_dir, texts, names, "multi_label_classification")
    pipe = transformers.pipeline("text-classification", model=str(hf_dir), device="cpu", top_k=None)
    for out, p in zip(pipe(texts), predicted):  # sigmoid scores, by label name
        scores = {o["label"]: o["score"] for o in out}
        assert [scores[n] for n in names] == pytest.approx(p["probabilities"], abs=1e-5)


@pytest.mark.slow
def test_regression_tsv_of_pairs_trains_predicts_and_exports(tmp_path):
    train = write_similarity_tsv(tmp_path / "train.tsv", 300, 0)
    valid = write_similarity_tsv(tmp_path / "validation.tsv", 50, 1)
    run = _train(tmp_path / "run", "--task", "regression", "--train-file", str(train), "--validation-file",
                 str(valid), "--text-columns", "first,second", "--label-column", "score")
    results = json.loads((run / "results.json").read_text())
    assert {"pearson", "spearmanr", "mse"} <= set(results) and results["main_metric"] == "pearson"
    written = [json.loads(line) for line in (run / "predictions_validation.jsonl").read_text().splitlines()]
    predicted = _predict(run, valid)
    assert [p["prediction"] for p in predicted] == pytest.approx([r["prediction"] for r in written], abs=1e-6)
    rows = _rows(valid, "\t")
    mse = np.mean([(p["prediction"] - float(r["score"])) ** 2 for p, r in zip(predicted, rows)])
    assert mse == pytest.approx(results["mse"], rel=1e-4)
    hf_dir = _export(run, tmp_path / "hf")
    _check_export(run, hf_dir, [(r["first"], r["second"]) for r in rows[:8]], [], "regression")


def write_hub_dataset(root: Path, seed: int = 0) -> Path:
    """A dataset repository's files as the hub holds them: README.md naming two configs, parquet files per split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    stars = {"terrible": 1, "bad": 2, "okay": 3, "good": 4, "great": 5}
    for config in ("stars", "other"):
        (root / config).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", 300), ("validation", 40), ("test", 20)):
            moods = [rng.choice(list(MOODS)) for _ in range(n)]
            table = pa.table({"sentence": [_sentence(rng, rng.sample(MOODS[m], 2)) for m in moods],
                              "rating": [stars[m] * (10 if config == "stars" else 1) for m in moods]})
            pq.write_table(table, root / config / f"{split}-00000-of-00001.parquet")
    card = ["---", "configs:"]
    for config in ("stars", "other"):
        card += [f"- config_name: {config}", "  data_files:"]
        card += [f"  - split: {s}\n    path: {config}/{s}-*.parquet" for s in ("train", "validation", "test")]
    (root / "README.md").write_text("\n".join(card + ["---", "# reviews", ""]))
    return root


@pytest.mark.slow
def test_hub_layout_dataset_is_read_by_name_offline(tmp_path):
    hub = tmp_path / "datasets"
    write_hub_dataset(hub / "acme" / "reviews")
    run = _train(tmp_path / "run", "--task", "classification", "--data-dir", str(hub), "--dataset-name",
                 "acme/reviews", "--dataset-config", "stars", "--text-columns", "sentence", "--label-column", "rating")
    names = ["10", "20", "30", "40", "50"]  # numbers are named by their value and sorted by it
    assert json.loads((run / "config.json").read_text())["bert_dist"]["label_names"] == names
    assert (run / "predictions_test.jsonl").is_file()  # the dataset's test split is predicted
    assert len((run / "predictions_test.jsonl").read_text().splitlines()) == 20
    card = (run / "README.md").read_text()
    assert "--dataset-name acme/reviews" in card and "config `stars`" in card and "`10`, `20`" in card
    valid = tmp_path / "validation.jsonl"
    Dataset.from_parquet(str(hub / "acme/reviews/stars/validation-00000-of-00001.parquet")).to_json(valid)
    predicted = _predict(run, valid)
    written = [json.loads(line) for line in (run / "predictions_validation.jsonl").read_text().splitlines()]
    assert predicted == [{k: v for k, v in r.items() if k != "idx"} for r in written]
    hf_dir = _export(run, tmp_path / "hf")
    texts = [json.loads(line)["sentence"] for line in valid.read_text().splitlines()][:6]
    _check_export(run, hf_dir, texts, names, "single_label_classification")


def test_a_hub_id_that_is_not_cached_fails_in_seconds(tmp_path, capsys):
    fails(["--task", "classification", "--dataset-name", "acme/nowhere", "--preset", "tiny", "--output-dir",
           str(tmp_path / "o")], capsys, "cannot reach the Hugging Face hub to load acme/nowhere",
          "--data-dir DIR holding DIR/acme/nowhere", out=tmp_path / "o")


# ---------------------------------------------------------------------------------------------
# Bad input: one line each


def _csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = [["a fine film", "good"], ["a poor film", "bad"], ["fine again", "good"], ["poor again", "bad"]]


@pytest.mark.parametrize("kind, train, valid, args, phrases", [
    ("unseen", GOOD, [["x", "good"], ["y", "meh"]], [], ["the label 'meh' at row 2 is not among the 2 labels of "
                                                         "the training split (bad, good)"]),
    ("half numbers", [*GOOD, ["odd one", "3"]], GOOD, [], ["mixes numbers ('3' at row 5) and names ('good' at "
                                                          "row 1)"]),
    ("empty text", [["", "good"], ["  ", "bad"]], GOOD, [], ["the text column 'text' is empty (every row is blank)"]),
    ("empty labels", [["a", ""], ["b", ""]], GOOD, [], ["the label column 'label' is empty"]),
    ("one class", [["a", "good"], ["b", "good"]], GOOD, [], ["every row of the training split has the label 'good'"]),
    ("fractional", [["a", "1"], ["b", "2.5"]], GOOD, [], ["the label 2.5 at row 2 is fractional"]),
    ("no text column", GOOD, GOOD, ["--text-columns", "review"], ["has no text column 'review' (columns: text, "
                                                                   "label); give --text-columns"]),
    ("no label column", GOOD, GOOD, ["--label-column", "stars"], ["has no label column 'stars' (columns: text, "
                                                                   "label); give --label-column"]),
])
def test_bad_own_data_is_one_line(tmp_path, capsys, kind, train, valid, args, phrases):
    t = _csv(tmp_path / "train.csv", ["text", "label"], train)
    v = _csv(tmp_path / "validation.csv", ["text", "label"], valid)
    fails(["--task", "classification", "--train-file", str(t), "--validation-file", str(v), *args, "--preset",
           "tiny", "--vocab-size", "100", "--output-dir", str(tmp_path / "o")], capsys, *phrases, out=tmp_path / "o")


def test_a_multi_label_cell_that_is_not_a_list_is_one_line(tmp_path, capsys):
    t = _jsonl(tmp_path / "train.jsonl", [{"text": "a b", "label": ["x"]}, {"text": "c", "label": "y"}])
    fails(["--task", "multi_label", "--train-file", str(t), "--validation-file", str(t), "--preset", "tiny",
           "--output-dir", str(tmp_path / "o")], capsys, "the labels at row 2 are 'y', not a list",
          out=tmp_path / "o")
    t = _csv(tmp_path / "train.csv", ["text", "label"], [["a", '["x", "y"]'], ["b", "x; y"]])
    fails(["--task", "multi_label", "--train-file", str(t), "--validation-file", str(t), "--preset", "tiny",
           "--output-dir", str(tmp_path / "o")], capsys, "the labels at row 2 are 'x; y', not a list",
          "CSV/TSV: a JSON list in the cell", out=tmp_path / "o")


def test_a_list_of_labels_for_classification_points_to_multi_label(tmp_path, capsys):
    t = _jsonl(tmp_path / "train.jsonl", [{"text": "a b", "label": "x"}, {"text": "c", "label": ["x", "y"]}])
    fails(["--task", "classification", "--train-file", str(t), "--validation-file", str(t), "--preset", "tiny",
           "--output-dir", str(tmp_path / "o")], capsys, "the label at row 2 is a list (['x', 'y']); for rows with "
          "several labels use --task multi_label", out=tmp_path / "o")


def test_regression_labels_that_are_half_numbers_are_one_line(tmp_path, capsys):
    t = _csv(tmp_path / "train.csv", ["text", "label"], [["a", "1.5"], ["b", "high"]])
    fails(["--task", "regression", "--train-file", str(t), "--validation-file", str(t), "--preset", "tiny",
           "--output-dir", str(tmp_path / "o")], capsys, "the label 'high' at row 2 is not a finite number",
          out=tmp_path / "o")


@pytest.mark.parametrize("args, phrase", [
    (["--task", "classification"], "--task classification trains on your own data: give --train-file"),
    (["--task", "sst2", "--text-columns", "review"], "--text-columns describes your own data"),
    (["--task", "regression", "--text-columns", "a,b,c"], "--text-columns takes one column name, or two"),
    (["--task", "regression", "--dataset-config", "x"], "--dataset-config picks a config of --dataset-name"),
    (["--task", "classification", "--label-column", "text"], "--label-column text is also one of --text-columns"),
    (["--task", "classification", "--dataset-name", "./nowhere"], "--dataset-name ./nowhere: no such directory"),
    (["--task", "multi_label", "--smoke"], "--smoke runs a GLUE, SQuAD or pretraining task"),
    (["--task", "sst2", "--seeds", "1,x"], "--seeds: 'x' is not an integer"),
    (["--task", "sst2", "--lrs", "2e-5,-1"], "--lrs: -1.0 is not a positive finite learning rate"),
    (["--task", "pretrain", "--seeds", "1,2"], "--task pretrain has none"),
])
def test_bad_own_data_flags_are_one_line(tmp_path, capsys, args, phrase):
    fails([*args, "--preset", "tiny", "--output-dir", str(tmp_path / "o")], capsys, phrase, out=tmp_path / "o")


def test_a_named_dataset_with_an_unknown_config_is_one_line(tmp_path, capsys):
    write_hub_dataset(tmp_path / "acme" / "reviews")
    fails(["--task", "classification", "--data-dir", str(tmp_path), "--dataset-name", "acme/reviews",
           "--dataset-config", "nope", "--preset", "tiny", "--output-dir", str(tmp_path / "o")], capsys,
          "--dataset-config nope: no such config", "Available: ['stars', 'other']", out=tmp_path / "o")
    fails(["--task", "classification", "--data-dir", str(tmp_path), "--dataset-name", "acme/missing",
           "--preset", "tiny", "--output-dir", str(tmp_path / "o")], capsys,
          "no folder for --dataset-name acme/missing", out=tmp_path / "o")


# ---------------------------------------------------------------------------------------------
# Pieces


def _spec(task: str, **flags: str):
    return own.task_from_flags(task, config_from_args(["--task", task, *[x for k, v in flags.items()
                                                                         for x in (f"--{k}", v)]]).data)


def test_label_names_are_sorted_numbers_by_value_and_names_by_text():
    numbers = DatasetDict({"train": Dataset.from_dict({"text": list("abcd"), "label": [10, 2, 2, 1]})})
    assert own.settle_labels(numbers, _spec("classification"), "x").label_names == ("1", "2", "10")
    names = DatasetDict({"train": Dataset.from_dict({"text": list("abc"), "label": ["b", "a", "C"]})})
    assert own.settle_labels(names, _spec("classification"), "x").label_names == ("C", "a", "b")
    # a hub ClassLabel keeps its own order, and its ids
    feats = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos", "mixed"])})
    hub = DatasetDict({"train": Dataset.from_dict({"text": list("ab"), "label": [2, 0]}, features=feats)})
    spec = own.settle_labels(hub, _spec("classification"), "x")
    assert spec.label_names == ("neg", "pos", "mixed")
    assert check_raw(hub, spec, "x")["train"]["label"] == [2, 0]


def test_multi_label_rows_become_one_column_per_label():
    feats = Features({"text": Value("string"), "tags": List(Value("string"))})
    raw = DatasetDict({"train": Dataset.from_dict({"text": list("abc"), "tags": [["y", "x"], [], ["z", "y"]]},
                                                  features=feats),
                       "validation": Dataset.from_dict({"text": ["d"], "tags": ['["z"]']})})  # a CSV cell: JSON
    spec = own.settle_labels(raw, _spec("multi_label", **{"label-column": "tags"}), "x")
    assert spec.label_names == ("x", "y", "z") and spec.num_labels == 3
    out = check_raw(raw, spec, "x")
    assert out["train"]["tags"] == [[1, 1, 0], [0, 0, 0], [0, 1, 1]] and out["validation"]["tags"] == [[0, 0, 1]]


def test_the_metric_module_scores_each_kind():
    m = load_metric("classification", "classification")
    assert m.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]) == pytest.approx(
        {"accuracy": 0.75, "macro_f1": (1 + 2 / 3 + 2 / 3) / 3})
    m = load_metric("classification", "multi_label")
    got = m.compute(predictions=[[1, 0, 0], [1, 1, 0], [0, 0, 1]], references=[[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    # micro: tp 2, fp 2, fn 0 -> 2/3; macro: label 0 2/3, label 1 1, label 2 0 -> 5/9; one row of three exact
    assert got == pytest.approx({"micro_f1": 2 / 3, "macro_f1": 5 / 9, "exact_match": 1 / 3})
    m = load_metric("classification", "regression")
    got = m.compute(predictions=[1.0, 2.0, 4.0], references=[1.0, 2.0, 3.0])
    assert got["mse"] == pytest.approx(1 / 3) and got["spearmanr"] == pytest.approx(1.0)


def test_multi_label_head_is_sigmoid_and_bce_as_transformers():
    from bert_dist.config import preset

    torch.manual_seed(0)
    ours = BertForSequenceClassification(preset("tiny", vocab_size=100), 4, multi_label=True).eval()
    hf_cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=256, num_labels=4, problem_type="multi_label_classification")
    hf = transformers.BertForSequenceClassification(hf_cfg).eval()
    hf.load_state_dict({k: v for k, v in ours.state_dict().items()}, strict=False)
    ids = torch.randint(5, 100, (3, 7))
    labels = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]])  # as the collator gives them: int64 (B, C)
    with torch.no_grad():
        mine = ours(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        theirs = hf(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels.float())
    torch.testing.assert_close(mine["logits"], theirs.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(mine["loss"], theirs.loss, atol=1e-6, rtol=0)


def test_config_keeps_own_data_flags():
    cfg = config_from_args(["--task", "classification", "--text-columns", "a, b", "--label-column", "y",
                            "--dataset-name", "org/x", "--dataset-config", "c"])
    spec = own.task_from_flags(cfg.task, cfg.data)
    assert spec.text_columns == ("a", "b") and spec.label_column == "y" and spec.hub_path == "org/x"
    assert spec.hub_config == "c" and spec.from_flags and spec.metric == "classification"
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.slow
def test_multi_label_on_two_processes_scores_every_row_once(tmp_path):
    """gloo, 2 processes: each validation row is predicted once (gather_for_metrics drops the repeated padding rows),
    so the run's exact match is that of its own predictions file."""
    train = write_topics_jsonl(tmp_path / "train.jsonl", 200, 0)
    valid = write_topics_jsonl(tmp_path / "validation.jsonl", 37, 1)  # odd: the last batch is evened out
    out = tmp_path / "run"
    p = run_cli(["--task", "multi_label", "--train-file", str(train), "--validation-file", str(valid),
                 "--label-column", "topics", *TINY, "--eval-batch-size", "8", "--max-steps", "10", "--output-dir",
                 str(out)], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    written = [json.loads(line) for line in (out / "predictions_validation.jsonl").read_text().splitlines()]
    assert [r["idx"] for r in written] == list(range(37))
    gold = [json.loads(line)["topics"] for line in valid.read_text().splitlines()]
    exact = np.mean([sorted(r["label"]) == sorted(g) for r, g in zip(written, gold)])
    assert exact == pytest.approx(json.loads((out / "results.json").read_text())["exact_match"], abs=1e-6)

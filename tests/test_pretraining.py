"""Pretraining: masking statistics, documents and NSP pairs, the tied MLM head, parity with transformers'
BertForPreTraining, and the pretrain -> fine-tune hand-off through the real entry point.

CPU, tiny sizes, data the tests make themselves, no network. transformers is the reference only here.
"""

from __future__ import annotations

import json
import os
import random

import pyarrow as pa
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from bert_dist.config import preset  # noqa: E402
from bert_dist.data.collate import MLMCollator, PadCollator  # noqa: E402
from bert_dist.data.pretraining import (  # noqa: E402
    IS_NEXT,
    IS_RANDOM,
    cut_long_sentences,
    documents,
    hold_out,
    nsp_pairs,
    pair_batch,
    schema,
    split_sentences,
)
from bert_dist.model import BertForPreTraining, BertForSequenceClassification  # noqa: E402
from bert_dist.tokenizer import train_tokenizer  # noqa: E402

SPECIAL = [0, 1, 2, 3, 4]  # [PAD] [UNK] [CLS] [SEP] [MASK]
PAD, CLS, SEP, MASK = 0, 2, 3, 4
V = 1000


def _rows(n: int, seed: int) -> list[dict]:
    """[CLS] A [SEP] B [SEP] rows of random ordinary ids, 16-128 long (so batches are padded)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a = [rng.randrange(5, V) for _ in range(rng.randint(5, 60))]
        b = [rng.randrange(5, V) for _ in range(rng.randint(5, 60))]
        ids = [CLS, *a, SEP, *b, SEP]
        rows.append({"input_ids": ids, "token_type_ids": [0] * (len(a) + 2) + [1] * (len(b) + 1),
                     "next_sentence_label": rng.randrange(2), "idx": i})
    return rows


def _collator(seed: int = 0) -> MLMCollator:
    return MLMCollator(MASK, V, SPECIAL, pad_token_id=PAD, pad_to_multiple_of=8, seed=seed)


def labels_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's masked positions as (B, T) labels: the original id where a position was chosen, else -100."""
    labels = torch.full_like(batch["input_ids"], -100)
    qm = max(batch["masked_positions"].shape[1], 1)
    rows = batch["masked_index"] // qm
    labels[rows, batch["masked_positions"].view(-1)[batch["masked_index"]]] = batch["masked_labels"]
    return labels


# ---------------------------------------------------------------------------------------------
# Masking


def test_masking_rates_and_special_tokens():
    rows, collator, pad = _rows(1600, 0), _collator(), PadCollator(PAD, 8, scalar_keys=("next_sentence_label",))
    maskable = chosen = masked = kept = replaced = 0
    for i in range(0, len(rows), 32):
        batch, plain = collator(rows[i : i + 32]), pad(rows[i : i + 32])
        orig, ids, labels = plain["input_ids"], batch["input_ids"], labels_of(batch)
        sel = labels != -100
        never = torch.isin(orig, torch.tensor(SPECIAL)) | (plain["attention_mask"] == 0)
        assert not sel[never].any(), "a special or pad token was chosen"
        assert torch.equal(ids[never], orig[never]), "a special or pad token was changed"
        assert torch.equal(labels[sel], orig[sel])
        assert not torch.isin(ids[sel & (ids != MASK)], torch.tensor(SPECIAL)).any(), "replaced by a special token"
        assert torch.equal(batch["next_sentence_label"], plain["next_sentence_label"])
        assert torch.equal(batch["attention_mask"], plain["attention_mask"])
        maskable += int((~never).sum())
        chosen += int(sel.sum())
        masked += int((ids[sel] == MASK).sum())
        kept += int((ids[sel] == orig[sel]).sum())
        replaced += int(((ids[sel] != MASK) & (ids[sel] != orig[sel])).sum())
    assert maskable > 100_000
    assert abs(chosen / maskable - 0.15) < 0.005
    # A random replacement can draw the original id (1 in ~1000): it then counts as kept.
    assert abs(masked / chosen - 0.8) < 0.015
    assert abs(replaced / chosen - 0.1) < 0.015
    assert abs(kept / chosen - 0.1) < 0.015


def test_masks_are_reproducible_fresh_each_epoch_and_independent_of_the_batch():
    rows = _rows(64, 1)
    a, b = _collator(seed=5)(rows[:32]), _collator(seed=5)(rows[:32])
    assert torch.equal(labels_of(a), labels_of(b)) and torch.equal(a["input_ids"], b["input_ids"])
    other_seed = _collator(seed=6)(rows[:32])
    assert not torch.equal(labels_of(a), labels_of(other_seed))
    c = _collator(seed=5)
    c.set_epoch(1)
    assert not torch.equal(labels_of(a), labels_of(c(rows[:32])))
    # A row's mask depends on (seed, epoch, row), not on what else is in its batch (nor its padding).
    alone = _collator(seed=5)([rows[3]])
    n = len(rows[3]["input_ids"])
    assert torch.equal(labels_of(alone)[0, :n], labels_of(a)[3, :n])


def _word_rows(n: int, seed: int) -> list[dict]:
    """[CLS] words [SEP] words [SEP] rows, words of 1-4 pieces, with their word_start flags (True at a first piece);
    B starts with a word's tail half the time (a truncated front)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        ids, starts = [CLS], [True]
        for segment in range(2):
            if segment and rng.random() < 0.5:
                ids += [rng.randrange(5, V)] * 2
                starts += [False, False]
            for _ in range(rng.randint(3, 25)):
                k = rng.randint(1, 4)
                ids += [rng.randrange(5, V) for _ in range(k)]
                starts += [True] + [False] * (k - 1)
            ids.append(SEP)
            starts.append(True)
        rows.append({"input_ids": ids, "word_start": starts, "idx": i})
    return rows


def _words(starts: list[bool], ids: list[int]) -> list[list[int]]:
    """Positions of each word: a start, its continuations; specials alone; a tail after a special is its own."""
    words: list[list[int]] = []
    for p, (s, t) in enumerate(zip(starts, ids)):
        if s or t in SPECIAL or ids[p - 1] in SPECIAL:
            words.append([p])
        else:
            words[-1].append(p)
    return words


@pytest.mark.parametrize("whole_word", [True, False])
def test_whole_word_masking_chooses_a_words_pieces_together(whole_word):
    rows = _word_rows(1500, 0)
    collator = MLMCollator(MASK, V, SPECIAL, pad_token_id=PAD, pad_to_multiple_of=8, seed=0, whole_word=whole_word)
    tokens = chosen = words = chosen_words = split = 0
    for i in range(0, len(rows), 32):
        batch = collator(rows[i : i + 32])
        for r, labels in zip(rows[i : i + 32], labels_of(batch)):
            sel = (labels != -100).tolist()
            for w in _words(r["word_start"], r["input_ids"]):
                if r["input_ids"][w[0]] in SPECIAL:
                    assert not sel[w[0]]
                    continue
                picked = [sel[p] for p in w]
                words += 1
                chosen_words += all(picked)
                split += any(picked) and not all(picked)
                tokens += len(w)
                chosen += sum(picked)
    assert tokens > 50_000
    assert abs(chosen / tokens - 0.15) < 0.01  # the share of tokens is the same either way
    if whole_word:
        assert split == 0, "a word's pieces were chosen apart"
        assert abs(chosen_words / words - 0.15) < 0.01
    else:
        assert split > 1000  # per token, words are split: the check above can fail


# ---------------------------------------------------------------------------------------------
# Documents and NSP pairs


def _documents(n_docs: int = 40, seed: int = 0) -> list[list[np.ndarray]]:
    """Document d's tokens are consecutive integers from 10_000 * (d + 1): the source of any token is known."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        nxt, doc = 10_000 * (d + 1), []
        for _ in range(rng.randint(4, 30)):
            k = rng.randint(3, 40)
            doc.append(np.arange(nxt, nxt + k, dtype=np.int32))
            nxt += k
        docs.append(doc)
    return docs


def _pair_rows(docs, max_length: int, seed: int, dupe_factor: int) -> list[dict]:
    """NSP pairs of `docs` as the prepared rows (through the Arrow batch a shard holds)."""
    continues = np.zeros(500_000, dtype=bool)
    sch = schema("mlm-nsp", pa.uint32())
    passes = nsp_pairs([cut_long_sentences(d, max_length) for d in docs], max_length, random.Random(seed),
                       dupe_factor)
    return [row for pairs in passes for row in pair_batch(pairs, 0, CLS, SEP, continues, sch).to_pylist()]


def test_nsp_pairs_are_balanced_and_never_pair_a_segment_with_itself():
    rows = _pair_rows(_documents(), max_length=64, seed=0, dupe_factor=3)
    labels = [r["next_sentence_label"] for r in rows]
    assert len(rows) > 500
    assert 0.42 < labels.count(IS_NEXT) / len(labels) < 0.58
    for r in rows:
        ids, types, label = r["input_ids"], r["token_type_ids"], r["next_sentence_label"]
        assert len(ids) == r["length"] <= 64
        assert ids[0] == CLS and ids[-1] == SEP and ids.count(SEP) == 2
        cut = ids.index(SEP)
        a, b = ids[1:cut], ids[cut + 1 : -1]
        assert a and b
        assert types == [0] * (len(a) + 2) + [1] * (len(b) + 1)
        doc_a, doc_b = {t // 10_000 for t in a}, {t // 10_000 for t in b}
        assert len(doc_a) == len(doc_b) == 1
        assert a == list(range(a[0], a[0] + len(a))) and b == list(range(b[0], b[0] + len(b)))  # contiguous runs
        if label == IS_NEXT:
            assert doc_a == doc_b and a[-1] < b[0], "B must follow A in the same document"
        else:
            assert label == IS_RANDOM and doc_a != doc_b, "a random B must come from another document"
    again = _pair_rows(_documents(), max_length=64, seed=0, dupe_factor=3)
    assert [r["input_ids"] for r in again] == [r["input_ids"] for r in rows]
    assert [r["input_ids"] for r in _pair_rows(_documents(), 64, seed=1, dupe_factor=3)] != \
        [r["input_ids"] for r in rows]


def test_document_rules_and_sentences():
    assert split_sentences(" He was born in 1950 . In 1970 he moved to H. americanus ! Then \"Quoted.\" Next\nLine") \
        == ["He was born in 1950 .", "In 1970 he moved to H. americanus !", "Then \"Quoted.\"", "Next", "Line"]
    wiki = ["", " = Alpha = \n", "", " First one here . Second one there . \n", "", " = = Early life = = \n", "",
            " Third one . \n", "", " = Beta = \n", "", " Fourth one . \n", ""]
    blank = ["first one here .", "second one there .", "", "", "third one .", "", "fourth one ."]
    rows = ["first one here . Second one there .", "third one .", "fourth one ."]
    tok = train_tokenizer(wiki + blank + rows, vocab_size=120)
    sentences = [[len(d) for d in documents(t, tok)] for t in (wiki, blank, rows)]
    # WikiText: articles start at ` = Title = `; headings are dropped. Else blank rows, else one row each.
    assert sentences == [[3, 1], [2, 1, 1], [2, 1, 1]]
    assert tok.decode(documents(wiki, tok)[0][0].tolist()) == "first one here."  # the heading row is no sentence
    train, held = hold_out(_documents(40))
    assert (len(train), len(held)) == (38, 2)
    assert not {id(d) for d in train} & {id(d) for d in held}


def test_document_rules_are_not_switched_by_one_stray_row():
    """An empty row of a .jsonl (a row a document) is a missing document, not a separator that merges the others;
    a `= x + y =` line inside a paragraph of a text file is text, not a WikiText title."""
    articles = [" ".join(f"Sentence {j} of article {i} is here." for j in range(3)) for i in range(12)]
    articles[5] = ""
    tok = train_tokenizer(articles, vocab_size=120)
    docs = documents(articles, tok, lines=False)
    assert len(docs) == 11 and all(len(d) == 3 for d in docs)
    text = []
    for d in range(6):
        text += [f"First line of doc {d} .", f"Second line of doc {d} ."] + (["= x + y ="] if d == 3 else []) + [""]
    assert len(documents(text, tok)) == 6  # a text file's lines


def test_long_unsplit_text_keeps_its_tokens_and_real_next_sentences():
    """Lower-case or CJK text has no sentence ends the splitter knows (CJK: 。！？ are): a row longer than half a
    sequence is cut into pieces, not truncated to one chunk with a random B (most tokens lost, NSP all random)."""
    assert split_sentences("我们去学校。他们来了！好吗？ 是的") == ["我们去学校。", "他们来了！", "好吗？", "是的"]
    assert split_sentences("你好？！我很好。他说：「走吧。」然后走了") == \
        ["你好？！", "我很好。", "他说：「走吧。」", "然后走了"]
    rows = []
    for d in range(8):
        rows += [" ".join(f"this is lower case text number {j} of doc {d} and it goes on" for j in range(10)), ""]
    tok = train_tokenizer(rows, vocab_size=150)
    docs = documents(rows, tok)
    total = sum(len(s) for d in docs for s in d)
    pairs = next(iter(nsp_pairs([cut_long_sentences(d, 32) for d in docs], 32, random.Random(0), 1, 0.0)))
    kept = sum(len(a) + len(b) for a, b, _ in pairs)
    assert kept > 0.6 * total  # was about a third: each row a chunk of one sentence, truncated
    assert IS_NEXT in [label for _, _, label in pairs]


def test_pairs_from_real_text():
    texts = ["", " = Alpha = \n", ""] + [" ".join(f"Word{i} goes here and there ." for i in range(j, j + 6)) + "\n"
                                         for j in range(0, 60, 6)]
    texts += ["", " = Beta = \n", ""] + [" ".join(f"Other{i} stays put ." for i in range(j, j + 5)) + "\n"
                                        for j in range(0, 50, 5)]
    tok = train_tokenizer(texts, vocab_size=200)
    pairs = next(iter(nsp_pairs([cut_long_sentences(d, 32) for d in documents(texts, tok)], 32, random.Random(0))))
    assert len(pairs) > 10 and max(len(a) + len(b) + 3 for a, b, _ in pairs) <= 32
    assert {label for _, _, label in pairs} == {IS_NEXT, IS_RANDOM}


# ---------------------------------------------------------------------------------------------
# Model


def _tiny() -> BertForPreTraining:
    torch.manual_seed(0)
    return BertForPreTraining(preset("tiny", vocab_size=V, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _batch(model_inputs_only: bool = False) -> dict[str, torch.Tensor]:
    batch = _collator()(_rows(4, 2))
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")} if model_inputs_only else batch


def test_decoder_weight_is_the_word_embedding_tensor():
    model = _tiny()
    dec, emb = model.cls.predictions.decoder.weight, model.bert.embeddings.word_embeddings.weight
    assert dec is emb and dec.data_ptr() == emb.data_ptr()
    assert sum(p is emb for p in model.parameters()) == 1  # one parameter, one gradient, one optimizer state
    model(**_batch())["loss"].backward()
    with torch.no_grad():
        emb.add_(1.0)
    assert torch.equal(model.cls.predictions.decoder.weight, emb)


def test_masked_position_logits_equal_full_vocabulary_logits():
    model = _tiny().eval()
    batch = _batch()
    with torch.no_grad():
        masked = model(**batch)
        full = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    labels = labels_of(batch)
    sel = labels != -100
    assert masked["mlm_logits"].shape == (int(sel.sum()), V)
    torch.testing.assert_close(masked["mlm_logits"], full["mlm_logits"][sel], atol=1e-5, rtol=1e-5)
    assert torch.equal(batch["masked_labels"], labels[sel])
    torch.testing.assert_close(masked["nsp_logits"], full["nsp_logits"])


def test_parity_with_transformers_bert_for_pretraining():
    transformers = pytest.importorskip("transformers")
    ours = _tiny().eval()
    c = ours.config
    ref = transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
        layer_norm_eps=c.layer_norm_eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager")).eval()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"cls.predictions.decoder.bias", "bert.embeddings.position_ids"}
    batch = _batch(model_inputs_only=True)
    with torch.no_grad():
        mine, theirs = ours(**batch), ref(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(mine["mlm_logits"][real], theirs.prediction_logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine["nsp_logits"], theirs.seq_relationship_logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# End to end, through the real entry point


def test_tokenizer_training_flags_refused_or_reported_where_they_do_not_apply(tmp_path, capsys):
    from bert_dist.run import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("some words here .\n" * 20)
    for extra, phrase in ((["--vocab-size", "-5"], "--vocab-size must be in"),
                          (["--vocab-size", "5000000000"], "--vocab-size must be in"),
                          (["--tokenizer", str(corpus)], "--init and --tokenizer do not apply")):
        with pytest.raises(SystemExit):
            main(["--task", "tokenizer", "--train-file", str(corpus), "--output-dir", str(tmp_path / "t"), *extra])
        assert phrase in " ".join(capsys.readouterr().err.split())
        assert not (tmp_path / "t").exists()  # nothing left behind to refuse the corrected rerun


def test_tokenizer_task_writes_tokenizer_files(tmp_path):
    from bert_dist.run import main
    from bert_dist.tokenizer import load_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"The Quick fox number {i} jumps over Lazy dogs ." for i in range(200)) + "\n")
    out = tmp_path / "tok"
    assert main(["--task", "tokenizer", "--train-file", str(corpus), "--vocab-size", "120", "--no-lowercase",
                 "--output-dir", str(out)]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "vocab.txt").is_file()
    assert (out / "vocab.txt").read_text().splitlines()[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert "Quick" in load_tokenizer(out).encode("Quick").tokens  # --no-lowercase kept the case


def test_the_tokenizer_command_twice_gives_byte_identical_files(tmp_path):
    """The `tokenizers` trainer numbers the `##x` pieces in a per-process hash order and breaks ties between equal merge
    counts by those numbers: two trainings on one corpus gave the same tokens in another order (and at the edge of
    the vocabulary other tokens). Now vocab.txt and tokenizer.json are the same, byte for byte."""
    from bert_dist.run import main

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzéüßΣ"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(500)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(" ".join(rng.choice(words) for _ in range(12)) + ".\n" for _ in range(400)))
    outs = [tmp_path / f"tok{i}" for i in range(2)]
    for out in outs:
        assert main(["--task", "tokenizer", "--train-file", str(corpus), "--vocab-size", "400", "--output-dir",
                     str(out)]) == 0
    for name in ("vocab.txt", "tokenizer.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    vocab = (outs[0] / "vocab.txt").read_text().splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(vocab) == 400
    assert {"##a", "##ß", "##σ"} <= set(vocab) and "##ü" not in vocab  # lowercased, accents stripped


def test_a_vocab_size_below_the_alphabet_is_warned_about(tmp_path, capsys):
    from bert_dist.run import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"The quick fox number {i} jumps" for i in range(50)) + "\n")
    assert main(["--task", "tokenizer", "--train-file", str(corpus), "--vocab-size", "6", "--output-dir",
                 str(tmp_path / "tok")]) == 0
    n = len((tmp_path / "tok" / "vocab.txt").read_text().splitlines())
    assert n > 6
    assert f"--vocab-size 6: the tokenizer has {n} tokens" in " ".join(capsys.readouterr().err.split())


def test_pretrain_then_finetune_through_the_entry_point(tmp_path):
    from bert_dist.run import main
    from bert_dist.weights import load_init, load_weights

    pt, ft, ft_eval = tmp_path / "pt", tmp_path / "ft", tmp_path / "ft_eval"
    assert main(["--task", "pretrain", "--smoke", "--max-steps", "4", "--output-dir", str(pt)]) == 0
    results = json.loads((pt / "results.json").read_text())
    assert {"mlm_loss", "perplexity", "mlm_accuracy", "nsp_accuracy"} <= results.keys()
    assert results["steps"] == 4 and 0 <= results["mlm_accuracy"] <= 1
    pretrained = load_file(str(pt / "model.safetensors"))
    assert "cls.predictions.transform.dense.weight" in pretrained and "cls.seq_relationship.weight" in pretrained
    assert "cls.predictions.decoder.weight" not in pretrained  # tied: stored once, as the word embeddings
    assert json.loads((pt / "config.json").read_text())["bert_dist"]["task"] == "pretrain"
    assert (pt / "tokenizer.json").is_file()

    # The hand-off: the encoder and tokenizer load, the pretraining heads are unused, the classifier is new.
    src = load_init(str(pt))
    report = load_weights(BertForSequenceClassification(src.config, 2), src.state_dict, str(pt))
    assert report["unused"] and all(k.startswith("cls.") for k in report["unused"])
    assert sorted(report["new"]) == ["classifier.bias", "classifier.weight"]

    # --eval-only saves the model as loaded: its encoder is the pretrained one, tensor for tensor.
    assert main(["--task", "sst2", "--smoke", "--init", str(pt), "--eval-only", "--output-dir", str(ft_eval)]) == 0
    loaded = load_file(str(ft_eval / "model.safetensors"))
    assert not any(k.startswith("cls.") for k in loaded)
    for k, v in pretrained.items():
        if k.startswith("bert."):
            assert torch.equal(loaded[k], v), k
    assert main(["--task", "sst2", "--smoke", "--init", str(pt), "--max-steps", "3", "--output-dir", str(ft)]) == 0
    assert json.loads((ft / "results.json").read_text())["steps"] == 3


def test_accelerates_warning_about_the_tied_decoder_is_dropped_and_others_pass(capsys):
    """accelerate warns at every checkpoint that it left the MLM decoder's weight out (it is the word embeddings);
    that one warning is dropped, a warning about any other shared tensor still shows."""
    import logging

    from accelerate import PartialState
    from accelerate.utils.other import clean_state_dict_for_safetensors

    from bert_dist.console import setup_logging

    PartialState()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging(True)
        kept = clean_state_dict_for_safetensors(BertForPreTraining(preset("tiny", vocab_size=50)).state_dict())
        assert "cls.predictions.decoder.weight" not in kept  # accelerate did leave it out
        shared = torch.zeros(3)
        clean_state_dict_for_safetensors({"a": shared, "b": shared})
    finally:
        root.handlers[:], root.level = handlers, level
    err = " ".join(capsys.readouterr().err.split())
    assert "Removed shared tensor {'b'}" in err
    assert "decoder" not in err


def test_mlm_metrics_with_no_masked_token_are_undefined_not_perfect():
    from bert_dist.pretrain import mlm_metrics

    sums = {"mlm_count": torch.tensor([0, 0]), "mlm_loss_sum": torch.tensor([0.0, 0.0]),
            "mlm_correct": torch.tensor([0, 0]), "nsp_correct": torch.tensor([1.0, 0.0])}
    m = mlm_metrics(sums)
    assert m["mlm_loss"] is None and m["perplexity"] is None and m["mlm_accuracy"] is None
    assert m["nsp_accuracy"] == 0.5
    sums["mlm_count"], sums["mlm_loss_sum"], sums["mlm_correct"] = (torch.tensor([2, 2]), torch.tensor([2.0, 2.0]),
                                                                    torch.tensor([1, 2]))
    assert mlm_metrics(sums)["mlm_loss"] == 1.0 and mlm_metrics(sums)["mlm_accuracy"] == 0.75

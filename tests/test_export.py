"""Export to Hugging Face format: transformers' Auto classes load it and agree with our model and tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from bert_dist.config import preset
from bert_dist.model import BertForPreTraining, BertForQuestionAnswering, BertForSequenceClassification
from bert_dist.tokenizer import train_tokenizer
from bert_dist.weights import export_hf, save_run_model

transformers = pytest.importorskip("transformers")

CORPUS = [
    "The cat sat on the mat.", "A Café in Zürich serves naïve crêpes!", "Don't panic: 42 is the answer.",
    "東京 and 北京 are cities.", "It was the best of times, it was the worst of times.",
    "Unbelievably, the unbreakable record broke.", "Hello, World! HELLO again.",
] * 20
SENTENCES = ["The cat sat on the MAT.", "Crêpes in Zürich, naïvely?", "東京 is big", "unbelievable   spacing\there",
             "zzyzx qwerty"]
PAIRS = [("The cat sat.", "The mat was sat on."), ("Is 42 the answer?", "Don't panic.")]


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    # Our init zeroes biases and sets LayerNorm to ones: random values everywhere make a mapping slip show.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _export(tmp_path, model, meta, lowercase=True):
    tok = train_tokenizer(CORPUS, vocab_size=200, lowercase=lowercase)
    run = tmp_path / "run"
    save_run_model(model, run, model.config, meta, tok)
    return export_hf(run, tmp_path / "hf"), tok


def _inputs(tok):
    enc = tok.encode_batch(SENTENCES[:3] + PAIRS)
    T = max(len(e.ids) for e in enc)
    ids = torch.tensor([e.ids + [0] * (T - len(e.ids)) for e in enc])
    types = torch.tensor([e.type_ids + [0] * (T - len(e.ids)) for e in enc])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (T - len(e.ids)) for e in enc])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _load(cls, path):
    model, info = cls.from_pretrained(str(path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _bert(tok_size=200):
    return preset("tiny", vocab_size=tok_size)


@pytest.mark.parametrize("regression", [False, True])
def test_sequence_classification_matches_transformers(tmp_path, regression):
    num_labels = 1 if regression else 3
    ours = _randomize(BertForSequenceClassification(_bert(), num_labels, regression=regression))
    names = [] if regression else ["entailment", "neutral", "contradiction"]
    meta = {"task": "stsb" if regression else "mnli", "kind": "regression" if regression else "classification",
            "num_labels": num_labels, "label_names": names}
    out, tok = _export(tmp_path, ours, meta)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"] and cfg["model_type"] == "bert"
    assert cfg["problem_type"] == ("regression" if regression else "single_label_classification")
    hf = _load(transformers.AutoModelForSequenceClassification, out)
    assert hf.config.num_labels == num_labels
    if not regression:
        assert hf.config.id2label == dict(enumerate(names)) and hf.config.label2id["neutral"] == 1
    x = _inputs(tok)
    with torch.no_grad():
        want = ours(**x)["logits"]
        got = hf(**x).logits
    torch.testing.assert_close(got.squeeze(-1) if regression else got, want, atol=1e-5, rtol=0)


def test_question_answering_matches_transformers(tmp_path):
    ours = _randomize(BertForQuestionAnswering(_bert()))
    out, tok = _export(tmp_path, ours, {"task": "squad", "kind": "qa", "num_labels": 0, "label_names": []})
    hf = _load(transformers.AutoModelForQuestionAnswering, out)
    x = _inputs(tok)
    real = x["attention_mask"].bool()  # padded positions carry no meaning in either model
    with torch.no_grad():
        want, got = ours(**x), hf(**x)
    torch.testing.assert_close(got.start_logits[real], want["start_logits"][real], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.end_logits[real], want["end_logits"][real], atol=1e-5, rtol=0)


def test_pretraining_matches_transformers_with_the_decoder_tied(tmp_path):
    ours = _randomize(BertForPreTraining(_bert()))
    out, tok = _export(tmp_path, ours, {"task": "pretrain", "kind": "pretrain", "max_length": 128})
    hf = _load(transformers.BertForPreTraining, out)
    emb = hf.bert.embeddings.word_embeddings.weight
    assert hf.cls.predictions.decoder.weight.data_ptr() == emb.data_ptr()  # tied, as in pretraining
    x = _inputs(tok)
    real = x["attention_mask"].bool()
    with torch.no_grad():
        want, got = ours(**x), hf(**x)
    torch.testing.assert_close(got.prediction_logits[real], want["mlm_logits"][real], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.seq_relationship_logits, want["nsp_logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("lowercase", [True, False])
def test_auto_tokenizer_gives_our_ids(tmp_path, lowercase):
    model = BertForSequenceClassification(_bert(), 2)
    meta = {"task": "sst2", "kind": "classification", "num_labels": 2, "label_names": ["negative", "positive"]}
    out, tok = _export(tmp_path, model, meta, lowercase=lowercase)
    for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / f).is_file(), f
    assert json.loads((out / "tokenizer_config.json").read_text())["do_lower_case"] is lowercase
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for s in SENTENCES:
        assert hf_tok(s)["input_ids"] == tok.encode(s).ids, s
    for a, b in PAIRS:
        enc, theirs = tok.encode(a, b), hf_tok(a, b)
        assert theirs["input_ids"] == enc.ids and theirs["token_type_ids"] == enc.type_ids
    assert hf_tok.pad_token_id == tok.token_to_id("[PAD]") and hf_tok.mask_token == "[MASK]"
    # Tools that read vocab.txt alone rebuild the tokenizer from tokenizer_config.json's flags: same ids.
    (out / "tokenizer.json").unlink()
    from_vocab = transformers.AutoTokenizer.from_pretrained(str(out))
    for s in SENTENCES:
        assert from_vocab(s)["input_ids"] == tok.encode(s).ids, s


def test_export_refuses_a_directory_that_is_no_run(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--model"):
        export_hf(tmp_path / "empty", tmp_path / "out")


def test_export_cli_keeps_what_is_in_out(tmp_path, capsys):
    """`bert-dist export` writes into a new or empty --out; a non-empty one only with --overwrite; one error line."""
    from bert_dist.cli import main

    tok = train_tokenizer(iter(SENTENCES * 3), vocab_size=200)
    run = tmp_path / "run"
    save_run_model(BertForSequenceClassification(_bert(tok.get_vocab_size()), 2), run, _bert(tok.get_vocab_size()),
                   {"task": "sst2", "kind": "classification", "num_labels": 2, "label_names": ["neg", "pos"]}, tok)
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["export", "--model", str(run), "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "not empty" in err and "--overwrite" in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["README.md"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit):
        main(["export", "--model", str(run), "--out", str(tmp_path / "afile")])
    assert "is a file" in capsys.readouterr().err
    assert main(["export", "--model", str(run), "--out", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file()
    assert main(["export", "--model", str(run), "--out", str(tmp_path / "new")]) == 0

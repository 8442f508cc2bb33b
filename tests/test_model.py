"""Model: shapes, padding invariance, heads, and parity with transformers on the same weights."""

from __future__ import annotations

import pytest
import torch

from bert_dist.config import BertConfig, preset
from bert_dist.data.collate import masked_positions
from bert_dist.model import (
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
)
from bert_dist.padding import layout_of
from bert_dist.weights import load_init, load_weights, save_model

V = 97


def tiny(**kw) -> BertConfig:
    return preset("tiny", vocab_size=V, **kw)


def batch(B: int = 3, T: int = 11, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, 5:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def test_shapes():
    cfg = tiny()
    b = batch()
    seq, pooled = BertModel(cfg).eval()(**b)
    assert seq.shape == (3, 11, cfg.hidden_size) and pooled.shape == (3, cfg.hidden_size)
    clf = BertForSequenceClassification(cfg, num_labels=3)
    out = clf(**b, labels=torch.tensor([0, 2, 1]))
    assert out["logits"].shape == (3, 3) and out["loss"].ndim == 0
    qa = BertForQuestionAnswering(cfg)
    out = qa(**b, start_positions=torch.tensor([0, 1, 2]), end_positions=torch.tensor([0, 2, 2]))
    assert out["start_logits"].shape == (3, 11) and out["end_logits"].shape == (3, 11) and out["loss"].ndim == 0


def test_regression_head_uses_mse():
    torch.manual_seed(0)
    m = BertForSequenceClassification(tiny(), num_labels=1, regression=True).eval()
    b = batch()
    labels = torch.tensor([0.5, 3.0, 4.2])
    out = m(**b, labels=labels)
    assert out["logits"].shape == (3,)
    assert torch.allclose(out["loss"], torch.mean((out["logits"] - labels) ** 2))
    with pytest.raises(ValueError):
        BertForSequenceClassification(tiny(), num_labels=2, regression=True)


def with_layout(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch as the collator gives it: with where its real tokens are (the model then runs unpadded)."""
    return {**b, **layout_of(b["attention_mask"])}


def widen(b: dict[str, torch.Tensor], pad: int = 13) -> dict[str, torch.Tensor]:
    """The same batch with `pad` more padded positions on every row."""
    return {k: torch.cat([v, torch.zeros(v.shape[0], pad, dtype=v.dtype)], dim=1) for k, v in b.items()}


@pytest.mark.parametrize("layout", [False, True])
def test_padding_invariance(layout):
    """Extra padding never changes the outputs at real tokens (nor the pooled [CLS]), on the padded path (attention
    mask) and the unpadded one (the collator's layout)."""
    torch.manual_seed(0)
    m = BertModel(tiny()).eval()
    b = batch()
    prep = with_layout if layout else dict
    seq, pooled = m(**prep(b))
    seq2, pooled2 = m(**prep(widen(b)))
    real = b["attention_mask"].bool()
    torch.testing.assert_close(seq2[:, :11][real], seq[real], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pooled2, pooled, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("head", ["classification", "qa", "pretraining"])
def test_unpadded_encoder_gives_the_padded_outputs_and_gradients(precision, head):
    """The unpadded path (per-token work on the N real tokens, attention re-padded) against the padded one (every
    position computed, padded keys masked): the same outputs at real tokens and the same parameter gradients."""
    torch.manual_seed(0)
    cfg = tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    b = batch()
    if head == "classification":
        model, targets, outs = BertForSequenceClassification(cfg, 3), {"labels": torch.tensor([0, 2, 1])}, ["logits"]
    elif head == "qa":
        model, outs = BertForQuestionAnswering(cfg), ["start_logits", "end_logits"]
        targets = {"start_positions": torch.tensor([0, 4, 2]), "end_positions": torch.tensor([3, 6, 2])}
    else:
        model, outs = BertForPreTraining(cfg), ["mlm_logits", "nsp_logits"]
        chosen = torch.zeros(3, 11, dtype=torch.bool)
        chosen[0, [2, 9]], chosen[1, 4] = True, True
        targets = {**masked_positions(chosen, b["input_ids"]), "next_sentence_label": torch.tensor([0, 1, 0])}
    real = b["attention_mask"].bool()
    results = []
    for inputs in (b, with_layout(b)):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(**inputs, **targets)
        out["loss"].backward()
        values = [out[k].float()[real] if out[k].shape[:2] == real.shape else out[k].float() for k in outs]
        results.append((values, {n: p.grad.float().clone() for n, p in model.named_parameters()}))
    tol = dict(atol=1e-5, rtol=1e-4) if precision == "fp32" else dict(atol=0.05, rtol=0.05)
    for ours, ref in zip(results[1][0], results[0][0], strict=True):
        torch.testing.assert_close(ours, ref, **tol)
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, msg=n, **tol)


def test_masked_positions_list_each_rows_masked_positions_in_order():
    chosen = torch.zeros(3, 6, dtype=torch.bool)
    chosen[0, [4, 1]] = True
    chosen[2, [0, 2, 5]] = True  # row 1 has none
    ids = torch.arange(18).view(3, 6)
    got = masked_positions(chosen, ids)
    assert got["masked_positions"].tolist() == [[1, 4, 0], [0, 0, 0], [0, 2, 5]]
    assert got["masked_index"].tolist() == [0, 1, 6, 7, 8]  # into the flattened (3 * 3)
    assert got["masked_labels"].tolist() == [1, 4, 12, 14, 17]
    none = masked_positions(torch.zeros(2, 4, dtype=torch.bool), ids[:2, :4])
    assert none["masked_positions"].shape == (2, 0) and none["masked_index"].numel() == 0


@pytest.mark.parametrize("padded", [True, False])
def test_last_layer_on_cls_rows_gives_the_same_logits_and_gradients(padded):
    """The classifier's last layer runs on [CLS] only (`keep`): the same logits and gradients as computing every
    row and reading [CLS], on the unpadded (a padded batch with its layout) and the padded (full rows) encoder paths.
    """
    torch.manual_seed(0)
    m = BertForSequenceClassification(tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), 3).train()
    b = batch()
    if not padded:
        b["attention_mask"] = torch.ones_like(b["attention_mask"])
    b = with_layout(b)
    labels = torch.tensor([0, 2, 1])

    def grads(loss):
        m.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    out = m(**b, labels=labels)
    seq, pooled = m.bert(**b)  # every row
    assert seq.shape == (3, 11, m.config.hidden_size)
    every = m.classifier(pooled)
    torch.testing.assert_close(out["logits"], every, atol=1e-6, rtol=1e-5)
    g_keep = grads(out["loss"])
    g_every = grads(torch.nn.functional.cross_entropy(m.classifier(m.bert(**b)[1]), labels))
    for n in g_keep:
        torch.testing.assert_close(g_keep[n], g_every[n], atol=1e-6, rtol=1e-4, msg=n)
    # keep picks rows: the output is those rows of the full sequence output
    keep = torch.tensor([[0, 4], [0, 6], [0, 2]])
    seq_kept, pooled_kept = m.eval().bert(**b, keep=keep)
    seq, pooled = m.bert(**b)
    torch.testing.assert_close(seq_kept, seq.gather(1, keep[..., None].expand(-1, -1, seq.shape[-1])), atol=1e-6,
                               rtol=1e-5)
    torch.testing.assert_close(pooled_kept, pooled, atol=1e-6, rtol=1e-5)


def test_qa_loss_ignores_padding():
    """The QA loss (and the logits at real tokens) do not change when the batch is padded further."""
    torch.manual_seed(0)
    m = BertForQuestionAnswering(tiny()).eval()
    b = batch()
    pos = {"start_positions": torch.tensor([0, 4, 2]), "end_positions": torch.tensor([3, 6, 2])}
    out = m(**b, **pos)
    out2 = m(**widen(b), **pos)
    torch.testing.assert_close(out2["loss"], out["loss"], atol=1e-6, rtol=1e-5)
    real = b["attention_mask"].bool()
    torch.testing.assert_close(out2["start_logits"][:, :11][real], out["start_logits"][real], atol=1e-6, rtol=1e-5)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = BertModel(tiny())
    b = batch()
    m.eval()
    a1, a2 = m(**b)[0], m(**b)[0]
    torch.testing.assert_close(a1, a2)
    m.train()
    assert not torch.allclose(m(**b)[0], m(**b)[0])


def _hf_config(cfg: BertConfig):
    transformers = pytest.importorskip("transformers")
    fields = {k: v for k, v in cfg.to_dict().items() if k != "classifier_dropout"}
    return transformers, transformers.BertConfig(**fields, attn_implementation="sdpa")


def test_parity_with_transformers_bert_model():
    """Same random weights -> same sequence and pooled outputs as transformers' BertModel (1e-5)."""
    cfg = tiny()
    transformers, hf_cfg = _hf_config(cfg)
    torch.manual_seed(0)
    hf = transformers.BertModel(hf_cfg).eval()
    ours = BertModel(cfg).eval()
    sd = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    ours.load_state_dict(sd, strict=True)
    b = batch()
    seq, pooled = ours(**b)
    ref = hf(**b)
    real = b["attention_mask"].bool()
    torch.testing.assert_close(seq[real], ref.last_hidden_state[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref.pooler_output, atol=1e-5, rtol=1e-5)


def test_hf_checkpoint_dir_loads_through_init(tmp_path):
    """A transformers save_pretrained dir (no `bert.` prefix, plus a vocab) loads via --init's path."""
    cfg = tiny()
    transformers, hf_cfg = _hf_config(cfg)
    torch.manual_seed(1)
    hf = transformers.BertForSequenceClassification(hf_cfg).eval()  # keys with the bert. prefix
    hf.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "vocab.txt").write_text("".join(f"{t}\n" for t in
                                                ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                                                [f"w{i}" for i in range(V - 5)]))
    src = load_init(str(tmp_path))
    assert src.config.hidden_size == cfg.hidden_size and src.tokenizer is not None
    ours = BertForSequenceClassification(src.config, num_labels=2).eval()
    report = load_weights(ours, src.state_dict, "hf")
    assert report["new"] == [] and report["unused"] == []
    b = batch()
    torch.testing.assert_close(ours(**b)["logits"], hf(**b).logits, atol=1e-5, rtol=1e-5)


def _vocab(path) -> None:
    path.write_text("".join(f"{t}\n" for t in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                            [f"w{i}" for i in range(V - 5)]))


@pytest.mark.parametrize("safe", [True, False])
def test_sharded_hf_checkpoint_loads_through_init(tmp_path, safe):
    """save_pretrained's sharded form (an index naming the shards), safetensors or .bin: every tensor loads."""
    cfg = tiny()
    transformers, hf_cfg = _hf_config(cfg)
    torch.manual_seed(1)
    hf = transformers.BertForSequenceClassification(hf_cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=safe, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*-of-*"))) > 1 and not (tmp_path / "model.safetensors").exists()
    _vocab(tmp_path / "vocab.txt")
    src = load_init(str(tmp_path))
    ours = BertForSequenceClassification(src.config, num_labels=2).eval()
    assert load_weights(ours, src.state_dict, "hf") == {"new": [], "unused": []}
    b = batch()
    torch.testing.assert_close(ours(**b)["logits"], hf(**b).logits, atol=1e-5, rtol=1e-5)
    next(tmp_path.glob("*-of-*")).unlink()
    with pytest.raises(ValueError, match="missing"):
        load_init(str(tmp_path))


def test_checkpoints_the_model_cannot_represent_are_refused(tmp_path):
    """Relative position embeddings; an MLM decoder untied from the word embeddings (refused for pretraining only,
    where it would be lost); one segment embedding for a pair task."""
    import json

    from bert_dist.config import check_model_fits
    from bert_dist.data import get_task
    from bert_dist.model import BertForPreTraining

    transformers, hf_cfg = _hf_config(tiny())
    torch.manual_seed(1)
    hf_cfg.tie_word_embeddings = False
    hf = transformers.BertForPreTraining(hf_cfg)
    hf.save_pretrained(tmp_path / "untied")
    _vocab(tmp_path / "untied" / "vocab.txt")
    src = load_init(str(tmp_path / "untied"))
    with pytest.raises(ValueError, match="not its word embeddings"):
        load_weights(BertForPreTraining(src.config), src.state_dict, "untied")
    load_weights(BertForSequenceClassification(src.config, 2), src.state_dict, "untied")  # fine-tuning: unused
    cfg = json.loads((tmp_path / "untied" / "config.json").read_text())
    (tmp_path / "untied" / "config.json").write_text(json.dumps({**cfg, "position_embedding_type": "relative_key"}))
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
        load_init(str(tmp_path / "untied"))
    one = tiny(type_vocab_size=1)
    check_model_fits(one, get_task("sst2"), 64)
    for task in ("mrpc", "squad", "pretrain"):
        with pytest.raises(ValueError, match=f"type_vocab_size 1.*--task {task}"):
            check_model_fits(one, get_task(task), 64)


def test_save_and_reload_roundtrip(tmp_path):
    torch.manual_seed(2)
    m = BertForSequenceClassification(tiny(), num_labels=2).eval()
    save_model(m, tmp_path, m.config, {"task": "sst2"})
    from bert_dist.weights import load_state_dict, read_config

    cfg, meta = read_config(tmp_path)
    assert meta == {"task": "sst2"} and cfg == m.config
    m2 = BertForSequenceClassification(cfg, num_labels=2).eval()
    load_weights(m2, load_state_dict(tmp_path), "roundtrip")
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


def test_encoder_shape_mismatch_is_a_clear_error(tmp_path):
    m = BertForSequenceClassification(tiny(), num_labels=2)
    save_model(m, tmp_path, m.config, {})
    from bert_dist.weights import load_state_dict

    other = BertForSequenceClassification(preset("tiny", vocab_size=V + 8), num_labels=2)
    with pytest.raises(ValueError, match="does not fit"):
        load_weights(other, load_state_dict(tmp_path), str(tmp_path))


def test_new_head_when_label_count_differs(tmp_path):
    m = BertForSequenceClassification(tiny(), num_labels=2)
    save_model(m, tmp_path, m.config, {})
    from bert_dist.weights import load_state_dict

    three = BertForSequenceClassification(tiny(), num_labels=3)
    report = load_weights(three, load_state_dict(tmp_path), "two-label run")
    assert sorted(report["new"]) == ["classifier.bias", "classifier.weight"]


def test_head_logits_are_fp32_under_bf16_autocast():
    """Regression scores and span logits keep fp32 resolution (bf16 would round 2 - 4 to steps of 1/64)."""
    torch.manual_seed(0)
    b = batch()
    reg = BertForSequenceClassification(tiny(), num_labels=1, regression=True).eval()
    qa = BertForQuestionAnswering(tiny()).eval()
    with torch.no_grad():
        reg.classifier.bias.fill_(3.0)  # scores near 3: bf16 steps of 1/64 there
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores = reg(**b)["logits"]
            spans = qa(**b)
    assert scores.dtype == torch.float32 and spans["start_logits"].dtype == torch.float32
    assert not torch.equal(scores, scores.bfloat16().float())  # finer than bf16


@pytest.mark.parametrize("amp", [False, True])
def test_a_pretraining_batch_with_no_masked_token_trains(amp):
    """Short rows often have no masked token: then the MLM loss is 0 (NSP still trains), not an index error."""
    torch.manual_seed(0)
    m = BertForPreTraining(tiny())
    b = with_layout(batch())
    none = masked_positions(torch.zeros_like(b["input_ids"], dtype=torch.bool), b["input_ids"])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = m(**b, **none, next_sentence_label=torch.tensor([0, 1, 0]))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert m.cls.seq_relationship.weight.grad.abs().sum() > 0


def test_a_model_cast_to_bf16_runs_its_heads():
    """model.to(torch.bfloat16), no autocast: the heads' fp32 output projection reads the bf16 weights."""
    torch.manual_seed(0)
    b = batch()
    for m in (BertForSequenceClassification(tiny(), num_labels=2), BertForQuestionAnswering(tiny())):
        ref = m.eval()(**b)
        with torch.no_grad():
            out = m.to(torch.bfloat16)(**b)
        for k, v in out.items():
            if v is not None and k != "loss":
                assert v.dtype == torch.float32
                real = v if k == "logits" else v[b["attention_mask"].bool()]
                want = ref[k] if k == "logits" else ref[k][b["attention_mask"].bool()]
                torch.testing.assert_close(real, want.detach(), atol=0.1, rtol=0.1)


def test_a_hub_model_downloads_one_form_of_its_weights(monkeypatch, tmp_path):
    """bert-base-uncased holds model.safetensors and pytorch_model.bin (and TF/Flax copies): only the first is
    fetched; a sharded repo gets its index and shards; the tokenizer and config always."""
    import huggingface_hub

    import bert_dist.weights as C

    asked = {}

    def snapshot_download(repo, allow_patterns=None, **kw):
        asked[repo] = allow_patterns
        return str(tmp_path)

    repos = {"bert-base-uncased": ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5",
                                   "vocab.txt", "tokenizer.json", "tokenizer_config.json"],
             "org/sharded": ["config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
                             "pytorch_model-00002-of-00002.bin", "vocab.txt"]}
    monkeypatch.setattr(C, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo, **kw: repos[repo])
    for repo in repos:
        assert C.resolve_init(repo) == tmp_path
    assert "pytorch_model.bin" not in asked["bert-base-uncased"] and "model.safetensors" in asked["bert-base-uncased"]
    assert {"pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin", "config.json", "vocab.txt",
            "tokenizer.json"} <= set(asked["org/sharded"]) and "model.safetensors" not in asked["org/sharded"]


@pytest.mark.parametrize("head", ["classification", "pretraining"])
def test_compile_traces_each_recipe_in_one_graph(head):
    """torch.compile sees one graph, no break, for a collated batch of either recipe (padded rows, the layout and,
    for pretraining, the masked positions): nothing in the model reads the device or depends on its values."""
    import torch._dynamo

    from bert_dist import kernels
    from bert_dist.data.collate import MLMCollator, PadCollator

    torch.manual_seed(0)
    rows = [{"input_ids": torch.randint(5, V, (n,)).tolist(), "token_type_ids": [0] * n, "labels": i % 2,
             "next_sentence_label": i % 2, "idx": i} for i, n in enumerate((11, 7, 3))]
    if head == "classification":
        model, b = BertForSequenceClassification(tiny(), 2), PadCollator(0)(rows)
    else:
        model = BertForPreTraining(tiny())
        b = MLMCollator(mask_token_id=4, vocab_size=V, special_token_ids=[1, 2, 3], mlm_probability=0.3)(rows)
        assert b["masked_labels"].numel() > 0
    kernels.apply(model.train(), "auto", "cpu")  # under torch.compile the kernels step aside for the plain ops
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**b)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_count == 1

"""Model: shapes, padding invariance, heads, and parity with transformers on the same weights."""

from __future__ import annotations

import pytest
import torch

from bert_dist.config import BertConfig, preset
from bert_dist.model import (
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
    Linear,
    attend,
    linear,
    masked_rows,
    set_cpu_matmul,
)
from bert_dist.model import _onednn_works as onednn_works
from bert_dist.model import cpu_matmul as cpu_matmul_in_use
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


def widen(b: dict[str, torch.Tensor], pad: int = 13) -> dict[str, torch.Tensor]:
    """The same batch with `pad` more padded positions on every row."""
    return {k: torch.cat([v, torch.zeros(v.shape[0], pad, dtype=v.dtype)], dim=1) for k, v in b.items()}


def test_padding_invariance():
    """Extra padding never changes the outputs at real tokens (nor the pooled [CLS])."""
    torch.manual_seed(0)
    m = BertModel(tiny()).eval()
    b = batch()
    seq, pooled = m(**b)
    seq2, pooled2 = m(**widen(b))
    real = b["attention_mask"].bool()
    torch.testing.assert_close(seq2[:, :11][real], seq[real], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pooled2, pooled, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("padded", [True, False])
def test_last_layer_on_cls_rows_gives_the_same_logits_and_gradients(padded):
    """The classifier's last layer runs on [CLS] only (`keep`): the same logits and gradients as computing every
    row and reading [CLS], on the unpadded (padded batch, CPU) and the padded (full rows) encoder paths."""
    torch.manual_seed(0)
    m = BertForSequenceClassification(tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), 3).train()
    b = batch()
    if not padded:
        b["attention_mask"] = torch.ones_like(b["attention_mask"])
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


def test_masked_rows_lists_each_rows_masked_positions_in_order():
    labels = torch.full((3, 6), -100)
    labels[0, [4, 1]] = 7
    labels[2, [0, 2, 5]] = 9  # row 1 has none
    keep, valid = masked_rows(labels)
    assert keep.tolist() == [[0, 1, 4, 0], [0, 0, 0, 0], [0, 0, 2, 5]]
    assert valid.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    assert torch.equal(labels.gather(1, keep[:, 1:])[valid], labels[labels != -100])


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


@pytest.mark.parametrize("precision", ["bf16 tensors", "autocast", "fp32"])
def test_cpu_dropout_attention_matches_sdpa(precision):
    """The CPU training path of `attend` (taken when dropout_p > 0, in any precision) is SDPA's attention: with a
    dropout rate too small to drop anything it equals SDPA without dropout, masked keys included, under bf16
    autocast, with bf16 inputs, and in fp32 (to fp32 precision)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 9, 8, generator=g) for _ in range(3))
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., 6:] = False
    mask[2, ..., 2:] = False
    if precision == "bf16 tensors":
        q, k, v = (t.bfloat16() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        ours = attend(q, k, v, mask, 1e-12)
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    tol = 1e-5 if precision == "fp32" else 2e-2
    torch.testing.assert_close(ours.float(), ref.float(), atol=tol, rtol=tol)
    assert ours.dtype == (torch.float32 if precision == "fp32" else torch.bfloat16)


def _qkv(B: int = 5, Q: int = 9, T: int = 9, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, 4, n, 8, generator=g).bfloat16() for n in (Q, T, T))


@pytest.mark.parametrize("masking", ["none", "all real", "prefix", "not a prefix"])
@pytest.mark.parametrize("rows_bytes", [1 << 20, 2 * 4 * 9 * 9 * 2])  # every row in one chunk; chunks of 2 rows
def test_bf16_inference_attention_by_rows_matches_sdpa(monkeypatch, masking, rows_bytes):
    """`attend` in bf16 without gradients on the CPU (`_attend_in_chunks`) is SDPA's attention at bf16 precision,
    for each kind of mask, in one chunk or several (5 rows, chunks of 2: a short last chunk). With a prefix mask
    the padded query rows are zeros and a row with no real token is all zeros, not NaN."""
    import bert_dist.model as M

    monkeypatch.setitem(M._CHUNK_BYTES, "inference", rows_bytes)
    q, k, v = _qkv()
    mask = torch.ones(5, 1, 1, 9, dtype=torch.bool)
    if masking == "prefix":
        for b, n in enumerate((9, 6, 1, 0, 4)):
            mask[b, ..., n:] = False
    elif masking == "not a prefix":
        mask[1, ..., 2] = False
        mask[3, ..., :4] = False
    with torch.no_grad():
        ours = attend(q, k, v, None if masking == "none" else mask, 0.0)
        assert ours.dtype == torch.bfloat16 and ours.shape == q.shape
        seen = mask.any(-1).squeeze(1).squeeze(1)  # rows with at least one key
        ref = torch.nn.functional.scaled_dot_product_attention(q[seen].float(), k[seen].float(), v[seen].float(),
                                                               attn_mask=mask[seen])
    if masking == "prefix":
        real = mask.view(5, 1, 9, 1).expand_as(ours)  # a query row is real where its own token is
        assert not ours[~real].any()
        torch.testing.assert_close(ours.float()[seen][real[seen]], ref[real[seen]], atol=3e-2, rtol=3e-2)
    else:
        torch.testing.assert_close(ours.float(), ref, atol=3e-2, rtol=3e-2)


def test_bf16_inference_attention_by_rows_on_kept_queries():
    """A last layer on kept rows: Q = 2 query positions (not a prefix) over T = 9 keys, some padded; a row with
    fewer real tokens than kept queries still answers every query."""
    q, k, v = _qkv(Q=2)
    mask = torch.ones(5, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., 5:] = False
    mask[2, ..., 1:] = False
    with torch.inference_mode():
        ours = attend(q, k, v, mask, 0.0)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    torch.testing.assert_close(ours.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("chunk_bytes", [8 << 20, 2 * 4 * 9 * 9 * 2])  # one chunk; chunks of 2 rows
@pytest.mark.parametrize("dropout_p", [0.0, 1e-12])  # 1e-12: the dropout op runs, and drops nothing
def test_bf16_training_attention_in_chunks_matches_sdpa_and_its_gradients(monkeypatch, chunk_bytes, dropout_p):
    """With gradients (training), `attend` in chunks of rows gives SDPA's output and gradients at bf16 precision,
    the mask applied as it is (a prefix in one row, a hole in another)."""
    import bert_dist.model as M

    monkeypatch.setitem(M._CHUNK_BYTES, "training", chunk_bytes)
    q, k, v = _qkv()
    mask = torch.ones(5, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., 6:] = False
    mask[3, ..., 2] = False
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn, dtype in ((attend, torch.bfloat16), (None, torch.float32)):
        leaves = [t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        if fn is None:
            out = torch.nn.functional.scaled_dot_product_attention(*leaves, attn_mask=mask)
        else:
            out = fn(*leaves, mask, dropout_p)
            assert out.dtype == torch.bfloat16
        (out.float() * dy).sum().backward()
        grads.append([out.float()] + [t.grad.float() for t in leaves])
    for ours, ref in zip(*grads, strict=True):
        assert ref.abs().max() > 0.1
        torch.testing.assert_close(ours, ref, atol=4e-2, rtol=4e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_dropout_drops_each_element_with_probability_p_and_scales_like_torch(dtype, p):
    """`dropout` (its own mask on the CPU): the dropped fraction is p, in even and odd positions alike (each int64
    draw serves two elements) and in an odd-sized tensor; kept elements are scaled exactly as F.dropout scales them
    in that dtype; the gradient is the same mask; the mask follows the seed."""
    from bert_dist.model import dropout

    n = 100_001
    x = torch.ones(n, dtype=dtype, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x, p)
    y.sum().backward()
    dropped = y == 0
    tol = 6 * (p * (1 - p) / (n / 2)) ** 0.5  # six standard deviations of either half's fraction
    for half in (dropped[0::2], dropped[1::2]):
        assert abs(half.float().mean().item() - p) < tol
    scale = torch.nn.functional.dropout(torch.ones(1000, dtype=dtype), p).max().item()  # torch's kept value
    assert torch.equal(y[~dropped], torch.full_like(y[~dropped], scale))
    assert torch.equal(x.grad, y.detach())
    torch.manual_seed(0)
    assert torch.equal(dropout(x.detach(), p), y.detach())
    assert not torch.equal(dropout(x.detach(), p), y.detach())
    assert dropout(x, p, training=False) is x and dropout(x, 0.0) is x


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


@pytest.fixture
def cpu_matmul():
    """Sets --cpu-matmul for one test and restores the default after it."""
    yield set_cpu_matmul
    set_cpu_matmul("auto")


needs_onednn = pytest.mark.skipif(not onednn_works(), reason="this torch build has no oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_f_linear_forward_and_backward(cpu_matmul, bias):
    cpu_matmul("onednn")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 24, generator=g, requires_grad=True)
    w = torch.randn(40, 24, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True) if bias else None
    xt = x.transpose(0, 1)  # (5, 6, 24), not contiguous
    dy = torch.randn(5, 6, 40, generator=g)
    grads = []
    for fn in (linear, torch.nn.functional.linear):
        y = fn(xt, w, b)
        params = [t for t in (x, w, b) if t is not None]
        grads.append((y, *torch.autograd.grad(y, params, dy)))
    assert grads[0][0].grad_fn.name() == "_OneDNNLinearBackward"  # the path under test was taken
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_and_torch_matmuls_give_the_same_model(cpu_matmul):
    """The whole model, training mode off, through both paths: same logits and parameter gradients."""
    cfg = tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg, num_labels=3)
    b = batch()
    labels = torch.tensor([0, 2, 1])
    outs = []
    for mode in ("onednn", "torch"):
        cpu_matmul(mode)
        model.zero_grad()
        out = model(**b, labels=labels)
        out["loss"].backward()
        outs.append((out["logits"].detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    for g1, g2 in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_low_precision_and_forced_torch_keep_f_linear(cpu_matmul):
    x, w = torch.randn(3, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, w)
    assert y.dtype == torch.bfloat16 and y.grad_fn.name() != "_OneDNNLinearBackward"  # autocast's own cast
    assert linear(x.double(), w.double()).grad_fn.name() != "_OneDNNLinearBackward"
    cpu_matmul("torch")
    assert linear(x, w).grad_fn.name() != "_OneDNNLinearBackward"
    with pytest.raises(ValueError, match="--cpu-matmul"):
        cpu_matmul("mkl")


@needs_onednn
def test_bf16_inference_keeps_weight_copies_and_remakes_them_when_weights_change(cpu_matmul):
    """bf16 autocast without gradients: `Linear` runs on kept bf16 copies; the same logits as autocast's F.linear,
    also after an in-place update of a weight (which must remake the copies)."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny(), num_labels=3).eval()
    b = batch()

    def logits(mode: str) -> torch.Tensor:
        cpu_matmul(mode)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**b)["logits"].float()

    ours, ref = logits("onednn"), logits("torch")
    assert model.bert.pooler.dense._bf16 is not None
    torch.testing.assert_close(ours, ref, rtol=1e-2, atol=1e-2)
    import copy
    import pickle

    twin = copy.deepcopy(model)  # the packed copies (opaque oneDNN tensors) are left behind, and remade
    assert twin.bert.pooler.dense._bf16 is None and pickle.loads(pickle.dumps(model)).bert.pooler.dense._bf16 is None
    cpu_matmul("onednn")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(twin(**b)["logits"].float(), ours)
    with torch.no_grad():
        model.bert.pooler.dense.weight.mul_(-3)
    ours2, ref2 = logits("onednn"), logits("torch")
    torch.testing.assert_close(ours2, ref2, rtol=1e-2, atol=1e-2)
    assert not torch.allclose(ours2, ours, atol=1e-3)  # the stale copy was not used
    attention = model.bert.encoder.layer[0].attention.self
    assert attention.value._bf16 is not None
    with torch.no_grad():
        attention.value.weight.mul_(-3)
    ours3, ref3 = logits("onednn"), logits("torch")
    torch.testing.assert_close(ours3, ref3, rtol=1e-2, atol=1e-2)
    assert not torch.allclose(ours3, ours2, atol=1e-3)
    copy_of = Linear(4, 2)
    cpu_matmul("onednn")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # gradients on: no copies
        copy_of(torch.randn(3, 4))
    assert copy_of._bf16 is None


@needs_onednn
@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
@pytest.mark.parametrize("padded", [True, False])
def test_bf16_inference_path_matches_autocast(cpu_matmul, act, padded):
    """bf16 inference (`Linear`'s kept bf16 copies) against autocast's F.linear: the encoder's output on the padded
    and unpadded paths, with the last layer on [CLS] and one more row (`keep`, as classification and pretraining run
    it) and on every row (QA)."""
    torch.manual_seed(0)
    model = BertModel(tiny(hidden_act=act), add_pooling_layer=False).eval()
    b = batch()
    b.pop("labels", None)
    if not padded:
        b["attention_mask"] = torch.ones_like(b["attention_mask"])
    keep = torch.tensor([[0, 2], [0, 5], [0, 1]])

    def outputs(mode: str) -> list[torch.Tensor]:
        cpu_matmul(mode)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            every_row = model(**b)[0].float()
            real = b["attention_mask"].bool()
            return [every_row[real], model(**b, keep=keep)[0].float()]  # padded rows may hold anything

    ours, ref = outputs("onednn"), outputs("torch")
    assert model.encoder.layer[-1].attention.self.key._bf16 is not None  # the path under test was taken
    for o, r in zip(ours, ref, strict=True):
        assert r.abs().mean() > 0.5  # LayerNorm's output: a wrong projection shows as an O(1) difference
        torch.testing.assert_close(o, r, rtol=0.05, atol=0.05)


@needs_onednn
def test_cpu_matmul_first_asked_inside_autocast_still_finds_onednn(cpu_matmul):
    cpu_matmul("auto")  # forget the resolved choice
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_matmul_in_use() == "onednn"


@needs_onednn
def test_bf16_inference_after_a_fused_adamw_step_sees_the_new_weights(cpu_matmul):
    """Evaluate, train a step with fused AdamW (which leaves no version mark on the weights), evaluate again: the
    second evaluation must use the updated weights, as autocast's F.linear does."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny(), num_labels=3)
    b = batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)

    def logits(mode: str) -> torch.Tensor:
        cpu_matmul(mode)
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**b)["logits"].float()

    before = logits("onednn")
    model.train()
    model(**b, labels=torch.tensor([0, 2, 1]))["loss"].backward()
    optimizer.step()
    after, ref = logits("onednn"), logits("torch")
    assert not torch.allclose(after, before, atol=1e-3)
    torch.testing.assert_close(after, ref, rtol=1e-2, atol=1e-2)


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
    from bert_dist.model import BertForPreTraining

    torch.manual_seed(0)
    m = BertForPreTraining(tiny())
    b = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = m(**b, labels=torch.full_like(b["input_ids"], -100), next_sentence_label=torch.tensor([0, 1, 0]))
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


@pytest.mark.parametrize("grad", [False, True])
def test_bf16_attention_with_a_row_that_has_no_key_is_finite(grad):
    """A row whose keys are all masked (and whose query is read, as [CLS] is): finite, as SDPA gives, not NaN."""
    q, k, v = _qkv()
    mask = torch.ones(5, 1, 1, 9, dtype=torch.bool)
    mask[4] = False
    mask[2, ..., 3] = False  # not a prefix: the masked path
    with torch.set_grad_enabled(grad):
        out = attend(*(t.requires_grad_(grad) for t in (q, k, v)), mask, 0.0)
    assert torch.isfinite(out.float()).all()


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

"""The CPU kernels (bert_dist.kernels): taken where they should be, and the same model with them as without."""

from __future__ import annotations

import copy
import pickle
import platform

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bert_dist import kernels
from bert_dist.config import preset
from bert_dist.data.collate import PadCollator
from bert_dist.kernels.cpu import (
    CpuDropout,
    CpuSelfAttention,
    OneDNNLinear,
    PackedLinear,
    attend_in_chunks,
    dropout,
    onednn_works,
)
from bert_dist.model import BertForQuestionAnswering, BertForSequenceClassification, BertModel, BertSelfAttention

V = 97
X86 = platform.machine().lower() in ("x86_64", "amd64")


def tiny(**kw):
    return preset("tiny", vocab_size=V, **kw)


def batch(lengths=(11, 7, 3), seed: int = 0) -> dict[str, torch.Tensor]:
    """A collated batch (the layout included) of rows with these real lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": torch.randint(5, V, (n,), generator=g).tolist(), "token_type_ids": [0] * (n // 2) +
             [1] * (n - n // 2)} for n in lengths]
    return PadCollator(0, scalar_keys=())(rows)


def test_auto_takes_every_kernel_on_x86_64():
    """On x86-64 `auto` must take a projection kernel: a torch without oneDNN's linear (a private op) would otherwise
    make fp32 runs on AMD CPUs 1.5x - 2x slower, and bf16 inference slower on any, without a word. fp32 through oneDNN
    on AMD CPUs only (MKL is the faster there on Intel's); elsewhere the projections stay on torch's GEMM."""
    swaps = kernels.cpu_swaps()
    assert swaps[nn.Dropout] is CpuDropout and swaps[BertSelfAttention] is CpuSelfAttention
    if X86:
        assert onednn_works(), "this torch build lost oneDNN's linear (torch.ops.mkldnn._linear_pointwise)"
        assert swaps[nn.Linear] is (OneDNNLinear if kernels.cpu_vendor() == "AuthenticAMD" else PackedLinear)
    else:
        assert nn.Linear not in swaps


def test_auto_takes_onednn_fp32_projections_on_amd_cpus_only(monkeypatch):
    if not X86:
        pytest.skip("oneDNN projections are an x86-64 kernel")
    for vendor, kernel in (("AuthenticAMD", OneDNNLinear), ("GenuineIntel", PackedLinear), ("", PackedLinear)):
        monkeypatch.setattr(kernels, "cpu_vendor", lambda v=vendor: v)
        assert kernels.cpu_swaps()[nn.Linear] is kernel, vendor


def test_apply_swaps_in_place_and_off_takes_them_out():
    model = BertForSequenceClassification(tiny(), num_labels=3)
    keys = list(model.state_dict())
    used = kernels.apply(model, "auto", "cpu")
    assert set(used) == {k.__name__ for k in kernels.cpu_swaps().values()}
    assert isinstance(model.bert.encoder.layer[0].attention.self, CpuSelfAttention)
    assert type(model.bert.embeddings.dropout) is CpuDropout
    assert list(model.state_dict()) == keys  # the same parameters, under the same names
    assert kernels.apply(model, "auto", "cpu") == used  # twice is once
    assert kernels.apply(model, "off", "cpu") == []
    assert {type(m) for m in model.modules()}.isdisjoint(kernels.kernels())
    assert kernels.apply(model, "auto", "cuda") == []  # a GPU model gets none of the CPU's
    with pytest.raises(ValueError, match="--cpu-kernels"):
        kernels.apply(model, "on", "cpu")


def _step(model, b, labels, precision):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model(**b, labels=labels)
    out["loss"].backward()
    return out["logits"].detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("vendor", ["AuthenticAMD", "GenuineIntel"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("lengths", [(11, 7, 3), (9, 9, 9)])
def test_kernels_on_and_off_give_the_same_outputs_and_gradients(monkeypatch, precision, lengths, vendor):
    """A training step (dropout rate too small to drop anything, so the kernels' dropout and attention-in-chunks
    paths run) with the kernels and without: the same logits and parameter gradients, padded and full rows, with the
    kernels an AMD CPU takes (fp32 projections through oneDNN) and those an Intel one takes."""
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: vendor)
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny(hidden_dropout_prob=1e-12, attention_probs_dropout_prob=1e-12), 3)
    b, labels = batch(lengths), torch.tensor([0, 2, 1])
    kernels.apply(model, "off", "cpu")
    ref = _step(model, b, labels, precision)
    kernels.apply(model, "auto", "cpu")
    ours = _step(model, b, labels, precision)
    tol = dict(rtol=1e-4, atol=1e-5) if precision == "fp32" else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(ours[0], ref[0], **tol)
    for n in ref[1]:
        assert ref[1][n].abs().max() > 0 or n.endswith("token_type_embeddings.weight"), n
        torch.testing.assert_close(ours[1][n], ref[1][n], msg=n, **tol)


@pytest.mark.skipif(not X86, reason="oneDNN projections are taken on x86-64 only (test_auto_takes_...)")
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_f_linear_forward_and_backward(bias):
    g = torch.Generator().manual_seed(0)
    lin = OneDNNLinear(24, 40, bias=bias)
    x = torch.randn(6, 5, 24, generator=g, requires_grad=True)
    xt = x.transpose(0, 1)  # (5, 6, 24), not contiguous
    dy = torch.randn(5, 6, 40, generator=g)
    params = [x, *lin.parameters()]
    ours = lin(xt)
    assert ours.grad_fn.name() == "_OneDNNLinearFnBackward"  # the path under test was taken
    ref = F.linear(xt, lin.weight, lin.bias)
    for o, r in zip((ours, *torch.autograd.grad(ours, params, dy)), (ref, *torch.autograd.grad(ref, params, dy))):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


def test_low_precision_keeps_f_linear():
    lin = OneDNNLinear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16 and y.grad_fn.name() != "_OneDNNLinearFnBackward"  # autocast's own cast
    assert lin.double()(x.double()).grad_fn.name() != "_OneDNNLinearFnBackward"


def _bf16_logits(model, b):
    model.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(**b)["logits"].float()


@pytest.mark.skipif(not X86, reason="oneDNN projections are taken on x86-64 only (test_auto_takes_...)")
def test_bf16_inference_keeps_weight_copies_and_remakes_them_when_weights_change():
    """bf16 autocast without gradients: OneDNNLinear runs on kept bf16 copies; the same logits as autocast's
    F.linear, also after an in-place update of a weight (which must remake the copies)."""
    torch.manual_seed(0)
    model, b = BertForSequenceClassification(tiny(), num_labels=3), batch()
    plain = copy.deepcopy(model)
    kernels.apply(model, "auto", "cpu")
    ours = _bf16_logits(model, b)
    assert model.bert.pooler.dense._bf16 is not None
    torch.testing.assert_close(ours, _bf16_logits(plain, b), rtol=1e-2, atol=1e-2)
    twin = copy.deepcopy(model)  # the packed copies (opaque oneDNN tensors) are left behind, and remade
    assert twin.bert.pooler.dense._bf16 is None and pickle.loads(pickle.dumps(model)).bert.pooler.dense._bf16 is None
    assert torch.equal(_bf16_logits(twin, b), ours)
    for module in (model.bert.pooler.dense, model.bert.encoder.layer[0].attention.self.value):
        name = [n for n, m in model.named_modules() if m is module][0]
        with torch.no_grad():
            module.weight.mul_(-3)
            plain.get_submodule(name).weight.mul_(-3)
        again = _bf16_logits(model, b)
        torch.testing.assert_close(again, _bf16_logits(plain, b), rtol=1e-2, atol=1e-2)
        assert not torch.allclose(again, ours, atol=1e-3)  # the stale copy was not used
        ours = again
    lin = OneDNNLinear(4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # gradients on: no copies
        lin(torch.randn(3, 4))
    assert lin._bf16 is None


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
@pytest.mark.parametrize("lengths", [(11, 7, 3), (11, 11, 11)])
def test_bf16_inference_with_kernels_matches_autocast(act, lengths):
    """bf16 inference with the kernels against the plain model under autocast: the encoder's output at real tokens,
    with the last layer on [CLS] and one more row (`keep`, as classification and pretraining run it) and on every
    row (QA)."""
    torch.manual_seed(0)
    model = BertModel(tiny(hidden_act=act), add_pooling_layer=False).eval()
    plain = copy.deepcopy(model)
    kernels.apply(model, "auto", "cpu")
    b = batch(lengths)
    keep = torch.tensor([[0, 2], [0, 5], [0, 1]])
    real = b["attention_mask"].bool()

    def outputs(m):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return [m(**b)[0].float()[real], m(**b, keep=keep)[0].float()]

    for o, r in zip(outputs(model), outputs(plain), strict=True):
        assert r.abs().mean() > 0.5  # LayerNorm's output: a wrong projection shows as an O(1) difference
        torch.testing.assert_close(o, r, rtol=0.05, atol=0.05)


def test_bf16_inference_after_a_fused_adamw_step_sees_the_new_weights():
    """Evaluate, train a step with fused AdamW (which leaves no version mark on the weights), evaluate again: the
    second evaluation must use the updated weights, as the plain model does."""
    torch.manual_seed(0)
    model, b = BertForSequenceClassification(tiny(), num_labels=3), batch()
    kernels.apply(model, "auto", "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    before = _bf16_logits(model, b)
    model.train()
    model(**b, labels=torch.tensor([0, 2, 1]))["loss"].backward()
    optimizer.step()
    after = _bf16_logits(model, b)
    plain = copy.deepcopy(model)
    kernels.apply(plain, "off", "cpu")
    assert not torch.allclose(after, before, atol=1e-3)
    torch.testing.assert_close(after, _bf16_logits(plain, b), rtol=1e-2, atol=1e-2)


# --- attention in chunks --------------------------------------------------------------------------------------

ATTENTION = CpuSelfAttention(tiny())


def attend(q, k, v, mask, dropout_p):
    return ATTENTION.attend(q, k, v, mask, dropout_p)


@pytest.mark.parametrize("precision", ["bf16 tensors", "autocast", "fp32"])
def test_cpu_dropout_attention_matches_sdpa(precision):
    """The kernel's training path (taken when dropout_p > 0, in any precision) is SDPA's attention: with a dropout
    rate too small to drop anything it equals SDPA without dropout, masked keys included."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 9, 8, generator=g) for _ in range(3))
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., 6:] = False
    mask[2, ..., 2:] = False
    if precision == "bf16 tensors":
        q, k, v = (t.bfloat16() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        ours = attend(q, k, v, mask, 1e-12)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    tol = 1e-5 if precision == "fp32" else 2e-2
    torch.testing.assert_close(ours.float(), ref.float(), atol=tol, rtol=tol)
    assert ours.dtype == (torch.float32 if precision == "fp32" else torch.bfloat16)


def _qkv(B: int = 5, Q: int = 9, T: int = 9, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, 4, n, 8, generator=g).bfloat16() for n in (Q, T, T))


@pytest.mark.parametrize("masking", ["none", "all real", "prefix", "not a prefix"])
@pytest.mark.parametrize("rows_bytes", [1 << 20, 2 * 4 * 9 * 9 * 2])  # every row in one chunk; chunks of 2 rows
def test_bf16_inference_attention_by_rows_matches_sdpa(monkeypatch, masking, rows_bytes):
    """In bf16 without gradients, attention in chunks is SDPA's at bf16 precision, for each kind of mask, in one chunk
    or several (5 rows, chunks of 2: a short last chunk). With a prefix mask the padded query rows are zeros and a
    row with no real token is all zeros, not NaN."""
    import bert_dist.kernels.cpu as K

    monkeypatch.setitem(K._CHUNK_BYTES, "inference", rows_bytes)
    q, k, v = _qkv()
    mask = torch.ones(5, 1, 1, 9, dtype=torch.bool)
    if masking == "prefix":
        for b, n in enumerate((9, 6, 1, 0, 4)):
            mask[b, ..., n:] = False
    elif masking == "not a prefix":
        mask[1, ..., 2] = False
        mask[3, ..., :4] = False
    with torch.no_grad():
        ours = attend_in_chunks(q, k, v, None if masking == "none" else mask, 0.0)
        assert ours.dtype == torch.bfloat16 and ours.shape == q.shape
        seen = mask.any(-1).squeeze(1).squeeze(1)  # rows with at least one key
        ref = F.scaled_dot_product_attention(q[seen].float(), k[seen].float(), v[seen].float(), attn_mask=mask[seen])
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
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    torch.testing.assert_close(ours.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("chunk_bytes", [8 << 20, 2 * 4 * 9 * 9 * 2])  # one chunk; chunks of 2 rows
@pytest.mark.parametrize("dropout_p", [0.0, 1e-12])  # 1e-12: the dropout op runs, and drops nothing
def test_bf16_training_attention_in_chunks_matches_sdpa_and_its_gradients(monkeypatch, chunk_bytes, dropout_p):
    """With gradients (training), attention in chunks of rows gives SDPA's output and gradients at bf16 precision,
    the mask applied as it is (a prefix in one row, a hole in another)."""
    import bert_dist.kernels.cpu as K

    monkeypatch.setitem(K._CHUNK_BYTES, "training", chunk_bytes)
    q, k, v = _qkv()
    mask = torch.ones(5, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., 6:] = False
    mask[3, ..., 2] = False
    dy = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for ours, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        leaves = [t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        if ours:
            out = attend(*leaves, mask, dropout_p)
            assert out.dtype == torch.bfloat16
        else:
            out = F.scaled_dot_product_attention(*leaves, attn_mask=mask)
        (out.float() * dy).sum().backward()
        grads.append([out.float()] + [t.grad.float() for t in leaves])
    for o, r in zip(*grads, strict=True):
        assert r.abs().max() > 0.1
        torch.testing.assert_close(o, r, atol=4e-2, rtol=4e-2)


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


# --- dropout --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_dropout_drops_each_element_with_probability_p_and_scales_like_torch(dtype, p):
    """The kernel's dropout: the dropped fraction is p, in even and odd positions alike (each int64 draw serves two
    elements) and in an odd-sized tensor; kept elements are scaled exactly as F.dropout scales them in that dtype;
    the gradient is the same mask; the mask follows the seed."""
    n = 100_001
    x = torch.ones(n, dtype=dtype, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x, p)
    y.sum().backward()
    dropped = y == 0
    tol = 6 * (p * (1 - p) / (n / 2)) ** 0.5  # six standard deviations of either half's fraction
    for half in (dropped[0::2], dropped[1::2]):
        assert abs(half.float().mean().item() - p) < tol
    scale = F.dropout(torch.ones(1000, dtype=dtype), p).max().item()  # torch's kept value
    assert torch.equal(y[~dropped], torch.full_like(y[~dropped], scale))
    assert torch.equal(x.grad, y.detach())
    torch.manual_seed(0)
    assert torch.equal(dropout(x.detach(), p), y.detach())
    assert not torch.equal(dropout(x.detach(), p), y.detach())
    assert dropout(x, p, training=False) is x and dropout(x, 0.0) is x


def test_qa_model_with_kernels_matches_without():
    """Span logits at real tokens, through the unpadded encoder, kernels on and off (inference, fp32)."""
    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny()).eval()
    b = batch()
    ref = model(**b)["start_logits"]
    kernels.apply(model, "auto", "cpu")
    real = b["attention_mask"].bool()
    torch.testing.assert_close(model(**b)["start_logits"][real], ref[real], rtol=1e-5, atol=1e-5)

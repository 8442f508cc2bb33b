"""The CPU's fast paths: modules of the model swapped for subclasses that keep their parameters and names.

    PackedLinear       bf16 inference on kept bf16 weights, prepacked for oneDNN's GEMM (x86-64)
    OneDNNLinear       PackedLinear, and fp32 projections through oneDNN's GEMM: torch sends fp32 F.linear to MKL,
                       which takes a slow code path on AMD CPUs (on Intel's it is the faster one)
    CpuDropout         a keep mask from 32 random bits per element against a threshold (torch's CPU bernoulli_
                       is several times slower)
    CpuSelfAttention   attention as plain matmuls and a softmax over a few batch rows at a time, in low precision
                       or with dropout (SDPA's CPU kernels are slow there)

Each falls back to the plain op outside its case (CUDA tensors, fp16, torch.compile, which fuses its own).
Figures: BENCHMARKS.md, "CPU kernels".

Shape legend: B batch size, nh heads, Q query rows, T key rows, hs head size, K in and N out features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bert_dist.model import BertSelfAttention

# --- Projections ----------------------------------------------------------------------------------------------


def onednn_works() -> bool:
    """oneDNN's linear exists and agrees with F.linear on a small product (it is torch's private, inductor-facing op,
    so a torch release may drop or change it)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=g) for s in ((5, 16), (7, 16), (7,)))
        with torch.autocast("cpu", enabled=False):  # it may first be asked inside a bf16 region
            y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
            return torch.allclose(y, F.linear(x, w, b), rtol=1e-4, atol=1e-5)
    except (AttributeError, RuntimeError):
        return False


def _mm_t(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K), b (N, K) -> a @ b.T + bias: (M, N), in oneDNN. Either may be a transposed view."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class _OneDNNLinearFn(torch.autograd.Function):
    """F.linear with oneDNN's GEMM forward and backward. x (..., K), weight (N, K), bias (N,) -> (..., N)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return _mm_t(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: torch.Tensor):
        x2, weight = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1]).contiguous()  # (M, N)
        gx = _mm_t(g2, weight.t()).view(*gy.shape[:-1], x2.shape[1]) if ctx.needs_input_grad[0] else None
        gw = _mm_t(g2.t(), x2.t()) if ctx.needs_input_grad[1] else None  # (N, M) @ (M, K)
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def _plain(x: torch.Tensor) -> bool:
    """Where the kernels step aside: not a CPU tensor, nothing to compute, or torch.compile tracing."""
    return x.device.type != "cpu" or x.numel() == 0 or torch.compiler.is_compiling()


class PackedLinear(nn.Linear):
    """nn.Linear (same parameters and names) with bf16 inference on kept bf16 weights.

    In bf16 inference (no gradients, bf16 CPU autocast: evaluation, prediction) it keeps bf16 copies of its weight,
    packed in oneDNN's GEMM layout, and bias between forwards, and runs oneDNN's linear with the bias fused: autocast
    would cast every weight again at every forward. The copies are dropped at every forward that takes gradients (a
    training step: fused AdamW updates the weights without bumping their version counters) and made again when the
    weights' storage or version changes (a load). The price: the copies (half the fp32 size) stay in memory after an
    evaluation. Training, fp16 and CUDA stay on F.linear.
    """

    _bf16: tuple | None = None  # (what the copies were made from, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features)."""
        if _plain(x):
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled():
            self._bf16 = None  # the weights are about to change, and an optimizer may leave no trace of it
        elif (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
              and x.dtype in (torch.float32, torch.bfloat16)):
            x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
            w, b = self._bf16_weights(x2.shape[0])
            return _mm_t(x2, w, b).view(*x.shape[:-1], self.out_features)
        return self._linear(x)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _bf16_weights(self, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = self.bias
        key = (self.weight.data_ptr(), self.weight._version, None if b is None else (b.data_ptr(), b._version))
        if self._bf16 is None or self._bf16[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                self._bf16 = (key, _prepacked(self.weight.to(torch.bfloat16), rows),
                              None if b is None else b.to(torch.bfloat16))
        return self._bf16[1], self._bf16[2]

    def __getstate__(self) -> dict:
        """Without the copies: a packed weight is an opaque oneDNN tensor that neither deep-copies nor pickles."""
        state = self.__dict__.copy()
        state.pop("_bf16", None)
        return state


class OneDNNLinear(PackedLinear):
    """PackedLinear, with fp32 projections (forward and backward) through oneDNN's GEMM rather than MKL's."""

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
            return _OneDNNLinearFn.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def _prepacked(w: torch.Tensor, rows: int) -> torch.Tensor:
    """A bf16 weight (N, K) in oneDNN's blocked layout for its GEMM (inductor's CPU freezing does the same); from a
    plain weight oneDNN reorders it at every call. `rows` (M) is a hint for the layout: the packed weight serves any
    M. The plain weight where torch has no such op."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w, rows)
    except (AttributeError, RuntimeError):
        return w


# --- Dropout --------------------------------------------------------------------------------------------------


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout, x any shape -> the same shape, with the keep mask from `_keep` on the CPU: the same arithmetic as
    torch's (x times a mask of 0 and 1 / (1 - p) in x's dtype), another mask generator."""
    if not training or p == 0.0:
        return x
    if _plain(x) or not x.is_floating_point() or not 0.0 < p < 1.0:
        return F.dropout(x, p, training)
    return x * _keep(x.shape, p, x.dtype).mul_(1.0 / (1.0 - p))


def _keep(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """A mask of `shape` in `dtype`, each element 1 with probability 1 - p (to 2**-32), else 0: 32 bits of the
    default generator per element, drawn 64 at a time (`random_` over every int64 value), against a threshold."""
    n = math.prod(shape)
    bits = torch.empty((n + 1) // 2, dtype=torch.int64).random_(-2**63, None).view(torch.int32)[:n].view(shape)
    return torch.ge(bits, min(-2**31 + round(p * 2**32), 2**31 - 1), out=torch.empty(shape, dtype=dtype))


class CpuDropout(nn.Dropout):
    """nn.Dropout (no parameters, same repr) through `dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


# --- Attention ------------------------------------------------------------------------------------------------


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               dropout_p: float) -> torch.Tensor:
    """Attention as its ops: q (b, nh, Q, hs), k, v (b, nh, T, hs), mask (b, 1, 1, T) or None -> (b, nh, Q, hs).

    Scores in the input precision (bf16 under autocast, as in transformers' eager attention), the softmax computed
    in fp32 and stored in the input precision (the PV matmul reads bf16 probabilities on every path, SDPA's too).
    """
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (b, nh, Q, T)
    if mask is not None:  # the lowest finite score, not -inf: a row with no key to attend gives no NaN
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return dropout(torch.softmax(scores, -1), dropout_p) @ v


# The most bf16 scores, (rows, nh, Q, T), one chunk holds. Without gradients: a core's L2 (1 MB). With gradients a
# chunk's backward comes later, and fewer, larger chunks won (8 MB of 2 - 16 MB).
_CHUNK_BYTES = {"inference": 1 << 20, "training": 8 << 20}


def attend_in_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     dropout_p: float) -> torch.Tensor:
    """`_attention` on a few batch rows at a time, so that each chunk's scores stay in cache; the shapes of
    `BertSelfAttention.attend`.

    Without gradients, where the mask is real tokens then padding (what the model makes from the batch's layout),
    each row attends over its first n keys only, with no mask, one row per chunk; a padded query row (Q = T) is then
    zeros (no head reads it). With gradients the mask is applied as it is (reading it would cost the step time).
    """
    B, nh, Q, hs = q.shape
    T = k.shape[2]
    grad = torch.is_grad_enabled()
    lengths = None
    if mask is not None and not grad:
        m = mask.reshape(B, T)
        n = m.sum(1)
        if torch.equal(m, torch.arange(T, device=m.device) < n[:, None]):
            lengths, mask = n.tolist(), None
    rows = max(1, _CHUNK_BYTES["training" if grad else "inference"] // max(1, q.element_size() * nh * Q * T))
    if grad:
        if rows >= B:
            return _attention(q, k, v, mask, dropout_p)
        return torch.cat([_attention(q[i:i + rows], k[i:i + rows], v[i:i + rows],
                                     None if mask is None else mask[i:i + rows], dropout_p)
                          for i in range(0, B, rows)])
    out = torch.empty_like(q) if lengths is None else torch.zeros_like(q)
    for i in range(0, B, 1 if lengths is not None else rows):
        if lengths is None:
            r, nq, nk = slice(i, i + rows), None, None
        else:
            r, nk = slice(i, i + 1), lengths[i]
            nq = nk if Q == T else None  # the last layer's kept queries are positions, not a prefix
        out[r, :, :nq] = _attention(q[r, :, :nq], k[r, :, :nk], v[r, :, :nk], None if mask is None else mask[r],
                                    dropout_p)
    return out


class CpuSelfAttention(BertSelfAttention):
    """BertSelfAttention with `attend` in chunks of rows on the CPU in low precision or with dropout.

    In low precision SDPA's CPU kernels run slower than these plain matmuls over a few rows at a time (BENCHMARKS.md,
    "CPU kernels"); with dropout SDPA takes its reference path and torch's dropout mask. In fp32 without dropout both
    do the same arithmetic and SDPA is a little faster: it stays. Under torch.compile, the plain ops in one piece
    where there is dropout (inductor fuses them; SDPA with dropout leaves its fused CPU kernel for a reference path).
    """

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               dropout_p: float) -> torch.Tensor:
        low_precision = q.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
        if q.device.type != "cpu" or not (low_precision or dropout_p > 0.0):
            return super().attend(q, k, v, mask, dropout_p)
        if torch.compiler.is_compiling():
            return super().attend(q, k, v, mask, 0.0) if dropout_p == 0.0 else _attention(q, k, v, mask, dropout_p)
        return attend_in_chunks(q, k, v, mask, dropout_p)

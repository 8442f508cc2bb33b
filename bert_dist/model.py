"""BERT in plain PyTorch, with Hugging Face parameter names so checkpoints map by key.

Shape legend used in this file:
    B batch size, T sequence length, H hidden size, nh attention heads, hs head size (H / nh),
    I intermediate size, V vocabulary size, M masked positions in a batch, C labels,
    N real (non-padding) tokens in a batch, when the encoder runs unpadded,
    Q positions per row that a head reads (`keep`), when the last layer runs on those rows only.
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bert_dist.config import CPU_MATMULS, BertConfig

_ACT = {
    "gelu": F.gelu,  # exact (erf) GELU, as in the original BERT
    "relu": F.relu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


# --- Projections on the CPU ----------------------------------------------------------------------------------
# torch sends an fp32 F.linear on the CPU to MKL, which on AMD CPUs takes a slower code path: on this project's
# EPYC (AVX-512) oneDNN's fp32 GEMM, the library torch already uses for bf16, ran one BERT projection forward +
# backward 2.0x faster, the minilm fp32 train step 1.57x and inference 1.93x (BENCHMARKS.md, "Fast paths" (j)).
# `linear` routes fp32 CPU matmuls there. bf16 training stays on F.linear (already oneDNN; oneDNN's linear measured
# 0.99x); bf16 inference goes through `Linear`'s kept bf16 weights; fp16, CUDA and torch.compile keep F.linear.
_cpu_matmul = {"mode": "auto", "onednn": None}  # "onednn": the resolved choice, None until first needed


def set_cpu_matmul(mode: str) -> None:
    """--cpu-matmul: auto (oneDNN on x86-64 CPUs where torch has it), onednn (required), torch (F.linear)."""
    if mode not in CPU_MATMULS:
        raise ValueError(f"--cpu-matmul must be one of {', '.join(CPU_MATMULS)}, not {mode!r}")
    _cpu_matmul.update(mode=mode, onednn=None)
    if mode == "onednn" and not _onednn_works():
        raise ValueError("--cpu-matmul onednn: this torch build has no working oneDNN linear "
                         "(torch.ops.mkldnn._linear_pointwise); use --cpu-matmul torch")


def _onednn_works() -> bool:
    """The op exists and agrees with F.linear on a small product (it is torch's private, inductor-facing op)."""
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


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.numel() == 0
            or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()):
        return False
    return cpu_matmul() == "onednn"


def cpu_matmul() -> str:
    """What projections on the CPU run through under the current --cpu-matmul: "onednn" (fp32, and bf16 inference:
    `Linear`) or "torch" (F.linear)."""
    if _cpu_matmul["onednn"] is None:
        mode = _cpu_matmul["mode"]
        _cpu_matmul["onednn"] = mode == "onednn" or (
            mode == "auto" and platform.machine().lower() in ("x86_64", "amd64") and _onednn_works())
    return "onednn" if _cpu_matmul["onednn"] else "torch"


def _mm_t(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K), b (N, K) -> a @ b.T + bias: (M, N), in oneDNN. Either may be a transposed view."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, x (..., K), weight (N, K) -> (..., N); fp32 on the CPU through oneDNN (see above)."""
    if _use_onednn(x, weight):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def _bf16_inference(x: torch.Tensor) -> bool:
    """No gradients, bf16 CPU autocast, oneDNN on: where `Linear` keeps bf16 copies of its weights."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.numel() > 0
            and x.dtype in (torch.float32, torch.bfloat16) and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and not torch.compiler.is_compiling()
            and cpu_matmul() == "onednn")


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) through `linear`.

    In bf16 inference on the CPU (evaluation, prediction) it keeps bf16 copies of its weight (packed in oneDNN's
    GEMM layout: `_prepacked`) and bias between forwards and runs oneDNN's linear with the bias fused: autocast would
    cast every weight again at every forward.
    The copies are dropped at every forward that takes gradients (a training step: fused AdamW updates the weights
    without bumping their version counters) and made again when the weights' storage or version changes (a load).
    minilm bf16 inference: 1.06x - 1.09x (BENCHMARKS.md, "Fast paths" (k)). The price: the copies (half the fp32
    size) stay in memory after an evaluation. A weight changed in place through `.data` with no forward between
    is not seen: nothing in bert-dist does that.
    """

    _bf16: tuple | None = None  # (what the copies were made from, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features)."""
        if _bf16_inference(x):
            x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
            w, b = self._bf16_weights(x2.shape[0])
            return _mm_t(x2, w, b).view(*x.shape[:-1], self.out_features)
        if torch.is_grad_enabled():
            self._bf16 = None  # the weights are about to change, and an optimizer may leave no trace of it
        return linear(x, self.weight, self.bias)

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


def _prepacked(w: torch.Tensor, rows: int) -> torch.Tensor:
    """A bf16 weight (N, K) in oneDNN's own blocked layout for its GEMM (inductor's CPU freezing does the same);
    from a plain weight oneDNN reorders it at every call. `rows` (M) is a hint for the layout: the packed weight
    serves any M. BERT-base projections 3% - 6% faster here. The plain weight where torch has no such op."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w, rows)
    except (AttributeError, RuntimeError):
        return w


def output_layer(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A task head's last projection, x (..., H) -> (..., C), in fp32 also under autocast: bf16 logits (8 bits of
    mantissa) round a regression score to steps of 1/64 - 1/32 between 2 and 5 and tie span scores. It is H x C
    multiply-adds per row, C <= 3 (classification, regression) or 2 (QA): nothing next to the encoder."""
    with torch.autocast(x.device.type, enabled=False):
        if linear.weight.dtype == torch.float32:
            return linear(x.float())
        bias = None if linear.bias is None else linear.bias.float()  # a model cast to bf16/fp16 as a whole
        return F.linear(x.float(), linear.weight.float(), bias)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout, x any shape -> the same shape; on the CPU its keep mask comes from `_keep`.

    The same arithmetic as torch's (x times a mask of 0 and 1 / (1 - p) in x's dtype), another mask generator:
    torch's CPU `bernoulli_` took 30 ms for one (32, 12, 128, 128) attention mask here, about a fifth of a minilm
    bf16 training step; this dropout's forward + backward took 19 ms where torch's took 35 ms (BENCHMARKS.md,
    "Session 8"). CUDA and torch.compile (which fuses its own) keep F.dropout.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not x.is_floating_point() or not 0.0 < p < 1.0 or torch.compiler.is_compiling():
        return F.dropout(x, p, training)
    return x * _keep(x.shape, p, x.dtype).mul_(1.0 / (1.0 - p))


def _keep(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """A mask of `shape` in `dtype`, each element 1 with probability 1 - p (to 2**-32), else 0: 32 bits of the
    default generator per element, drawn 64 at a time (`random_` over every int64 value), against a threshold."""
    n = math.prod(shape)
    bits = torch.empty((n + 1) // 2, dtype=torch.int64).random_(-2**63, None).view(torch.int32)[:n].view(shape)
    return torch.ge(bits, min(-2**31 + round(p * 2**32), 2**31 - 1), out=torch.empty(shape, dtype=dtype))


class Dropout(nn.Dropout):
    """nn.Dropout (no parameters, same repr) through `dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)
        # A buffer rather than torch.arange per call: no allocation in the step, moves with .to().
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings), persistent=False)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, token_type_ids: (B, T) -> (B, T, H)."""
        T = input_ids.shape[1]
        x = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids[:T])
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           dropout_p: float) -> torch.Tensor:
    """Scaled dot-product attention: q (B, nh, Q, hs), k, v (B, nh, T, hs), mask (B, 1, 1, T) bool (True = attend)
    -> (B, nh, Q, hs). Q = T, except in a last layer that runs on the rows its head reads (`keep`).

    SDPA, except on the CPU in low precision or with dropout (`_attend_in_chunks`). In low precision SDPA's kernels
    ran 2.3x - 2.6x slower than plain matmuls and a softmax over a few rows at a time. In fp32 without dropout the two
    do the same arithmetic and SDPA measured 3% - 4% faster (session 5, "Fast paths"); with dropout SDPA takes its
    reference path and torch's dropout, and the chunks with `dropout` measured 1.10x faster at 32x128, 0.99x at
    16x384 (session 8). Under torch.compile, the plain ops in one piece where there is dropout (inductor fuses them;
    SDPA with dropout leaves its fused CPU kernel for a reference path that upcasts to fp32).
    """
    low_precision = q.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
    if (q.device.type != "cpu" or not (low_precision or dropout_p > 0.0)
            or (dropout_p == 0.0 and torch.compiler.is_compiling())):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if torch.compiler.is_compiling():
        return _attention(q, k, v, mask, dropout_p)
    return _attend_in_chunks(q, k, v, mask, dropout_p)


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


# The most bf16 scores, (rows, nh, Q, T), one chunk of `_attend_in_chunks` holds. Without gradients: a core's L2
# (1 MB on this project's EPYC). With gradients a chunk's backward comes later, and fewer, larger chunks won: of 2,
# 4, 8 and 16 MB, 8 MB was fastest or within noise of it at 32x128 and 16x384 (BENCHMARKS.md, "Session 7").
_CHUNK_BYTES = {"inference": 1 << 20, "training": 8 << 20}


def _attend_in_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      dropout_p: float) -> torch.Tensor:
    """`_attention` on a few batch rows at a time, so that each chunk's scores stay in cache: the shapes of
    `attend`. SDPA's CPU flash kernel ran bf16 inference at a sixth of the projections' GEMM speed; this took
    2.3x - 2.6x less time there, and 1.8x - 2.2x less on a bf16 training step's attention (forward + backward,
    against these same ops on the whole batch with an fp32 softmax). BENCHMARKS.md, "Session 7" under "Speed".

    Without gradients, where the mask is real tokens then padding (what every collator here makes), each row
    attends over its first n keys only, with no mask, one row per chunk; a padded query row (Q = T) is then zeros
    (no head reads it: BertModel). With gradients the mask is applied as it is.
    """
    B, nh, Q, hs = q.shape
    T = k.shape[2]
    grad = torch.is_grad_enabled()
    lengths = None
    if mask is not None:
        m = mask.reshape(B, T)
        n = m.sum(1)
        if bool((n == T).all()):
            mask = None
        elif not grad and torch.equal(m, torch.arange(T, device=m.device) < n[:, None]):
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


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = Linear(config.hidden_size, config.hidden_size)
        self.key = Linear(config.hidden_size, config.hidden_size)
        self.value = Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, unpad: Unpadding | None = None,
                xq: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, H), or (N, H) with `unpad`; mask: (B, 1, 1, T) bool, True = attend, or None -> x's shape.

        xq: (B, Q, H), the only rows that ask (queries); keys and values still come from every token of x.
        Then -> (B, Q, H).
        """
        B, T = (x.shape[0], x.shape[1]) if unpad is None else (unpad.batch_size, unpad.seq_len)
        H = x.shape[-1]

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, H) -> (B, nh, L, hs)
            return t.view(B, -1, self.num_heads, self.head_dim).transpose(1, 2)

        # On the unpadded path the projections run on the N real tokens only; attention itself needs the
        # (B, nh, T, hs) layout back.
        k, v = (heads(lin(x) if unpad is None else unpad.pad(lin(x))) for lin in (self.key, self.value))
        if xq is not None:
            q = heads(self.query(xq))  # (B, nh, Q, hs)
        else:
            q = heads(self.query(x) if unpad is None else unpad.pad(self.query(x)))  # (B, nh, T, hs)
        y = attend(q, k, v, mask, self.dropout_p if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, -1, H)
        return y if unpad is None or xq is not None else unpad.unpad(y)  # (N, H): padded queries are dropped


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(y)) + residual)  # post-LN, as in BERT


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, unpad: Unpadding | None = None,
                xq: torch.Tensor | None = None) -> torch.Tensor:
        """-> x's shape, or xq's (B, Q, H) when given (the residual is then xq)."""
        return self.output(self.self(x, mask, unpad, xq), x if xq is None else xq)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACT[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))  # (B, T, I)


class BertOutput(BertSelfOutput):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.dense = Linear(config.intermediate_size, config.hidden_size)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, unpad: Unpadding | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, H), or (N, H) with `unpad` -> the same shape.

        keep: (B, Q) positions (long); then only those rows are computed, -> (B, Q, H). Every token still
        serves as a key and a value, so those rows come out as they would from the whole layer.
        """
        xq = None if keep is None else rows_at(x if unpad is None else unpad.pad(x), keep)
        x = self.attention(x, mask, unpad, xq)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, unpad: Unpadding | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, H), or (N, H) with `unpad` -> the same shape; with keep (B, Q): (B, Q, H).

        With `keep`, the last layer runs on the kept rows only: no layer after it reads the others, and its
        queries, attention output and feed-forward are 10/12 of its projection work (K and V, 2/12, still
        run on every token). MosaicBERT does the same for its heads.
        """
        last = len(self.layer) - 1
        for i, layer in enumerate(self.layer):
            x = layer(x, mask, unpad, keep if i == last else None)
        return x


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, H) -> (B, H): tanh(dense) of the [CLS] position."""
        return torch.tanh(self.dense(x[:, 0]))


def rows_at(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x (B, T, H), keep (B, Q) positions -> (B, Q, H): x[b, keep[b, q]]."""
    return x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@dataclass
class Unpadding:
    """Where the N real tokens of a (B, T) batch sit, so the encoder can run on (N, H) rather than (B, T, H).

    Every projection, LayerNorm, GELU and dropout of a layer is per token: on real tokens only, they do
    N/(B*T) of the work and give the same values. Only attention needs the padded layout, and gets it
    back for the duration of the call.
    """

    index: torch.Tensor
    """(N,) positions b * T + t of the real tokens in the flattened batch, in order."""
    batch_size: int
    seq_len: int

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Unpadding | None:
        """The batch's real tokens, or None where the padded path is the one to take.

        Only on the CPU: there, reading the mask (`all`, `nonzero`) costs nothing, whereas on CUDA it
        would stall the host until the GPU catches up, once per forward. Never under torch.compile
        (N varies per batch: a recompile or a graph break each time). None too when nothing is padded
        (the mask is kept then: dropping it measured no faster on the CPU, BENCHMARKS.md).
        """
        if attention_mask.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        keep = attention_mask.bool()
        if keep.all():
            return None
        B, T = keep.shape
        return cls(keep.view(-1).nonzero().squeeze(1), B, T)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)."""
        return x.reshape(self.batch_size * self.seq_len, *x.shape[2:]).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at the padding."""
        full = x.new_zeros(self.batch_size * self.seq_len, *x.shape[1:]).index_copy(0, self.index, x)
        return full.view(self.batch_size, self.seq_len, *x.shape[1:])


class BertModel(nn.Module):
    """The encoder: embeddings, `num_hidden_layers` post-LN layers, tanh pooler."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids, attention_mask (1 = real token), token_type_ids: (B, T).

        Returns the sequence output (B, T, H) and the pooled output (B, H) (None without a pooler).
        keep: (B, Q) long, the only positions a head reads; the sequence output is then (B, Q, H), those rows,
        and the last layer computes nothing else. The pooler reads row 0 of the output: with a pooler,
        keep[:, 0] must be 0 ([CLS]).
        """
        # Key-padding mask broadcast over heads and queries: (B, 1, 1, T). Padded keys never contribute,
        # so extra padding never changes real tokens. Padded positions of the sequence output are
        # zeros on the unpadded (CPU) path and ignored values otherwise: no head may read them.
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids)
        unpad = None if attention_mask is None else Unpadding.of(attention_mask)
        if unpad is None:
            x = self.encoder(x, mask, keep=keep)
        else:
            x = self.encoder(unpad.unpad(x), mask, unpad, keep)
            x = x if keep is not None else unpad.pad(x)  # with keep, already (B, Q, H)
        return x, (self.pooler(x) if self.pooler is not None else None)


def _init_weights(module: nn.Module, std: float) -> None:
    """The one init: N(0, std) for Linear/Embedding weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class _BertWithHead(nn.Module):
    """Shared plumbing of the heads: `self.bert`, init, and the head dropout rate."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=add_pooling_layer)
        p = config.classifier_dropout
        self.head_dropout = Dropout(config.hidden_dropout_prob if p is None else p)

    def init_weights(self) -> None:
        self.apply(lambda m: _init_weights(m, self.config.initializer_range))


class BertForSequenceClassification(_BertWithHead):
    """Classification (cross-entropy over `num_labels`), multi-label classification (a sigmoid and binary
    cross-entropy per label) or regression (MSE, `num_labels == 1`).

    The loss is chosen here, at build time: `regression=True` for STS-B-style scores, `multi_label=True` for rows
    with any number of labels.
    """

    def __init__(self, config: BertConfig, num_labels: int, regression: bool = False, multi_label: bool = False):
        super().__init__(config)
        if regression and num_labels != 1:
            raise ValueError("a regression head has num_labels == 1")
        self.num_labels = num_labels
        self.regression = regression
        self.classifier = Linear(config.hidden_size, num_labels)
        self.loss_fn = nn.MSELoss() if regression else nn.BCEWithLogitsLoss() if multi_label else nn.CrossEntropyLoss()
        self.float_labels = regression or multi_label  # MSE and BCE take float targets, cross-entropy class ids
        self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """(B, T) inputs, labels (B,), or (B, C) 0/1 for multi-label -> {"logits": (B, C) or (B,) for regression,
        "loss": ()}.

        The head reads [CLS] only, so the last layer runs on that row alone (`keep`): the same logits for
        1/num_layers x 10/12 less work (minilm, 6 layers: BENCHMARKS.md, "last layer on [CLS]").
        """
        cls = torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)  # (B, 1)
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids, keep=cls)
        logits = output_layer(self.classifier, self.head_dropout(pooled))
        if self.regression:
            logits = logits.squeeze(-1)
        out = {"logits": logits}
        if labels is not None:
            # The loss in fp32 even under autocast: MSE/CE on bf16 logits loses precision.
            out["loss"] = self.loss_fn(logits.float(), labels.float() if self.float_labels else labels)
        return out


class BertForQuestionAnswering(_BertWithHead):
    """Span extraction: a start and an end logit per token."""

    def __init__(self, config: BertConfig):
        super().__init__(config, add_pooling_layer=False)
        self.qa_outputs = Linear(config.hidden_size, 2)
        self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """(B, T) inputs, positions (B,) -> {"start_logits": (B, T), "end_logits": (B, T), "loss"}.

        Positions point at [CLS] (0) when the window holds no answer. The loss leaves padded positions out of
        the softmax (the logits returned are not masked), so it does not depend on how far a batch was padded;
        transformers' and Google's heads keep them in.
        """
        x, _ = self.bert(input_ids, attention_mask, token_type_ids)
        start, end = output_layer(self.qa_outputs, x).unbind(-1)  # (B, T) each
        out = {"start_logits": start, "end_logits": end}
        if start_positions is not None and end_positions is not None:
            if attention_mask is not None:
                pad = attention_mask == 0
                start, end = start.masked_fill(pad, -1e4), end.masked_fill(pad, -1e4)
            out["loss"] = (F.cross_entropy(start, start_positions) + F.cross_entropy(end, end_positions)) / 2
        return out


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)
        self.act = _ACT[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # tied: one tensor, one gradient
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., H) -> (..., V)."""
        return linear(self.transform(x), self.decoder.weight, self.bias)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = BertLMPredictionHead(config, word_embeddings)
        self.seq_relationship = Linear(config.hidden_size, 2)


class BertForPreTraining(_BertWithHead):
    """Masked LM (decoder tied to the word embeddings) + next sentence prediction."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.cls = BertPreTrainingHeads(config, self.bert.embeddings.word_embeddings)
        self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """(B, T) inputs; labels (B, T) with -100 at unmasked positions; next_sentence_label (B,).

        With `labels`, the MLM head runs only on the M masked positions:
        {"mlm_logits": (M, V), "mlm_labels": (M,), "nsp_logits": (B, 2), "loss", "mlm_loss", "nsp_loss"}.
        Without, it runs on every token: {"mlm_logits": (B, T, V), "nsp_logits": (B, 2)}.
        """
        if labels is None:
            x, pooled = self.bert(input_ids, attention_mask, token_type_ids)
            return {"nsp_logits": self.cls.seq_relationship(pooled), "mlm_logits": self.cls.predictions(x)}
        # The heads read [CLS] (NSP) and the masked positions (MLM) only: the last layer runs on those rows
        # (`keep`), and the V-wide projection on the M masked ones, not on every token.
        keep, masked = masked_rows(labels)  # (B, 1 + Qm), (B, Qm)
        x, pooled = self.bert(input_ids, attention_mask, token_type_ids, keep=keep)  # x: (B, 1 + Qm, H)
        nsp_logits = self.cls.seq_relationship(pooled)
        out = {"nsp_logits": nsp_logits}
        mlm_labels = labels.gather(1, keep[:, 1:])[masked]  # (M,), in the order of labels[labels != -100]
        mlm_logits = self.cls.predictions(x[:, 1:][masked]).float()  # (M, V)
        out.update(mlm_logits=mlm_logits, mlm_labels=mlm_labels)
        out["mlm_loss"] = F.cross_entropy(mlm_logits, mlm_labels) if mlm_labels.numel() else mlm_logits.sum() * 0
        out["loss"] = out["mlm_loss"]
        if next_sentence_label is not None:
            out["nsp_loss"] = F.cross_entropy(nsp_logits.float(), next_sentence_label)
            out["loss"] = out["loss"] + out["nsp_loss"]
        return out


def masked_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (B, T), -100 where nothing is predicted -> keep (B, 1 + Qm): [CLS] (0), then each row's masked
    positions in order, padded with 0 up to Qm, the most any row has; and valid (B, Qm) bool, which of them
    are masked positions rather than padding. Reading Qm syncs with the host (once per step)."""
    masked = labels != -100
    counts = masked.sum(1)  # (B,)
    qm = int(counts.max()) if labels.numel() else 0
    # A stable sort on "not masked" puts each row's masked positions first, in position order.
    order = torch.sort((~masked).to(torch.uint8), dim=1, stable=True).indices[:, :qm]  # (B, Qm)
    valid = torch.arange(qm, device=labels.device) < counts[:, None]  # (B, Qm)
    cls = torch.zeros(labels.shape[0], 1, dtype=order.dtype, device=labels.device)  # also when no row is masked
    keep = torch.cat([cls, order.masked_fill(~valid, 0)], 1)
    return keep, valid


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(config: BertConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), the usual 6N + attention rule."""
    n = config.num_params(embeddings=False)
    attn = 12 * config.num_hidden_layers * config.hidden_size * seq_len  # 2 (QK, AV) x 2 flops x 3 passes
    return 6 * n + attn


__all__ = [
    "BertModel",
    "BertForSequenceClassification",
    "BertForQuestionAnswering",
    "BertForPreTraining",
    "count_params",
    "flops_per_token",
]

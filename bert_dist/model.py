"""BERT in plain PyTorch, with Hugging Face parameter names so checkpoints map by key.

Shape legend used in this file:
    B batch size, T sequence length, H hidden size, nh attention heads, hs head size (H / nh),
    I intermediate size, V vocabulary size, C labels,
    N real (non-padding) tokens of a batch, when the encoder runs unpadded (`bert_dist.padding`),
    Q positions per row that a head reads (`keep`), when the last layer computes those rows only,
    Qm masked positions per row at most, M masked positions in the batch (pretraining).

Where the real tokens are comes with the batch (`indices`, `cu_seqlens`, and for pretraining the masked
positions), computed by the collator on the host: nothing here reads the device to choose a path. Device-specific
fast paths (the CPU's) are not here either: `bert_dist.kernels` swaps them into a built model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bert_dist.config import BertConfig
from bert_dist.padding import Unpadded, rows_at, unpadded

_ACT = {
    "gelu": F.gelu,  # exact (erf) GELU, as in the original BERT
    "relu": F.relu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # A buffer rather than torch.arange per call: no allocation in the step, moves with .to().
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings), persistent=False)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                unpad: Unpadded | None = None) -> torch.Tensor:
        """input_ids, token_type_ids: (B, T) -> (B, T, H), or (N, H) with `unpad` (the real tokens only)."""
        if unpad is None:
            positions = self.position_ids[: input_ids.shape[1]]  # (T,)
        else:
            input_ids, positions = unpad.unpad(input_ids), unpad.positions()  # (N,) each
            token_type_ids = None if token_type_ids is None else unpad.unpad(token_type_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, unpad: Unpadded | None = None,
                xq: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, H), or (N, H) with `unpad`; mask: (B, 1, 1, T) bool (True = attend), or None (attend to all).

        xq: (B, Q, H), the only rows that ask (queries); keys and values still come from every token of x. Returns
        xq's shape, else x's.
        """
        B = x.shape[0] if unpad is None else unpad.batch_size

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, H), or (N, H) re-padded -> (B, nh, L, hs)
            t = unpad.pad(t) if t.dim() == 2 else t
            return t.view(B, -1, self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(self.query(x if xq is None else xq))
        k, v = heads(self.key(x)), heads(self.value(x))
        y = self.attend(q, k, v, mask, self.dropout_p if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, -1, self.num_heads * self.head_dim)  # (B, L, H)
        return unpad.unpad(y) if unpad is not None and xq is None else y  # padded queries dropped

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               dropout_p: float) -> torch.Tensor:
        """q (B, nh, Q, hs), k, v (B, nh, T, hs), mask (B, 1, 1, T) or None -> (B, nh, Q, hs).

        Without a mask (no row padded) SDPA may take its flash kernel; a mask rules that out."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig, width: int | None = None):
        super().__init__()
        self.dense = nn.Linear(width or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(y)) + residual)  # post-LN, as in BERT


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, unpad: Unpadded | None = None,
                xq: torch.Tensor | None = None) -> torch.Tensor:
        """-> x's shape, or xq's (B, Q, H) when given (the residual is then xq)."""
        return self.output(self.self(x, mask, unpad, xq), x if xq is None else xq)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACT[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))  # (..., I)


class BertOutput(BertSelfOutput):
    def __init__(self, config: BertConfig):
        super().__init__(config, width=config.intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, unpad: Unpadded | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, H), or (N, H) with `unpad` -> the same shape.

        keep: (B, Q) positions (long); then only those rows are computed, -> (B, Q, H). Every token still
        serves as a key and a value, so those rows come out as they would from the whole layer.
        """
        xq = None if keep is None else rows_at(x, keep) if unpad is None else unpad.rows(x, keep)
        x = self.attention(x, mask, unpad, xq)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, unpad: Unpadded | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, H), or (N, H) with `unpad` -> the same shape; with keep (B, Q): (B, Q, H).

        With `keep` the last layer runs on the kept rows only (MosaicBERT does the same for its heads): its queries,
        attention output and feed-forward are 10/12 of its projection work; K and V still run on every token.
        """
        last = len(self.layer) - 1
        for i, layer in enumerate(self.layer):
            x = layer(x, mask, unpad, keep if i == last else None)
        return x


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, H) -> (B, H): tanh(dense) of the [CLS] position."""
        return torch.tanh(self.dense(x[:, 0]))


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
        indices: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids, attention_mask (1 = real token), token_type_ids: (B, T); the collator's layout, indices (N,)
        and cu_seqlens (B + 1,) (`bert_dist.padding`): the encoder then runs on the real tokens and the attention
        mask is not read. Without a layout the encoder runs padded, masked by attention_mask where given.

        Returns the sequence output (B, T, H) and the pooled output (B, H) (None without a pooler); padded positions
        hold zeros or ignored values. keep: (B, Q) long, the only positions a head reads: the sequence output is then
        (B, Q, H), and the last layer computes nothing else (with a pooler, keep[:, 0] must be 0, [CLS]).
        """
        unpad = unpadded(input_ids, indices, cu_seqlens)
        if unpad is not None:  # key-padding mask (B, 1, 1, T): padded keys never contribute
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1])[:, None]
            mask = (self.embeddings.position_ids[: input_ids.shape[1]] < lengths)[:, None, None, :]
        elif indices is not None or attention_mask is None:
            mask = None  # every token real
        else:
            mask = attention_mask.bool()[:, None, None, :]
        x = self.encoder(self.embeddings(input_ids, token_type_ids, unpad), mask, unpad, keep)
        if unpad is not None and keep is None:
            x = unpad.pad(x)
        return x, (self.pooler(x) if self.pooler is not None else None)


def output_layer(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A task head's last projection, x (..., H) -> (..., C), in fp32 also under autocast: bf16 logits round a
    regression score to steps of 1/64 - 1/32 between 2 and 5 and tie span scores (and C is at most 3: cheap)."""
    with torch.autocast(x.device.type, enabled=False):
        if linear.weight.dtype == torch.float32:
            return linear(x.float())
        bias = None if linear.bias is None else linear.bias.float()  # a model cast to bf16/fp16 as a whole
        return F.linear(x.float(), linear.weight.float(), bias)


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
        self.head_dropout = nn.Dropout(config.hidden_dropout_prob if p is None else p)

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
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        self.loss_fn = nn.MSELoss() if regression else nn.BCEWithLogitsLoss() if multi_label else nn.CrossEntropyLoss()
        self.float_labels = regression or multi_label  # MSE and BCE take float targets, cross-entropy class ids
        self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """(B, T) inputs, labels (B,), or (B, C) 0/1 for multi-label, the layout (BertModel) -> {"logits": (B, C) or
        (B,) for regression, "loss": ()}.

        The head reads [CLS] only, so the last layer runs on that row alone (`keep`): the same logits for
        1/num_layers x 10/12 less work.
        """
        cls = torch.zeros(input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device)  # (B, 1)
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids, cls, indices, cu_seqlens)
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
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """(B, T) inputs, positions (B,) -> {"start_logits": (B, T), "end_logits": (B, T), "loss"}.

        Positions point at [CLS] (0) when the window holds no answer. The loss leaves padded positions out of
        the softmax (the logits returned are not masked), so it does not depend on how far a batch was padded;
        transformers' and Google's heads keep them in.
        """
        x, _ = self.bert(input_ids, attention_mask, token_type_ids, None, indices, cu_seqlens)
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
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = _ACT[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # tied: one tensor, one gradient
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., H) -> (..., V)."""
        return self.decoder(self.transform(x)) + self.bias


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = BertLMPredictionHead(config, word_embeddings)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


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
        masked_positions: torch.Tensor | None = None,
        masked_index: torch.Tensor | None = None,
        masked_labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """(B, T) inputs and the layout (BertModel); from the collator (`MLMCollator`), masked_positions (B, Qm), each
        row's masked positions then 0s, masked_index (M,), where the M real ones sit in the flattened (B * Qm), and
        masked_labels (M,), their ids; next_sentence_label (B,).

        With masked positions the heads read [CLS] and those only: the last layer runs on those rows (`keep`), the
        V-wide projection on the M masked ones: {"mlm_logits": (M, V), "nsp_logits": (B, 2)} and with labels "loss",
        "mlm_loss", "nsp_loss". Without, on every token: {"mlm_logits": (B, T, V), "nsp_logits": (B, 2)}.
        """
        if masked_positions is None:
            x, pooled = self.bert(input_ids, attention_mask, token_type_ids, None, indices, cu_seqlens)
            return {"nsp_logits": self.cls.seq_relationship(pooled), "mlm_logits": self.cls.predictions(x)}
        cls = masked_positions.new_zeros(masked_positions.shape[0], 1)  # (B, 1)
        keep = torch.cat([cls, masked_positions], 1)  # (B, 1 + Qm)
        x, pooled = self.bert(input_ids, attention_mask, token_type_ids, keep, indices, cu_seqlens)
        rows = x[:, 1:].reshape(-1, x.shape[-1]).index_select(0, masked_index)  # (M, H)
        out = {"mlm_logits": self.cls.predictions(rows).float(), "nsp_logits": self.cls.seq_relationship(pooled)}
        if masked_labels is not None:
            # No masked token in the batch (short rows): a zero loss that still reaches the graph.
            has_masked = masked_labels.shape[0] > 0
            out["mlm_loss"] = (F.cross_entropy(out["mlm_logits"], masked_labels) if has_masked
                               else out["mlm_logits"].sum() * 0)
            out["loss"] = out["mlm_loss"]
        if next_sentence_label is not None:
            out["nsp_loss"] = F.cross_entropy(out["nsp_logits"].float(), next_sentence_label)
            out["loss"] = out["nsp_loss"] + out.get("mlm_loss", 0.0)
        return out


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

"""Where a batch's real tokens are, and moving between the padded and the unpadded layout.

The collator computes the layout on the host (`layout_of`), so that the model never reads the device to learn it:
on a GPU such a read (`nonzero`, `.item()`, boolean indexing) stalls the host until the queued work is done.
MosaicBERT's `bert_padding.py` and flash-attention's `unpad_input` / `pad_input` do the same.

Shape legend: B batch size, T padded length, N real tokens in the batch, Q positions per row, ... any trailing dims.
Padding is on the right: row b's real tokens are its first lengths[b] positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def layout_of(attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The layout of a right-padded batch, from its (B, T) attention mask on the host (the collator's side).

    Returns {"indices": (N,) long, the flat positions b * T + t of the real tokens in order,
    "cu_seqlens": (B + 1,) int32, the offsets of each row's tokens among the N}.
    """
    cu_seqlens = torch.zeros(attention_mask.shape[0] + 1, dtype=torch.int32)
    torch.cumsum(attention_mask.sum(1), 0, out=cu_seqlens[1:])
    return {"indices": attention_mask.reshape(-1).nonzero().squeeze(1), "cu_seqlens": cu_seqlens}


@dataclass
class Unpadded:
    """A (B, T) batch whose encoder runs on its N real tokens, (N, H), rather than on (B, T, H).

    Projections, LayerNorm, GELU and dropout are per token: on real tokens only they do N / (B * T) of the work and
    give the same values. Attention needs the (B, T) layout back, for the duration of the call.
    """

    indices: torch.Tensor
    """(N,) flat positions of the real tokens."""
    cu_seqlens: torch.Tensor
    """(B + 1,) offsets of each row's tokens among the N."""
    batch_size: int
    seq_len: int

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)."""
        return x.reshape(self.batch_size * self.seq_len, *x.shape[2:]).index_select(0, self.indices)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at the padding."""
        full = x.new_zeros(self.batch_size * self.seq_len, *x.shape[1:]).index_copy(0, self.indices, x)
        return full.view(self.batch_size, self.seq_len, *x.shape[1:])

    def rows(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (N, ...), keep (B, Q) positions within each row -> (B, Q, ...): row b's token at keep[b, q]."""
        flat = (self.cu_seqlens[:-1, None].long() + keep).view(-1)  # (B * Q,) indices among the N
        return x.index_select(0, flat).view(*keep.shape, *x.shape[1:])

    def positions(self) -> torch.Tensor:
        """(N,) each real token's position within its row."""
        return self.indices % self.seq_len


def unpadded(input_ids: torch.Tensor, indices: torch.Tensor | None,
             cu_seqlens: torch.Tensor | None) -> Unpadded | None:
    """The unpadded layout of a (B, T) batch, or None where there is no padding to leave out (no layout given, or
    every token real). Decided from shapes alone (N against B * T): no read of the device."""
    if indices is None or cu_seqlens is None:
        return None
    B, T = input_ids.shape
    if indices.shape[0] == B * T:
        return None
    return Unpadded(indices, cu_seqlens, B, T)


def rows_at(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x (B, T, H), keep (B, Q) positions -> (B, Q, H): x[b, keep[b, q]]."""
    return x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

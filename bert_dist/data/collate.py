"""Batch collation: pad per batch (never to a fixed length), and the batch orders it draws from.

Shape legend: B batch size, T longest sequence in the batch (rounded up to `pad_to_multiple_of`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

SEQUENCE_KEYS = ("input_ids", "token_type_ids")


class PadCollator:
    """Rows of {"input_ids": [...], "token_type_ids": [...], <scalar fields>} -> a padded batch.

    Output: input_ids, token_type_ids, attention_mask (B, T) long; each name in `scalar_keys` as (B,)
    (float32 when the values are floats, e.g. regression labels; int64 otherwise). Other fields are
    dropped, so bookkeeping columns (idx, lengths, offsets) never reach the model.
    """

    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: int | None = None,
                 scalar_keys: Sequence[str] = ("labels",)):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.scalar_keys = tuple(scalar_keys)

    def padded_length(self, longest: int) -> int:
        m = self.pad_to_multiple_of
        return longest if not m else math.ceil(longest / m) * m

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(r["input_ids"]) for r in rows]
        B, T = len(rows), self.padded_length(max(lengths))
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        token_type_ids = torch.zeros((B, T), dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for i, (r, n) in enumerate(zip(rows, lengths)):
            input_ids[i, :n] = torch.as_tensor(r["input_ids"])
            if "token_type_ids" in r:
                token_type_ids[i, :n] = torch.as_tensor(r["token_type_ids"])
            attention_mask[i, :n] = 1
        batch = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
        for k in self.scalar_keys:
            if k in rows[0]:
                values = [r[k] for r in rows]
                dtype = torch.float32 if isinstance(values[0], float) else torch.long
                batch[k] = torch.tensor(values, dtype=dtype)
        return batch


class BatchSampler(Sampler[list[int]]):
    """Batches of indices whose order is a function of (seed, epoch) alone: every process agrees.

    With `group_by_length`, shuffled indices are cut into mega-batches of 50 batches, each sorted by
    length, so a batch holds sequences of similar length (little padding) while the order stays random.
    The longest batch goes first, so an out-of-memory shows at step 1, not hours in.
    """

    def __init__(self, num_examples: int, batch_size: int, shuffle: bool = True, seed: int = 0,
                 lengths: Sequence[int] | None = None, group_by_length: bool = False, drop_last: bool = False):
        if group_by_length and lengths is None:
            raise ValueError("group_by_length needs the example lengths")
        self.num_examples, self.batch_size, self.shuffle, self.seed = num_examples, batch_size, shuffle, seed
        self.lengths = None if lengths is None else torch.as_tensor(lengths)
        self.group_by_length, self.drop_last = group_by_length, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n, b = self.num_examples, self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_examples, generator=g) if self.shuffle else torch.arange(self.num_examples)
        if self.group_by_length:
            mega = self.batch_size * 50
            chunks = [order[i : i + mega] for i in range(0, len(order), mega)]
            order = torch.cat([c[torch.argsort(self.lengths[c], descending=True, stable=True)] for c in chunks])
        batches = list(torch.split(order, self.batch_size))
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.group_by_length and self.shuffle and batches:
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in perm]
            longest = max(range(len(batches)), key=lambda i: int(self.lengths[batches[i]].max()))
            batches[0], batches[longest] = batches[longest], batches[0]
        for b in batches:
            yield b.tolist()

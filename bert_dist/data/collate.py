"""Batch collation: pad per batch (never to a fixed length), and the batch orders it draws from.

A batch also carries what the training step needs to know about itself, computed here on the host so that the step
never reads the device to learn it: where the real tokens are (`bert_dist.padding.layout_of`) and, for MLM, the
masked positions.

Shape legend: B batch size, T longest sequence in the batch (rounded up to `pad_to_multiple_of`), N real tokens in
the batch, Qm masked positions per row at most, M masked positions in the batch.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from bert_dist.padding import layout_of

SEQUENCE_KEYS = ("input_ids", "token_type_ids")


def pad_multiple(pad_to_multiple_of: int | None, mixed_precision: str | None) -> int | None:
    """The --pad-to-multiple-of in force: as given (0 = off), else 8 under fp16/bf16 (tensor cores, bf16 tiles)."""
    if pad_to_multiple_of is not None:
        return pad_to_multiple_of or None
    return 8 if mixed_precision in ("fp16", "bf16") else None


class PadCollator:
    """Rows of {"input_ids": [...], "token_type_ids": [...], <scalar fields>} -> a padded batch.

    Output: input_ids, token_type_ids, attention_mask (B, T) long; the layout, indices (N,) long and cu_seqlens
    (B + 1,) int32; each name in `scalar_keys` as (B,) (float32 when the values are floats, e.g. regression labels;
    int64 otherwise). Other fields are dropped, so bookkeeping columns (idx, lengths, offsets) never reach the model.
    """

    def __init__(
        self, pad_token_id: int = 0, pad_to_multiple_of: int | None = None, scalar_keys: Sequence[str] = ("labels",),
        max_length: int | None = None,
    ):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.scalar_keys = tuple(scalar_keys)
        self.max_length = max_length

    def padded_length(self, longest: int) -> int:
        """The batch's T: `longest` rounded up to the multiple, but never past `max_length` (the model's positions
        end there: 512 rounded up to a multiple of 24 would be 528)."""
        m = self.pad_to_multiple_of
        if not m:
            return longest
        rounded = math.ceil(longest / m) * m
        return rounded if self.max_length is None else max(longest, min(rounded, self.max_length))

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
        batch = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
                 **layout_of(attention_mask)}
        for k in self.scalar_keys:
            if k in rows[0]:
                values = [r[k] for r in rows]
                dtype = torch.float32 if isinstance(values[0], float) else torch.long
                batch[k] = torch.tensor(values, dtype=dtype)
        return batch


class MLMCollator(PadCollator):
    """PadCollator plus BERT's dynamic masking, drawn afresh for every batch (and so every epoch).

    Of the tokens that are neither special nor padding, each is chosen with `mlm_probability`;
    a chosen token becomes [MASK] 80% of the time, a random non-special token 10%, and stays as
    it is 10%. Output: PadCollator's (input_ids masked), the chosen positions (`masked_positions`) and
    next_sentence_label (B,) when present.

    Randomness: each row's draws come from its own `torch.Generator`, seeded from (seed, epoch, the
    row's `idx`, or a CRC of its token ids when it has none). A mask is thus a function of the seed,
    the epoch and the example alone: reproducible from `--seed`, the same on resume (skipped batches
    need no replay), the same with any number of DataLoader workers, and different on different
    processes because they hold different examples. The global RNG (seeded identically on every
    process by accelerate's `set_seed`, and consumed by dropout) is never touched. Call
    `set_epoch(e)` with the sampler's so each epoch masks each example anew.

    `whole_word`: a word is chosen whole, all its pieces or none (`choose_for_mlm`); rows then carry `word_start`,
    True at each token that begins a word (the prepared pretraining corpus has it).
    """

    def __init__(
        self,
        mask_token_id: int,
        vocab_size: int,
        special_token_ids: Sequence[int],
        pad_token_id: int = 0,
        mlm_probability: float = 0.15,
        pad_to_multiple_of: int | None = None,
        seed: int = 0,
        max_length: int | None = None,
        whole_word: bool = False,
    ):
        super().__init__(pad_token_id, pad_to_multiple_of, scalar_keys=("next_sentence_label",), max_length=max_length)
        self.whole_word = whole_word
        if not 0 < mlm_probability < 1:
            raise ValueError(f"--mlm-probability must be in (0, 1), got {mlm_probability}")
        self.mask_token_id, self.mlm_probability, self.seed = mask_token_id, mlm_probability, seed
        self.epoch = 0
        self.special = torch.zeros(vocab_size, dtype=torch.bool)  # (V,) lookup: never chosen, never drawn
        self.special[torch.as_tensor([*special_token_ids, pad_token_id, mask_token_id])] = True
        self.replacements = (~self.special).nonzero().squeeze(1)  # ids a random replacement may take

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(rows)
        ids = batch["input_ids"]
        B, T = ids.shape
        # (3, B, T) uniforms: choose?, then how (mask / random / keep), then which random id.
        u = torch.ones(3, B, T)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            key = r["idx"] if "idx" in r else zlib.crc32(ids[i, :n].numpy().tobytes())
            g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, int(key)))
            u[:, i, :n] = torch.rand(3, n, generator=g)  # drawn for the row's own length: batch-independent
        # index_select, not table[ids]: advanced indexing runs a threaded kernel that stalls on a busy CPU.
        special = self.special.index_select(0, ids.view(-1)).view(B, T)
        maskable = ~special & batch["attention_mask"].bool()
        word_start = None
        if self.whole_word:
            word_start = torch.ones(B, T, dtype=torch.bool)
            for i, r in enumerate(rows):
                word_start[i, : len(r["word_start"])] = torch.as_tensor(r["word_start"])
        chosen = choose_for_mlm(u[0], maskable, self.mlm_probability, word_start)
        batch.update(masked_positions(chosen, ids))
        n_repl = len(self.replacements)
        pick = (u[2] * n_repl).long().clamp_(max=n_repl - 1)
        random_ids = self.replacements.index_select(0, pick.view(-1)).view(B, T)
        ids = torch.where(chosen & (u[1] < 0.8), self.mask_token_id, ids)
        batch["input_ids"] = torch.where(chosen & (u[1] >= 0.8) & (u[1] < 0.9), random_ids, ids)
        return batch


def choose_for_mlm(u: torch.Tensor, maskable: torch.Tensor, probability: float,
                   word_start: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) bool: the positions chosen for MLM, each token with `probability` (u (B, T) uniforms below it) among the
    `maskable` ones (B, T) (real, non-special tokens).

    With `word_start` (B, T) bool (True where a word begins): whole words, as Google's whole-word masking: a word is
    chosen by its first piece's uniform, and its `##` pieces with it, so words (not pieces) are chosen with
    `probability` and the expected share of chosen tokens is unchanged. A run of pieces after a special token (a word
    truncated at its front) is a word of its own.
    """
    if word_start is None:
        return (u < probability) & maskable
    B, T = u.shape
    starts = word_start | ~maskable
    starts[:, 1:] |= ~maskable[:, :-1]
    pos = torch.arange(T).expand(B, T)
    first = torch.where(starts, pos, 0).cummax(1).values  # (B, T) where each token's word begins
    return (u.gather(1, first) < probability) & maskable


def masked_positions(chosen: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """chosen (B, T) bool, the positions to predict; ids (B, T), the original tokens ->
    {"masked_positions": (B, Qm) each row's chosen positions in order, then 0s (Qm = the most any row has),
    "masked_index": (M,) where the M chosen ones sit in the flattened (B * Qm), "masked_labels": (M,) their ids}."""
    counts = chosen.sum(1)
    qm = int(counts.max()) if chosen.numel() else 0
    # A stable sort on "not chosen" puts each row's chosen positions first, in position order.
    order = torch.sort((~chosen).to(torch.uint8), dim=1, stable=True).indices[:, :qm]  # (B, Qm)
    valid = torch.arange(qm) < counts[:, None]  # (B, Qm)
    return {"masked_positions": order.masked_fill(~valid, 0), "masked_index": valid.view(-1).nonzero().squeeze(1),
            "masked_labels": ids[chosen]}


_M64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """splitmix64 folded over `values`: nearby (seed, epoch, idx) triples give unrelated 63-bit seeds."""
    h = 0
    for v in values:
        h = (h + (v & _M64) + 0x9E3779B97F4A7C15) & _M64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _M64
        h ^= h >> 31
    return h >> 1


class BatchSampler(Sampler[list[int]]):
    """Batches of indices whose order is a function of (seed, epoch) alone: every process agrees.

    With `group_by_length`, shuffled indices are cut into mega-batches of 50 batches, each sorted by
    length, so a batch holds sequences of similar length (little padding) while the order stays random.
    The longest batch goes first, so an out-of-memory shows at step 1, not hours in; a short batch (the
    examples do not divide into batches) is always the last.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        lengths: Sequence[int] | None = None,
        group_by_length: bool = False,
        drop_last: bool = False,
    ):
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
        # Batches as start offsets into `order`, sliced as they are yielded: a list of every batch's tensor took 10 s
        # before the first step of a 10-million-example corpus.
        b = self.batch_size
        full, rest = divmod(self.num_examples, b)
        starts = list(range(0, full * b, b))
        short = [full * b] if rest and not self.drop_last else []
        if self.group_by_length and self.shuffle and starts:
            # The short batch (if any) stays last: accelerate's sharding across processes expects only the final
            # batch to be short (it fills that one from the epoch's start); a short batch mid-epoch went to one
            # process alone, or made it skip a whole round of batches.
            perm = torch.randperm(len(starts), generator=g)
            starts = [starts[i] for i in perm.tolist()]
            longest = self.lengths[order[: full * b]].view(full, b).amax(1)[perm].tolist()
            top = longest.index(max(longest))
            starts[0], starts[top] = starts[top], starts[0]
        for start in starts + short:
            yield order[start : start + b].tolist()

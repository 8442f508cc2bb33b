"""What several processes do together: run a block on the main process first, share its result, gather weights
and evaluation outputs. One process is the case of one: every function works there too.

Shapes: B the batch (examples per process), T a per-batch width (token positions), P the number of processes.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator


@contextlib.contextmanager
def main_process_first(accelerator: Accelerator):
    """`accelerator.main_process_first()` (the main process runs the block first, e.g. to write a datasets cache the
    others then read), also when the block raises on the main process: it still meets the others at the barrier
    before raising, so they run the block too, meet the same error (bad data is bad on every process) and exit,
    rather than wait at the barrier forever."""
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        yield
        return
    try:
        yield
    finally:
        accelerator.wait_for_everyone()


def share_from_main(obj: Any) -> Any:
    """The main process's `obj` (picklable), on every process (None elsewhere before the call)."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj])[0]


def gather_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The prepared `model`'s whole state dict (no `_orig_mod.` keys of torch.compile) on the main process, None on
    the others. Call it on every process: under FSDP the layers' shards are gathered by collectives that every rank
    must join (a main process gathering alone would hang, or meet the others' next evaluation), and the module
    itself holds only this rank's shards."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        weights = {k.removeprefix("_orig_mod."): v for k, v in accelerator.get_state_dict(model).items()}
    elif accelerator.is_main_process:
        weights = accelerator.unwrap_model(model, keep_torch_compile=False).state_dict()
    return weights if accelerator.is_main_process else None


def load_whole_state_dict(accelerator: Accelerator, model: torch.nn.Module,
                          weights: dict[str, torch.Tensor]) -> list[str]:
    """Load a whole state dict (what `gather_state_dict` gives; every process holds it) into the prepared `model`, on
    every process: under FSDP each rank keeps its shards of it (a collective). Returns the model's keys it lacked."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        result = set_model_state_dict(getattr(model, "_orig_mod", model), weights,
                                      options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        result = accelerator.unwrap_model(model, keep_torch_compile=False).load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"weights for another model: {', '.join(result.unexpected_keys[:5])} are not its parameters")
    return list(result.missing_keys)


def gather_outputs(accelerator: Accelerator, picked: dict[str, torch.Tensor],
                   pad_value: float = -1e4) -> dict[str, np.ndarray]:
    """One evaluation batch's outputs from every process, in dataset order, on the host.

    `picked`: tensors (B, ...) whose first dim is the batch; 2-D ones (B, T) may differ in T between processes and
    are padded to the longest with `pad_value` (-100 for integer ones). `gather_for_metrics` drops the examples
    repeated to even out the last batch, so each example comes back once: arrays of (P * B - repeats, ...).
    """
    picked = {k: accelerator.pad_across_processes(v, dim=1, pad_index=pad_for(v.dtype, pad_value)) if v.ndim == 2
              else v for k, v in picked.items()}
    return {k: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
            for k, v in accelerator.gather_for_metrics(picked).items()}


def pad_for(dtype: torch.dtype | np.dtype, pad_value: float) -> float | int:
    """The padding of a 2-D output: `pad_value` for scores, -100 (the ignored label) for integer ones."""
    floating = dtype.is_floating_point if isinstance(dtype, torch.dtype) else np.issubdtype(dtype, np.floating)
    return pad_value if floating else -100

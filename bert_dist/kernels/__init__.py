"""Device-specific fast paths, applied to a built model in one call (`apply`), behind one switch (--cpu-kernels).

A kernel is a subclass of one of the model's modules with the same parameters and names; `apply` swaps a module's
class in place (torchtitan's model converters work on a built model the same way), so checkpoints, optimizers and
wrappers (DDP) see the same model. Today there are the CPU's (`bert_dist.kernels.cpu`); `--cpu-kernels off` runs
the plain model, as on a GPU.
"""

from __future__ import annotations

import platform
from collections.abc import Collection

import torch
from torch import nn

from bert_dist.model import BertSelfAttention

CPU_KERNELS = ("auto", "off")
"""--cpu-kernels: auto (on a CPU device) | off."""


def kernels() -> dict[type[nn.Module], type[nn.Module]]:
    """{CPU kernel class: the model module class it stands in for}, every one."""
    from bert_dist.kernels.cpu import CpuDropout, CpuSelfAttention, OneDNNLinear, PackedLinear

    return {OneDNNLinear: nn.Linear, PackedLinear: nn.Linear, CpuDropout: nn.Dropout,
            CpuSelfAttention: BertSelfAttention}


def cpu_vendor() -> str:
    """The CPU's vendor id (GenuineIntel, AuthenticAMD, ...), "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("vendor_id")), "")
    except OSError:
        return ""


def cpu_swaps() -> dict[type[nn.Module], type[nn.Module]]:
    """{model module class: its kernel} that `auto` takes on this machine: dropout and attention on every CPU; on
    x86-64 with oneDNN's linear, bf16 inference on packed weights, and on AMD CPUs fp32 through oneDNN too (MKL's fp32
    GEMM, torch's default, is the slower one there and the faster one on Intel's: BENCHMARKS.md, "CPU kernels")."""
    from bert_dist.kernels.cpu import CpuDropout, CpuSelfAttention, OneDNNLinear, PackedLinear, onednn_works

    swaps: dict[type[nn.Module], type[nn.Module]] = {nn.Dropout: CpuDropout, BertSelfAttention: CpuSelfAttention}
    if platform.machine().lower() in ("x86_64", "amd64") and onednn_works():
        swaps[nn.Linear] = OneDNNLinear if cpu_vendor() == "AuthenticAMD" else PackedLinear
    return swaps


def apply(model: nn.Module, mode: str, device: torch.device | str, only: Collection[str] | None = None) -> list[str]:
    """Swap the kernels for `device` into `model` in place (mode "auto"), or take them out ("off"). `only`: the names
    of the kernels to take (benchmarks measure one at a time). Returns the names of the kernel classes now in the
    model."""
    if mode not in CPU_KERNELS:
        raise ValueError(f"--cpu-kernels must be one of {', '.join(CPU_KERNELS)}, not {mode!r}")
    swaps = cpu_swaps() if mode == "auto" and torch.device(device).type == "cpu" else {}
    swaps = {base: k for base, k in swaps.items() if only is None or k.__name__ in only}
    plain = kernels()
    used = set()
    for module in model.modules():
        base = plain.get(type(module), type(module))
        module.__class__ = swaps.get(base, base)
        if base in swaps:
            used.add(swaps[base].__name__)
    return sorted(used)

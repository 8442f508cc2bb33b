"""Hardware peaks and model FLOPs utilisation (MFU), for results.json and the benchmarks.

MFU = achieved model FLOP/s / the device's peak. Model FLOPs are `flops_per_token` (6N + attention,
the PaLM/Chinchilla convention): the work the model needs, not what the kernels happened to run (so
recomputation and padding never count). The peak is the dense bf16 tensor-core figure of the device's
datasheet, the usual denominator even for fp32 runs.
"""

from __future__ import annotations

import torch

from bert_dist.config import BertConfig


def flops_per_token(config: BertConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), the usual 6N + attention rule."""
    n = config.num_params(embeddings=False)
    attn = 12 * config.num_hidden_layers * config.hidden_size * seq_len  # 2 (QK, AV) x 2 flops x 3 passes
    return 6 * n + attn


# Dense (no 2:4 sparsity) bf16 tensor-core peaks in FLOP/s, from NVIDIA's datasheets. Matched in order
# against torch.cuda.get_device_name(): more specific names first ("H100 PCIe" before "H100").
# The datasheets print the 2:4-sparse figure: dense is half of it.
PEAK_BF16_DENSE: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM5
    ("H800 PCIe", 756e12),  # the export H100: same compute
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),  # SXM4 and PCIe alike
    ("A800", 312e12),  # the export A100
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)


def peak_flops(device: torch.device | str) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None where unknown (every CPU: no figure is honest there)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_DENSE if key in name), None)


def mfu(tokens_per_second: float, config: BertConfig, seq_len: int, device: torch.device | str,
        num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation of a training run, or None where the peak is unknown.

    Args:
        tokens_per_second: tokens trained on per second, summed over all `num_devices` devices.
        config: the encoder's architecture (`flops_per_token` counts its non-embedding parameters).
        seq_len: the sequence length the attention term is counted at (the run's max_length).
        device: one of the devices the run trains on (all are assumed alike).
        num_devices: how many devices produced `tokens_per_second`.
    """
    peak = peak_flops(device)
    if peak is None:
        return None
    return round(tokens_per_second * flops_per_token(config, seq_len) / (peak * num_devices), 4)

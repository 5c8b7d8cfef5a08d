"""MBU and MFU: the work a step must do over its time, as a fraction of the device's measured peak.

- `measure_copy_bandwidth` and `measure_matmul_peak` measure, once per run, what the device really
  does (not its data-sheet numbers); MBU and MFU are ratios to those.
- `decode_bytes_per_step` (bytes one decode step reads) and `prefill_flops` (FLOPs of a prefill)
  are the work; `utilisation` is work / seconds / peak.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from harness.backends.capabilities import dtype_name
from harness.performance.timing import time_calls


@dataclass(frozen=True)
class DevicePeaks:
    """What this device achieved on the two operations that bound LLM inference."""

    device: str
    copy_bytes_per_s: float   # (read + write) bytes per second of a large device-to-device copy
    copy_buffer_bytes: int
    matmul_flops_per_s: float  # dense square matmul in `matmul_dtype`
    matmul_size: int
    matmul_dtype: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def measure_copy_bandwidth(device, nbytes: int | None = None, repeats: int = 10) -> tuple[float, int]:
    """Median (read+write) bytes/s of copying a buffer far larger than the caches."""
    import torch

    device = torch.device(device)
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 1 << 27
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = statistics.median(time_calls(lambda: dst.copy_(src), device, warmup=2, repeats=repeats))
    return 2 * src.numel() * 4 / seconds, src.numel() * 4


def measure_matmul_peak(device, dtype, size: int | None = None, repeats: int = 10) -> tuple[float, int]:
    """Median FLOP/s of an n x n x n matmul (2 n^3 FLOPs) in `dtype`."""
    import torch

    device = torch.device(device)
    n = size or (8192 if device.type == "cuda" else 1024)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    seconds = statistics.median(time_calls(lambda: torch.mm(a, b), device, warmup=3, repeats=repeats))
    return 2 * n**3 / seconds, n


def measure_device_peaks(device, dtype) -> DevicePeaks:
    import torch

    copy, nbytes = measure_copy_bandwidth(device)
    flops, n = measure_matmul_peak(device, dtype)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return DevicePeaks(str(device), copy, nbytes, flops, n, dtype_name(dtype))


# ---------------------------------------------------------------------------------------------
# Utilisation


def decode_bytes_per_step(counts, weight_bytes: int, kv_bytes_per_token: int, batch: int, context: int) -> int:
    """Bytes one decode step must read: every weight except the input embedding table (of which
    only `batch` rows are read, unless it is tied to the LM head, which reads it all), plus the
    KV cache of `context` tokens for each sequence."""
    if counts.tied or counts.total == 0:
        weights = weight_bytes
    else:
        weights = weight_bytes - weight_bytes * counts.input_embedding // counts.total
    return int(weights + kv_bytes_per_token * batch * context)


def prefill_flops(counts, shape, batch: int, seq_len: int) -> float:
    """FLOPs of a prefill that computes logits for the last position only (as generate does):
    2 per weight per token for the linear layers, 2 x vocab x hidden for the one LM-head row
    (input-embedding lookups are free), and causal attention's QK^T and PV: 2 x 2 x N^2/2 x
    heads x head_dim per layer."""
    lm_head = counts.output_embedding or (counts.input_embedding if counts.tied else 0)
    linear = 2.0 * batch * seq_len * counts.linear + 2.0 * batch * lm_head
    attention = 2.0 * batch * shape.layers * seq_len * seq_len * shape.heads * shape.head_dim
    return linear + attention


def utilisation(work: float, seconds: float, peak_per_s: float) -> float:
    """MBU (work in bytes, peak in bytes/s) or MFU (work in FLOPs, peak in FLOP/s)."""
    return work / seconds / peak_per_s if seconds > 0 and peak_per_s > 0 else float("nan")

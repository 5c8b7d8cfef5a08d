"""Attention implementations by name, all with one calling convention, plus the model-level mapping.

Calling convention (every kernel-level implementation, including the planted faults in tests/):

    fn(q, k, v, *, mask=None, causal=False, window=None, scale=None) -> out

* ``q``: (batch, q_heads, q_len, head_dim); ``k``, ``v``: (batch, kv_heads, k_len, head_dim) with
  q_heads a multiple of kv_heads (GQA/MQA): query head ``h`` reads kv head ``h // (q_heads // kv_heads)``,
  as ``repeat_interleave`` / transformers' ``repeat_kv`` arrange them.
* ``mask``: broadcastable to (batch, q_heads, q_len, k_len); bool (True = attend) or additive float
  (0 = attend, -inf = masked; other values are biases).
* ``causal``: bottom-right aligned, as flash-attn and KV-cached decoding use it: query ``i`` sits at
  absolute position ``k_len - q_len + i`` and sees keys ``j <= k_len - q_len + i``. (SDPA's own
  ``is_causal`` is top-left aligned, so it is only used where both agree: q_len == k_len.)
* ``window``: sliding window of ``window`` keys, transformers' convention: query at absolute
  position ``p`` sees key ``j`` only when ``p - j < window`` (flash-attn's window_size=(window-1, 0)).
* ``scale``: softmax scale, default 1/sqrt(head_dim).
* A query row whose keys are all masked has output 0 (not NaN, not a uniform average), as
  flash-attn defines it and as torch's SDPA (math, CPU flash) and flex_attention return.

Which implementation is which backend (its capability name, transformers name, probe and limits)
is harness.backends.attention's registry; this module holds the implementations, the reference
and the comparison rules.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["KernelImpl", "structural_mask", "combined_bool_mask", "eager_attention", "sdpa_attention",
           "flex_attention_impl", "flash_attn_package_impl"]


def structural_mask(q_len: int, k_len: int, *, causal: bool, window: int | None, device) -> torch.Tensor | None:
    """(q_len, k_len) bool, True = attend, for bottom-right causal and/or a sliding window; None if neither."""
    if not causal and window is None:
        return None
    q_pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    k_pos = torch.arange(k_len, device=device)[None, :]
    keep = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        keep &= k_pos <= q_pos
    if window is not None:
        keep &= q_pos - k_pos < window
    return keep


def combined_bool_mask(q: torch.Tensor, k: torch.Tensor, mask, causal: bool, window: int | None) -> torch.Tensor | None:
    """The user mask (bool, or additive where -inf counts as masked) AND the causal/window structure."""
    keep = structural_mask(q.shape[2], k.shape[2], causal=causal, window=window, device=q.device)
    if mask is not None:
        user = mask if mask.dtype == torch.bool else ~torch.isneginf(mask)
        keep = user if keep is None else (user & keep)
    return keep


def _user_biases(mask: torch.Tensor, dtype) -> torch.Tensor:
    """An additive float mask's biases, its -inf (masked) entries as 0: combined_bool_mask holds those."""
    return torch.where(torch.isneginf(mask), 0.0, mask).to(dtype)


def _additive_bias(mask, keep: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """One additive mask: the user's float biases (if any) plus -inf where ``keep`` is False."""
    if keep is None:
        return None
    bias = torch.zeros((), dtype=dtype, device=keep.device)
    if mask is not None and mask.dtype != torch.bool:
        bias = _user_biases(mask, dtype)
    return torch.where(keep, bias, torch.tensor(float("-inf"), dtype=dtype, device=keep.device))


def _repeat_kv(x: torch.Tensor, q_heads: int) -> torch.Tensor:
    groups = q_heads // x.shape[1]
    if groups * x.shape[1] != q_heads:
        raise ValueError(f"{q_heads} query heads are not a multiple of {x.shape[1]} key/value heads")
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def eager_attention(q, k, v, *, mask=None, causal=False, window=None, scale=None):
    """The reference: plain matmul + softmax, in the inputs' dtype (fp64 gives the truth).

    Like transformers' eager path, scores are formed in the input dtype, the softmax runs in
    float32 (float64 for float64 inputs) and its probabilities are cast back before the second
    matmul. Fully masked rows give 0.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    # In place on the one score matrix: at a long prompt it is (heads, n, n) in float64, and every
    # extra full-size temporary costs as much as the matmul on a CPU (the same values as adding an
    # additive -inf bias, which is how transformers' eager path masks).
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    keep = combined_bool_mask(q, k, mask, causal, window)
    if mask is not None and mask.dtype != torch.bool:
        scores.add_(_user_biases(mask, scores.dtype))
    if keep is not None:
        scores.masked_fill_(~keep, float("-inf"))
    softmax_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype)
    if keep is not None:
        has_key = keep.any(-1, keepdim=True)
        if not bool(has_key.all()):
            probs.masked_fill_(~has_key, 0.0)  # a fully masked row: 0, not softmax's NaN
    return torch.matmul(probs.to(q.dtype), v)


def sdpa_attention(q, k, v, *, mask=None, causal=False, window=None, scale=None, backend: str = "MATH"):
    """torch SDPA forced to one backend (an unsupported input raises RuntimeError, never falls back)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kwargs = {}
    if causal and q.shape[2] == 1:
        causal = False  # bottom-right: a single (newest) query sees every key, so no mask is needed
    if causal and window is None and mask is None and q.shape[2] == k.shape[2]:
        kwargs["is_causal"] = True  # the flag fused kernels need; same alignment as ours when square
    else:
        keep = combined_bool_mask(q, k, mask, causal, window)
        if keep is not None:
            kwargs["attn_mask"] = keep if (mask is None or mask.dtype == torch.bool) else _additive_bias(mask, keep, q.dtype)
    if q.shape[1] != k.shape[1]:
        if backend in ("MATH", "FLASH_ATTENTION"):
            kwargs["enable_gqa"] = True
        else:  # torch documents enable_gqa for the math and flash kernels only: give the others repeated heads
            k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    with sdpa_kernel(getattr(SDPBackend, backend)):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, **kwargs)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    """flex_attention compiled for static shapes: one kernel per shape bucket and mask kind
    (harness.equivalence.attention_cases.KERNEL_BUCKET_SETS). transformers compiles it with automatic
    dynamic shapes; on an H100 (session 13) that search did not finish bf16, fp16 and fp32 in 170 s,
    against ~2.6 s a static graph (examples/gpu-session.sh flex compares the two)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention_impl(q, k, v, *, mask=None, causal=False, window=None, scale=None):
    """flex_attention with a block mask for causal/window/bool masks and a score_mod for additive biases.

    Compiled on CUDA (the fused Triton kernel users get); on CPU the uncompiled reference path runs,
    since compiling per hypothesis shape would exceed the CI budget.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, q_heads, q_len, _ = q.shape
    k_len = k.shape[2]
    keep = combined_bool_mask(q, k, mask, causal, window)
    block_mask = score_mod = None
    if keep is not None:
        keep4 = keep.expand(batch, q_heads, q_len, k_len).contiguous()
        block_mask = create_block_mask(lambda b, h, qi, ki: keep4[b, h, qi, ki], batch, q_heads, q_len, k_len,
                                       device=q.device)
    if mask is not None and mask.dtype != torch.bool:
        bias4 = torch.where(torch.isneginf(mask), 0.0, mask).to(q.dtype).expand(batch, q_heads, q_len, k_len).contiguous()
        score_mod = lambda score, b, h, qi, ki: score + bias4[b, h, qi, ki]  # noqa: E731
    fn = _compiled_flex() if q.device.type == "cuda" else flex_attention
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def flash_attn_package_impl(module_name: str, fn_name: str = "flash_attn_func"):
    """flash-attn's (batch, len, heads, dim) API wrapped to our convention; padding via a bool mask is
    not expressible there (it needs varlen packing), so these kernels take causal/window only."""

    def run(q, k, v, *, mask=None, causal=False, window=None, scale=None):
        if mask is not None:
            raise NotImplementedError(f"{module_name}.{fn_name} takes no dense mask (varlen API needed)")
        module = importlib.import_module(module_name)
        fn = getattr(module, fn_name)
        kwargs = {"causal": causal, "softmax_scale": scale}
        if window is not None:
            # left = window - 1 keys back; right: none when causal, unlimited otherwise (flash-attn 2/3
            # spell unlimited -1, flash-attn 4 None; its (w-1, 0) would hide the keys to the right)
            unlimited = None if module_name == "flash_attn.cute" else -1
            kwargs["window_size"] = (window - 1, 0 if causal else unlimited)
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)

    return run


@dataclass(frozen=True)
class KernelImpl:
    """One attention implementation and what inputs it accepts (so strategies draw only those)."""

    name: str  # the capability name in harness.backends.capabilities
    fn: Callable
    dense_masks: bool = True  # accepts bool/additive masks (padding)
    additive_masks: bool = True
    windows: bool = True
    max_head_dim: int = 256
    head_dim_multiple: int = 1
    causal_square_only: bool = False  # causal only where SDPA's top-left is_causal agrees (q_len == k_len or 1)
    low_precision_only: bool = False  # fp16/bf16 only (flash kernels)
    # device types where it compiles a kernel per input shape (flex_attention via torch.compile,
    # flash-attn-4's CuTe DSL JIT): searches draw its shapes from a few buckets there
    compiles_per_shape_on: tuple[str, ...] = ()

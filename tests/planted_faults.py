"""Deliberately broken attention, to prove the attention suites fail on real bugs.

Two forms of each fault:

* ``ATTENTION_FAULTS[name]``: a transformers attention function (the signature of
  ``transformers.integrations.sdpa_attention.sdpa_attention_forward``) for model-level runs;
  ``activate_planted_fault(name)`` installs it as transformers' global "sdpa", so every model
  loaded with ``attn_implementation="sdpa"`` is broken (Llama, Mistral, Qwen2, GPT-2 dispatch
  through it; Falcon calls torch SDPA itself and is unaffected).
* ``KERNEL_FAULTS[name]``: the same bug in harness.backends.kernels's kernel convention
  ``fn(q, k, v, *, mask, causal, window, scale)``.

Each fault is a one-line change of a correct computation, described in ``FAULT_DESCRIPTIONS``.
"""

from __future__ import annotations

import math

import torch

from harness.backends.kernels import combined_bool_mask, eager_attention, structural_mask

FAULT_DESCRIPTIONS = {
    "attention_scale_off": "softmax scale 1/sqrt(d+1) instead of 1/sqrt(d)",
    "attention_causal_shift": "causal mask shifted by one: each query also sees the next token",
    "attention_padding_ignored": "padding mask dropped (causal/window structure kept)",
    "attention_gqa_wrong_order": "GQA key/value heads tiled (kv0,kv1,kv0,kv1) instead of interleaved (kv0,kv0,kv1,kv1)",
    "attention_window_too_wide": "sliding window admits one key more than it should",
    "attention_fp16_accumulation": "scores, softmax and weighted sum computed in float16 instead of float32",
    "attention_scale_off_1pct": "softmax scale 1 % too large (the model's scaling x 1.01)",
    "attention_decode_drops_first_key": "cached decode (one query) ignores the first cached key",
    "attention_probs_rounded_bf16": "float32 path: attention probabilities rounded to bfloat16 before the weighted sum",
}


# ---------------------------------------------------------------------------------------------
# Model level: transformers' attention-function signature


def _keep_mask(query, key, attention_mask, is_causal: bool):
    """transformers' mask as bool (True = attend); None means causal (top-left, as SDPA's is_causal)."""
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            return attention_mask
        return attention_mask > torch.finfo(attention_mask.dtype).min / 2
    q_len, k_len = query.shape[2], key.shape[2]
    if not is_causal or q_len == 1:
        return torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
    return torch.arange(k_len, device=query.device)[None, :] <= torch.arange(q_len, device=query.device)[:, None]


def _sliding_window(module, kwargs) -> int | None:
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    return int(window) if window else None


def _transformers_attention(query, key, value, keep, scaling, *, kv_repeat: str = "interleave", compute_dtype=None):
    """SDPA-equivalent attention on (batch, heads, len, dim) with a bool keep mask; returns transformers' layout."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        if kv_repeat == "interleave":
            key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        else:  # the fault: tile instead of interleave
            key, value = key.repeat(1, groups, 1, 1), value.repeat(1, groups, 1, 1)
    dtype = query.dtype
    if compute_dtype is not None:
        query, key, value = query.to(compute_dtype), key.to(compute_dtype), value.to(compute_dtype)
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # stays in compute_dtype: the fault
        probs = torch.nan_to_num(probs)
        out = torch.matmul(probs, value).to(dtype)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=keep, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _scale(query, scaling):
    return scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])


def _is_causal(module, is_causal):
    return is_causal if is_causal is not None else getattr(module, "is_causal", True)


def scale_off_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None, **kwargs):
    keep = _keep_mask(query, key, attention_mask, _is_causal(module, is_causal))
    return _transformers_attention(query, key, value, keep, 1.0 / math.sqrt(query.shape[-1] + 1))


def causal_shift_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None, **kwargs):
    keep = _keep_mask(query, key, attention_mask, _is_causal(module, is_causal))
    keep = keep.clone()
    keep[..., 1:] |= keep[..., :-1].clone()  # query i now also sees key i+1
    return _transformers_attention(query, key, value, keep, _scale(query, scaling))


def padding_ignored_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None, **kwargs):
    q_len, k_len = query.shape[2], key.shape[2]
    keep = structural_mask(q_len, k_len, causal=_is_causal(module, is_causal) and q_len > 1 or k_len > q_len,
                           window=_sliding_window(module, kwargs), device=query.device)
    if keep is None:
        keep = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
    return _transformers_attention(query, key, value, keep, _scale(query, scaling))


def gqa_wrong_order_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None, **kwargs):
    keep = _keep_mask(query, key, attention_mask, _is_causal(module, is_causal))
    return _transformers_attention(query, key, value, keep, _scale(query, scaling), kv_repeat="tile")


def window_too_wide_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None, **kwargs):
    keep = _keep_mask(query, key, attention_mask, _is_causal(module, is_causal))
    window = _sliding_window(module, kwargs)
    if window is not None:
        q_len, k_len = query.shape[2], key.shape[2]
        distance = (torch.arange(q_len, device=query.device)[:, None] + k_len - q_len
                    - torch.arange(k_len, device=query.device)[None, :])
        keep = keep.clone()
        # admit the key exactly `window` back when its right neighbour (inside the window) was admitted
        keep[..., :-1] |= keep[..., 1:].clone() & (distance[:, :-1] == window)
    return _transformers_attention(query, key, value, keep, _scale(query, scaling))


def fp16_accumulation_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None, **kwargs):
    keep = _keep_mask(query, key, attention_mask, _is_causal(module, is_causal))
    return _transformers_attention(query, key, value, keep, _scale(query, scaling), compute_dtype=torch.float16)


def scale_off_1pct_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=_scale(query, scaling) * 1.01,
                                  dropout=dropout, is_causal=is_causal, **kwargs)


def decode_drops_first_key_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None,
                                   **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] == 1 and key.shape[2] > 1:
        key, value = key[:, :, 1:], value[:, :, 1:]
        attention_mask = None if attention_mask is None else attention_mask[..., 1:]
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  is_causal=is_causal, **kwargs)


def probs_rounded_bf16_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None,
                               **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.dtype != torch.float32:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      is_causal=is_causal, **kwargs)
    keep = _keep_mask(query, key, attention_mask, _is_causal(module, is_causal))
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * _scale(query, scaling)
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num()
    out = torch.matmul(probs.to(torch.bfloat16).to(torch.float32), value)  # the fault: probabilities lose 16 bits
    return out.transpose(1, 2).contiguous(), None


ATTENTION_FAULTS = {
    "attention_scale_off": scale_off_forward,
    "attention_causal_shift": causal_shift_forward,
    "attention_padding_ignored": padding_ignored_forward,
    "attention_gqa_wrong_order": gqa_wrong_order_forward,
    "attention_window_too_wide": window_too_wide_forward,
    "attention_fp16_accumulation": fp16_accumulation_forward,
    "attention_scale_off_1pct": scale_off_1pct_forward,
    "attention_decode_drops_first_key": decode_drops_first_key_forward,
    "attention_probs_rounded_bf16": probs_rounded_bf16_forward,
}


def activate_planted_fault(name: str) -> None:
    """Register fault ``name`` as transformers' global "sdpa" attention (KeyError for unknown names)."""
    if name not in ATTENTION_FAULTS:
        raise KeyError(f"{name!r}; known attention faults: {', '.join(ATTENTION_FAULTS)}")
    from transformers import AttentionInterface

    AttentionInterface._global_mapping["sdpa"] = ATTENTION_FAULTS[name]


def deactivate_planted_faults() -> None:
    """Restore transformers' own "sdpa" attention."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface._global_mapping["sdpa"] = sdpa_attention_forward


# ---------------------------------------------------------------------------------------------
# Kernel level: harness.backends.kernels's convention


def kernel_scale_off(q, k, v, *, mask=None, causal=False, window=None, scale=None):
    return eager_attention(q, k, v, mask=mask, causal=causal, window=window, scale=1.0 / math.sqrt(q.shape[-1] + 1))


def kernel_causal_shift(q, k, v, *, mask=None, causal=False, window=None, scale=None):
    """The causal structure built one key too far (query i also sees key i+1); padding and window intact."""
    if not causal:
        return eager_attention(q, k, v, mask=mask, window=window, scale=scale)
    shifted = structural_mask(q.shape[2], k.shape[2], causal=True, window=None, device=q.device)
    shifted[:, 1:] |= shifted[:, :-1].clone()
    if mask is None:
        combined = shifted
    elif mask.dtype == torch.bool:
        combined = mask & shifted
    else:
        combined = torch.where(shifted, mask, torch.tensor(float("-inf"), dtype=mask.dtype, device=mask.device))
    return eager_attention(q, k, v, mask=combined, window=window, scale=scale)


def kernel_padding_ignored(q, k, v, *, mask=None, causal=False, window=None, scale=None):
    return eager_attention(q, k, v, causal=causal, window=window, scale=scale)


def kernel_gqa_wrong_order(q, k, v, *, mask=None, causal=False, window=None, scale=None):
    groups = q.shape[1] // k.shape[1]
    return eager_attention(q, k.repeat(1, groups, 1, 1), v.repeat(1, groups, 1, 1), mask=mask, causal=causal,
                           window=window, scale=scale)


def kernel_window_too_wide(q, k, v, *, mask=None, causal=False, window=None, scale=None):
    return eager_attention(q, k, v, mask=mask, causal=causal, window=None if window is None else window + 1, scale=scale)


def kernel_fp16_accumulation(q, k, v, *, mask=None, causal=False, window=None, scale=None):
    half = [t.to(torch.float16) for t in (q, k, v)]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    keep = combined_bool_mask(q, k, mask, causal, window)
    groups = q.shape[1] // k.shape[1]
    qh, kh, vh = half[0], half[1].repeat_interleave(groups, 1), half[2].repeat_interleave(groups, 1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if mask is not None and mask.dtype != torch.bool:
        scores = scores + torch.where(torch.isneginf(mask), 0.0, mask).to(torch.float16)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1))
    return torch.matmul(probs, vh).to(q.dtype)


KERNEL_FAULTS = {
    "attention_scale_off": kernel_scale_off,
    "attention_causal_shift": kernel_causal_shift,
    "attention_padding_ignored": kernel_padding_ignored,
    "attention_gqa_wrong_order": kernel_gqa_wrong_order,
    "attention_window_too_wide": kernel_window_too_wide,
    "attention_fp16_accumulation": kernel_fp16_accumulation,
}

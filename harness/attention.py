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

import contextlib
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


def _additive_bias(mask, keep: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """One additive mask: the user's float biases (if any) plus -inf where ``keep`` is False."""
    if keep is None:
        return None
    bias = torch.zeros((), dtype=dtype, device=keep.device)
    if mask is not None and mask.dtype != torch.bool:
        bias = torch.where(torch.isneginf(mask), 0.0, mask).to(dtype)
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
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    keep = combined_bool_mask(q, k, mask, causal, window)
    bias = _additive_bias(mask, keep, scores.dtype) if keep is not None else None
    if bias is None and mask is not None and mask.dtype != torch.bool:
        bias = mask.to(scores.dtype)
    if bias is not None:
        scores = scores + bias
    softmax_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype)
    if keep is not None:
        probs = torch.where(keep.expand_as(probs).any(-1, keepdim=True), probs, 0.0)  # fully masked -> 0
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

    name: str  # the capability name in harness.capabilities
    fn: Callable
    dense_masks: bool = True  # accepts bool/additive masks (padding)
    additive_masks: bool = True
    windows: bool = True
    max_head_dim: int = 256
    head_dim_multiple: int = 1
    causal_square_only: bool = False  # causal only where SDPA's top-left is_causal agrees (q_len == k_len or 1)
    low_precision_only: bool = False  # fp16/bf16 only (flash kernels)


# ---------------------------------------------------------------------------------------------
# Kernel-level cases and the check every kernel suite (and the planted-fault tests) runs


@dataclass(frozen=True)
class AttentionCase:
    """One kernel-level input: shapes, masking and the seed of its random q/k/v.

    ``mask`` is 'none', 'bool' (key padding) or 'additive' (key padding as -inf plus an ALiBi-like
    bias); ``padding`` says on which side the ``valid_keys[b]`` real keys of batch row ``b`` sit.
    A row with 0 valid keys, or a causal/window row that only sees padding, is fully masked.
    """

    batch: int = 1
    q_heads: int = 4
    kv_heads: int = 2
    q_len: int = 8
    k_len: int = 8
    head_dim: int = 64
    causal: bool = True
    window: int | None = None
    mask: str = "none"
    padding: str = "left"
    valid_keys: tuple[int, ...] = ()
    seed: int = 0

    def restricted_to(self, impl: KernelImpl) -> "AttentionCase":
        """The same case without the features ``impl`` does not take (so no example is wasted)."""
        import dataclasses

        case = self
        if not impl.dense_masks or (self.mask == "additive" and not impl.additive_masks):
            case = dataclasses.replace(case, mask="none")
        if not impl.windows:
            case = dataclasses.replace(case, window=None)
        if case.head_dim > impl.max_head_dim:
            case = dataclasses.replace(case, head_dim=impl.max_head_dim)
        if case.head_dim % impl.head_dim_multiple:
            case = dataclasses.replace(case, head_dim=-(-case.head_dim // impl.head_dim_multiple) * impl.head_dim_multiple)
        if impl.causal_square_only and case.causal and 1 < case.q_len < case.k_len:
            case = dataclasses.replace(case, causal=False)
        return case

    def tensors(self, dtype, device):
        """(q, k, v, mask) with q/k/v rounded to ``dtype`` (so every implementation sees the same inputs)."""
        gen = torch.Generator().manual_seed(self.seed)
        q = torch.randn(self.batch, self.q_heads, self.q_len, self.head_dim, generator=gen, dtype=torch.float64)
        k = torch.randn(self.batch, self.kv_heads, self.k_len, self.head_dim, generator=gen, dtype=torch.float64)
        v = torch.randn(self.batch, self.kv_heads, self.k_len, self.head_dim, generator=gen, dtype=torch.float64)
        q, k, v = (t.to(dtype).to(device) for t in (q, k, v))
        mask = None
        if self.mask != "none":
            valid = list(self.valid_keys) + [self.k_len] * (self.batch - len(self.valid_keys))
            pos = torch.arange(self.k_len)
            keep = torch.stack([(pos >= self.k_len - n) if self.padding == "left" else (pos < n) for n in valid[: self.batch]])
            keep = keep[:, None, None, :].expand(self.batch, 1, self.q_len, self.k_len)
            if self.mask == "bool":
                mask = keep
            else:
                slopes = torch.linspace(0.05, 0.5, self.q_heads, dtype=torch.float64)[None, :, None, None]
                distance = (torch.arange(self.q_len)[:, None] + self.k_len - self.q_len - pos[None, :]).abs()
                mask = torch.where(keep, -slopes * distance, float("-inf")).to(dtype)
            mask = mask.to(device)
        return q, k, v, mask


# The quick profile's kernel search (issue 15): flex_attention and flash-attn-4 compile one kernel
# per new input shape, so a free search compiles one per example (flex fp32 on the H200: 34 s of a
# cold gate). In the quick profile the shapes come from these buckets, each showing a structure the
# faults in tests/planted_faults.py need: decode with GQA, square prefill with MHA, chunked prefill
# with MQA and odd lengths, a head size that is no multiple of 16, and, where the suite allows long
# inputs, a long prefill and a long decode. Masks, padding, windows, causality and values are still
# drawn freely. Which profiles use them: harness.profiles (kernel_shape_buckets).
# (batch, kv_heads, groups, q_len, k_len, head_dim); groups 1 = MHA, kv_heads 1 with groups > 1 = MQA
SHAPE_BUCKETS = ((1, 2, 3, 1, 40, 64), (2, 4, 1, 40, 40, 128), (3, 1, 2, 17, 33, 80), (2, 2, 2, 7, 7, 36))
LONG_SHAPE_BUCKETS = ((2, 2, 2, 160, 160, 64), (1, 1, 4, 1, 127, 128))
def attention_cases(max_len: int = 40, head_dims=(32, 36, 64, 80, 100, 128, 256), max_batch: int = 3,
                    buckets: bool = False):
    """hypothesis strategy over AttentionCase: decode (q_len=1), chunked prefill (q_len < k_len),
    square prefill, GQA/MQA/MHA, masks, padding on either side, windows. With ``buckets`` the
    shapes come from SHAPE_BUCKETS (and LONG_SHAPE_BUCKETS when max_len allows them)."""
    from hypothesis import strategies as st

    shapes = [b for b in SHAPE_BUCKETS + LONG_SHAPE_BUCKETS if b[4] <= max_len and b[0] <= max_batch]

    @st.composite
    def cases(draw):
        if buckets:
            batch, kv_heads, groups, q_len, k_len, head_dim = draw(st.sampled_from(shapes))
        else:
            batch = draw(st.integers(1, max_batch))
            kv_heads = draw(st.sampled_from([1, 2, 4]))
            groups = draw(st.sampled_from([1, 2, 3]))  # 1 = MHA; kv_heads=1 with groups>1 = MQA
            k_len = draw(st.integers(1, max_len))
            q_len = draw(st.one_of(st.just(1), st.just(k_len), st.integers(1, k_len)))
            head_dim = draw(st.sampled_from(head_dims))
        mask = draw(st.sampled_from(["none", "bool", "additive"]))
        valid = tuple(draw(st.integers(0, k_len)) for _ in range(batch)) if mask != "none" else ()
        return AttentionCase(
            batch=batch, q_heads=kv_heads * groups, kv_heads=kv_heads, q_len=q_len, k_len=k_len,
            head_dim=head_dim, causal=draw(st.booleans()),
            window=draw(st.one_of(st.none(), st.integers(1, k_len + 1))), mask=mask,
            padding=draw(st.sampled_from(["left", "right"])), valid_keys=valid, seed=draw(st.integers(0, 2**31 - 1)))

    return cases()


def query_rows_to_compare(case: AttentionCase, device) -> torch.Tensor:
    """All query rows count (fully masked rows must be exactly 0); shape broadcastable to the output."""
    return torch.ones(case.batch, 1, case.q_len, 1, dtype=torch.bool, device=device)


def check_attention_kernel(fn: Callable, case: AttentionCase, *, dtype, device, factor: float, slack_floor: float,
                           name: str = "attention"):
    """Run ``fn`` on ``case`` and apply harness.compare's k x eager rule against the fp64 eager truth."""
    from harness.compare import attention_error_check

    q, k, v, mask = case.tensors(dtype, device)
    kwargs = dict(mask=mask, causal=case.causal, window=case.window)
    out = fn(q, k, v, **kwargs)
    baseline = eager_attention(q, k, v, **kwargs)
    ref = eager_attention(q.double(), k.double(), v.double(), mask=None if mask is None else (
        mask if mask.dtype == torch.bool else mask.double()), causal=case.causal, window=case.window)
    return attention_error_check(out, baseline, ref, factor=factor, slack_floor=slack_floor,
                                 mask=query_rows_to_compare(case, device), name=f"{name} on {case}")


# ---------------------------------------------------------------------------------------------
# Model level: the check the model suite (and the planted-fault tests) run


def padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift RoPE/learned positions."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def model_forward(model, input_ids, attention_mask, context=None, use_cache=None):
    """One no-grad forward with every layer's hidden states, inside ``context`` (e.g. sdpa_kernel).
    ``use_cache=False`` keeps no KV cache in the outputs (long prompts: it is as big as the keys
    and values of every layer); None leaves the model's default."""
    kwargs = {} if use_cache is None else {"use_cache": use_cache}
    with torch.no_grad(), (context or contextlib.nullcontext)():
        return model(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=padded_position_ids(attention_mask), output_hidden_states=True, **kwargs)


def upcast_reference(model, dtype=torch.float64, device=None, layers_device=None):
    """The same weights in a wider dtype: the truth the k x eager rule measures against.

    Loading the model again in float64 is not the same thing for random-weight presets (their
    initialisation draws different numbers per dtype), and a reference with other weights would
    make every comparison vacuous.

    The reference attention is this module's ``eager_attention`` registered with transformers as
    ``REFERENCE_ATTENTION``, not transformers' own "eager"/"sdpa": transformers' eager path turns
    the fully masked query rows of left padding into NaN in float64 (two finfo.min biases
    overflow to -inf, and the NaN reaches real tokens through 0 x NaN in the next layer), and
    "sdpa" is the name a planted fault (or a user's override) replaces. Falcon does not dispatch
    through transformers' registry, so it keeps its SDPA path run with the math kernel
    (``reference_context()``), which gives fully masked rows 0 as well.

    The copy is made tensor by tensor straight into ``dtype`` (no second copy in the model's
    dtype), on ``device`` (default: the model's), decoder layers on ``layers_device`` (default:
    ``device``; harness.reference_sizing streams them from there). How big a reference a device
    can take, and which placement to use, is harness.reference_sizing's business.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from harness.reference_sizing import upcast_copy

    AttentionInterface.register(REFERENCE_ATTENTION, _reference_attention_forward)
    AttentionMaskInterface.register(REFERENCE_ATTENTION, sdpa_mask)  # bool masks (True = attend) or None
    reference = upcast_copy(model, dtype, device=device, layers_device=layers_device).to(dtype)
    reference.set_attn_implementation("sdpa" if reference.config.model_type == "falcon" else REFERENCE_ATTENTION)
    return reference


REFERENCE_ATTENTION = "harness_eager_reference"


def _reference_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None,
                                 **kwargs):
    """transformers' attention-function signature around eager_attention (masks: bool, additive, or None)."""
    mask, causal, window = attention_mask, False, None
    if mask is None:  # sdpa_mask skipped a plain causal (or sliding-window) mask
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)) and query.shape[2] > 1
        window = kwargs.get("sliding_window") or None
    elif mask.dtype != torch.bool:
        mask = torch.where(mask <= torch.finfo(mask.dtype).min / 2, float("-inf"), mask)
    out = eager_attention(query, key, value, mask=mask, causal=causal, window=window, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def reference_context():
    """The context the upcast reference runs in (SDPA forced to its math kernel, for Falcon)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


@dataclass(frozen=True)
class KnownDisagreement:
    """A disagreement between transformers' own attention paths, keyed by what causes it (an
    architecture feature and the transformers releases it was seen in), not by a model's name:
    a user's checkpoint with the same feature gets the same explanation. Suites record it as an
    expected failure, only when it occurs, so a fix shows up as a pass."""

    feature: str
    applies: Callable  # (config) -> bool
    transformers: str  # version specifier where it was seen
    explanation: str


KNOWN_DISAGREEMENTS = (
    KnownDisagreement(
        feature="Falcon with ALiBi",
        applies=lambda config: config.model_type == "falcon" and bool(getattr(config, "alibi", False)),
        transformers=">=5.17,<6",
        explanation="modeling_falcon.py builds the ALiBi bias into the SDPA mask but adds it to the scores in eager; "
                    "the two differ by ~20 % of a hidden value at layer 1 while eager is within 4e-8 of the float64 "
                    "reference (seen with transformers 5.17 and 5.24, torch 2.11/2.13)"),
)


def known_disagreement(config) -> str | None:
    """The explanation of a known transformers disagreement that applies to this model, or None."""
    import transformers
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    version = Version(transformers.__version__)
    for known in KNOWN_DISAGREEMENTS:
        if known.applies(config) and version in SpecifierSet(known.transformers):
            return (f"known transformers disagreement for {known.feature} (transformers {known.transformers}): "
                    f"{known.explanation}")
    return None


def error_over_allowed(*verdicts) -> float:
    """The quantity harness.compare's k x eager rule decides on, for result rows: the largest
    error / allowed error (allowed = k x eager's error + slack) of ``verdicts``; every verdict
    passes exactly when this is <= 1. (Verdict.ratio, error / eager's error, is not decisive: the
    slack lets a near-exact eager be far exceeded in ratio by an error still within rounding.)"""
    def one(v):
        if v.allowed:
            return v.error / v.allowed
        return 0.0 if v.error == 0 else float("inf")

    return max(one(v) for v in verdicts)


def compare_model_outputs(out, eager_out, reference_out, attention_mask, *, tolerances, name: str):
    """(layers verdict, logits verdict) of harness.compare's k x eager rule; padding excluded. The
    numbers are the run's Tolerances: model_error_factor (k), attention_abs_slack, reference_logit_gap.

    Raises ValueError when the reference cannot be the same weights, since then the rule would
    accept anything: the embeddings (hidden state 0) must agree within rounding, and eager's
    logits may be at most ``reference_logit_gap`` x the largest reference logit away from the
    reference at the median position (see Tolerances.reference_logit_gap for the measured values).
    """
    from harness.compare import (compare_tensors, first_diverging_layer, max_abs_error, reference_rounding,
                                 typical_position_error)

    factor, slack, max_reference_gap = (tolerances.model_error_factor, tolerances.attention_abs_slack,
                                        tolerances.reference_logit_gap)
    embeddings_gap = max_abs_error(eager_out.hidden_states[0], reference_out.hidden_states[0], attention_mask)
    embeddings_rounding = 2.0 * reference_rounding(reference_out.hidden_states[0], eager_out.hidden_states[0].dtype,
                                                   attention_mask)
    scale = float(reference_out.logits.abs().max())
    # the typical position, not the worst: another model differs everywhere, while bf16 drifts far at a few
    logits_gap = typical_position_error(eager_out.logits, reference_out.logits, attention_mask)
    if embeddings_gap > embeddings_rounding or logits_gap > max_reference_gap * scale:
        raise ValueError(f"{name}: eager and the reference are not the same model: embeddings differ by "
                         f"{embeddings_gap:.3g} (rounding {embeddings_rounding:.3g}), logits by {logits_gap:.3g} "
                         f"at the median position (allowed {max_reference_gap:g} x {scale:.3g})")

    layers = first_diverging_layer(out.hidden_states, eager_out.hidden_states, reference_out.hidden_states,
                                   attention_mask, factor, slack, name=name)
    logits = compare_tensors(out.logits, eager_out.logits, reference_out.logits, factor=factor, slack_floor=slack,
                             mask=attention_mask, what=f"{name}: logits", position_names=("batch", "token", "vocab"))
    return layers, logits

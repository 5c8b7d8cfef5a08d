"""Kernel-level attention inputs (AttentionCase), the hypothesis strategy over them, and the check every
kernel suite and the planted-fault tests run on one case (harness.equivalence.compare's k x eager rule against
the fp64 reference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from harness.backends.kernels import KernelImpl, eager_attention


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

    def in_bucket(self, buckets=None) -> "AttentionCase":
        """The same case on one of ``buckets`` (default QUICK_SHAPE_BUCKETS) of its own kind (decode, square
        or chunked prefill; the seed picks among several): masks, padding, causality and the window are
        kept, the valid keys scaled to the bucket's length, the window capped at it."""
        import dataclasses

        buckets = QUICK_SHAPE_BUCKETS if buckets is None else buckets
        kind = _kind_of_shape(self.q_len, self.k_len)
        same_kind = [b for b in buckets if _kind_of_shape(b[3], b[4]) == kind] or list(buckets)
        batch, kv_heads, groups, q_len, k_len, head_dim = same_kind[self.seed % len(same_kind)]
        valid = tuple(round(n * k_len / self.k_len) for n in self.valid_keys[:batch])
        if self.mask != "none":
            valid += (k_len,) * (batch - len(valid))
        return dataclasses.replace(self, batch=batch, q_heads=kv_heads * groups, kv_heads=kv_heads, q_len=q_len,
                                   k_len=k_len, head_dim=head_dim, valid_keys=valid,
                                   window=None if self.window is None else min(self.window, k_len + 1))

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


# Shape buckets for the kernels that compile per input shape (KernelImpl.compiles_per_shape_on:
# flex_attention through torch.compile, flash-attn-4's CuTe DSL JIT). A free search compiled one
# kernel per example until torch.compile's recompile limit (8 graphs per function and process) made
# every later example run flex_attention uncompiled, unnoticed; the harness now fails at that limit
# (harness.performance.compile_cache.refuse_eager_fallback), so these kernels' examples are moved
# onto a bucket (AttentionCase.in_bucket): per dtype, at most one graph per bucket and mask kind (no
# block mask, a block mask, a block mask with an additive score_mod). Masks, padding, windows,
# causality and values are still drawn freely, and the kernels that do not compile per shape
# search every shape. Measured on an H100 (session 13, static shapes, empty caches): the six-bucket
# set compiled 39 flex graphs for bf16 and fp16 in 102 s, ~2.6 s each.
# (batch, kv_heads, groups, q_len, k_len, head_dim); groups 1 = MHA, kv_heads 1 with groups > 1 = MQA
# The quick profile's three: a GQA decode over two of flex_attention's 128-key blocks with the usual
# head size, a GQA square prefill over two blocks, an MQA chunked prefill with odd lengths and a head
# size that is no multiple of 16: together they expose every kernel fault in tests/planted_faults.py
# within 30 examples (tests/test_attention_faults.py).
QUICK_SHAPE_BUCKETS = ((1, 2, 3, 1, 150, 128), (2, 2, 2, 160, 160, 64), (3, 1, 2, 17, 33, 36))
# The full profile's: those and five more (a short decode, an MHA prefill at head size 128, head size 80,
# a tiny square prefill, an MQA decode inside one block)
SHAPE_BUCKETS = QUICK_SHAPE_BUCKETS + ((1, 2, 3, 1, 40, 64), (2, 4, 1, 40, 40, 128), (3, 1, 2, 17, 33, 80),
                                       (2, 2, 2, 7, 7, 36), (1, 1, 4, 1, 127, 128))
# harness.profiles.Profile.compiled_kernel_shapes -> the buckets
KERNEL_BUCKET_SETS = {"quick": QUICK_SHAPE_BUCKETS, "wide": SHAPE_BUCKETS}


def _kind_of_shape(q_len: int, k_len: int) -> str:
    return "decode" if q_len == 1 else "square" if q_len == k_len else "chunked"


def attention_cases(max_len: int = 40, head_dims=(32, 36, 64, 80, 100, 128, 256), max_batch: int = 3):
    """hypothesis strategy over AttentionCase: decode (q_len=1), chunked prefill (q_len < k_len),
    square prefill, GQA/MQA/MHA, masks, padding on either side, windows."""
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
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
    """Run ``fn`` on ``case`` and apply harness.equivalence.compare's k x eager rule against the fp64 eager truth."""
    from harness.equivalence.compare import attention_error_check

    q, k, v, mask = case.tensors(dtype, device)
    kwargs = dict(mask=mask, causal=case.causal, window=case.window)
    out = fn(q, k, v, **kwargs)
    baseline = eager_attention(q, k, v, **kwargs)
    ref = eager_attention(q.double(), k.double(), v.double(), mask=None if mask is None else (
        mask if mask.dtype == torch.bool else mask.double()), causal=case.causal, window=case.window)
    return attention_error_check(out, baseline, ref, factor=factor, slack_floor=slack_floor,
                                 mask=query_rows_to_compare(case, device), name=f"{name} on {case}")

"""Attention kernels compute the same function as plain matmul + softmax.

Every implementation the capability matrix offers (SDPA math / efficient / flash / cuDNN forced
with ``sdpa_kernel``, flex_attention, flash-attn packages) is run on hypothesis-drawn inputs:
decode (q_len=1), chunked prefill (q_len < k_len), square prefill; MHA, GQA, MQA; head dims
32..256 (some not a multiple of 8); causal or not; bool and additive masks with left or right
padding (rows with no visible key must give 0); sliding windows. Each output must satisfy
flash-attn's rule against the float64 truth (harness.compare.attention_error_check):

    error(impl, fp64) <= attention_error_factor x error(eager in the same dtype, fp64) + slack

Failures shrink to the smallest failing shape; the known hard cases are pinned with @example.
"""

import pytest
import torch
from hypothesis import example, given

from harness.attention import KERNELS, AttentionCase, attention_cases, check_attention_kernel, eager_attention

FUSED_KERNELS = [name for name in KERNELS if name != "eager"]

HARD_CASES = [
    # every key of batch row 0 is padding: its rows must be exactly 0, not NaN or a uniform average
    AttentionCase(batch=2, q_heads=4, kv_heads=2, q_len=5, k_len=5, head_dim=64, causal=True, mask="bool",
                  padding="left", valid_keys=(0, 3), seed=1),
    AttentionCase(batch=2, q_heads=4, kv_heads=2, q_len=5, k_len=5, head_dim=64, causal=False, mask="additive",
                  padding="right", valid_keys=(0, 5), seed=2),
    # a single key (first decode step after a 1-token prompt)
    AttentionCase(batch=1, q_heads=4, kv_heads=1, q_len=1, k_len=1, head_dim=64, causal=True, seed=3),
    # head_dim not a multiple of 8, GQA with 3 query heads per kv head, chunked prefill with a window
    AttentionCase(batch=2, q_heads=6, kv_heads=2, q_len=7, k_len=19, head_dim=36, causal=True, window=5,
                  mask="bool", padding="left", valid_keys=(19, 11), seed=4),
    AttentionCase(batch=1, q_heads=2, kv_heads=2, q_len=3, k_len=3, head_dim=100, causal=False, seed=5),
]


def _with_hard_cases(test):
    for case in HARD_CASES:
        test = example(case=case)(test)
    return test


def _selected(name, require, run_config):
    """The implementation, or a skip naming why it cannot run here (--attn filter, capability matrix)."""
    if run_config.attn and name not in run_config.attn:
        pytest.skip(f"{name} not selected by --attn {','.join(run_config.attn)}")
    require(name)
    return KERNELS[name]


def _cuda_limits(impl, dtype):
    """On CUDA the fused SDPA kernels take no dense mask (flash) or fp32 (flash, cuDNN): say so."""
    import dataclasses

    if impl.name in ("sdpa_flash", "sdpa_cudnn"):
        if dtype == torch.float32:
            pytest.skip(f"{impl.name} has no float32 kernel on CUDA")
        return dataclasses.replace(impl, dense_masks=False, windows=False)
    return impl


def _check(impl, case, dtype, device, tolerances, record=None):
    case = case.restricted_to(impl)
    verdict = check_attention_kernel(impl.fn, case, dtype=dtype, device=device,
                                     factor=tolerances.attention_error_factor,
                                     slack_floor=tolerances.attention_abs_slack, name=impl.name)
    assert verdict.passed, verdict.message
    return verdict


@pytest.mark.parametrize("name", FUSED_KERNELS)
@given(case=attention_cases())
@_with_hard_cases
def test_kernel_matches_fp64_reference_fp32_cpu(name, case, require, run_config, tolerances):
    kernel = _selected(name, require, run_config)
    if kernel.low_precision_only:
        pytest.skip(f"{name} computes in fp16/bf16 only")
    _check(kernel, case, torch.float32, torch.device("cpu"), tolerances)


@pytest.mark.gpu
@pytest.mark.parametrize("name", FUSED_KERNELS)
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@given(case=attention_cases(max_len=160))
@_with_hard_cases
def test_kernel_matches_fp64_reference_half_cuda(name, half, case, require, run_config, device, tolerances):
    kernel = _selected(name, require, run_config)
    _check(_cuda_limits(kernel, half), case, half, device, tolerances)


@pytest.mark.gpu
@pytest.mark.parametrize("name", FUSED_KERNELS)
@given(case=attention_cases(max_len=160))
def test_kernel_matches_fp64_reference_fp32_cuda(name, case, require, run_config, device, tolerances):
    kernel = _selected(name, require, run_config)
    if kernel.low_precision_only:
        pytest.skip(f"{kernel.name} computes in fp16/bf16 only")
    _check(_cuda_limits(kernel, torch.float32), case, torch.float32, device, tolerances)


# The reference itself: its conventions (documented in harness.attention) checked on cases whose
# answer is known without computing a softmax, so a wrong reference cannot pass silently.


def _qkv(batch, q_heads, kv_heads, q_len, k_len, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, q_heads, q_len, dim, generator=g, dtype=torch.float64),
            torch.randn(batch, kv_heads, k_len, dim, generator=g, dtype=torch.float64),
            torch.randn(batch, kv_heads, k_len, dim, generator=g, dtype=torch.float64))


def test_reference_window_of_one_returns_own_value():
    q, k, v = _qkv(1, 2, 2, 4, 4)
    assert torch.equal(eager_attention(q, k, v, causal=True, window=1), v)


def test_reference_causal_is_bottom_right_aligned_for_decode():
    q, k, v = _qkv(1, 2, 2, 1, 6)
    # a single query is the newest token: it sees every cached key, so causal changes nothing
    torch.testing.assert_close(eager_attention(q, k, v, causal=True), eager_attention(q, k, v, causal=False))
    # and with a window of 2 it sees only the last two keys
    torch.testing.assert_close(eager_attention(q, k, v, causal=True, window=2),
                               eager_attention(q, k[:, :, -2:], v[:, :, -2:]))


def test_reference_gqa_maps_query_head_to_kv_head_by_integer_division():
    q, k, v = _qkv(1, 4, 2, 3, 3)
    out = eager_attention(q, k, v)
    for h in range(4):
        torch.testing.assert_close(out[:, h], eager_attention(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], v[:, h // 2:h // 2 + 1])[:, 0])


def test_reference_fully_masked_rows_are_zero():
    q, k, v = _qkv(2, 2, 2, 3, 3)
    keep = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    keep[0] = False
    out = eager_attention(q, k, v, mask=keep)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and out[1].abs().sum() > 0


def test_reference_bool_and_additive_masks_agree():
    q, k, v = _qkv(1, 2, 2, 4, 5)
    keep = torch.rand(1, 1, 4, 5, generator=torch.Generator().manual_seed(0)) > 0.3
    keep[..., 0] = True
    additive = torch.zeros(1, 1, 4, 5, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(eager_attention(q, k, v, mask=keep), eager_attention(q, k, v, mask=additive))

"""Attention kernels compute the same function as plain matmul + softmax.

Every implementation the capability matrix offers (SDPA math / efficient / flash / cuDNN forced
with ``sdpa_kernel``, flex_attention, flash-attn packages) is run on hypothesis-drawn inputs:
decode (q_len=1), chunked prefill (q_len < k_len), square prefill; MHA, GQA, MQA; head dims
32..256 (some not a multiple of 8); causal or not; bool and additive masks with left or right
padding (rows with no visible key must give 0); sliding windows. Each output must satisfy
flash-attn's rule against the float64 truth (harness.equivalence.compare.attention_error_check):

    error(impl, fp64) <= attention_error_factor x error(eager in the same dtype, fp64) + slack

Failures shrink to the smallest failing shape; the known hard cases are pinned with @example.
"""

import dataclasses
import statistics

import pytest
import torch
from hypothesis import HealthCheck, example, given, reject, settings

from harness import profiles
from harness.backends.kernels import eager_attention
from harness.equivalence.attention_cases import KERNEL_BUCKET_SETS, AttentionCase, attention_cases, check_attention_kernel
from harness.equivalence.compare import error_over_allowed
from harness.backends.attention import ATTENTION_BACKENDS, fused_backends
from harness.backends.capabilities import dtype_name

FUSED_KERNELS = fused_backends()

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


def _selected(name, require, run_config, device, dtype):
    """The kernel with the inputs it accepts on this device and dtype (its registry record), or a
    skip naming why it cannot run here (--attn filter, capability matrix, no kernel for the dtype)."""
    if run_config.attn and name not in run_config.attn:
        pytest.skip(f"{name} not selected by --attn {','.join(run_config.attn)}")
    require(name)
    kernel = ATTENTION_BACKENDS[name].kernel_on(device.type, dtype)
    if isinstance(kernel, str):
        pytest.skip(kernel)
    return kernel


def _check(impl, case, dtype, device, tolerances, run_config, error_ratios):
    # a kernel compiled per shape gets a bounded set of shapes, so every example runs the compiled
    # kernel (harness.equivalence.attention_cases.KERNEL_BUCKET_SETS; the wide set keeps the hard cases' own)
    if device.type in impl.compiles_per_shape_on:
        shapes = profiles.active().compiled_kernel_shapes
        if shapes == "quick" or case not in HARD_CASES:
            case = case.in_bucket(KERNEL_BUCKET_SETS[shapes])
    # --seed moves the q/k/v values of every drawn shape, so repeated runs probe new numbers
    # (hypothesis' own shape search is derandomised in the ci profile)
    case = dataclasses.replace(case.restricted_to(impl), seed=case.seed + run_config.seed)
    try:
        verdict = check_attention_kernel(impl.fn, case, dtype=dtype, device=device,
                                         factor=tolerances.attention_error_factor,
                                         slack_floor=tolerances.attention_abs_slack, name=impl.name)
    except RuntimeError as exc:
        # A backend forced with sdpa_kernel refuses shapes outside its domain (e.g. the
        # mem-efficient kernel in half precision needs head_dim % 8 == 0, cuDNN has no GQA decode):
        # not a wrong answer. The case is rejected and counted; hypothesis fails the test as
        # Unsatisfiable if the kernel refuses nearly everything, so a refusing kernel cannot pass.
        if "No available kernel" not in str(exc) and "No viable backend" not in str(exc):
            raise
        error_ratios.append(None)
        reject()
    error_ratios.append(verdict)
    assert verdict.passed, verdict.message
    return verdict


@pytest.fixture
def error_ratios(record_result, request, tolerances):
    """Collects every example's verdict and records one summary row per implementation and dtype."""
    collected = []
    yield collected
    verdicts = [v for v in collected if v is not None]
    refused = len(collected) - len(verdicts)  # cases the kernel has no implementation for
    measured = [v.ratio for v in verdicts if v.baseline_error > 0]  # exact-eager cases have no ratio
    if not verdicts:
        return
    params = request.node.callspec.params
    where = f"{params['name']}/{dtype_name(params.get('half', 'float32'))}/{request.node.originalname.rsplit('_', 1)[-1]}"
    # the row shows what decides it: the largest error / allowed error (allowed = k x eager's error
    # + slack); the error ratio to eager alone can exceed k where the slack covers a near-exact eager
    record_result("attention_kernel", "max error / allowed error", error_over_allowed(*verdicts), threshold=1.0,
                  passed=all(v.passed for v in verdicts), where=where,
                  rule=f"error <= {tolerances.attention_error_factor:g} x eager error + slack", examples=len(verdicts),
                  refused_by_kernel=refused, max_error=max(v.error for v in verdicts),
                  ratio_vs_eager=round(max(measured), 3) if measured else 0.0,
                  median_ratio=round(statistics.median(measured), 3) if measured else 0.0)


# a function-scoped fixture (error_ratios) shared by all examples of one test is what we want here
COLLECTING = settings(suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("name", FUSED_KERNELS)
@COLLECTING
@given(case=attention_cases())
@_with_hard_cases
def test_kernel_matches_fp64_reference_fp32_cpu(name, case, require, run_config, device, tolerances, error_ratios):
    if device.type != "cpu":
        pytest.skip(f"the run's device is {device.type}: the capability matrix describes it, not the CPU; "
                    "test_kernel_matches_fp64_reference_fp32_cuda checks float32 there")
    kernel = _selected(name, require, run_config, device, torch.float32)
    if kernel.low_precision_only:
        pytest.skip(f"{name} computes in fp16/bf16 only")
    _check(kernel, case, torch.float32, torch.device("cpu"), tolerances, run_config, error_ratios)


@pytest.mark.gpu
@pytest.mark.parametrize("name", FUSED_KERNELS)
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@COLLECTING
@given(case=attention_cases(max_len=160))
@_with_hard_cases
def test_kernel_matches_fp64_reference_half_cuda(name, half, case, require, run_config, device, tolerances,
                                                 error_ratios):
    _check(_selected(name, require, run_config, device, half), case, half, device, tolerances, run_config, error_ratios)


@pytest.mark.gpu
@pytest.mark.parametrize("name", FUSED_KERNELS)
@COLLECTING
@given(case=attention_cases(max_len=160))
def test_kernel_matches_fp64_reference_fp32_cuda(name, case, require, run_config, device, tolerances, error_ratios):
    kernel = _selected(name, require, run_config, device, torch.float32)
    if kernel.low_precision_only:
        pytest.skip(f"{kernel.name} computes in fp16/bf16 only")
    _check(kernel, case, torch.float32, device, tolerances, run_config, error_ratios)


# The reference itself: its conventions (documented in harness.backends.kernels) checked on cases whose
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

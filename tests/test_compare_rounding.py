"""harness.equivalence.compare's rounding term and the reference sanity statistic, on hand-made tensors."""

import pytest
import torch

from harness.equivalence.compare import compare_tensors, reference_rounding, typical_position_error


@pytest.mark.parametrize("dtype, value, half_ulp", [
    (torch.bfloat16, 488.0, 1.0),         # [256, 512): ulp 2 in bf16
    (torch.float16, 1000.0, 0.25),        # [512, 1024): ulp 0.5 in fp16
    (torch.float32, 3.0, 2.0 ** -23),     # [2, 4): ulp 2^-22
])
def test_rounding_is_half_an_ulp_of_a_large_value(dtype, value, half_ulp):
    ref = torch.tensor([-value, value / 3], dtype=torch.float64)
    assert reference_rounding(ref, dtype) == half_ulp


def test_rounding_of_small_values_is_never_below_fa3s_estimate():
    ref = torch.tensor([0.01, -0.07, 0.05], dtype=torch.float64)
    r = ref.to(torch.bfloat16)
    fa3 = float(((r + 0.3) - 0.3 - r).abs().max())
    assert fa3 > 0 and reference_rounding(ref, torch.bfloat16) == fa3


def test_rounding_ignores_masked_positions_and_nan():
    ref = torch.tensor([[1.0, 1e6], [float("nan"), 2.0]], dtype=torch.float64)
    keep = torch.tensor([[True, False], [True, True]])
    assert reference_rounding(ref, torch.bfloat16, keep) == 2.0 ** -7  # 2.0: ulp 2^-6 in bf16


def test_one_bf16_rounding_of_a_large_activation_is_within_the_rule():
    """H200, SmolLM2-135M layer 3: out 494 vs ref 488.5 while eager read 488 (error 0.5): three ulps of
    a value whose ulp is 2 are rounding, not a wrong kernel; ten are not."""
    ref = torch.tensor([488.505, 1.0], dtype=torch.float64)
    baseline = torch.tensor([488.0, 1.0], dtype=torch.bfloat16)
    near = compare_tensors(torch.tensor([494.0, 1.0], dtype=torch.bfloat16), baseline, ref, factor=8, slack_floor=0.0625)
    far = compare_tensors(torch.tensor([508.0, 1.0], dtype=torch.bfloat16), baseline, ref, factor=8, slack_floor=0.0625)
    assert near.passed and near.slack == 2.0, near.message
    assert not far.passed, far.message


def test_typical_position_error_is_the_median_position_not_the_worst():
    a = torch.zeros(1, 5, 4)
    b = a.clone()
    b[0, 0, 1] = 14.8               # one drifting position
    b[0, 1:, 2] = 0.5               # every other position 0.5 off
    assert typical_position_error(a, b) == 0.5
    keep = torch.tensor([[True, True, False, False, False]])
    assert typical_position_error(a, b, keep) in (0.5, 14.8)  # median of two kept positions (lower one)
    b[0, 1:, 2] = 30.0              # another model: far everywhere
    assert typical_position_error(a, b) == 30.0


def test_a_reference_with_nan_decides_nothing():
    ref = torch.tensor([1.0, float("nan")], dtype=torch.float64)
    out = torch.tensor([5.0, 7.0])
    with pytest.raises(ValueError, match="NaN or inf"):
        compare_tensors(out, out, ref, factor=2, slack_floor=1e-5)
    keep = torch.tensor([True, False])  # a NaN where nothing is compared is no obstacle
    assert not compare_tensors(out, torch.tensor([1.0, 0.0]), ref, factor=2, slack_floor=1e-5, mask=keep).passed


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_passes_give_the_verdict_of_one_pass(monkeypatch, chunk):
    """The max rule walks long tensors in chunks (harness.equivalence.compare._CHUNK_ELEMENTS): every
    number, the worst position (first occurrence of a tie) and the message must be what one pass over
    the whole tensor gives, masks, NaN, ties across chunk borders and a failing case included."""
    from harness.equivalence import compare

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 7, 11, generator=g, dtype=torch.float64)
    ref[1, 5, 9] = ref[0, 1, 2]
    out = (ref + torch.randn(3, 7, 11, generator=g, dtype=torch.float64) * 1e-3).to(torch.bfloat16)
    baseline = ref.to(torch.bfloat16)
    tied = out.clone()
    tied[0, 1, 2] = tied[1, 5, 9] = ref[0, 1, 2] + 5.0  # equal worst errors, in different chunks
    out[2, 6, 10] = float("nan")
    keep = torch.rand(3, 7, generator=g) > 0.2
    keep[0, 1] = keep[1, 5] = keep[2, 6] = True
    cases = [(out, None), (out, keep), (tied, keep), (baseline, keep), (out.transpose(0, 1), None)]

    def verdicts():
        results = []
        for o, m in cases:
            r, b = (ref, baseline) if o.shape == ref.shape else (ref.transpose(0, 1), baseline.transpose(0, 1))
            results.append(compare_tensors(o, b, r, factor=2.0, slack_floor=1e-6, mask=m, what="x"))
            results.append((compare.max_abs_error(o, b, m), reference_rounding(r, torch.bfloat16, m)))
        return results

    monkeypatch.setattr(compare, "_CHUNK_ELEMENTS", 10 ** 9)
    whole = verdicts()
    monkeypatch.setattr(compare, "_CHUNK_ELEMENTS", chunk)
    assert verdicts() == whole
    assert not whole[0].passed and whole[0].worst_position == (2, 6, 10)  # NaN counts as an infinite error
    assert whole[4].worst_position == (0, 1, 2)  # the first of the two tied worst positions

"""The near-tie margin follows the dtype's rounding at the logits' own scale (issue 18, H200)."""

import torch

from harness.equivalence.tolerances import Tolerances
from harness.equivalence.token_agreement import NEAR_TIE, TOKEN_MISMATCH, compare_greedy

TOL = Tolerances()


def _step(top, second, vocab=8):
    row = torch.full((vocab,), -5.0)
    row[0], row[1] = top, second
    return row


def _compare(top, second, dtype_name):
    ref_row, cand_row = _step(top, second), _step(second, top)  # the candidate picked the runner-up
    return compare_greedy([0], ref_row[None], ref_row[None], [1], cand_row[None], ref_row[None],
                          dtype_name=dtype_name, tolerances=TOL)


def test_bf16_margin_within_two_ulps_of_large_logits_is_a_near_tie():
    # logits of ~20: bf16 spacing 0.125, so 0.156 is about one rounding step (seen on the H200)
    assert _compare(20.0, 20.0 - 0.156, "bfloat16").verdict == NEAR_TIE


def test_bf16_margin_of_several_ulps_is_still_a_mismatch():
    assert _compare(20.0, 20.0 - 0.6, "bfloat16").verdict == TOKEN_MISMATCH


def test_float32_keeps_its_fixed_margin():
    assert _compare(20.0, 20.0 - 0.01, "float32").verdict == TOKEN_MISMATCH
    assert _compare(20.0, 20.0 - 5e-4, "float32").verdict == NEAR_TIE

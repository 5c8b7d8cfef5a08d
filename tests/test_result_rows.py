"""A result row shows the quantity that decides its verdict, against that quantity's limit (issue 13).

Seen before: a kernel row showed error / eager error 4.562 against the factor 2 with verdict pass,
because the rule (error <= k x eager error + slack) was decided by max error / allowed 0.16. Each
case below builds a verdict the displayed quantity used to contradict and checks that the row's
value against its threshold now gives the row's verdict.
"""

import operator
import re

import pytest
import torch

from harness.equivalence.compare import error_over_allowed
from harness.equivalence.compare import compare_tensors
from harness.equivalence.tolerances import Tolerances
from harness.equivalence.token_agreement import (IDENTICAL, LENGTH_MISMATCH, LOGITS_MISMATCH, NEAR_TIE, TOKEN_MISMATCH,
                                     compare_greedy, record_fields)

OPS = {"<": operator.lt, "<=": operator.le, "==": operator.eq, ">": operator.gt, ">=": operator.ge}


def holds(value, threshold) -> bool:
    """value against a numeric threshold (an upper limit) or a '<op> number ...' one."""
    if isinstance(threshold, (int, float)):
        return value <= threshold
    op, number = re.match(r"(<=|>=|==|<|>) ?([-+0-9.e]+)", threshold).groups()
    return OPS[op](value, float(number))


def test_kernel_rule_row_is_decided_by_error_over_allowed_not_by_the_ratio_to_eager():
    ref = torch.zeros(1, 2, 4, 8, dtype=torch.float64)
    baseline = ref.float() + 1e-6  # eager almost exact
    out = ref.float() + 4.5e-6  # 4.5 x eager's error, but inside the 1e-5 slack
    verdict = compare_tensors(out, baseline, ref, factor=2.0, slack_floor=1e-5)
    assert verdict.passed and verdict.ratio > 2.0  # the old row: 4.5 against 2, "pass"
    assert holds(error_over_allowed(verdict), 1.0) == verdict.passed
    failing = compare_tensors(ref.float() + 1e-3, baseline, ref, factor=2.0, slack_floor=1e-5)
    assert not failing.passed and not holds(error_over_allowed(verdict, failing), 1.0)


def _rows(vocab=50, steps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(steps, vocab, generator=g) * 3
    return logits


def _agreement(ref_logits, cand_logits, cand_tokens=None, dtype_name="float32"):
    ref_tokens = ref_logits.argmax(-1).tolist()
    cand_tokens = cand_logits.argmax(-1).tolist() if cand_tokens is None else cand_tokens
    return compare_greedy(ref_tokens, ref_logits, ref_logits, cand_tokens, cand_logits, cand_logits,
                          dtype_name=dtype_name, tolerances=Tolerances())


def _with_top2(logits, step, margin, second_rank_token=None):
    """logits whose row `step` has top-1 minus top-2 equal to `margin`; returns (logits, top1, top2)."""
    out = logits.clone()
    top = out[step].topk(2).indices.tolist()
    out[step, top[1]] = out[step, top[0]] - margin
    return out, top[0], top[1]


def test_identical_and_logits_mismatch_rows_show_the_logit_error():
    ref = _rows()
    same = _agreement(ref, ref.clone())
    drift = _agreement(ref, ref + 0.05 * ref.abs().max())  # same tokens, logits off by 5 % of the largest
    for agreement, verdict in ((same, IDENTICAL), (drift, LOGITS_MISMATCH)):
        row = record_fields(agreement)
        assert agreement.verdict == verdict and row["metric"] == "max relative logit error"
        assert row["threshold"] == Tolerances().generation_logit_rel("float32")
        assert holds(row["value"], row["threshold"]) == row["passed"]


def test_token_mismatch_outside_a_near_tie_shows_the_margin_not_the_small_logit_error():
    ref, top1, top2 = _with_top2(_rows(), 1, margin=0.5)  # 0.5 >= 1e-3: not a near-tie in fp32
    tokens = ref.argmax(-1).tolist()
    tokens[1] = top2
    agreement = _agreement(ref, ref.clone(), cand_tokens=tokens)  # logits equal: error 0 <= limit
    row = record_fields(agreement)
    assert agreement.verdict == TOKEN_MISMATCH and not row["passed"]
    assert row["max_logit_error"] == 0.0  # the old row: 0 against the logit limit, "FAIL"
    assert row["metric"].startswith("reference top-2 margin") and row["value"] == pytest.approx(0.5)
    assert holds(row["value"], row["threshold"]) == row["passed"]


def test_near_tie_outside_the_top_k_shows_the_rank():
    """bf16 rule: a near-tie (margin < 0.15) whose tokens must also be in each other's top-5."""
    ref = torch.zeros(1, 20)
    ref[0, :10] = torch.tensor([10.0, 9.99, 9.98, 9.97, 9.96, 9.95, 9.94, 9.93, 9.92, 9.91])
    cand = ref.clone()
    cand[0, 0] = 9.7  # 3 % of the largest logit: inside the bf16 logit limit; token 0 falls to rank 10
    agreement = _agreement(ref, cand, dtype_name="bfloat16")
    row = record_fields(agreement)
    assert agreement.verdict == TOKEN_MISMATCH and not row["passed"], agreement.message
    assert agreement.margin < Tolerances().token_margin("bfloat16")  # the margin alone would say "near-tie"
    assert row["metric"].startswith("worst rank") and row["value"] == 10 and row["threshold"] == "<= 5 (top-k)"
    assert holds(row["value"], row["threshold"]) == row["passed"]


def test_accepted_near_tie_and_length_mismatch_rows_agree_with_their_verdicts():
    ref, top1, top2 = _with_top2(_rows(), 3, margin=1e-4)
    tokens = ref.argmax(-1).tolist()
    tokens[3] = top2
    tie = _agreement(ref, ref.clone(), cand_tokens=tokens)
    assert tie.verdict == NEAR_TIE
    row = record_fields(tie)
    assert row["passed"] and holds(row["value"], row["threshold"])
    short = compare_greedy([1, 2, 3], ref[:3], ref[:3], [1, 2], ref[:2], ref[:2], dtype_name="float32",
                           tolerances=Tolerances())
    row = record_fields(short)
    assert short.verdict == LENGTH_MISMATCH and (row["value"], row["threshold"]) == (2, "== 3 (the reference's)")
    assert holds(row["value"], row["threshold"]) == row["passed"] is False

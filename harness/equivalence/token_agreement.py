"""THE rule for comparing two greedy generations, defined once and used by every suite.

Two greedy runs of N forced tokens agree when
  1. their token sequences are equal, or, on reduced precision, they are equal up to a first
     divergence at a near-tie: the reference's top-2 margin there is below
     ``Tolerances.token_margin(dtype)`` AND each run's token is in the other run's top-k
     (``Tolerances.token_topk``, the vLLM logprob rule). Comparison stops at that step (the two
     runs continue from different prefixes, so later steps say nothing) and the result says where;
  2. and, at every compared step (up to and including an accepted divergence), the raw logits agree:
     max |candidate - reference| <= tolerance x max |reference| at that step
     (``Tolerances.generation_logit_rel(dtype)``). Equal tokens with drifting logits still fail:
     a cache that loses one key often keeps the argmax for a few steps.

Anything else fails with a message naming the step, both tokens, the margin and which run diverged.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable, Sequence

IDENTICAL = "identical"
NEAR_TIE = "near-tie divergence"
TOKEN_MISMATCH = "token mismatch"
LOGITS_MISMATCH = "logits mismatch"
LENGTH_MISMATCH = "length mismatch"

_PASSING = (IDENTICAL, NEAR_TIE)


@dataclass(frozen=True)
class TokenAgreement:
    """Outcome of comparing a candidate greedy run with a reference greedy run.

    step: 0-based index of the generated token where the verdict was decided (the first differing
    token, or the step whose logits were out of tolerance); None when identical.
    tokens: (reference token, candidate token) at `step`, when they differ.
    margin: the reference's top-1 minus top-2 score at `step`, when tokens differ.
    compared_steps: how many steps were checked (all of them unless a near-tie stopped it).
    max_logit_error: the largest relative logit error over the compared steps.
    """

    verdict: str
    step: int | None
    tokens: tuple[int, int] | None
    margin: float | None
    message: str
    compared_steps: int = 0
    max_logit_error: float = 0.0
    # the limits the verdict was decided against (for the result row), and for a token mismatch
    # at a near-tie the worst rank of each run's token in the other run's scores
    logit_limit: float | None = None
    margin_limit: float | None = None
    topk: int | None = None
    rank: int | None = None
    lengths: tuple[int, int] | None = None  # (reference, candidate) tokens, for a length mismatch

    @property
    def passed(self) -> bool:
        return self.verdict in _PASSING


_MANTISSA_BITS = {"bfloat16": 7, "float16": 10, "float32": 23, "float64": 52}


def _ulp(value: float, dtype_name: str) -> float:
    """Spacing of ``dtype_name`` numbers at magnitude ``value`` (one unit in the last place)."""
    if not value > 0 or not math.isfinite(value):
        return 0.0
    return 2.0 ** (math.floor(math.log2(value)) - _MANTISSA_BITS.get(dtype_name, 23))


def _largest(row) -> float:
    import torch

    row = torch.as_tensor(row).detach().double()
    finite = row[torch.isfinite(row)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _top2_margin(row) -> float:
    top = row.float().topk(2).values
    return float(top[0] - top[1])


def _in_topk(row, token: int, k: int) -> bool:
    return token in row.float().topk(k).indices.tolist()


def _rank(row, token: int) -> int:
    """1 + how many entries of ``row`` score above ``token``."""
    row = row.float()
    return int((row > row[token]).sum()) + 1


def relative_logit_error(reference_row, candidate_row) -> float:
    """max |candidate - reference| / max |reference| over the vocabulary, in float32."""
    ref = reference_row.float()
    return float((candidate_row.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def compare_greedy(reference_tokens: Sequence[int], reference_scores, reference_logits,
                   candidate_tokens: Sequence[int], candidate_scores, candidate_logits, *,
                   dtype_name: str, tolerances, reference_label: str = "reference",
                   candidate_label: str = "candidate",
                   decode: Callable[[int], str] | None = None) -> TokenAgreement:
    """Apply the rule above. scores: the processed scores greedy chose from (steps x vocab);
    logits: the raw logits (steps x vocab). dtype_name: the compute dtype, e.g. 'bfloat16'."""
    who = f"{candidate_label} vs {reference_label}"
    show = (lambda t: f"{t} {decode(t)!r}") if decode else str
    ref, cand = list(map(int, reference_tokens)), list(map(int, candidate_tokens))
    if len(ref) != len(cand):
        return TokenAgreement(LENGTH_MISMATCH, min(len(ref), len(cand)), None, None,
                              f"{who}: {len(cand)} tokens generated, reference has {len(ref)} "
                              "(both were forced to the same length)", lengths=(len(ref), len(cand)))
    base_margin = tolerances.token_margin(dtype_name)
    logit_limit = tolerances.generation_logit_rel(dtype_name)
    k = tolerances.token_topk
    limits = dict(logit_limit=logit_limit, margin_limit=base_margin, topk=k)
    worst = 0.0
    for step, (r, c) in enumerate(zip(ref, cand)):
        error = relative_logit_error(reference_logits[step], candidate_logits[step])
        worst = max(worst, error)
        if error > logit_limit:
            return TokenAgreement(LOGITS_MISMATCH, step, (r, c) if r != c else None, None,
                                  f"{who}: logits at step {step} differ by {error:.3g} relative to the reference's "
                                  f"largest logit (allowed {logit_limit:g} for {dtype_name}); tokens "
                                  f"{'equal' if r == c else f'{show(r)} vs {show(c)}'} there, "
                                  f"equal before", step + 1, worst, **limits)
        if r == c:
            continue
        margin = _top2_margin(reference_scores[step])
        margin_limit = max(base_margin, tolerances.token_margin_ulps * _ulp(_largest(reference_logits[step]), dtype_name))
        limits["margin_limit"] = margin_limit
        near_tie = margin < margin_limit
        in_topk = _in_topk(reference_scores[step], c, k) and _in_topk(candidate_scores[step], r, k)
        if near_tie and in_topk:
            return TokenAgreement(NEAR_TIE, step, (r, c), margin,
                                  f"{who}: equal up to step {step}, then a near-tie (reference top-2 margin "
                                  f"{margin:.3g} < {margin_limit:g} for {dtype_name}): reference {show(r)}, "
                                  f"{candidate_label} {show(c)}; comparison stopped there", step + 1, worst, **limits)
        why = (f"reference top-2 margin {margin:.3g} >= {margin_limit:g} for {dtype_name}, not a near-tie"
               if not near_tie else f"a near-tie (margin {margin:.3g}) but the tokens are not in each other's top-{k}")
        rank = max(_rank(reference_scores[step], c), _rank(candidate_scores[step], r))
        if near_tie and rank <= k:  # a tie at the k-th place that topk left out: decided by topk
            rank = k + 1
        return TokenAgreement(TOKEN_MISMATCH, step, (r, c), margin,
                              f"{who}: token differs at step {step}: reference {show(r)}, {candidate_label} "
                              f"{show(c)} ({why}; logit error there {error:.3g})", step + 1, worst, **limits,
                              rank=rank)
    return TokenAgreement(IDENTICAL, None, None, None,
                          f"{who}: all {len(ref)} tokens equal, logits within {worst:.3g} relative "
                          f"(allowed {logit_limit:g} for {dtype_name})", len(ref), worst, **limits)


def compare_runs(reference, candidate, *, dtype_name: str, tolerances,
                 decode: Callable[[int], str] | None = None) -> TokenAgreement:
    """compare_greedy for two harness.inference.generation.GreedyRun objects (their labels name them)."""
    return compare_greedy(reference.tokens, reference.scores, reference.logits,
                          candidate.tokens, candidate.scores, candidate.logits,
                          dtype_name=dtype_name, tolerances=tolerances, reference_label=reference.label,
                          candidate_label=candidate.label, decode=decode)


def record_fields(agreement: TokenAgreement) -> dict:
    """The agreement as keyword arguments for the plugin's record_result(check=..., ...), with the
    quantity that decided the verdict as metric/value/threshold: the relative logit error against
    its limit, or, where the tokens differ, the reference's top-2 margin against the near-tie limit
    (not a near-tie) or the tokens' worst rank in each other's scores against top-k (a near-tie
    whose tokens are not in each other's top-k), or the generated length."""
    where = "all steps" if agreement.step is None else f"step {agreement.step}"
    decided = dict(metric="max relative logit error", value=round(agreement.max_logit_error, 8),
                   threshold=agreement.logit_limit)
    if agreement.verdict == LENGTH_MISMATCH:
        decided = dict(metric="generated tokens", value=agreement.lengths[1],
                       threshold=f"== {agreement.lengths[0]} (the reference's)")
    elif agreement.verdict == TOKEN_MISMATCH and agreement.margin is not None:
        if agreement.margin >= agreement.margin_limit:
            decided = dict(metric="reference top-2 margin where the tokens differ", value=agreement.margin,
                           threshold=f"< {agreement.margin_limit:g} (a near-tie)")
        else:
            decided = dict(metric="worst rank of each token in the other run's scores", value=agreement.rank,
                           threshold=f"<= {agreement.topk} (top-k)")
    return dict(**decided, passed=agreement.passed, where=where, verdict=agreement.verdict,
                tokens=list(agreement.tokens) if agreement.tokens else None, margin=agreement.margin,
                max_logit_error=round(agreement.max_logit_error, 8), logit_limit=agreement.logit_limit,
                message=agreement.message)

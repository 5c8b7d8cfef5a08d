"""The greedy rule's logits bound (harness.equivalence.token_agreement) over a forward on the prompt:
every position of a candidate's logits (a tensor-parallel run's) against a reference run's."""

from __future__ import annotations

from dataclasses import dataclass

from harness.equivalence.token_agreement import relative_logit_error


@dataclass(frozen=True)
class LogitsAgreement:
    """Forward logits of a TP run against the single-device run, position by position."""

    passed: bool
    max_error: float
    worst_position: int
    first_failing_position: int | None
    limit: float
    message: str


def compare_prompt_logits(reference, candidate, *, dtype_name: str, tolerances, label: str) -> LogitsAgreement:
    """The greedy rule's logits bound (harness.equivalence.token_agreement: max |candidate - reference| <=
    Tolerances.generation_logit_rel(dtype) x max |reference|, per row) applied to every position of
    a forward over the prompt. reference, candidate: positions x vocab."""
    limit = tolerances.generation_logit_rel(dtype_name)
    if tuple(reference.shape) != tuple(candidate.shape):
        return LogitsAgreement(False, float("inf"), 0, 0, limit,
                               f"{label}: logits of shape {tuple(candidate.shape)}, reference {tuple(reference.shape)}")
    errors = [relative_logit_error(r, c) for r, c in zip(reference, candidate)]
    worst = max(range(len(errors)), key=errors.__getitem__)
    first = next((i for i, e in enumerate(errors) if e > limit), None)
    where = f"position {worst} of {len(errors)}"
    if first is None:
        return LogitsAgreement(True, errors[worst], worst, None, limit,
                               f"{label}: prompt logits within {errors[worst]:.3g} relative (worst at {where}; "
                               f"allowed {limit:g} for {dtype_name})")
    column = int((candidate[worst].float() - reference[worst].float()).abs().argmax())
    return LogitsAgreement(False, errors[worst], worst, first, limit,
                           f"{label}: prompt logits differ by {errors[worst]:.3g} relative to the reference's largest "
                           f"logit at {where}, vocabulary index {column} (allowed {limit:g} for {dtype_name}); "
                           f"first position over the limit: {first}")

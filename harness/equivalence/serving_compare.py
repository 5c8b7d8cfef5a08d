"""A served request against the same request decoded alone, by harness.equivalence.token_agreement's rule.

The serving path returns each request's tokens and the log-probability of each chosen token, not
logits. So the rule is applied to what it returns:

- tokens: where the token sequences first differ, both continuations are scored: the reference's
  scores come from its own run, the served continuation is scored by a plain forward of the model
  over prompt + served tokens (the same processing: EOS masked as min_new_tokens masks it). Then
  `compare_greedy` decides, unchanged: a near-tie divergence on reduced precision (reference margin
  below the limit, each token in the other's top-k) passes and stops the comparison; anything else
  fails naming the step and both tokens.
- logits: the rule bounds max|Δ logit| <= tol x max|reference logit| at every compared step. The
  chosen token's log-probability z_t - logsumexp(z) moves by at most |Δz_t| + max|Δz| <= 2 max|Δz|,
  so |Δ logprob| / (2 max|reference logit|) is a lower bound on the rule's relative logit error and
  is held to the same limit (`generation_logit_rel`) at every step both runs share. No new
  tolerance: a run that passes the rule passes this, and a corrupted cache that keeps the argmax
  (common on random-weight models) still moves the log-probabilities.
"""

from __future__ import annotations

import dataclasses

from harness.inference.generation import GreedyRun
from harness.equivalence.token_agreement import IDENTICAL, LOGITS_MISMATCH, TokenAgreement, compare_runs


def rescored_run(model, prompt: list[int], tokens: list[int], eos_ids: list[int], label: str) -> GreedyRun:
    """The served continuation scored by one plain forward (no cache) of prompt + tokens: row s is
    what the model predicts for step s given the served prefix; scores mask EOS like min_new_tokens."""
    import torch

    ids = torch.tensor([list(prompt) + list(tokens)[:-1]], device=model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, len(prompt) - 1:]
    logits = logits.float().cpu()
    scores = logits.clone()
    if eos_ids:
        scores[:, list(eos_ids)] = float("-inf")
    return GreedyRun(label=label, prompt_length=len(prompt), tokens=tuple(tokens), scores=scores, logits=logits)


def logprob_bounds(reference: GreedyRun, tokens: list[int], logprobs: list[float], steps: int) -> list[float]:
    """Per step: |served logprob - reference logprob of the same token| / (2 max|reference logit|),
    a lower bound on max|Δ logit| / max|reference logit| (module docstring)."""
    import torch

    bounds = []
    for step in range(steps):
        if step >= len(logprobs):
            bounds.append(float("inf"))  # the serving path gave no log-probability for a token it returned
            continue
        alone = float(torch.log_softmax(reference.scores[step].float(), dim=-1)[tokens[step]])
        scale = float(reference.logits[step].float().abs().max().clamp_min(1e-30))
        bounds.append(abs(logprobs[step] - alone) / (2 * scale))
    return bounds


def served_agreement(reference: GreedyRun, served, *, model, eos_ids: list[int], label: str, dtype_name: str,
                     tolerances, decode=None) -> TokenAgreement:
    """Apply the rule to one served request (a harness.inference.serving.ServedRequest). `model` rescoring
    the served continuation where its tokens differ from the reference's (module docstring)."""
    import torch

    show = (lambda t: f"{t} {decode(t)!r}") if decode else str
    tokens, ref = list(served.tokens), list(reference.tokens)
    first = next((i for i, (a, b) in enumerate(zip(ref, tokens)) if a != b), None)
    verdict = None
    shared = len(ref)
    if first is not None or len(tokens) != len(ref):
        candidate = rescored_run(model, served.prompt, tokens, eos_ids, label)
        verdict = compare_runs(reference, candidate, dtype_name=dtype_name, tolerances=tolerances, decode=decode)
        if not verdict.passed:
            return verdict
        shared = verdict.step  # a near-tie divergence: the runs share the steps before it
    limit = tolerances.generation_logit_rel(dtype_name)
    limits = dict(logit_limit=limit, margin_limit=tolerances.token_margin(dtype_name), topk=tolerances.token_topk)
    bounds = logprob_bounds(reference, tokens, served.logprobs, shared)
    worst = max(bounds, default=0.0)
    who = f"{label} vs {reference.label}"
    if worst > limit:
        step = bounds.index(worst)
        alone = float(torch.log_softmax(reference.scores[step].float(), dim=-1)[tokens[step]])
        served_lp = served.logprobs[step] if step < len(served.logprobs) else float("nan")
        return TokenAgreement(LOGITS_MISMATCH, step, None, None,
                              f"{who}: at step {step} the log-probability of token {show(tokens[step])} is "
                              f"{served_lp:.6g} served, {alone:.6g} alone, so the logits differ by at least "
                              f"{worst:.3g} relative to the reference's largest logit (allowed {limit:g} for "
                              f"{dtype_name}); tokens equal up to there", step + 1, worst, **limits)
    if verdict is None:
        return TokenAgreement(IDENTICAL, None, None, None,
                              f"{who}: all {len(ref)} tokens equal; their log-probabilities bound the logit error at "
                              f"{worst:.3g} relative (allowed {limit:g} for {dtype_name})", len(ref), worst, **limits)
    return dataclasses.replace(verdict, max_logit_error=max(verdict.max_logit_error, worst),
                               message=f"{verdict.message}; log-probabilities before step {shared} bound the logit "
                                       f"error at {worst:.3g} relative")

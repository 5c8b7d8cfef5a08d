"""Quantized vs reference agreement, measured the way llama.cpp's KL-divergence mode measures it.

A quantized model is accepted when, over every scored token position of a fixed corpus
(harness.equivalence.quantization_corpus), its next-token distribution stays close to the
reference's (fp32 on CPU, the run's half precision on GPU):

* top-1 agreement ("same top token", with its binomial standard error sqrt(p(1-p)/(n-1)));
* top-k overlap (k = 5, 10): the share of the reference's k best tokens that are also the quantized
  model's k best;
* KL(reference || quantized) per position: mean with standard error, max, percentiles, min;
* delta p = p_quantized(correct token) - p_reference(correct token): mean, RMS, percentiles;
* perplexity of both, their ratio and the mean of ln(PPL_q / PPL_ref) per token.

Fewer than ``MIN_SCORED_TOKENS`` positions give percentiles that mean nothing, so the harness
refuses them. Also here: the checks of those statistics against a scheme's limits, the greedy
common prefix, and the report's scheme table. suites/test_quantization.py applies them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from harness.backends.quantization import SchemeThresholds
from harness.equivalence.quantization_thresholds import QuantizationThresholds
from harness.errors import HarnessUsageError

MIN_SCORED_TOKENS = 100
KLD_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)
DELTA_P_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1)
TOPK = (5, 10)


# ---------------------------------------------------------------------------------------------
# Statistics


@dataclass
class WorstPosition:
    index: int            # scored position (0-based, in corpus order)
    kld: float
    reference_token: int  # argmax of the reference
    quantized_token: int
    target_token: int


@dataclass
class AgreementStatistics:
    """llama.cpp-style statistics of a quantized model against its reference over n scored tokens."""

    n: int
    top1: float
    top1_stderr: float
    topk_overlap: dict[int, float]
    kld_mean: float
    kld_stderr: float
    kld_max: float
    kld_min: float
    kld_percentiles: dict[float, float]
    delta_p_mean: float
    delta_p_stderr: float
    delta_p_rms: float
    delta_p_max: float
    delta_p_min: float
    delta_p_percentiles: dict[float, float]
    ppl_reference: float
    ppl_quantized: float
    ln_ppl_ratio_mean: float
    ln_ppl_ratio_stderr: float
    max_abs_logit_difference: float
    worst: list[WorstPosition] = field(default_factory=list)

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_quantized / self.ppl_reference

    @property
    def same_top_percent(self) -> float:
        return 100.0 * self.top1

    def as_record(self) -> dict:
        """Flat name -> value mapping, one entry per statistic, for record_result."""
        rec = {"scored tokens": self.n, "top-1 agreement": self.top1, "top-1 stderr": self.top1_stderr}
        rec.update({f"top-{k} overlap": v for k, v in self.topk_overlap.items()})
        rec.update({"KLD mean": self.kld_mean, "KLD stderr": self.kld_stderr, "KLD max": self.kld_max,
                    "KLD min": self.kld_min})
        rec.update({f"KLD p{p:g}": v for p, v in self.kld_percentiles.items()})
        rec.update({"same-top %": self.same_top_percent, "delta p mean": self.delta_p_mean,
                    "delta p stderr": self.delta_p_stderr, "delta p RMS": self.delta_p_rms,
                    "delta p max": self.delta_p_max, "delta p min": self.delta_p_min})
        rec.update({f"delta p p{p:g}": v for p, v in self.delta_p_percentiles.items()})
        rec.update({"PPL reference": self.ppl_reference, "PPL quantized": self.ppl_quantized,
                    "PPL ratio": self.ppl_ratio, "mean ln(PPL ratio)": self.ln_ppl_ratio_mean,
                    "ln(PPL ratio) stderr": self.ln_ppl_ratio_stderr,
                    "max |logit difference|": self.max_abs_logit_difference})
        return rec


def _percentiles(values, ps) -> dict[float, float]:
    import torch

    q = torch.tensor([p / 100.0 for p in ps], dtype=torch.float64)
    got = torch.quantile(values.double(), q)
    return {p: float(v) for p, v in zip(ps, got)}


def _stderr(values) -> float:
    n = values.numel()
    return float(values.double().std(unbiased=False) / math.sqrt(n - 1)) if n > 1 else float("nan")


def agreement_statistics(ref_logits, q_logits, target_ids, mask=None, *, worst: int = 5) -> AgreementStatistics:
    """Statistics over the positions selected by `mask` (bool, same leading shape as the logits; None:
    every position). target_ids: the token that actually follows each position."""
    if ref_logits.shape != q_logits.shape:
        raise HarnessUsageError(f"reference logits {tuple(ref_logits.shape)} and quantized logits "
                                f"{tuple(q_logits.shape)} differ in shape")
    vocab = ref_logits.shape[-1]
    ref, q, tgt = ref_logits.reshape(-1, vocab), q_logits.reshape(-1, vocab), target_ids.reshape(-1)
    if mask is not None:
        keep = mask.reshape(-1).to(ref.device)
        ref, q, tgt = ref[keep], q[keep], tgt[keep]
    n = ref.shape[0]
    if n < MIN_SCORED_TOKENS:
        raise HarnessUsageError(f"only {n} scored tokens: agreement statistics need at least {MIN_SCORED_TOKENS} "
                                "(use more or longer windows)")
    if bool((tgt < 0).any()):
        raise HarnessUsageError("a scored position has no target token (mask the last position of each window)")
    ref, q = ref.float(), q.float()
    lp_ref, lp_q = ref.log_softmax(-1), q.log_softmax(-1)
    kld = (lp_ref.exp() * (lp_ref - lp_q)).sum(-1).clamp_min(0.0)
    top_ref, top_q = lp_ref.argmax(-1), lp_q.argmax(-1)
    same = (top_ref == top_q).double()
    p_top1 = float(same.mean())
    overlap = {}
    for k in TOPK:
        a, b = lp_ref.topk(k, -1).indices, lp_q.topk(k, -1).indices
        overlap[k] = float((a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).double().mean())
    nll_ref = -lp_ref.gather(-1, tgt[:, None]).squeeze(-1).double()
    nll_q = -lp_q.gather(-1, tgt[:, None]).squeeze(-1).double()
    delta_p = (-nll_q).exp() - (-nll_ref).exp()
    ln_ratio = nll_q - nll_ref
    order = kld.argsort(descending=True)[:worst]
    return AgreementStatistics(
        n=n, top1=p_top1, top1_stderr=math.sqrt(p_top1 * (1 - p_top1) / (n - 1)), topk_overlap=overlap,
        kld_mean=float(kld.double().mean()), kld_stderr=_stderr(kld), kld_max=float(kld.max()),
        kld_min=float(kld.min()), kld_percentiles=_percentiles(kld, KLD_PERCENTILES),
        delta_p_mean=float(delta_p.mean()), delta_p_stderr=_stderr(delta_p),
        delta_p_rms=float(delta_p.pow(2).mean().sqrt()), delta_p_max=float(delta_p.max()),
        delta_p_min=float(delta_p.min()), delta_p_percentiles=_percentiles(delta_p, DELTA_P_PERCENTILES),
        ppl_reference=float(nll_ref.mean().exp()), ppl_quantized=float(nll_q.mean().exp()),
        ln_ppl_ratio_mean=float(ln_ratio.mean()), ln_ppl_ratio_stderr=_stderr(ln_ratio),
        max_abs_logit_difference=float((q - ref).abs().max()),
        worst=[WorstPosition(int(i), float(kld[i]), int(top_ref[i]), int(top_q[i]), int(tgt[i])) for i in order])


# ---------------------------------------------------------------------------------------------
# Checks (the suite and the planted-fault tests call these; each returns failure messages)


def _describe_worst(stats: AgreementStatistics, decode=None) -> str:
    show = (lambda t: f"{decode(t)!r}") if decode else str
    parts = [f"#{w.index}: KLD {w.kld:.3g}, reference {show(w.reference_token)} vs quantized "
             f"{show(w.quantized_token)} (next token {show(w.target_token)})" for w in stats.worst]
    return "worst positions: " + "; ".join(parts)


def check_agreement(stats: AgreementStatistics, limits: SchemeThresholds, *, scheme: str, decode=None) -> list[str]:
    """One message per statistic out of its limit, each naming statistic, value, limit and worst positions."""
    checks = [
        ("top-1 agreement", stats.top1, limits.min_top1, ">="),
        ("top-5 overlap", stats.topk_overlap[5], limits.min_top5_overlap, ">="),
        ("mean KLD", stats.kld_mean, limits.max_kld_mean, "<="),
        ("99th-percentile KLD", stats.kld_percentiles[99.0], limits.max_kld_p99, "<="),
        ("|mean ln(PPL_q/PPL_ref)|", abs(stats.ln_ppl_ratio_mean), limits.max_ln_ppl_ratio, "<="),
    ]
    failures = []
    for name, value, limit, op in checks:
        ok = value >= limit if op == ">=" else value <= limit
        if not ok:
            failures.append(f"{scheme}: {name} {value:.4g} violates the threshold {op} {limit:g} over {stats.n} "
                            f"scored tokens; {_describe_worst(stats, decode)}")
    return failures


def check_really_differs(stats: AgreementStatistics, thresholds: QuantizationThresholds, *, scheme: str) -> list[str]:
    """Agreement that is too perfect means the 'quantized' logits are the reference's (or vice versa)."""
    failures = []
    if stats.max_abs_logit_difference == 0.0:
        failures.append(f"{scheme}: every logit equals the reference's over {stats.n} tokens: the comparison "
                        "is of a model with itself (reference computed with the quantized model?)")
    if stats.kld_mean <= thresholds.min_kld_mean:
        failures.append(f"{scheme}: mean KLD {stats.kld_mean:.3g} is at or below the floor {thresholds.min_kld_mean:g} "
                        "a quantized model always exceeds: agreement too perfect (reference computed with the "
                        "quantized model, or the model was not quantized)")
    return failures


# ---------------------------------------------------------------------------------------------
# Greedy generation agreement (the greedy answers: generation_basics.chat_greedy_tokens) and the report table


def common_prefix_length(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if int(x) != int(y):
            break
        n += 1
    return n


def markdown_table(rows: list[dict]) -> str:
    """rows: {"scheme", "top1", "top5", "kld_mean", "same_top", "ppl_ratio", "footprint_ratio"}."""
    head = ("| scheme | top-1 | top-5 overlap | mean KLD | same-top % | PPL ratio | footprint ratio |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['top1']:.4f} | {r['top5']:.4f} | {r['kld_mean']:.5f} | "
                     f"{r['same_top']:.2f} ± {r.get('same_top_err', 0.0):.2f} | {r['ppl_ratio']:.4f} | "
                     f"{r['footprint_ratio']:.4f} |")
    return "\n".join(lines)


def table_row(scheme: str, stats: AgreementStatistics, footprint_ratio: float) -> dict:
    return {"scheme": scheme, "top1": stats.top1, "top5": stats.topk_overlap[5], "kld_mean": stats.kld_mean,
            "same_top": stats.same_top_percent, "same_top_err": 100 * stats.top1_stderr,
            "ppl_ratio": stats.ppl_ratio, "footprint_ratio": footprint_ratio}

"""Quantized vs reference agreement, measured the way llama.cpp's KL-divergence mode measures it.

A quantized model is accepted when, over every scored token position of a fixed corpus, its next-token
distribution stays close to the reference's (fp32 on CPU, the run's half precision on GPU):

* top-1 agreement ("same top token", with its binomial standard error sqrt(p(1-p)/(n-1)));
* top-k overlap (k = 5, 10): the share of the reference's k best tokens that are also the quantized
  model's k best;
* KL(reference || quantized) per position: mean with standard error, max, percentiles, min;
* delta p = p_quantized(correct token) - p_reference(correct token): mean, RMS, percentiles;
* perplexity of both, their ratio and the mean of ln(PPL_q / PPL_ref) per token.

As in llama.cpp (`perplexity --kl-divergence`), each window of the corpus is evaluated from its start
and only the logits of its second half are scored, so every scored token sees at least half a window
of context. Fewer than ``MIN_SCORED_TOKENS`` positions give percentiles that mean nothing, so the
harness refuses them.

Schemes, thresholds (one dataclass, each number with the measurement behind it) and the weight
footprint each scheme should have also live here; suites/test_quantization.py applies them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from harness.backends.quantization import get_scheme
from harness.config import DATA_DIR, read_thresholds_section
from harness.errors import HarnessUsageError

CORPUS_DIR = DATA_DIR / "corpus"
MIN_SCORED_TOKENS = 100
KLD_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)
DELTA_P_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1)
TOPK = (5, 10)


# ---------------------------------------------------------------------------------------------
# Thresholds


@dataclass(frozen=True)
class SchemeThresholds:
    """Acceptance limits for one scheme (see QuantizationThresholds for where the numbers come from)."""

    min_top1: float            # same-top-token fraction
    min_top5_overlap: float
    max_kld_mean: float
    max_kld_p99: float
    max_ln_ppl_ratio: float    # |mean ln(PPL_q / PPL_ref)|
    min_greedy_prefix: float   # mean length of the common greedy prefix on the chat prompts, tokens
    # Band of every quantized layer's relative RMSE ||W_q - W|| / ||W||: a property of the scheme's
    # grid, not of the weights (measured the same on trained and random-weight checkpoints, below),
    # so it is the "really quantized" check that holds for any model.
    min_layer_rmse: float
    max_layer_rmse: float


# Per-layer relative RMSE of the dequantized weight, measured on CPU (fp32 reference) over every
# quantized layer of SmolLM2-135M (210 layers) and of random-weight GPT-NeoX and Gemma-2 checkpoints
# (12 and 21 layers): int8 0.0063-0.0116, nf4 0.091-0.102, fp4 0.121-0.147. The bands sit ~3x outside
# that on each side: a layer whose weight is the reference's (not quantized, or the reference
# computed from the quantized model) reads 0; a 4-bit layer where int8 was asked reads ~10x int8's.
INT8_LAYER_RMSE = {"min_layer_rmse": 0.002, "max_layer_rmse": 0.035}
NF4_LAYER_RMSE = {"min_layer_rmse": 0.03, "max_layer_rmse": 0.3}
FP4_LAYER_RMSE = {"min_layer_rmse": 0.04, "max_layer_rmse": 0.4}


@dataclass(frozen=True)
class QuantizationThresholds:
    """Every quantization threshold, once. Measured on SmolLM2-135M-Instruct (the default model), CPU,
    fp32 reference, bf16 compute, over the CI windows (2 x 256 tokens, 254 scored) and the whole
    bundled corpus (7 x 512 tokens, 1785 scored). A 135M model is far more sensitive to 4-bit
    rounding than 7B+ models (llama.cpp reports mean KLD ~0.01-0.03 for 4-bit 7B models), so larger
    models should pass these easily; a user accepting a large model tightens them with --thresholds.

    Limits sit ~2x the worst measured KLD / ln PPL ratio and ~0.08-0.15 below the measured top-1 and
    top-5 (the binomial standard error of top-1 over 254 tokens is ~0.03 at 0.7).
    """

    # int8 measured top-1 0.929 / 0.929, top-5 0.923 / 0.926, KLD mean 0.0137 / 0.0153, KLD p99
    # 0.060 / 0.093, ln PPL ratio 0.002 / 0.022 (CI windows / whole corpus).
    int8: SchemeThresholds = SchemeThresholds(
        min_top1=0.85, min_top5_overlap=0.85, max_kld_mean=0.03, max_kld_p99=0.2,
        max_ln_ppl_ratio=0.05, min_greedy_prefix=4.0, **INT8_LAYER_RMSE)
    # Greedy: 12 of 12 tokens on both CI prompts on the H100 (bf16 reference); on CPU (--run-slow only:
    # LLM.int8 generation takes seconds per token there) a mean of 9.83 of 32 tokens over the 6 prompts.
    # nf4 measured top-1 0.701 / 0.742, top-5 0.748 / 0.740, KLD mean 0.236 / 0.251, KLD p99
    # 0.88 / 1.31, ln PPL ratio 0.204 / 0.212. Double quantization only re-quantizes the absmax
    # scales (8-bit, blocks of 256): nf4-dq measured top-1 0.701, KLD mean 0.236, KLD p99 0.90 on the
    # CI windows, the same as nf4 within the statistics' standard error.
    # Greedy: nf4 measured a common prefix of 6 and 6 tokens (of 12) on the first two chat prompts.
    nf4: SchemeThresholds = SchemeThresholds(
        min_top1=0.6, min_top5_overlap=0.6, max_kld_mean=0.45, max_kld_p99=2.5,
        max_ln_ppl_ratio=0.4, min_greedy_prefix=3.0, **NF4_LAYER_RMSE)
    nf4_dq: SchemeThresholds = nf4  # measured the same as nf4 (above)
    # fp4's grid is not fitted to normally distributed weights, so it rounds coarser than nf4: measured
    # top-1 0.575 / 0.640, top-5 0.662 / 0.651, KLD mean 0.436 / 0.475, KLD p99 2.05 / 2.26,
    # ln PPL ratio 0.385 / 0.397.
    fp4: SchemeThresholds = SchemeThresholds(
        min_top1=0.45, min_top5_overlap=0.5, max_kld_mean=0.9, max_kld_p99=4.5,
        max_ln_ppl_ratio=0.8, min_greedy_prefix=1.0, **FP4_LAYER_RMSE)
    fp4_dq: SchemeThresholds = fp4  # double quantization changes only the scales' rounding, as for nf4
    # Too-perfect agreement: a quantized model really differs from its reference. Measured int8 (the
    # closest scheme) mean KLD 0.0126; a model compared with itself gives exactly 0 (fp32) and bf16
    # re-rounding of the same weights gives ~1e-4. 1e-3 sits between with >10x margin either way.
    min_kld_mean: float = 1e-3
    # Weight footprint (model.get_memory_footprint(): parameters + buffers, not the quant-state
    # absmax/SCB, which bitsandbytes keeps outside them) vs the prediction from the reference's
    # modules: exact by construction (measured 0.000 % off for every scheme); one 576x1536 projection
    # of SmolLM2 left unquantized adds 1.2 % (int8) to 1.9 % (4-bit), so 0.5 % catches it.
    footprint_rel_margin: float = 0.005
    # Per-layer gain of the dequantized weight onto the reference (<W_q, W> / <W, W>): rounding to the
    # nearest grid value is unbiased, measured max |gain - 1| over SmolLM2's 210 layers 1.0e-4 (int8),
    # 3.6e-3 (nf4 dequantized) / 4.1e-3 (nf4 read through its bf16 CPU kernel); a scale off by 5 % in
    # one layer gives 0.05, 5x this limit.
    max_layer_gain_error: float = 0.01

    def for_scheme(self, name: str) -> SchemeThresholds:
        get_scheme(name)
        return getattr(self, name.replace("-", "_"))


def load_quantization_thresholds(path: str | None) -> QuantizationThresholds:
    """QuantizationThresholds with the "quantization" section of the --thresholds JSON file applied:
    {"quantization": {"nf4": {"max_kld_mean": 0.1}, "footprint_rel_margin": 0.01}}. Unknown keys are errors."""
    base = QuantizationThresholds()
    section = read_thresholds_section(path, "quantization")
    changes = {}
    known = {f.name: f for f in dataclasses.fields(QuantizationThresholds)}
    for key, value in section.items():
        attr = key.replace("-", "_")
        if attr not in known:
            raise HarnessUsageError(f"--thresholds: unknown quantization threshold {key!r}; known: "
                                    f"{', '.join(sorted(known))}")
        current = getattr(base, attr)
        if isinstance(current, SchemeThresholds):
            if not isinstance(value, dict):
                raise HarnessUsageError(f"--thresholds: quantization.{key} must be an object of limits")
            fields = {f.name for f in dataclasses.fields(SchemeThresholds)}
            unknown = sorted(set(value) - fields)
            if unknown:
                raise HarnessUsageError(f"--thresholds: unknown limit(s) {', '.join(unknown)} in quantization.{key}; "
                                        f"known: {', '.join(sorted(fields))}")
            changes[attr] = dataclasses.replace(current, **{k: float(v) for k, v in value.items()})
        else:
            changes[attr] = float(value)
    return dataclasses.replace(base, **changes)


# ---------------------------------------------------------------------------------------------
# Corpus


def corpus_text() -> str:
    """The bundled evaluation corpus (prose and code), files in name order, separated by blank lines."""
    files = sorted(p for p in CORPUS_DIR.iterdir() if p.suffix == ".txt")
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in files)


def chat_prompts() -> list[str]:
    return list(json.loads((CORPUS_DIR / "chat_prompts.json").read_text(encoding="utf-8"))["prompts"])


def corpus_windows(tokenizer, window: int, count: int | None = None):
    """The corpus as `count` (default: as many as fit) non-overlapping windows of `window` tokens."""
    import torch

    if window < 4:
        raise HarnessUsageError(f"quantization window of {window} tokens: use at least 4")
    ids = tokenizer(corpus_text(), add_special_tokens=False)["input_ids"]
    fits = len(ids) // window
    if fits == 0 or (count is not None and count > fits):
        raise HarnessUsageError(f"the bundled corpus has {len(ids)} tokens: {count or 1} window(s) of {window} "
                                f"do not fit (at most {fits})")
    n = fits if count is None else count
    return torch.tensor(ids[:n * window], dtype=torch.long).reshape(n, window)


def scored_mask(windows):
    """llama.cpp's scoring: logits at positions window/2 .. window-2 (each predicts the next token)."""
    import torch

    n, w = windows.shape
    mask = torch.zeros(n, w, dtype=torch.bool)
    mask[:, w // 2: w - 1] = True
    return mask


def next_token_targets(windows):
    """target_ids[i, t] = windows[i, t + 1]; the last column has no target (-1, never scored)."""
    import torch

    return torch.cat([windows[:, 1:], torch.full_like(windows[:, :1], -1)], dim=1)


def window_logits(model, windows, mask, batch_size: int = 2):
    """fp32 logits at the scored positions, (n_scored, vocab), on the CPU."""
    import torch

    device = model.device
    out = []
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size]
            logits = model(batch.to(device)).logits
            out.append(logits[mask[start:start + batch_size].to(device)].float().cpu())
    return torch.cat(out)


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
# Per-layer weight reconstruction (llama.cpp's quantize-stats idea): a scale that is off by a few
# percent in one layer hides inside the model-level noise of quantization, but not here.


@dataclass
class LayerReconstruction:
    name: str
    gain: float          # least-squares scale of the dequantized weight onto the reference: <W_q, W> / <W, W>
    relative_rmse: float  # ||W_q - W|| / ||W||


def _weight_through_forward(module):
    """W as the layer applies it: layer(I) - layer(0) = I @ W^T, computed with the layer's own kernel."""
    import torch

    device = next(module.parameters()).device
    eye = torch.eye(module.in_features, dtype=getattr(module, "compute_dtype", None) or torch.float32, device=device)
    with torch.inference_mode():
        out = module(eye).float()
        if module.bias is not None:
            out = out - module.bias.float()
    return out.T


def dequantized_weight(module):
    """The weight a bitsandbytes layer actually multiplies by, in float32 (None for other modules)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        data, state = module.weight.data, module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes >= 0.48 repacks 4-bit weights for its CPU kernel on the first forward (and
            # its inverse is only best-effort): read the weight back through the layer itself.
            return _weight_through_forward(module)
        return bnb.functional.dequantize_4bit(data, state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        state = module.state
        codes = state.CB if state.CB is not None else module.weight.data
        scales = state.SCB if state.SCB is not None else module.weight.SCB
        return codes.float() * (scales.float()[:, None] / 127.0)
    return None


def layer_reconstructions(reference_model, quantized_model) -> list[LayerReconstruction]:
    ref_modules = dict(reference_model.named_modules())
    found = []
    for name, module in quantized_model.named_modules():
        weight = dequantized_weight(module)
        if weight is None or name not in ref_modules:
            continue
        ref = ref_modules[name].weight.detach().float().to(weight.device)
        ref_sq = float((ref * ref).sum())
        found.append(LayerReconstruction(name, float((weight * ref).sum()) / ref_sq,
                                         float((weight - ref).norm()) / ref_sq ** 0.5))
    return found


def check_layer_gains(layers: list[LayerReconstruction], max_gain_error: float, *, scheme: str) -> list[str]:
    if not layers:
        return [f"{scheme}: no bitsandbytes layer found in the quantized model: nothing was quantized"]
    bad = sorted((x for x in layers if abs(x.gain - 1.0) > max_gain_error), key=lambda x: -abs(x.gain - 1.0))
    return [f"{scheme}: layer {x.name} dequantizes to {x.gain:.4f} x the reference weight (|gain - 1| "
            f"{abs(x.gain - 1):.4f} > threshold {max_gain_error:g}; relative RMSE {x.relative_rmse:.4f}): "
            "its quantization scale is wrong" for x in bad]


def check_layer_errors(layers: list[LayerReconstruction], limits: SchemeThresholds, *, scheme: str) -> list[str]:
    """Every quantized layer's relative RMSE inside the scheme's band: it was really quantized, and
    with the grid the scheme names."""
    if not layers:
        return [f"{scheme}: no bitsandbytes layer found in the quantized model: nothing was quantized"]
    low, high = limits.min_layer_rmse, limits.max_layer_rmse
    out = [x for x in layers if not low <= x.relative_rmse <= high]
    return [f"{scheme}: layer {x.name} differs from the reference weight by relative RMSE {x.relative_rmse:.5f}, "
            f"outside {scheme}'s band [{low:g}, {high:g}]: "
            + ("it was not really quantized (or the reference is the quantized model)" if x.relative_rmse < low
               else "it was rounded to a coarser grid than the scheme's") for x in out]


# ---------------------------------------------------------------------------------------------
# Weight footprint


@dataclass
class FootprintPrediction:
    reference_bytes: int   # the reference model's get_memory_footprint()
    predicted_bytes: int   # what the quantized model's get_memory_footprint() should report
    quantized_layers: int
    kept_layers: list[str]  # Linear layers kept in higher precision

    @property
    def predicted_ratio(self) -> float:
        return self.predicted_bytes / self.reference_bytes


def _output_embedding_names(model) -> set[str]:
    out = model.get_output_embeddings()
    return {name for name, module in model.named_modules() if out is not None and module is out}


def predict_footprint(reference_model, scheme: str, *, quantized_dtype=None) -> FootprintPrediction:
    """Bytes the quantized model's parameters and buffers should take: every nn.Linear weight except the
    LM head (transformers keeps the output embedding and tied weights unquantized) at 1 byte (int8) or
    1/2 byte (4-bit, two values per uint8); embeddings, norms, biases and the kept layers at the element
    size of `quantized_dtype` (default: the reference's). bitsandbytes' quant state (absmax, SCB) lives
    outside parameters and buffers, so get_memory_footprint() does not count it; neither do we."""
    import torch

    bits = get_scheme(scheme).bits
    kept = _output_embedding_names(reference_model)
    seen: set[int] = set()
    total, quantized, kept_layers = 0, 0, []
    quantized_weights = set()
    for name, module in reference_model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if name in kept:
                kept_layers.append(name)
            else:
                quantized_weights.add(id(module.weight))
                quantized += 1
    for tensor in list(reference_model.parameters()) + list(reference_model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if id(tensor) in quantized_weights:
            total += tensor.numel() * bits // 8
        else:
            size = torch.empty((), dtype=quantized_dtype).element_size() if (
                quantized_dtype is not None and tensor.is_floating_point()) else tensor.element_size()
            total += tensor.numel() * size
    return FootprintPrediction(reference_model.get_memory_footprint(), total, quantized, kept_layers)


def unquantized_linear_layers(model) -> list[str]:
    """Names of plain nn.Linear layers left in a loaded quantized model (bnb layers subclass nn.Linear)."""
    import torch

    found = []
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear:
            found.append(name)
    return found


def quant_state_bytes(model) -> int:
    """Bytes of bitsandbytes' scales kept outside parameters and buffers (so outside
    get_memory_footprint()): int8 row scales (SCB), 4-bit absmax per 64-value block and, with double
    quantization, the 8-bit absmax plus its own fp32 scales per 256 blocks. Reported, not checked."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    total = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            scb = module.state.SCB if module.state.SCB is not None else getattr(module.weight, "SCB", None)
            total += scb.numel() * scb.element_size() if scb is not None else 0
        elif isinstance(module, bnb.nn.Linear4bit) and module.weight.quant_state is not None:
            qs = module.weight.quant_state
            for tensor in (qs.absmax, getattr(qs, "offset", None),
                           getattr(getattr(qs, "state2", None), "absmax", None)):
                if tensor is not None and hasattr(tensor, "numel"):
                    total += tensor.numel() * tensor.element_size()
    return total


def check_footprint(measured_bytes: int, prediction: FootprintPrediction, margin: float, *, scheme: str,
                    unquantized: list[str] | None = None) -> list[str]:
    error = measured_bytes / prediction.predicted_bytes - 1.0
    if abs(error) <= margin:
        return []
    extra = ""
    if unquantized is not None:
        unexpected = sorted(set(unquantized) - set(prediction.kept_layers))
        if unexpected:
            extra = f"; Linear layers left unquantized: {', '.join(unexpected[:5])}"
    return [f"{scheme}: weight footprint {measured_bytes / 2**20:.2f} MiB is {error:+.2%} off the predicted "
            f"{prediction.predicted_bytes / 2**20:.2f} MiB (ratio {measured_bytes / prediction.reference_bytes:.4f} "
            f"vs predicted {prediction.predicted_ratio:.4f} of the reference; margin {margin:.2%}){extra}"]


# ---------------------------------------------------------------------------------------------
# Greedy generation agreement and the report table


def common_prefix_length(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if int(x) != int(y):
            break
        n += 1
    return n


def greedy_tokens(model, tokenizer, prompt: str, new_tokens: int) -> list[int]:
    """Greedy answer forced to exactly `new_tokens` tokens (min_new_tokens), on the chat template."""
    import torch

    from harness.inference.generation_basics import chat_input_ids

    inputs = chat_input_ids(tokenizer, prompt, model.device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


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

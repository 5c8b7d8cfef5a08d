"""The harness's numeric comparison rules: every tolerance, once, with the reason for its number.

Suites import these names; users override them per run with ``--thresholds FILE`` (a JSON object
whose "tolerances" section holds the same field names).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from harness.config import read_thresholds_section
from harness.errors import HarnessUsageError

# The precision a quantized KV cache stores keys and values in (fp8 e4m3: 3 mantissa bits): greedy
# runs through such a cache are compared at this precision, with the kv_quantized_* numbers below.
QUANTIZED_KV_PRECISION = "float8_e4m3fn"


@dataclass(frozen=True)
class Tolerances:
    """Comparison rules shared by every suite. Each number says why it is what it is."""

    # flash-attn's own tests: a kernel may be at most 2x as far from the fp32/fp64 reference as
    # PyTorch's same-precision implementation is. We use the same factor; it absorbs reordering
    # of the softmax/matmul reductions but not a wrong scale, mask or head mapping.
    attention_error_factor: float = 2.0
    # flash-attn adds 1e-5 in causal/split-KV cases; FA3 derives slack from the reference's own
    # rounding. We take max(this, 2 * rounding of the reference in the compared dtype).
    attention_abs_slack: float = 1e-5
    # Model level: the same k x eager rule over every layer's hidden states and the logits. The
    # max over a whole residual stream is a noisier statistic than over one attention output: on
    # CPU float32, 20 seeds x 4 scenarios x SmolLM2-135M (30 layers) reached 4.78 for sdpa_math
    # (one case: layer 3, hidden value ~238, 40 ulps vs eager's 8), p90 2.25; the tiny presets stay
    # <= 1.6. The planted faults measure >= 746 (fp16 accumulation) and up to 3e6, so 8 keeps
    # both margins wide. (transformers' own tests use atol 1e-2..3e-2 in bf16, with no baseline.)
    model_error_factor: float = 8.0
    # Each layer's attention call on eager's own recorded inputs (harness.equivalence.layer_attention): only
    # the attention function differs, so the kernel rule applies per layer (attention_error_factor
    # on the max error) and, besides it, on the RMS error. A correct kernel's RMS error is eager's
    # or less (SDPA keeps scores in fp32 where eager rounds them to bf16): measured on CPU bf16,
    # SmolLM2-135M, 3 seeds, left-padded batch: sdpa <= 0.89 x eager over all 30 layers. A softmax
    # scale 1 % off reaches 3.5 (RMS) but only 2.4-2.8 on the max; 0.3 % reaches 1.2. 2 separates
    # both sides by ~2x.
    attention_rms_factor: float = 2.0
    # A sanity bound, not an accuracy criterion: at the median position, eager in the run's dtype
    # may differ from the upcast reference by at most this x the largest reference logit, or the
    # reference is taken to be another model. The worst position is no measure of that: on the
    # H200 in bf16, SmolLM2-135M on padded batches of 3 seeds in 20 drifted 14.8 / 33.4 = 0.44 at
    # one position (H100 bf16 worst positions: SmolLM2 0.087, random 7B Llama 0.061; float32 on
    # CPU: < 1e-5). A different model differs by O(1) x the scale at most positions.
    reference_logit_gap: float = 0.25
    # Greedy tokens: a divergence is accepted only at a near-tie of the reference, i.e. where the
    # reference's top-2 logit margin is below this (in logits), and the other run's token must be
    # in the reference's top-k. fp32 near-ties below 1e-3 are rounding noise; bf16 rounds logits
    # of magnitude ~20 to ~0.06, so the margin scales with the dtype (see token_margin()).
    token_margin_fp32: float = 1e-3
    token_margin_half: float = 0.15
    token_topk: int = 5
    # ... and, whatever the dtype's fixed margin, a margin within this many units in the last place
    # of the step's largest logit is a near-tie too: two logits rounded on different paths can each
    # move half an ulp or more. H200, bf16, continuous batching vs one request alone: margin 0.156
    # at logits of ~20 (bf16 ulp 0.125) flipped, 0.15 fixed margin said "not a near-tie". In fp32 the
    # term is ~1e-5, far under token_margin_fp32.
    token_margin_ulps: float = 2.0

    def token_margin(self, dtype_name: str) -> float:
        if dtype_name == QUANTIZED_KV_PRECISION:
            return self.kv_quantized_token_margin
        return self.token_margin_fp32 if dtype_name in ("float32", "float64") else self.token_margin_half

    # Greedy runs (cache vs no cache, static+compile, assisted/lookup vs plain): per-step raw logits
    # may differ by at most this x the step's largest |logit|. Measured here (CPU fp32, SmolLM2-135M
    # and the tiny presets, 20 seeds, 32 tokens): <= 3e-6; bf16 on CPU: <= 1.2e-2 (see the issue 4
    # report). A dropped/duplicated key, a RoPE offset or a wrong static slot move logits by >= 5e-2
    # relative on the first affected step, so 1e-4 / 4e-2 keep ~30x / ~3x headroom and still catch them.
    generation_logit_rel_fp32: float = 1e-4
    generation_logit_rel_half: float = 4e-2

    def generation_logit_rel(self, dtype_name: str) -> float:
        if dtype_name == QUANTIZED_KV_PRECISION:
            return self.kv_quantized_logit_rel
        return self.generation_logit_rel_fp32 if dtype_name in ("float32", "float64") else self.generation_logit_rel_half

    # Quantised KV caches (fp8 e4m3 stores 3 mantissa bits: 2^-4 = 6 % rounding per key/value) are
    # lossy by design, so they get the same token rule with wider numbers. Measured on SmolLM2-135M:
    # logits drift 0.019 (fp32) to 0.056 (bf16) relative; 0.15 keeps ~3x headroom. A flip is a
    # near-tie below 1 logit, i.e. ~5 % of the logit range, the size of the drift itself.
    kv_quantized_logit_rel: float = 0.15
    kv_quantized_token_margin: float = 1.0

    # RoPE cos/sin vs the float64 reference (harness.equivalence.positions), in units of fp32 epsilon x
    # (|angle| + 1): computing inv_freq (a pow), position x inv_freq and the cos each round once,
    # so about 3 units; measured <= 2.6 for default/linear/dynamic/llama3/yarn up to 4x the trained
    # window. 8 leaves room for other libm/CUDA cos; a wrong factor, base or attention scale is
    # off by >= 1e-2 absolute, i.e. thousands of units at small positions.
    rope_error_units: float = 8.0
    # ALiBi: Falcon and BLOOM materialise slope x key position in bfloat16 (as the original
    # checkpoints were trained), so the bias of key j relative to query i may be off by half a
    # bf16 ulp (<= 2^-8 relative) of each of the two: <= 2^-7 x slope x i. Measured on
    # tiny:falcon-alibi at 3072 tokens: exactly that bound is reached (4.0 at slope 0.25, i 2072).
    # The reference's exact slopes must hold within it; a wrong slope is off by slope x distance.
    alibi_rounding_rel: float = 2.0 ** -7

    # Memory, predicted vs measured (harness.performance.memory). Weights and KV caches are whole tensors, so
    # the allocator (CUDA) or the resident set (CPU, after a warm-up forward so library code pages
    # are already resident) sees them almost exactly: measured 0.1-0.3 % off on CPU for SmolLM2-135M
    # and the tiny presets. 5 % leaves room for allocator rounding and Python objects created with
    # them; a wrong dtype (2x), an unquantised layer or a duplicated tied table is >= 10 % off.
    memory_prediction_rel_error: float = 0.05
    # Eager attention's extra peak over SDPA, in score matrices (batch x heads x N x N): transformers'
    # shared eager path holds 2 + mask in fp32 (measured 2.3 for tiny:llama, N=1408) and 4 + mask
    # in half precision; GPT-2's own eager code and Mistral's sliding-window mask hold more
    # (measured 3.4-5.0). Above 6, something materialises extra N^2 tensors.
    eager_max_score_copies: float = 6.0
    # Growth with sequence length: eager must hold at least this many score matrices per N^2 in its
    # fitted quadratic term (it holds ~2 in fp32, ~4 in half precision) ...
    eager_min_score_copies: float = 0.9
    # ... and a fused kernel (SDPA flash/efficient, flash-attn) at most this fraction of one: a
    # boolean B x 1 x N x N mask (sliding-window models) is 1/(heads x bytes) of the scores.
    fused_max_score_fraction: float = 0.1
    # Untrained weights: mean next-token entropy over the bundled prose, as a fraction of a uniform
    # distribution's ln(vocab). SmolLM2-135M: 0.30 (3.3 of 10.8 nats); random-initialised models
    # (std 0.02): >= 0.99. Between, 0.9 flags only a checkpoint that predicts almost nothing.
    untrained_entropy_fraction: float = 0.9
    # The harness's timer vs triton.testing.do_bench (issue 6: within 3 %) on long GPU kernels.
    timer_agreement_rel: float = 0.03


def load_tolerances(path: str | None) -> Tolerances:
    """Tolerances with the user's overrides from a JSON file applied (unknown keys are errors)."""
    base = Tolerances()
    section = read_thresholds_section(path, "tolerances")
    known = {f.name for f in dataclasses.fields(Tolerances)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise HarnessUsageError(f"--thresholds: unknown tolerance(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(base, **{k: float(v) if k != "token_topk" else int(v) for k, v in section.items()})

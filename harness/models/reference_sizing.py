"""Size the references and comparisons the harness builds itself, before building them (issue 13).

Rule: no reference or comparison that the harness itself builds may run out of memory on a card
where the model under test fits. A model-level comparison (harness.equivalence.attention_model.compare_model_outputs)
holds, besides the variants under test, the eager baseline's activations, an upcast copy of the
weights (float32 on GPU: twice a bf16 model), that copy's activations (every layer's hidden states
and the eager N x N scores, in the wider dtype) and float64 temporaries of the comparison itself.
At a model's whole window that can be far more than the model needs (random:llama-7b, 16384
tokens: 156 GiB predicted beside the 25 GiB of its two bf16 variants; an H200 has 139 GiB), so the
harness predicts it from harness.performance.memory's predictions, before building anything, and picks, in
this order of preference:

1. ``device``: the reference on the device over the longest prompt that fits (the whole window
   when it does, never fewer than ``minimum`` tokens);
2. ``layers``: the same, with the reference's decoder layers kept in host memory and streamed to
   the device one at a time (only one layer of upcast weights on the device);
3. ``cpu``: the whole reference on the CPU over ``minimum`` tokens, its outputs moved to the
   device for the comparison;
4. otherwise a skip that gives the predicted bytes and the free bytes.

Measured on an H200 (random:llama-7b, bf16, fp32 reference, 13056 of 16384 tokens chosen with
114 GiB free): peak allocated 98.1 GiB in the reference forward against 101.5 GiB predicted (112.6
with the headroom below); layer by layer at 8192 tokens 33.1 against 35.2 GiB; on the CPU at 1024
tokens 2.4 against 2.3 GiB (the comparison).

``ReferencePlan.note`` says what was done; suites put it in the recorded result and the message.
On the CPU (CI) nothing is sized: the whole requested prompt, as before. Building and running the
reference as planned: harness.models.reference_build.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from harness.backends.capabilities import dtype_name
from harness.config import format_bytes
from harness.performance.memory import release_device_memory

__all__ = ["ComparisonShape", "comparison_shape", "predict_comparison_bytes", "ReferencePlan", "plan_reference",
           "device_memory_available", "host_memory_available", "plan_model_reference", "PLACEMENTS"]

PLACEMENTS = ("device", "layers", "cpu")
PLACEMENT_WORDS = {"device": "on the device", "layers": "layer by layer (decoder layers streamed from host memory)",
                   "cpu": "on the CPU"}

# Safety margin on top of the prediction: allocator rounding and fragmentation, cuBLAS workspaces,
# and what the prediction leaves out (small per-layer temporaries).
HEADROOM_FRACTION = 0.10
HEADROOM_BYTES = 1 << 30
# Live batch x heads x N x N score tensors at the peak of harness.backends.kernels.eager_attention (the
# reference attention): scores, the softmax probabilities, and the fully-masked-rows `where`.
REFERENCE_LIVE_SCORES = 3
# Live float64 (batch, tokens, width) tensors at the peak of harness.equivalence.compare.compare_tensors: the
# kept |out - ref| plus max_abs_error's two upcast operands and their difference.
COMPARE_LIVE_FLOAT64 = 4
# Score matrices (in the run's dtype) that transformers' eager attention holds on CUDA beyond
# harness.performance.memory's prediction: H200, random:llama-7b, bf16, 13056 tokens, measured 54.7 GiB against
# 46.2 GiB predicted for the eager forward, ~0.85 of one 10.2 GiB score matrix more (softmax's float32
# copy of its input beside its float32 output).
EAGER_EXTRA_SCORES = 1
# Prompts shorter than the request are rounded down to a multiple of this (kernel-friendly).
LENGTH_STEP = 256


def _element_size(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class ComparisonShape:
    """What the prediction needs to know about the model; build it with comparison_shape(config)."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    dtype_bytes: int  # the run's dtype (the variants under test and eager)
    reference_bytes: int  # the reference's dtype
    reference_weights: int  # bytes of the whole upcast copy
    reference_layer_weights: int  # bytes of one upcast decoder layer
    eager_scores: object = None  # callable(batch, N) -> eager's extra prefill peak; None: 4 score units
    batch: int = 1
    reference_name: str = "fp32"
    kv_cache_bytes_per_token: int = 0  # per kept output in the run's dtype (0: forwards keep no KV cache)

    @property
    def reference_outside_layers(self) -> int:
        """Upcast weights that are not in a decoder layer (embeddings, final norm, LM head)."""
        return max(0, self.reference_weights - self.layers * self.reference_layer_weights)


def comparison_shape(config, dtype, reference_dtype, batch: int = 1, kv_cache: bool = False) -> ComparisonShape:
    """ComparisonShape from a transformers config, through harness.performance.predictions.
    ``kv_cache``: the forwards' outputs keep their KV cache (transformers' default use_cache)."""
    from harness.performance.predictions import (attention_shape, parameter_counts, predict_eager_attention_peak_bytes,
                                     predict_kv_cache_bytes, predict_weight_bytes)

    counts = parameter_counts(config)
    shape = attention_shape(config)
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    intermediate = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                    or getattr(config, "ffn_hidden_size", None) or 4 * hidden)
    ref_weights = predict_weight_bytes(counts, reference_dtype).bytes
    per_layer = (counts.total - counts.input_embedding - counts.output_embedding) // max(1, shape.layers)
    return ComparisonShape(
        layers=shape.layers, hidden=hidden, intermediate=intermediate, vocab=config.vocab_size, heads=shape.heads,
        dtype_bytes=_element_size(dtype), reference_bytes=_element_size(reference_dtype),
        reference_weights=ref_weights, reference_layer_weights=per_layer * _element_size(reference_dtype),
        eager_scores=lambda b, n: predict_eager_attention_peak_bytes(shape, b, n, dtype), batch=batch,
        reference_name=dtype_name(reference_dtype).replace("float", "fp"),
        kv_cache_bytes_per_token=predict_kv_cache_bytes(shape, 1, 1, dtype) if kv_cache else 0)


def predict_comparison_bytes(shape: ComparisonShape, length: int, placement: str = "device") -> dict[str, int]:
    """Device bytes, beyond what is allocated now (the variants held), of each phase of a
    model-level comparison over ``length`` tokens: the eager forward, building the reference, its
    forward, the fused variant's forward, and the comparison. Every phase holds the outputs
    (all hidden states and the logits) of the forwards before it. The largest is the need."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r}: one of {PLACEMENTS}")
    s, n = shape, length
    tokens = s.batch * n

    def outputs(nbytes):  # every layer's hidden states (embeddings included), the logits, the KV cache if kept
        kv = s.kv_cache_bytes_per_token * tokens * nbytes // s.dtype_bytes
        return (s.layers + 1) * tokens * s.hidden * nbytes + tokens * s.vocab * nbytes + kv

    def mlp(nbytes):  # gate, up and their product in one MLP, plus q/k/v/o of one layer
        return 3 * tokens * s.intermediate * nbytes + 4 * tokens * s.hidden * nbytes

    one_scores = s.batch * s.heads * n * n * s.dtype_bytes
    eager_scores = EAGER_EXTRA_SCORES * one_scores + (
        s.eager_scores(s.batch, n) if s.eager_scores is not None else 4 * one_scores + s.batch * n * n * s.dtype_bytes)
    base, ref_out = outputs(s.dtype_bytes), outputs(s.reference_bytes)
    ref_attention = (REFERENCE_LIVE_SCORES * s.batch * s.heads * n * n * s.reference_bytes
                     + s.batch * n * n * (s.reference_bytes + 1))  # + the additive and the bool mask
    weights = {"device": s.reference_weights,
               "layers": s.reference_outside_layers + s.reference_layer_weights, "cpu": 0}[placement]
    on_device = placement != "cpu"
    phases = {
        "eager forward": base + eager_scores + mlp(s.dtype_bytes),
        "reference weights": base + weights,
        "reference forward": base + weights + ref_out + (ref_attention + mlp(s.reference_bytes) if on_device else 0),
        "fused forward": 2 * base + ref_out + mlp(s.dtype_bytes),
        "comparison": 2 * base + ref_out + COMPARE_LIVE_FLOAT64 * tokens * max(s.vocab, s.hidden) * 8,
    }
    return phases


def predict_host_bytes(shape: ComparisonShape, length: int, placement: str) -> int:
    """Host bytes the reference needs outside the device: its upcast weights (``layers``, ``cpu``)
    and, on the CPU, its forward (scores, one MLP, every hidden state and the logits)."""
    if placement == "device":
        return 0
    if placement == "layers":
        return shape.reference_weights
    s, tokens = shape, shape.batch * length
    nbytes = s.reference_bytes
    return (s.reference_weights + REFERENCE_LIVE_SCORES * s.batch * s.heads * length * length * nbytes
            + 3 * tokens * s.intermediate * nbytes + ((s.layers + 1) * s.hidden + s.vocab) * tokens * nbytes)


def _with_headroom(nbytes: int) -> int:
    return int(nbytes * (1 + HEADROOM_FRACTION)) + HEADROOM_BYTES


@dataclass(frozen=True)
class ReferencePlan:
    """How (and over how many tokens) the harness runs a reference, and why."""

    length: int  # tokens compared
    requested: int  # tokens wanted (e.g. the model's whole window)
    placement: str = "device"  # one of PLACEMENTS
    need_bytes: int | None = None  # predicted device bytes at `length` with `placement` (headroom included)
    requested_need_bytes: int | None = None  # the same for the whole request on the device
    free_bytes: int | None = None  # device bytes available (None: not sized, e.g. on the CPU)
    reference_name: str = "fp32"
    skip: str | None = None  # set when nothing fits: the reason, with the numbers
    phases: dict = field(default_factory=dict)  # predicted bytes per phase at `length`

    @property
    def sized(self) -> bool:
        return self.free_bytes is not None

    @property
    def note(self) -> str:
        """What was done, for record_result and the test's message ('' when nothing was sized)."""
        if self.skip:
            return self.skip
        if not self.sized:
            return ""
        span = (f"all {self.length} tokens" if self.length == self.requested
                else f"{self.length} of {self.requested} tokens")
        where = "" if self.placement == "device" else f", {PLACEMENT_WORDS[self.placement]}"
        return (f"reference on {span}{where}: {self.reference_name} reference and comparison need "
                f"{format_bytes(self.requested_need_bytes)} over {self.requested} tokens on the device, "
                f"{format_bytes(self.free_bytes)} free")

    def details(self) -> dict:
        """Fields for record_result."""
        return {"reference_plan": self.note or "not sized (CPU)", "reference_placement": self.placement,
                "reference_tokens": self.length, "requested_tokens": self.requested,
                "reference_need_bytes": self.need_bytes, "device_free_bytes": self.free_bytes,
                "predicted_gib_per_phase": {k: round(v / 2**30, 2) for k, v in self.phases.items()}}


def plan_reference(shape: ComparisonShape, *, requested: int, minimum: int, free_bytes: int | None,
                   host_free_bytes: int | None = None, placements=PLACEMENTS) -> ReferencePlan:
    """The plan for a comparison that wants ``requested`` tokens; never fewer than ``minimum``
    (capped at ``requested``). ``free_bytes`` None means the device is not sized (CPU): the whole
    request. ``host_free_bytes`` None means host memory is not checked."""
    minimum = max(1, min(minimum, requested))
    name = shape.reference_name
    if free_bytes is None:
        return ReferencePlan(length=requested, requested=requested, reference_name=name)

    def need(length, placement):
        return _with_headroom(max(predict_comparison_bytes(shape, length, placement).values()))

    def host_fits(length, placement):
        host = _with_headroom(predict_host_bytes(shape, length, placement))
        return host_free_bytes is None or host <= host_free_bytes

    requested_need = need(requested, "device")
    tried = []
    for placement in placements:
        def fits(n, placement=placement):
            return need(n, placement) <= free_bytes and host_fits(n, placement)

        if placement == "cpu":  # slow: the shortest prompt only
            length = minimum if fits(minimum) else None
        else:
            length = _longest_fitting(fits, minimum, requested)
        if length is not None:
            return ReferencePlan(length=length, requested=requested, placement=placement,
                                 need_bytes=need(length, placement), requested_need_bytes=requested_need,
                                 free_bytes=free_bytes, reference_name=name,
                                 phases=predict_comparison_bytes(shape, length, placement))
        host = "" if host_fits(minimum, placement) else (
            f", host {format_bytes(_with_headroom(predict_host_bytes(shape, minimum, placement)))} of "
            f"{format_bytes(host_free_bytes)} free")
        tried.append(f"{PLACEMENT_WORDS[placement]} {format_bytes(need(minimum, placement))}{host}")
    span = f"{minimum} tokens" + ("" if minimum == requested else f" (the shortest compared; {requested} wanted)")
    reason = (f"no {name} reference fits: over {span} the reference and comparison need {'; '.join(tried)} of "
              f"device memory, {format_bytes(free_bytes)} free")
    return ReferencePlan(length=minimum, requested=requested, placement="device", need_bytes=need(minimum, "device"),
                         requested_need_bytes=requested_need, free_bytes=free_bytes, reference_name=name,
                         skip=reason, phases=predict_comparison_bytes(shape, minimum, "device"))


def _longest_fitting(fits, minimum: int, requested: int) -> int | None:
    """The longest n in [minimum, requested] with fits(n) (monotone: longer never fits better);
    below the request, rounded down to a multiple of LENGTH_STEP when that stays >= minimum."""
    if fits(requested):
        return requested
    if not fits(minimum):
        return None
    lo, hi = minimum, requested  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    rounded = lo // LENGTH_STEP * LENGTH_STEP
    return rounded if rounded >= minimum else lo


# ---------------------------------------------------------------------------------------------
# What is free


def device_memory_available(device, budget_bytes: int | None = None) -> int | None:
    """Bytes the test may still allocate on ``device``: free device memory plus what torch's
    allocator holds but does not use (None on the CPU: not sized). With a memory budget (the run's
    --memory-budget applies to the test), also at most the budget minus the device memory in use."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    release_device_memory(device)
    free, total = torch.cuda.mem_get_info(device)
    available = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if budget_bytes is not None:
        available = min(available, budget_bytes - (total - free))
    return max(0, available)


def host_memory_available() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - no psutil, or no reading on this platform: host not checked
        return None


def plan_model_reference(model, device, dtype, reference_dtype, *, requested: int, minimum: int, batch: int = 1,
                         budget_bytes: int | None = None, placements=PLACEMENTS,
                         kv_cache: bool = False) -> ReferencePlan:
    """plan_reference for ``model`` on ``device``, against what is free there now (call it once the
    variants the test compares are loaded: they are what is already allocated)."""
    free = device_memory_available(device, budget_bytes)
    if free is None:
        return ReferencePlan(length=requested, requested=requested,
                             reference_name=dtype_name(reference_dtype).replace("float", "fp"))
    shape = comparison_shape(model.config, dtype, reference_dtype, batch, kv_cache)
    return plan_reference(shape, requested=requested, minimum=minimum, free_bytes=free,
                          host_free_bytes=host_memory_available(), placements=placements)

"""The one rule for "is this tensor as close to the truth as the trusted implementation is?".

flash-attn's tests (see shared/ANCHORS.md) compare three outputs per case: a high-precision
reference (``ref``, here fp64 or fp32), the trusted implementation run in the *same* dtype as the
candidate (``baseline``, here eager attention), and the candidate (``out``). The candidate passes
when

    max|out - ref| <= factor * max|baseline - ref| + slack

i.e. it may be at most ``factor`` times as far from the truth as the trusted implementation is,
because reordering reductions changes rounding but a wrong scale, mask or head mapping moves the
result by far more than rounding. ``slack`` covers the case where the baseline happens to be
(nearly) exact: it is ``max(slack_floor, 2 * rounding of the reference in the compared dtype)``,
the reference's own rounding being half an ulp of its largest value in the candidate's dtype (FA3
estimates it as ``|(ref + 0.3 - 0.3) - ref|``, which misses values whose ulp exceeds 0.6).

Positions excluded by ``mask`` (False = excluded, e.g. padding tokens) are ignored everywhere.

The same rule with ``statistic="rms"`` compares root-mean-square errors instead of maxima (FA3's
Hopper tests bound the mean error besides the max). Rounding noise of a correct kernel has about
eager's RMS; a bias that moves every position a little (a softmax scale 1 % off) multiplies it,
while the max over a bf16 tensor is set by a few rounding outliers that hide such a bias.

API (small on purpose; other suites import it):
    max_abs_error(a, b, mask=None) -> float
    reference_rounding(ref, dtype, mask=None) -> float
    typical_position_error(a, b, mask=None) -> float
    rms_error(a, b, mask=None) -> float
    compare_tensors(out, baseline, ref, *, factor, slack_floor, mask=None, what="", statistic="max") -> Verdict
    attention_error_check(...)  -- compare_tensors with the attention wording
    first_diverging_layer(hidden_impl, hidden_baseline, hidden_ref, mask, factor, slack_floor) -> Verdict
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["Verdict", "max_abs_error", "rms_error", "reference_rounding", "typical_position_error", "compare_tensors",
           "attention_error_check", "first_diverging_layer"]


@dataclass(frozen=True)
class Verdict:
    """Outcome of one comparison; ``message`` is written to be pasted into an assertion."""

    passed: bool
    error: float  # max |out - ref| over kept positions
    baseline_error: float  # max |baseline - ref| over kept positions
    allowed: float  # factor * baseline_error + slack
    slack: float
    factor: float
    worst_position: tuple[int, ...] = ()  # index into the compared tensor of the largest |out - ref|
    layer: int | None = None  # for first_diverging_layer: the hidden-state index (0 = embeddings)
    message: str = ""
    statistic: str = "max"  # "max": largest |error|; "rms": root-mean-square error over kept positions
    details: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """error / baseline_error: how many times further from the truth than the trusted path."""
        if self.baseline_error == 0.0:
            return 0.0 if self.error == 0.0 else float("inf")
        return self.error / self.baseline_error

    def __bool__(self) -> bool:  # lets ``assert verdict, verdict.message`` read naturally
        return self.passed


def _expand_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """Broadcast a keep-mask (True = compare) against ``like``, padding trailing dims.

    A (batch, tokens) padding mask thus applies to (batch, tokens, hidden) hidden states and to
    (batch, tokens, vocab) logits alike.
    """
    if mask is None:
        return None
    m = mask.to(device=like.device, dtype=torch.bool)
    while m.dim() < like.dim():
        m = m.unsqueeze(-1)
    return m.expand_as(like)


def _same_shape(*tensors: torch.Tensor) -> None:
    first = tensors[0]
    for t in tensors[1:]:
        if t.shape != first.shape:
            raise ValueError(f"cannot compare tensors of shapes {tuple(first.shape)} and {tuple(t.shape)}")


def _require_finite_reference(ref: torch.Tensor, keep: torch.Tensor | None, what: str) -> None:
    """ValueError unless ``ref`` is finite wherever ``keep`` (expanded to ref's shape) is True."""
    finite = torch.isfinite(ref.detach())
    if not bool(finite.logical_or_(~keep).all() if keep is not None else finite.all()):
        # inf - inf is NaN, counted as an infinite error on both sides: inf <= factor x inf would pass
        raise ValueError(f"{what}: the reference has NaN or inf at compared positions; it decides nothing")


def _abs_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    _same_shape(a, b)
    # in place on one float64 copy: logits of a long prompt are ~50M values, and every pass counts on CPU
    diff = a.detach().to(torch.float64, copy=True)
    diff.sub_(b.detach().to(device=a.device)).abs_()
    # NaN must never compare as "small": make it infinite so it fails loudly.
    torch.nan_to_num_(diff, nan=float("inf"))
    m = _expand_mask(mask, diff)
    if m is not None:
        diff.masked_fill_(~m, 0.0)
    return diff


def _max_rule_errors(out: torch.Tensor, baseline: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None,
                     dtype: torch.dtype, what: str) -> tuple[float, int, float, float]:
    """One chunked pass for the max statistic: (max |out - ref|, flat index of its first occurrence,
    max |baseline - ref|, reference_rounding(ref, dtype)); ValueError if the reference is not finite
    at a kept position."""
    bits = _precision_bits(dtype)
    error, worst, baseline_error, largest, fa3_estimate = -1.0, 0, 0.0, 0.0, 0.0
    offset = 0
    for (o, b, r), keep in _chunks((out, baseline, ref), mask):
        _require_finite_reference(r, keep, what)
        diff = _abs_diff(o, r, keep)
        index = int(diff.argmax())
        largest_here = float(diff[index])
        if largest_here > error:  # strictly: the first occurrence over all chunks, as argmax
            error, worst = largest_here, offset + index
        baseline_error = max(baseline_error, _max_or_zero(_abs_diff(b, r, keep)))
        largest = max(largest, _largest_kept(r, keep))
        fa3_estimate = max(fa3_estimate, _fa3_rounding(r, dtype, keep))
        offset += r.numel()
    return max(error, 0.0), worst, baseline_error, max(_half_ulp(largest, bits), fa3_estimate)


def max_abs_error(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """max |a - b| in float64 over positions where ``mask`` is True (all when None); NaN counts as inf."""
    return max((_max_or_zero(_abs_diff(x, y, keep)) for (x, y), keep in _chunks((a, b), mask)), default=0.0)


_PRECISION_BITS = {torch.float64: 53, torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}


def reference_rounding(ref: torch.Tensor, dtype: torch.dtype, mask: torch.Tensor | None = None) -> float:
    """The rounding of ``ref`` in ``dtype``: the larger of FA3's estimate, max |(ref + 0.3 - 0.3) - ref|
    (the rounding of values near 0.3-0.6, where attention outputs live), and half a unit in the last
    place of the largest kept value. FA3's estimate alone reads 0 wherever ulp/2 > 0.3: bf16 hidden
    states of ~500, whose ulp is 2, were seen on the H200 as an error of 2.75 ulp judged against a
    slack of 0.06."""
    bits = _precision_bits(dtype)
    largest, fa3_estimate = 0.0, 0.0
    for (r,), keep in _chunks((ref,), mask):
        largest = max(largest, _largest_kept(r, keep))
        fa3_estimate = max(fa3_estimate, _fa3_rounding(r, dtype, keep))
    return max(_half_ulp(largest, bits), fa3_estimate)


def _precision_bits(dtype: torch.dtype) -> int:
    bits = _PRECISION_BITS.get(dtype)
    if bits is None:
        raise ValueError(f"no rounding model for {dtype}; known: {', '.join(map(str, _PRECISION_BITS))}")
    return bits


def _half_ulp(largest: float, bits: int) -> float:
    _, exponent = math.frexp(largest)  # largest = m * 2**exponent, 0.5 <= m < 1
    return 2.0 ** (exponent - bits) / 2 if largest else 0.0


def _largest_kept(ref: torch.Tensor, keep: torch.Tensor | None) -> float:
    """max |ref| over kept, finite values (|x| and its max are exact in any float dtype)."""
    kept = ref.abs()
    if keep is not None:
        kept.masked_fill_(~keep, 0.0)
    return float(torch.nan_to_num_(kept, nan=0.0, posinf=0.0).max()) if kept.numel() else 0.0


def _fa3_rounding(ref: torch.Tensor, dtype: torch.dtype, keep: torch.Tensor | None) -> float:
    """max |(r + 0.3 - 0.3) - r| over kept values, r = ref in ``dtype`` (non-finite values as 0: never an
    infinite slack)."""
    r = torch.nan_to_num_(ref.to(dtype, copy=True), nan=0.0, posinf=0.0, neginf=0.0)
    return _max_or_zero(_abs_diff((r + 0.3).sub_(0.3), r, keep))


def _max_or_zero(diff: torch.Tensor) -> float:
    return float(diff.max()) if diff.numel() else 0.0


# Elements per pass of the max-statistic rule: a long prompt's logits are ~50M values (400 MB in
# float64), and a dozen full-size temporaries each cost a trip through memory and fresh pages; chunks
# of 2^20 (8 MB in float64) take the same elementwise steps, so every maximum is the same number.
_CHUNK_ELEMENTS = 1 << 20


def _chunks(tensors: tuple[torch.Tensor, ...], mask: torch.Tensor | None):
    """Yield (flat chunk of each tensor, flat chunk of the expanded keep-mask or None), in index order.
    The tensors share one shape (checked); a non-contiguous one is flattened by one copy."""
    _same_shape(*tensors)
    first = tensors[0]
    flat = [t.detach().reshape(-1) for t in tensors]
    keep = _expand_mask(mask, first)
    keep = keep.reshape(-1) if keep is not None else None
    total = first.numel()
    for start in range(0, total, _CHUNK_ELEMENTS) if total else ():
        stop = min(start + _CHUNK_ELEMENTS, total)
        yield (tuple(f[start:stop].to(device=first.device) for f in flat),
               keep[start:stop] if keep is not None else None)


def typical_position_error(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Median over kept positions (all dims but the last) of max |a - b| over the last dim: what most
    positions differ by, untouched by a few positions where reduced precision drifts."""
    diff = _position_maxima(a, b, mask) if a.dim() and a.numel() else _abs_diff(a, b, mask).amax(dim=-1)
    if mask is not None:
        diff = diff[mask.to(device=diff.device, dtype=torch.bool).expand_as(diff)]
    return float(diff.flatten().median()) if diff.numel() else 0.0


def _position_maxima(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """max |a - b| over the last dim at every position (masked positions 0), whole positions per chunk."""
    _same_shape(a, b)
    width = a.shape[-1]
    rows_a, rows_b = a.detach().reshape(-1, width), b.detach().reshape(-1, width)
    keep = _expand_mask(mask, a).reshape(-1, width) if mask is not None else None
    step = max(1, _CHUNK_ELEMENTS // width)
    return torch.cat([_abs_diff(rows_a[i:i + step], rows_b[i:i + step].to(device=a.device),
                                keep[i:i + step] if keep is not None else None).amax(dim=-1)
                      for i in range(0, rows_a.shape[0], step)]).reshape(a.shape[:-1])


def _unravel(flat_index: int, shape: torch.Size) -> tuple[int, ...]:
    out = []
    for size in reversed(shape):
        out.append(flat_index % size)
        flat_index //= size
    return tuple(reversed(out))


def rms_error(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """sqrt(mean (a - b)^2) in float64 over positions where ``mask`` is True; NaN counts as inf."""
    diff = _abs_diff(a, b, mask)
    kept = int(_expand_mask(mask, diff).sum()) if mask is not None else diff.numel()
    return float((diff.square().sum() / kept).sqrt()) if kept else 0.0


def compare_tensors(out: torch.Tensor, baseline: torch.Tensor, ref: torch.Tensor, *, factor: float,
                    slack_floor: float, mask: torch.Tensor | None = None, what: str = "output",
                    position_names: tuple[str, ...] = (), statistic: str = "max") -> Verdict:
    """error(out, ref) <= factor * error(baseline, ref) + slack, slack = max(slack_floor, 2 * rounding).

    ``baseline`` is the trusted implementation in the same dtype as ``out``; ``ref`` is the
    high-precision truth. ``position_names`` labels the worst position's indices in the message.
    ``statistic`` "max" compares the largest errors, "rms" the root-mean-square errors (slack: the
    floor alone, see below).
    """
    if statistic == "max":
        error, flat_worst, baseline_error, rounding = _max_rule_errors(out, baseline, ref, mask, out.dtype, what)
        worst = _unravel(flat_worst, out.shape) if out.numel() else ()
        # The max error can be one rounding of the output away from the truth even where eager is exact
        slack = max(slack_floor, 2.0 * rounding)
    elif statistic == "rms":
        _require_finite_reference(ref, _expand_mask(mask, ref), what)
        diff = _abs_diff(out, ref, mask)
        worst = _unravel(int(diff.argmax()), diff.shape) if diff.numel() else ()
        del diff
        error, baseline_error = rms_error(out, ref, mask), rms_error(baseline, ref, mask)
        # an RMS over many positions always contains eager's own output rounding, so only the floor is
        # added (the rounding term, 2 ulp of the largest value, would exceed a bf16 RMS error and hide
        # the bias this statistic is for)
        slack = slack_floor
    else:
        raise ValueError(f"unknown error statistic {statistic!r}; known: max, rms")
    allowed = factor * baseline_error + slack
    passed = error <= allowed
    where = ", ".join(f"{n}={i}" for n, i in zip(position_names, worst)) if position_names else str(worst)
    ratio = error / baseline_error if baseline_error else (0.0 if error == 0 else float("inf"))
    located = f"at {where}" if statistic == "max" else f"(largest at {where})"
    message = (f"{what}: {statistic} error {error:.3g} vs reference {located} "
               f"{'<=' if passed else 'EXCEEDS'} allowed {allowed:.3g} "
               f"(= {factor:g} x eager {statistic} error {baseline_error:.3g} + slack {slack:.3g}); ratio {ratio:.3g}")
    if not passed and worst:
        message += (f"; there out={float(out.detach()[worst]):.6g} baseline={float(baseline.detach()[worst]):.6g} "
                    f"ref={float(ref.detach()[worst]):.6g}")
    return Verdict(passed=passed, error=error, baseline_error=baseline_error, allowed=allowed, slack=slack,
                   factor=factor, worst_position=worst, message=message, statistic=statistic)


def attention_error_check(out: torch.Tensor, out_eager_same_dtype: torch.Tensor, ref64: torch.Tensor, *,
                          factor: float, slack_floor: float, mask: torch.Tensor | None = None,
                          name: str = "attention") -> Verdict:
    """The kernel-level rule: an attention output (batch, heads, q_len, head_dim) against fp64.

    ``mask`` (broadcastable, True = compare) excludes e.g. query rows of padding tokens.
    """
    return compare_tensors(out, out_eager_same_dtype, ref64, factor=factor, slack_floor=slack_floor, mask=mask,
                           what=name, position_names=("batch", "head", "query", "dim"))


def first_diverging_layer(hidden_states_impl, hidden_states_eager, hidden_states_ref,
                          mask: torch.Tensor | None, factor: float, slack: float, *,
                          name: str = "hidden states") -> Verdict:
    """Walk per-layer hidden states (index 0 = embeddings) and return the first layer breaking the rule.

    Each argument is a sequence of (batch, tokens, hidden) tensors as returned with
    ``output_hidden_states=True``; ``mask`` is the (batch, tokens) attention mask (1 = real token).
    Returns the first failing layer's verdict, or, when all pass, the verdict of the layer with the
    largest error/allowed so callers can record the tightest margin.
    """
    n = len(hidden_states_impl)
    if not (n == len(hidden_states_eager) == len(hidden_states_ref)):
        raise ValueError(f"hidden-state counts differ: {n}, {len(hidden_states_eager)}, {len(hidden_states_ref)}")
    tightest: Verdict | None = None
    for layer, (h_impl, h_eager, h_ref) in enumerate(zip(hidden_states_impl, hidden_states_eager, hidden_states_ref)):
        v = compare_tensors(h_impl, h_eager, h_ref, factor=factor, slack_floor=slack, mask=mask,
                            what=f"{name}, layer {layer} of {n - 1} (0 = embeddings)",
                            position_names=("batch", "token", "hidden"))
        v = Verdict(**{**v.__dict__, "layer": layer})
        if not v.passed:
            return Verdict(**{**v.__dict__, "message": f"first diverging layer {layer}: {v.message}"})
        if tightest is None or (v.error / v.allowed if v.allowed else 0) > (
                tightest.error / tightest.allowed if tightest.allowed else 0):
            tightest = v
    assert tightest is not None, "no hidden states to compare"
    return Verdict(**{**tightest.__dict__, "message": f"all {n} layers within the rule; tightest {tightest.message}"})

def error_over_allowed(*verdicts) -> float:
    """The quantity harness.equivalence.compare's k x eager rule decides on, for result rows: the largest
    error / allowed error (allowed = k x eager's error + slack) of ``verdicts``; every verdict
    passes exactly when this is <= 1. (Verdict.ratio, error / eager's error, is not decisive: the
    slack lets a near-exact eager be far exceeded in ratio by an error still within rounding.)"""
    def one(v):
        if v.allowed:
            return v.error / v.allowed
        return 0.0 if v.error == 0 else float("inf")

    return max(one(v) for v in verdicts)

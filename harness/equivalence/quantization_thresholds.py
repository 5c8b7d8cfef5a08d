"""The quantization suite's thresholds: the scheme-independent numbers (each with the measurement
behind it), the per-scheme limits the user overrides, and the "quantization" section of the
--thresholds JSON file that sets both.

Each scheme's own limits are its registry record's (harness.backends.quantization: ``limits`` at its
``register`` call, with their measurements), so a new scheme brings its limits with it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from harness.backends.quantization import SCHEMES, SchemeThresholds, get_scheme
from harness.config import read_thresholds_section
from harness.errors import HarnessUsageError


@dataclass(frozen=True)
class QuantizationThresholds:
    """Every quantization threshold that is not a scheme's own, once, plus the user's per-scheme
    overrides. Measured as the schemes' limits are (harness.backends.quantization): SmolLM2-135M-Instruct,
    CPU, fp32 reference, bf16 compute, CI windows and whole corpus."""

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
    # Per-scheme limits set through --thresholds, by registered scheme name; the others are the record's.
    scheme_overrides: dict[str, SchemeThresholds] = field(default_factory=dict)

    def for_scheme(self, name: str) -> SchemeThresholds:
        scheme = get_scheme(name)
        return self.scheme_overrides.get(scheme.name, scheme.limits)


def _threshold_key(name: str) -> str:
    """The spelling a --thresholds key is matched in: '-' and '_' are the same ("nf4-dq", "nf4_dq")."""
    return name.replace("-", "_")


def load_quantization_thresholds(path: str | None) -> QuantizationThresholds:
    """QuantizationThresholds with the "quantization" section of the --thresholds JSON file applied:
    {"quantization": {"nf4": {"max_kld_mean": 0.1}, "footprint_rel_margin": 0.01}}. A scheme's object
    replaces the named limits of its registered ones. Unknown keys are errors."""
    base = QuantizationThresholds()
    section = read_thresholds_section(path, "quantization")
    numbers = {f.name for f in dataclasses.fields(QuantizationThresholds) if f.name != "scheme_overrides"}
    schemes = {_threshold_key(name): name for name in SCHEMES}
    known = sorted(numbers | set(schemes))
    changes, overrides = {}, {}
    for key, value in section.items():
        attr = _threshold_key(key)
        if attr in schemes:
            if not isinstance(value, dict):
                raise HarnessUsageError(f"--thresholds: quantization.{key} must be an object of limits")
            fields = {f.name for f in dataclasses.fields(SchemeThresholds)}
            unknown = sorted(set(value) - fields)
            if unknown:
                raise HarnessUsageError(f"--thresholds: unknown limit(s) {', '.join(unknown)} in quantization.{key}; "
                                        f"known: {', '.join(sorted(fields))}")
            name = schemes[attr]
            overrides[name] = dataclasses.replace(base.for_scheme(name), **{k: float(v) for k, v in value.items()})
        elif attr in numbers:
            changes[attr] = float(value)
        else:
            raise HarnessUsageError(f"--thresholds: unknown quantization threshold {key!r}; known: "
                                    f"{', '.join(known)}")
    return dataclasses.replace(base, scheme_overrides=overrides, **changes)

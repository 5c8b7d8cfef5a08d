"""The quantization schemes: one record each (issue 17).

A record says everything the harness needs to validate one scheme: the transformers config that
loads a model with it, the bytes its weights take (harness.performance.memory.predict_weight_bytes reads the
quantized and statistics bytes from here), its row in the capability matrix and how to probe it,
and whether the memory and speed suites measure it (the double-quantized variants are checked by
the quantization suite only). The quantization suite's thresholds per scheme are
harness.equivalence.quantization.QuantizationThresholds (each number with its measurement). Adding a scheme is
one ``register`` call below.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

from harness.backends import Registry

DOUBLE_QUANT_BLOCKS = 256  # bitsandbytes stores 4-bit absmax in 8 bits, one fp32 scale per 256 blocks


@dataclass(frozen=True)
class QuantScheme:
    name: str
    bits: int
    quant_type: str  # "int8" | "nf4" | "fp4"
    capability: str  # its row in the capability matrix
    double_quant: bool = False
    measured: bool = True  # the memory and speed suites parametrise over it

    def config(self, compute_dtype=None, skip_modules: list[str] | None = None):
        """The transformers BitsAndBytesConfig. skip_modules: extra modules kept unquantized (for
        planted faults; None lets transformers keep the LM head and tied weights in full precision)."""
        import torch
        from transformers import BitsAndBytesConfig

        extra = {} if skip_modules is None else {"llm_int8_skip_modules": list(skip_modules)}
        if self.bits == 8:
            # 6.0: the outlier threshold of the LLM.int8() paper and of transformers' default; feature
            # dimensions with |activation| above it run in 16-bit.
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, **extra)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16, **extra)

    def quantized_bytes(self, linear_weights: int) -> int:
        return math.ceil(linear_weights * self.bits / 8)

    def statistics_bytes(self, linear_weights: int, linear_rows: int, blocksize: int = 64) -> int:
        """int8 (LLM.int8): one fp32 scale per output row; 4-bit: one fp32 absmax per `blocksize`
        weights, or with double quantization that absmax in 8 bits plus one fp32 per 256 blocks."""
        if self.bits == 8:
            return linear_rows * 4
        blocks = math.ceil(linear_weights / blocksize)
        return blocks + math.ceil(blocks / DOUBLE_QUANT_BLOCKS) * 4 if self.double_quant else blocks * 4


SCHEMES: Registry = Registry("quantization scheme")


def register(scheme: QuantScheme) -> QuantScheme:
    return SCHEMES.register(scheme)


def get_scheme(name: str) -> QuantScheme:
    return SCHEMES.get_record(name)


def quantization_config(name: str, compute_dtype=None, skip_modules: list[str] | None = None):
    return get_scheme(name).config(compute_dtype, skip_modules)


def measured_schemes() -> list[str]:
    """The schemes the memory and speed suites measure."""
    return [name for name, scheme in SCHEMES.items() if scheme.measured]


def capability_probes() -> dict[str, QuantScheme]:
    """One scheme per capability row (the first registered), in registry order."""
    rows: dict[str, QuantScheme] = {}
    for scheme in SCHEMES.values():
        rows.setdefault(scheme.capability, scheme)
    return rows


def probe(scheme: QuantScheme, device) -> tuple[bool, str]:
    """Quantize a 64x64 Linear with the scheme's bitsandbytes layer and run it on `device`."""
    from harness.backends.capabilities import try_probe

    if importlib.util.find_spec("bitsandbytes") is None:
        return False, "package bitsandbytes not installed (pip install bitsandbytes)"
    import torch

    def run():
        import bitsandbytes as bnb

        base = torch.nn.Linear(64, 64, bias=False)
        if scheme.bits == 8:
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False, threshold=6.0)
            layer.weight = bnb.nn.Int8Params(base.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        else:
            layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type=scheme.quant_type)
            layer.weight = bnb.nn.Params4bit(base.weight.data.clone(), requires_grad=False, quant_type=scheme.quant_type)
            dtype = torch.bfloat16
        layer = layer.to(device)
        out = layer(torch.randn(2, 64, device=device, dtype=dtype))
        if not torch.isfinite(out).all():
            raise RuntimeError("non-finite output from the quantised layer")

    err = try_probe(run)
    return err is None, err or f"quantised Linear ran on {device.type}"


register(QuantScheme("int8", 8, "int8", capability="bnb_int8"))
register(QuantScheme("nf4", 4, "nf4", capability="bnb_nf4"))
register(QuantScheme("nf4-dq", 4, "nf4", capability="bnb_nf4", double_quant=True, measured=False))
register(QuantScheme("fp4", 4, "fp4", capability="bnb_fp4"))
register(QuantScheme("fp4-dq", 4, "fp4", capability="bnb_fp4", double_quant=True, measured=False))

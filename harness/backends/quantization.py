"""The quantization schemes: one record each (issue 17).

A record says everything the harness needs to validate one scheme: the transformers config that
loads a model with it, the bytes its weights take (harness.performance.predictions.predict_weight_bytes reads the
quantized and statistics bytes from here), its row in the capability matrix and how to probe it,
whether the memory and speed suites measure it (the double-quantized variants are checked by the
quantization suite only), and the quantization suite's acceptance limits for it (``limits``, each
number with its measurement at the ``register`` call; the scheme-independent thresholds and the
--thresholds overrides are harness.equivalence.quantization_thresholds.QuantizationThresholds).
Adding a scheme is one ``register`` call below.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

from harness.backends import Registry

DOUBLE_QUANT_BLOCKS = 256  # bitsandbytes stores 4-bit absmax in 8 bits, one fp32 scale per 256 blocks


@dataclass(frozen=True)
class SchemeThresholds:
    """Acceptance limits for one scheme (its record's ``limits``; where each number comes from is
    written at the ``register`` calls below)."""

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


@dataclass(frozen=True)
class QuantScheme:
    name: str
    bits: int
    quant_type: str  # "int8" | "nf4" | "fp4"
    capability: str  # its row in the capability matrix
    limits: SchemeThresholds  # the quantization suite's acceptance limits (measured, at the register call)
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

    from harness.performance.compile_cache import remembered_probe

    err = remembered_probe(f"bitsandbytes {scheme.capability}", device, None, lambda: try_probe(run),
                           packages=("bitsandbytes",))
    return err is None, err or f"quantised Linear ran on {device.type}"


# ---------------------------------------------------------------------------------------------
# The schemes, each with its acceptance limits. Measured on SmolLM2-135M-Instruct (the default model),
# CPU, fp32 reference, bf16 compute, over the CI windows (2 x 256 tokens, 254 scored) and the whole
# bundled corpus (7 x 512 tokens, 1785 scored). A 135M model is far more sensitive to 4-bit rounding
# than 7B+ models (llama.cpp reports mean KLD ~0.01-0.03 for 4-bit 7B models), so larger models should
# pass these easily; a user accepting a large model tightens them with --thresholds.
#
# Limits sit ~2x the worst measured KLD / ln PPL ratio and ~0.08-0.15 below the measured top-1 and
# top-5 (the binomial standard error of top-1 over 254 tokens is ~0.03 at 0.7).

# Per-layer relative RMSE of the dequantized weight, measured on CPU (fp32 reference) over every
# quantized layer of SmolLM2-135M (210 layers) and of random-weight GPT-NeoX and Gemma-2 checkpoints
# (12 and 21 layers): int8 0.0063-0.0116, nf4 0.091-0.102, fp4 0.121-0.147. The bands sit ~3x outside
# that on each side: a layer whose weight is the reference's (not quantized, or the reference
# computed from the quantized model) reads 0; a 4-bit layer where int8 was asked reads ~10x int8's.
INT8_LAYER_RMSE = {"min_layer_rmse": 0.002, "max_layer_rmse": 0.035}
NF4_LAYER_RMSE = {"min_layer_rmse": 0.03, "max_layer_rmse": 0.3}
FP4_LAYER_RMSE = {"min_layer_rmse": 0.04, "max_layer_rmse": 0.4}

# int8 measured top-1 0.929 / 0.929, top-5 0.923 / 0.926, KLD mean 0.0137 / 0.0153, KLD p99
# 0.060 / 0.093, ln PPL ratio 0.002 / 0.022 (CI windows / whole corpus).
# Greedy: 12 of 12 tokens on both CI prompts on the H100 (bf16 reference); on CPU (--run-slow only:
# LLM.int8 generation takes seconds per token there) a mean of 9.83 of 32 tokens over the 6 prompts.
register(QuantScheme("int8", 8, "int8", capability="bnb_int8", limits=SchemeThresholds(
    min_top1=0.85, min_top5_overlap=0.85, max_kld_mean=0.03, max_kld_p99=0.2,
    max_ln_ppl_ratio=0.05, min_greedy_prefix=4.0, **INT8_LAYER_RMSE)))

# nf4 measured top-1 0.701 / 0.742, top-5 0.748 / 0.740, KLD mean 0.236 / 0.251, KLD p99
# 0.88 / 1.31, ln PPL ratio 0.204 / 0.212.
# Greedy: nf4 measured a common prefix of 6 and 6 tokens (of 12) on the first two chat prompts.
NF4_LIMITS = SchemeThresholds(
    min_top1=0.6, min_top5_overlap=0.6, max_kld_mean=0.45, max_kld_p99=2.5,
    max_ln_ppl_ratio=0.4, min_greedy_prefix=3.0, **NF4_LAYER_RMSE)
register(QuantScheme("nf4", 4, "nf4", capability="bnb_nf4", limits=NF4_LIMITS))
# Double quantization only re-quantizes the absmax scales (8-bit, blocks of 256): nf4-dq measured
# top-1 0.701, KLD mean 0.236, KLD p99 0.90 on the CI windows, the same as nf4 within the
# statistics' standard error, so it shares nf4's limits.
register(QuantScheme("nf4-dq", 4, "nf4", capability="bnb_nf4", limits=NF4_LIMITS, double_quant=True,
                     measured=False))

# fp4's grid is not fitted to normally distributed weights, so it rounds coarser than nf4: measured
# top-1 0.575 / 0.640, top-5 0.662 / 0.651, KLD mean 0.436 / 0.475, KLD p99 2.05 / 2.26,
# ln PPL ratio 0.385 / 0.397.
FP4_LIMITS = SchemeThresholds(
    min_top1=0.45, min_top5_overlap=0.5, max_kld_mean=0.9, max_kld_p99=4.5,
    max_ln_ppl_ratio=0.8, min_greedy_prefix=1.0, **FP4_LAYER_RMSE)
register(QuantScheme("fp4", 4, "fp4", capability="bnb_fp4", limits=FP4_LIMITS))
# Double quantization changes only the scales' rounding, as for nf4: fp4-dq shares fp4's limits.
register(QuantScheme("fp4-dq", 4, "fp4", capability="bnb_fp4", limits=FP4_LIMITS, double_quant=True,
                     measured=False))

"""The quantization scheme registry (harness.backends.quantization): one record per scheme, read by
the capability matrix, the weight-byte prediction and the suites' parametrisation."""

import dataclasses

import torch

from harness.backends import quantization as schemes
from harness.backends.capabilities import detect
from harness.equivalence.quantization_thresholds import QuantizationThresholds
from harness.performance.predictions import ParameterCounts, predict_weight_bytes

COUNTS = ParameterCounts(total=10_000, linear=8_192, linear_out_features=128, linear_bias=0, input_embedding=1_000,
                         output_embedding=0, tied=True)


def test_each_capability_row_comes_from_the_registry():
    rows = [c.name for c in detect(torch.device("cpu"), torch.float32) if c.category == "quantization"]
    assert rows == list(schemes.capability_probes()) == ["bnb_int8", "bnb_nf4", "bnb_fp4"]


def test_weight_bytes_follow_the_record():
    dense = (COUNTS.total - COUNTS.linear) * 4
    assert predict_weight_bytes(COUNTS, torch.float32, "int8").bytes == dense + 8_192 + 128 * 4
    assert predict_weight_bytes(COUNTS, torch.float32, "nf4").bytes == dense + 4_096 + 128 * 4  # 128 blocks of 64
    # double quantization: 8-bit absmax per block plus one fp32 per 256 blocks
    assert predict_weight_bytes(COUNTS, torch.float32, "nf4-dq").bytes == dense + 4_096 + 128 + 4


def test_a_new_scheme_is_one_register_call(monkeypatch):
    monkeypatch.setattr(schemes, "SCHEMES", schemes.SCHEMES.copy())
    limits = dataclasses.replace(schemes.FP4_LIMITS, max_kld_mean=0.7)
    schemes.register(schemes.QuantScheme("int4-test", 4, "fp4", capability="bnb_fp4", limits=limits))
    assert "int4-test" in schemes.measured_schemes()
    assert QuantizationThresholds().for_scheme("int4-test") is limits  # the quantization suite's limits
    assert predict_weight_bytes(COUNTS, torch.float32, "int4-test").bytes == predict_weight_bytes(
        COUNTS, torch.float32, "fp4").bytes
    assert schemes.quantization_config("int4-test").load_in_4bit

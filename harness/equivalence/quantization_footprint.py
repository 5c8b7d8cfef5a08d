"""The quantized model's weight footprint against its prediction
(harness.performance.predictions.predict_footprint): the check, the plain Linear layers a loaded
model left unquantized (named when the footprint is off), and the bytes of bitsandbytes' scales kept
outside get_memory_footprint() (reported, not checked).
"""

from __future__ import annotations

from harness.performance.predictions import FootprintPrediction


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


"""Per-layer weight reconstruction (llama.cpp's quantize-stats idea): each bitsandbytes layer's weight,
dequantized, against the reference's. A scale that is off by a few percent in one layer hides inside
the model-level noise of quantization (harness.equivalence.quantization_agreement), but not here; and
the relative error's band is a property of the scheme's grid, so these checks hold for any weights,
trained or random.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.backends.quantization import SchemeThresholds


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


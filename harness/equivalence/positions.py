"""Independent reference maths for position encodings: RoPE (with its scaling schemes) and ALiBi.

Written from the papers, in float64, without calling the model's code, so that a suite can hold a
model's rotary embeddings and ALiBi biases against them:

- RoPE: Su et al. 2021, inverse frequencies theta^(-2i/d); cos/sin of position * inv_freq, laid out
  as two concatenated halves (the rotate_half convention used by Llama-family checkpoints).
- linear ("position interpolation", Chen et al. 2023): positions divided by `factor`.
- dynamic NTK (bloc97/emozilla): the base grows with the current length L beyond the trained one:
  theta' = theta * (factor * L / L_train - (factor - 1)) ** (d / (d - 2)).
- llama3 (Llama 3.1 release): wavelengths above L_orig/low_freq_factor divided by `factor`, those
  below L_orig/high_freq_factor kept, a linear blend in 1/wavelength in between.
- YaRN (Peng et al. 2023): per-dimension blend of interpolation and extrapolation by a ramp over
  the dimensions whose rotation count in L_orig lies between beta_slow and beta_fast, and cos/sin
  scaled by the attention factor 0.1 * ln(factor) + 1 (or the mscale ratio when given).
- ALiBi (Press et al. 2022): head h of n gets slope 2^(-8h/n) for n a power of two; otherwise the
  slopes of the closest power of two followed by every other slope of twice that many heads; the
  bias of query i on key j <= i is -slope * (i - j).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from harness.errors import HarnessUsageError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class RopeSpec:
    """The RoPE settings of one model, read from its config (transformers 5.x layouts)."""

    head_dim: int
    theta: float
    rope_type: str
    params: dict
    max_position_embeddings: int
    partial_rotary_factor: float = 1.0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


def rope_spec_from_config(config) -> RopeSpec | None:
    """RoPE settings from `config.rope_parameters` (5.x), falling back to `rope_scaling`/`rope_theta`
    (older layouts); None for models without rotary embeddings (ALiBi, learned positions)."""
    params = getattr(config, "rope_parameters", None)
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        if getattr(config, "rope_theta", None) is not None:
            params.setdefault("rope_theta", config.rope_theta)
    if not params or "rope_theta" not in params or getattr(config, "alibi", False):
        return None
    params = dict(params)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise HarnessUsageError(f"no reference for RoPE type {rope_type!r}; known: {', '.join(ROPE_TYPES)}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    return RopeSpec(head_dim=head_dim, theta=float(params["rope_theta"]), rope_type=rope_type, params=params,
                    max_position_embeddings=int(config.max_position_embeddings), partial_rotary_factor=float(partial))


def _default_inv_freq(theta: float, dim: int):
    import torch

    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    return 1.0 / torch.tensor(theta, dtype=torch.float64) ** exponents


def rope_inverse_frequencies(spec: RopeSpec, seq_len: int):
    """(inv_freq as float64, attention factor) for a forward pass over positions 0..seq_len-1."""
    import torch

    dim, theta, p = spec.rotary_dim, spec.theta, spec.params
    if spec.rope_type == "default":
        return _default_inv_freq(theta, dim), 1.0
    if spec.rope_type == "linear":
        return _default_inv_freq(theta, dim) / float(p["factor"]), 1.0
    if spec.rope_type == "dynamic":
        factor, trained = float(p["factor"]), spec.max_position_embeddings
        length = max(seq_len, trained)
        grown = theta * (factor * length / trained - (factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(grown, dim), 1.0
    original = int(p.get("original_max_position_embeddings") or spec.max_position_embeddings)
    if spec.rope_type == "llama3":
        factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        inv = _default_inv_freq(theta, dim)
        wavelength = 2 * math.pi / inv
        blend = (original / wavelength - low) / (high - low)
        blended = (1 - blend) * inv / factor + blend * inv
        scaled = torch.where(wavelength > original / low, inv / factor, blended)
        return torch.where(wavelength < original / high, inv, scaled), 1.0
    # yarn
    factor = float(p.get("factor") or spec.max_position_embeddings / original)
    beta_fast, beta_slow = float(p.get("beta_fast") or 32), float(p.get("beta_slow") or 1)

    def dim_for_rotations(rotations: float) -> float:
        # the dimension index whose wavelength fits `rotations` times into the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolated = _default_inv_freq(theta, dim)
    inv = extrapolated / factor * ramp + extrapolated * (1 - ramp)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    return inv, float(attention_factor)


def rope_cos_sin(spec: RopeSpec, position_ids):
    """Reference (cos, sin, angles) in float64 for `position_ids` (any shape); last dim = rotary_dim."""
    import torch

    positions = torch.as_tensor(position_ids, dtype=torch.float64)
    seq_len = int(positions.max().item()) + 1
    inv_freq, attention_factor = rope_inverse_frequencies(spec, seq_len)
    angles = positions[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor, emb


def alibi_slopes(num_heads: int):
    """The ALiBi paper's per-head slopes (float64), including its rule for non-powers of two."""
    import torch

    def power_of_two_slopes(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    closest = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two_slopes(closest)
    if closest != num_heads:
        slopes += power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float64)


def alibi_bias(num_heads: int, length: int):
    """Reference ALiBi bias [heads, query, key] (float64): -slope * (i - j) on and below the diagonal,
    -inf above it (causal)."""
    import torch

    i = torch.arange(length, dtype=torch.float64)[:, None]
    j = torch.arange(length, dtype=torch.float64)[None, :]
    distance = (i - j)
    bias = -alibi_slopes(num_heads)[:, None, None] * distance
    return bias.masked_fill(distance < 0, float("-inf"))


# ---------------------------------------------------------------------------------------------
# Observing what a model computes (no maths of the model's own is reused)


def find_rotary_module(model):
    """The model's rotary embedding module (the one holding `inv_freq`), or None."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "forward"):
            return module
    return None


def model_rope_cos_sin(rotary, position_ids):
    """(cos, sin) the model's rotary module produces for `position_ids` [batch, seq], in float32."""
    import torch

    probe = torch.zeros(1, dtype=torch.float32, device=rotary.inv_freq.device)
    with torch.no_grad():
        cos, sin = rotary(probe, position_ids.to(probe.device))
    return cos.double().cpu(), sin.double().cpu()


def rope_error_units(model_cos, model_sin, ref_cos, ref_sin, angles):
    """max over positions/dims of |model - reference| / (fp32 eps x (|angle| + 1)), and where."""
    import torch

    error = torch.maximum((model_cos - ref_cos).abs(), (model_sin - ref_sin).abs())
    units = error / (torch.finfo(torch.float32).eps * (angles.abs() + 1))
    flat = int(units.argmax())
    position, dim = divmod(flat, units.shape[-1])
    return float(units.max()), float(error.max()), position, dim


def captured_attention_masks(model, input_ids) -> list:
    """The additive attention mask each attention layer received in one forward pass (Falcon and
    BLOOM fold ALiBi into it), captured by forward pre-hooks on modules named *attention."""
    import torch

    captured, handles = [], []
    for name, module in model.named_modules():
        if name.endswith(("self_attention", "self_attn")):
            def hook(mod, args, kwargs):
                mask = kwargs.get("attention_mask")
                if mask is None and len(args) > 2:
                    mask = args[2]
                captured.append(mask)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=input_ids.to(model.device))
    finally:
        for h in handles:
            h.remove()
    return captured


def relative_bias(mask, scale: float = 1.0):
    """[heads, q, k] bias of key j relative to the query's own position (mask[i, j] - mask[i, i]),
    times `scale`; row constants cancel in softmax, so this is the part attention sees."""
    import torch

    m = mask[0].double().cpu()
    return (m - torch.diagonal(m, dim1=-2, dim2=-1)[..., None]) * scale

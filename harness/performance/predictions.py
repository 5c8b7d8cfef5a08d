"""What the measurements are compared with: parameter counts and weight bytes per quantization
scheme (from a config, and the weight footprint of a loaded reference once quantized), the attention
shape and the KV-cache formula, the N x N score matrices eager attention materialises, and the fit of
peak memory against sequence length.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


def quantized_linears(model) -> dict:
    """name -> layer for every nn.Linear bitsandbytes quantizes when transformers loads the model: all
    but the output embedding (transformers keeps the LM head, and any weight tied to it, unquantized)."""
    import torch

    out = model.get_output_embeddings()
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not out}


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of a model built from its config on the meta device (nothing allocated)."""

    total: int
    linear: int           # weights of nn.Linear layers that bitsandbytes would quantise
    linear_out_features: int  # summed rows of those layers (int8 keeps one fp32 scale per row)
    linear_bias: int
    input_embedding: int  # the token table; decode reads only `batch` rows of it
    output_embedding: int  # the LM head (0 when tied to the input table)
    tied: bool

    @property
    def kept_dense(self) -> int:
        """Parameters every scheme leaves in the compute dtype: embeddings, norms, biases, LM head."""
        return self.total - self.linear


def parameter_counts(config) -> ParameterCounts:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and out.weight is inp.weight
    linear = rows = bias = 0
    for module in quantized_linears(model).values():
        linear += module.weight.numel()
        rows += module.out_features
        bias += module.bias.numel() if module.bias is not None else 0
    total = sum(p.numel() for p in model.parameters())
    return ParameterCounts(total=total, linear=linear, linear_out_features=rows, linear_bias=bias,
                           input_embedding=inp.weight.numel(),
                           output_embedding=0 if tied or out is None else out.weight.numel(), tied=tied)


@dataclass(frozen=True)
class WeightPrediction:
    scheme: str
    bytes: int
    breakdown: dict = field(default_factory=dict)


def predict_weight_bytes(counts: ParameterCounts, dtype, scheme: str = "none", *, blocksize: int = 64) -> WeightPrediction:
    """Bytes of the weights once loaded. `dtype` is the compute dtype of what stays dense.

    - none: params x bytes per element (the seed's "2 x billions of params GB" in bf16).
    - a quantization scheme (harness.backends.quantization): every linear weight but the LM head at
      the scheme's bits, plus its statistics (int8: one fp32 scale per output row; 4-bit: one fp32
      absmax per `blocksize` weights, 8-bit absmax with double quantization); everything else dense.
    """
    import torch

    from harness.backends.quantization import get_scheme

    dense_size = torch.empty((), dtype=dtype).element_size()
    if scheme == "none":
        return WeightPrediction(scheme, counts.total * dense_size, {"dense": counts.total * dense_size})
    record = get_scheme(scheme)
    dense = counts.kept_dense * dense_size
    quant = record.quantized_bytes(counts.linear)
    stats = record.statistics_bytes(counts.linear, counts.linear_out_features, blocksize)
    return WeightPrediction(scheme, dense + quant + stats, {"dense": dense, "quantized": quant, "statistics": stats})


@dataclass
class FootprintPrediction:
    reference_bytes: int   # the reference model's get_memory_footprint()
    predicted_bytes: int   # what the quantized model's get_memory_footprint() should report
    quantized_layers: int
    kept_layers: list[str]  # Linear layers kept in higher precision

    @property
    def predicted_ratio(self) -> float:
        return self.predicted_bytes / self.reference_bytes


def predict_footprint(reference_model, scheme: str, *, quantized_dtype=None) -> FootprintPrediction:
    """Bytes the quantized model's parameters and buffers should take: every nn.Linear weight except the
    LM head (transformers keeps the output embedding and tied weights unquantized) at the scheme's
    quantized bytes (1 byte for int8, 1/2 byte for 4-bit, two values per uint8); embeddings, norms,
    biases and the kept layers at the element size of `quantized_dtype` (default: the reference's).
    bitsandbytes' quant state (absmax, SCB) lives outside parameters and buffers, so
    get_memory_footprint() does not count it; neither do we (predict_weight_bytes' "statistics" does).
    Unlike predict_weight_bytes, it reads the loaded model, so buffers count too."""
    import torch

    from harness.backends.quantization import get_scheme

    record = get_scheme(scheme)
    quantized = quantized_linears(reference_model)
    kept_layers = [name for name, module in reference_model.named_modules()
                   if isinstance(module, torch.nn.Linear) and name not in quantized]
    quantized_weights = {id(module.weight) for module in quantized.values()}
    seen: set[int] = set()
    total = 0
    for tensor in list(reference_model.parameters()) + list(reference_model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if id(tensor) in quantized_weights:
            total += record.quantized_bytes(tensor.numel())
        else:
            size = torch.empty((), dtype=quantized_dtype).element_size() if (
                quantized_dtype is not None and tensor.is_floating_point()) else tensor.element_size()
            total += tensor.numel() * size
    return FootprintPrediction(reference_model.get_memory_footprint(), total, len(quantized), kept_layers)


@dataclass(frozen=True)
class AttentionShape:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    sliding_window: int | None = None


def attention_shape(config) -> AttentionShape:
    """Layers, heads, KV heads (as the cache stores them) and head size from any decoder config
    (Llama, Mistral, GPT-2, Falcon, ...; a multimodal config's text decoder)."""
    config = config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or heads
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        kv = 1  # Falcon's original multi-query attention: one K/V head shared by all queries
    return AttentionShape(layers=config.num_hidden_layers, heads=heads, kv_heads=kv, head_dim=head_dim,
                          sliding_window=getattr(config, "sliding_window", None) or None)


def kv_cache_bytes(shape: AttentionShape, seq_len: int, batch: int, bytes_per_element: int,
                   layer_lengths: list[int] | None = None) -> int:
    """The KV-cache formula: 2 (K and V) x layers x kv_heads x head_dim x seq_len x batch x bytes,
    summed per layer when layers hold different lengths (`layer_lengths`: a sliding-window layer
    holds at most its window, a static layer always max_cache_len slots). GQA/MQA shrink kv_heads,
    which is the whole saving they offer."""
    per_token = 2 * shape.kv_heads * shape.head_dim * batch * bytes_per_element
    if layer_lengths is None:
        return per_token * shape.layers * seq_len
    if len(layer_lengths) != shape.layers:
        raise ValueError(f"{len(layer_lengths)} layer lengths for {shape.layers} layers")
    return per_token * sum(layer_lengths)


def mha_equivalent(shape: AttentionShape) -> AttentionShape:
    """The same width with one KV head per query head: what GQA/MQA are saving against."""
    return dataclasses.replace(shape, kv_heads=shape.heads)


def kv_bytes_per_token(shape: AttentionShape, dtype) -> int:
    import torch

    return kv_cache_bytes(shape, 1, 1, torch.empty((), dtype=dtype).element_size())


def predict_kv_cache_bytes(shape: AttentionShape, batch: int, seq_len: int, dtype) -> int:
    """K and V for every layer: 2 x layers x batch x kv_heads x head_dim x tokens x bytes."""
    return kv_bytes_per_token(shape, dtype) * batch * seq_len


def attention_scores_bytes(batch: int, heads: int, q_len: int, kv_len: int, dtype) -> int:
    """One batch x heads x q_len x kv_len score matrix, the tensor flash/SDPA kernels never build."""
    import torch

    return batch * heads * q_len * kv_len * torch.empty((), dtype=dtype).element_size()


def eager_attention_live_scores(dtype) -> float:
    """How many score matrices (in `dtype` units) transformers' eager attention holds at once.

    `eager_attention_forward`: scores = q @ k^T * scale (1); scores + mask makes a new tensor while
    the old one is still bound (2); softmax is taken in fp32 and cast back. In fp32 the softmax
    output replaces one (2 at peak). In half precision the fp32 softmax is 2 units and its cast
    back 1 more, while the masked scores are still bound: 1 + 2 + 1 = 4."""
    import torch

    return 2.0 if dtype == torch.float32 else 4.0


def predict_eager_attention_peak_bytes(shape: AttentionShape, batch: int, seq_len: int, dtype) -> int:
    """Extra peak memory of eager over a fused kernel in one prefill layer: the live score
    matrices plus the materialised batch x 1 x N x N additive mask."""
    scores = attention_scores_bytes(batch, shape.heads, seq_len, seq_len, dtype)
    mask = attention_scores_bytes(batch, 1, seq_len, seq_len, dtype)
    return int(eager_attention_live_scores(dtype) * scores + mask)


# ---------------------------------------------------------------------------------------------
# Growth of peak memory with sequence length


@dataclass(frozen=True)
class GrowthFit:
    """increase(N) ~ quadratic*N^2 + linear*N + constant, fitted by least squares, plus the
    log-log slope between the two longest lengths (2 = quadratic, 1 = linear)."""

    lengths: tuple[int, ...]
    increases: tuple[int, ...]
    quadratic: float
    linear: float
    constant: float
    exponent: float

    def quadratic_share(self) -> float:
        """Fraction of the fitted increase at the longest length due to the N^2 term."""
        n = self.lengths[-1]
        total = self.quadratic * n * n + self.linear * n + self.constant
        return self.quadratic * n * n / total if total > 0 else float("nan")


def fit_growth(lengths, increases) -> GrowthFit:
    import numpy as np

    pairs = sorted(zip(lengths, increases))
    n = np.array([p[0] for p in pairs], dtype=float)
    y = np.array([p[1] for p in pairs], dtype=float)
    quadratic, linear, constant = np.polyfit(n, y, 2)
    lo, hi = max(y[-2], 1.0), max(y[-1], 1.0)
    exponent = math.log(hi / lo) / math.log(n[-1] / n[-2])
    return GrowthFit(tuple(int(v) for v in n), tuple(int(v) for v in y), float(quadratic), float(linear),
                     float(constant), exponent)


SCALING_CHECK = "prefill peak memory vs length"  # results of this check are plotted by the report

"""The KV-cache types: one record each (issue 17).

A record builds the cache (or the generate() arguments that ask for it), says where it does not
apply (a model without sliding layers, a CPU run, a missing quantization backend) and whether it is
lossy by design (compared at harness.equivalence.tolerances.QUANTIZED_KV_PRECISION). The cache-equivalence and
KV-memory suites parametrise over ``CACHE_TYPES``; adding a cache type is one entry there.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable

from harness.backends import Registry
from harness.inference.generation import GreedyRun, cache_kwarg, greedy, new_tokens_default


def layer_types(model) -> list[str]:
    """'full_attention' / 'sliding_attention' / ... per decoder layer, as transformers' caches see them."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, _ = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    return list(types)


def has_sliding_layers(model) -> bool:
    return any(t in ("sliding_attention", "chunked_attention") for t in layer_types(model))


def supports_static_cache(model) -> str | None:
    """None when StaticCache applies, else the reason it does not."""
    if not getattr(model, "_can_compile_fullgraph", False):
        return f"{type(model).__name__} does not declare static-cache/compile support in transformers"
    if getattr(model.config, "alibi", False):
        # Falcon sizes its ALiBi bias from the attention mask, not the static cache's length.
        return f"{type(model).__name__} with ALiBi builds its bias for the mask length, not a static cache (transformers limitation)"
    return None


def fp8_kv_available() -> bool:
    from transformers import cache_utils

    return hasattr(cache_utils, "Fp8QuantizedLayer")


@dataclass(frozen=True)
class CacheType:
    """A KV cache transformers offers. build(model, max_cache_len) returns a fresh cache object;
    not_applicable(model, device) is None or the reason to skip. lossy: stores K/V in fewer bits,
    so it is compared with its own looser rule, never the exact one."""

    name: str
    description: str
    build: Callable
    not_applicable: Callable = field(default=lambda model, device: None)
    lossy: bool = False
    # (what, the transformers release that fixed it): a bug of older releases that shows on an accelerator
    accelerator_bug: tuple[str, tuple[int, int]] | None = None
    # tokens_per_layer(model, fed_tokens, max_cache_len) -> the tokens each layer holds, for a cache
    # that stores K and V in the model's dtype, so its bytes must equal harness.performance.predictions'
    # kv_cache_bytes formula (the KV-memory suite checks every such type); None: it compresses or
    # moves its tensors, so the formula does not describe it
    tokens_per_layer: Callable | None = None


def _dynamic(model, max_cache_len):
    from transformers import DynamicCache

    return DynamicCache()


def _dynamic_with_config(model, max_cache_len):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _static(model, max_cache_len, offloading: bool = False):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_cache_len, offloading=offloading)


def _offloaded(model, max_cache_len):
    from transformers import DynamicCache

    return DynamicCache(config=model.config, offloading=True)


def _quantized(backend: str):
    def build(model, max_cache_len):
        from transformers import QuantizedCache

        if backend == "fp8":
            return QuantizedCache(backend="fp8", config=model.config)
        # residual_length keeps the newest tokens unquantised; set it below N so the comparison
        # really reads quantised keys/values.
        return QuantizedCache(backend=backend, config=model.config, nbits=4, q_group_size=16, residual_length=8)

    return build


def _layer_lengths(*, preallocated: bool, windowed: bool):
    """Full layers hold every fed token (growing caches) or max_cache_len slots (preallocated ones);
    window layers, where the cache keeps windows, hold at most the window (views of a window-sized buffer)."""
    def lengths(model, fed_tokens: int, max_cache_len: int) -> list[int]:
        window = getattr(model.config, "sliding_window", None)
        length = max_cache_len if preallocated else fed_tokens
        return [min(length, window) if windowed and kind == "sliding_attention" else length
                for kind in layer_types(model)]

    return lengths


def _needs_sliding(model, device):
    return None if has_sliding_layers(model) else "model has no sliding-window layers (nothing for a window cache to drop)"


def _needs_accelerator(model, device):
    if getattr(device, "type", str(device)) == "cpu":
        return "offloading moves cache layers from an accelerator to CPU; this run is on CPU"
    return None


def _static_needs(offloading: bool):
    def check(model, device):
        return (offloading and _needs_accelerator(model, device)) or supports_static_cache(model)

    return check


def _quantized_needs(backend: str):
    packages = {"quanto": ("optimum.quanto", "optimum-quanto"), "hqq": ("hqq", "hqq")}

    def check(model, device):
        import transformers

        if backend == "fp8" and not fp8_kv_available():
            return f"transformers {transformers.__version__} has no fp8 KV-cache backend (added after 5.17)"
        if backend in packages:
            module, dist = packages[backend]
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                return f"QuantizedCache backend {backend!r} needs the package {dist}, which is not installed"
        if has_sliding_layers(model):
            return "QuantizedCache supports full-attention layers only; this model has sliding-window layers"
        return None

    return check


# transformers 5.17-5.19 (cache_utils.Cache.update): the next offloaded layer is copied back on a side
# stream that waits for nothing on the default stream, so it can read a layer whose copy to the CPU is
# still running; 5.20 makes the side stream wait. Seen on an H100 with four gate processes on the GPU:
# offloaded-static's logits 0.80 away from the uncached run's at the first decoded step (session 12),
# then both offloaded cache types in one warm gate (session 13).
OFFLOAD_PREFETCH_RACE = ("the offloaded cache prefetches a layer on a side stream without waiting for its copy "
                         "to the CPU (a race: now and then stale keys and values)", (5, 20))

CACHE_TYPES: Registry = Registry("cache type")
for _cache_type in [
    CacheType("dynamic", "DynamicCache without a config: full-length layers, grows by concatenation", _dynamic,
              tokens_per_layer=_layer_lengths(preallocated=False, windowed=False)),
    CacheType("sliding-window", "DynamicCache(config): sliding-window layers keep only the window",
              _dynamic_with_config, _needs_sliding, tokens_per_layer=_layer_lengths(preallocated=False, windowed=True)),
    CacheType("static", "StaticCache: preallocated max_cache_len slots (sliding/hybrid layers per the config)",
              _static, _static_needs(False), tokens_per_layer=_layer_lengths(preallocated=True, windowed=True)),
    CacheType("offloaded", "DynamicCache(offloading=True): layers parked on CPU between uses",
              _offloaded, _needs_accelerator, accelerator_bug=OFFLOAD_PREFETCH_RACE),
    CacheType("offloaded-static", "StaticCache(offloading=True)",
              lambda model, n: _static(model, n, offloading=True), _static_needs(True),
              accelerator_bug=OFFLOAD_PREFETCH_RACE),
    CacheType("quantized-quanto", "QuantizedCache, quanto int4 backend", _quantized("quanto"), _quantized_needs("quanto"), lossy=True),
    CacheType("quantized-hqq", "QuantizedCache, HQQ int4 backend", _quantized("hqq"), _quantized_needs("hqq"), lossy=True),
    CacheType("quantized-fp8", "QuantizedCache, fp8 e4m3 per-tensor backend", _quantized("fp8"), _quantized_needs("fp8"), lossy=True),
]:
    CACHE_TYPES.register(_cache_type)


def get_cache_type(name: str) -> CacheType:
    return CACHE_TYPES.get_record(name)


def formula_sized_cache_types() -> list[str]:
    """The cache types whose bytes the KV-cache formula predicts exactly."""
    return [name for name, kind in CACHE_TYPES.items() if kind.tokens_per_layer is not None]


def cached_run(model, inputs, cache_type: CacheType | str, *, pad_token_id: int, new_tokens: int | None = None,
               **kwargs) -> GreedyRun:
    """Greedy run with a fresh cache of `cache_type` passed as past_key_values."""
    kind = get_cache_type(cache_type) if isinstance(cache_type, str) else cache_type
    n = new_tokens or new_tokens_default()
    cache = kind.build(model, inputs["input_ids"].shape[1] + n)
    kwargs[cache_kwarg()] = cache
    # On GPU generate() would compile the decode step of a static cache by itself; the compiled
    # path has its own test, so this one stays eager.
    kwargs.setdefault("disable_compile", True)
    return greedy(model, inputs, label=f"{kind.name} cache", pad_token_id=pad_token_id, new_tokens=n, **kwargs)



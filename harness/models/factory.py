"""Variants of one model under test (attention implementation, dtype, quantization), each loaded
once per run, within a memory policy: the harness's model factory (the plugin's ``model_factory``
fixture wraps it, turning a refused variant into a skip)."""

from __future__ import annotations

from harness.backends.capabilities import dtype_name
from harness.config import format_bytes
from harness.errors import VariantRefused
from harness.performance.memory import release_device_memory
from harness.models.capabilities import refusal_reason


class ModelFactory:
    """Loads variants of one model under test, each once per run.

    The run's own variant (eager attention, run dtype) stays loaded: the ``reference_model``
    fixture holds it for the whole session anyway. Other variants share what is left of a share
    of the device's memory (on CUDA, `variant_memory_share` of it; otherwise at most `keep`), least
    recently used first out, so a 7B model in bf16 keeps one extra variant instead of running the
    device out of memory for the activations the suites measure."""

    variant_memory_share = 0.25
    # Free device memory a new variant must leave beside its weights (activations, references): on an
    # 80 GB H100 the float32 pass of a 7B model in bf16 (27 GB of weights beside the run's 13.5 GB)
    # ran the device out of memory in session 12; a variant that cannot fit is a skip with the numbers.
    activation_headroom_share = 0.05

    def __init__(self, spec, device, dtype, keep: int = 3, refused=None, on_refusal=None):
        self.spec, self.device, self.dtype, self.keep = spec, device, dtype, keep
        self._cache: dict[tuple, object] = {}
        self._base_key = ("eager", str(dtype), None)
        # attn_implementation -> transformers' reason: from the model's capability probe, or found
        # by a load (then on_refusal records it)
        self.refused: dict[str, str] = dict(refused or {})
        self._on_refusal = on_refusal

    def __call__(self, attn_implementation: str = "eager", dtype=None, quantization=None, quantization_config=None):
        """The variant, loaded on first use. quantization: a hashable name for the scheme;
        quantization_config: the transformers config. Raises VariantRefused (with the reason) for
        a variant transformers refuses for this model, HarnessUsageError for bad input."""
        from harness.models.loading import load_model

        dtype = dtype or self.dtype
        key = (attn_implementation, str(dtype), quantization)
        if attn_implementation in self.refused:
            raise VariantRefused(self.refused[attn_implementation])
        if key not in self._cache:
            self._make_room(key)
            if quantization is None:
                self._refuse_unless_it_fits(attn_implementation, dtype)
            try:
                self._cache[key] = load_model(self.spec, device=self.device, dtype=dtype,
                                              attn_implementation=attn_implementation,
                                              quantization_config=quantization_config)
            except VariantRefused as exc:
                reason = refusal_reason(self.spec.name, attn_implementation, str(exc).split("(", 1)[-1].rstrip(")"))
                self.refused[attn_implementation] = reason
                if self._on_refusal is not None:
                    self._on_refusal(attn_implementation, reason)
                raise VariantRefused(reason) from None
        else:
            self._cache[key] = self._cache.pop(key)  # most recently used last
        return self._cache[key]

    def _other_variants(self) -> list[tuple]:
        """Every loaded variant but the run's own, least recently used first."""
        return [k for k in self._cache if k != self._base_key]

    def _evict(self, keys) -> None:
        for key in keys:
            self._cache.pop(key)
        release_device_memory(self.device)  # garbage and cached blocks count as used until returned

    def _make_room(self, key) -> None:
        if key == self._base_key:
            return
        while True:
            variants = self._other_variants()
            if not variants or len(variants) < self._variant_slots():
                return
            self._evict(variants[:1])

    def _refuse_unless_it_fits(self, attn_implementation: str, dtype) -> None:
        """VariantRefused (a skip, not recorded as the implementation's refusal) when the variant's
        weights, predicted from the run's own variant, would not fit in the device's free memory once
        every other variant is evicted (on the 7B gate on an H100, session 12: 23 GiB free for a
        25 GiB float32 copy, one 12.5 GiB bf16 variant evictable; the attention-model suite's float32
        reference held the rest)."""
        base = self._cache.get(self._base_key)
        if self.device.type != "cuda" or base is None:
            return
        import torch

        need = _model_bytes(base) // base.dtype.itemsize * torch.empty((), dtype=dtype).element_size()

        def fits() -> tuple[bool, int, int]:
            free, total = free_device_bytes(self.device)
            return need <= free - self.activation_headroom_share * total, free, total

        if fits()[0]:
            return
        self._evict(self._other_variants())  # every other variant makes way first
        fitting, free, total = fits()
        if not fitting:
            raise VariantRefused(
                f"{self.spec.name} with {attn_implementation} in {dtype_name(dtype)} needs "
                f"{format_bytes(need)} of weights; {format_bytes(free)} of the device's {format_bytes(total)} "
                f"are free ({self.activation_headroom_share:.0%} kept for activations; the run's own variant "
                "and the references hold the rest)")

    def _variant_slots(self) -> int:
        if self.device.type != "cuda" or not self._cache:
            return self.keep
        import torch

        sizes = [_model_bytes(m) for m in self._cache.values()]
        share = self.variant_memory_share * torch.cuda.get_device_properties(self.device).total_memory
        return max(1, min(self.keep, int(share // max(sizes))))

    def clear(self) -> None:
        self._cache.clear()
        release_device_memory(self.device)


def free_device_bytes(device) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device, as the driver counts them (every process's use)."""
    import torch

    return torch.cuda.mem_get_info(device)


def _model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])

import os

from harness.config import cache_root

pytest_plugins = ["pytester"]

# pytester points HOME at each test's temporary directory, which moved the default cache
# (~/.cache/llm-harness) with it: every in-process suite run converted the GGUF again (~35 s each,
# 12+ runs). The converted model is read-only input, so the tests share the user's cache.
os.environ.setdefault("LLM_HARNESS_CACHE", str(cache_root()))


def _preload_lazy_modules() -> None:
    """pytester's in-process runs drop modules first imported inside them; torch's distributed
    ops cannot be registered twice, so import every model family the tests build up front."""
    import torch
    import transformers  # noqa: F401

    from harness.presets import TINY_PRESETS, build_preset

    for name in TINY_PRESETS:
        build_preset(name, torch.device("cpu"), torch.float32)
    import torch.distributed._functional_collectives  # noqa: F401
    import transformers.generation  # noqa: F401

    # quantised loading imports bitsandbytes and transformers' integration lazily; a copy dropped
    # after one in-process run leaves transformers holding a half-imported module
    import importlib

    for name in ("bitsandbytes", "transformers.integrations.bitsandbytes", "transformers.quantizers.auto",
                 "transformers.quantizers.quantizer_bnb_8bit", "transformers.quantizers.quantizer_bnb_4bit",
                 "transformers.integrations.ggml", "gguf"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # absent here: the tests that need it skip


_preload_lazy_modules()

pytest_plugins = ["pytester"]


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


_preload_lazy_modules()

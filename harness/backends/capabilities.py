"""Which backends can run on this machine, and exactly why not when they cannot.

Each probe runs the backend for real on a tiny input where that is cheap (SDPA backends, flex
attention, bitsandbytes), because version checks alone miss broken builds and unsupported dtypes.
The attention backends' probes are their records in harness.backends.attention.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Capability:
    name: str
    category: str
    available: bool
    reason: str  # why not, or what was found when available

    def to_dict(self) -> dict:
        return asdict(self)




def resolve_device(text: str):
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device, or a one-line usage error."""
    import torch

    from harness.errors import HarnessUsageError

    text = (text or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            built = "built without CUDA" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise HarnessUsageError(f"--device {text}: no CUDA device is visible (torch {torch.__version__} {built})")
        dev = torch.device(text)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise HarnessUsageError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return dev
    raise HarnessUsageError(f"--device {text}: use auto, cpu, cuda or cuda:N")


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> 'bfloat16': the name the CLI, the rules and the report use."""
    return str(dtype).removeprefix("torch.")


DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64", "fp64": "float64"}


def resolve_dtype(text: str, device):
    """'auto' picks bf16 on CUDA and fp32 on CPU; a dtype the device cannot compute is an error."""
    import torch

    from harness.errors import HarnessUsageError

    text = (text or "auto").strip().lower()
    if text == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if text not in DTYPES:
        raise HarnessUsageError(f"--dtype {text}: unsupported; use one of auto, float32, bfloat16, float16")
    dtype = getattr(torch, DTYPES[text])
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name(device)
            raise HarnessUsageError(f"--dtype bfloat16: {name} has no bfloat16 support; use float16")
    try:
        a = torch.ones(4, 4, dtype=dtype, device=device)
        (a @ a).sum().item()
    except (RuntimeError, TypeError) as exc:
        raise HarnessUsageError(f"--dtype {text}: matrix products in {dtype} fail on {device} ({str(exc).splitlines()[0]})") from None
    return dtype


def try_probe(fn) -> str | None:
    """Run a probe; None if it worked, else the first line of what went wrong (warnings included)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        except Exception as exc:  # a probe's failure is data, whatever its type
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hints = [str(w.message).splitlines()[0] for w in caught if "kernel" in str(w.message).lower()]
            return "; ".join([msg] + hints[:2])[:300]
    return None


def _nvml() -> Capability:
    if importlib.util.find_spec("pynvml") is None:
        return Capability("nvml", "memory", False, "package missing: nvidia-ml-py")
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        driver = pynvml.nvmlSystemGetDriverVersion()
        return Capability("nvml", "memory", True, f"{count} device(s), driver {driver}")
    except Exception as exc:
        return Capability("nvml", "memory", False, f"NVML unavailable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")




@functools.lru_cache(maxsize=8)
def detect(device, dtype) -> tuple[Capability, ...]:
    """The capability matrix for `device` and the run's `dtype` (probed once per process)."""
    import torch

    from harness.backends.attention import ATTENTION_BACKENDS

    caps = [backend.capability(device, dtype) for backend in ATTENTION_BACKENDS.values()]
    from harness.backends import quantization

    for name, scheme in quantization.capability_probes().items():
        available, reason = quantization.probe(scheme, device)
        caps.append(Capability(name, "quantization", available, reason))
    caps.append(_nvml() if device.type == "cuda" else Capability("nvml", "memory", False, "no CUDA device in this run"))
    caps.append(Capability("cuda", "device", torch.cuda.is_available(),
                           torch.cuda.get_device_name(0) if torch.cuda.is_available() else
                           f"torch {torch.__version__} sees no CUDA device"))
    return tuple(caps)


def as_table(caps) -> list[str]:
    width = max(len(c.name) for c in caps)
    return [f"  {c.name:<{width}}  {'yes' if c.available else 'no ':<3}  {c.reason}" for c in caps]


def by_name(caps) -> dict[str, Capability]:
    return {c.name: c for c in caps}


# Bugs of older transformers releases the suites run into (found on the H100 with 5.17; the same
# tests pass on 5.24, the CI version). Where one occurs on an older release the test becomes an
# expected failure naming it (the plugin's ``known_transformers_bug`` fixture), so the report shows
# it and an upgrade shows up as a pass.
TRANSFORMERS_FIXED_IN = (5, 24)


def older_transformers(fixed_in: tuple[int, int] = TRANSFORMERS_FIXED_IN) -> str | None:
    """The installed transformers version when it is older than ``fixed_in``, else None."""
    import transformers
    from packaging.version import Version

    v = Version(transformers.__version__)
    return transformers.__version__ if (v.major, v.minor) < fixed_in else None

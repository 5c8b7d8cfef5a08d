"""What the model under test accepts, asked of transformers before any test runs.

The device's capability matrix (harness.backends.capabilities) says which backends this machine can run; this
says which of them this model's transformers code accepts. Each attn_implementation the device can
run is tried by building the model from its config on the meta device (no weights read, a fraction
of a second), so the answer and its reason are transformers' own check, not a table kept here. A
package that is missing is the device's row, not the model's, and is left out.
"""

from __future__ import annotations

from harness.backends.capabilities import Capability


def model_category(model_name: str) -> str:
    return f"model {model_name}"


def refusal_reason(model_name: str, attn_implementation: str, transformers_says: str) -> str:
    """The one wording of "this model cannot use this implementation" (probe and model factory)."""
    first_sentence = transformers_says.split(". ")[0].strip()
    return f"{model_name} refuses attn_implementation={attn_implementation} (transformers: {first_sentence})"


def probe_model(spec, device_caps) -> tuple[Capability, ...]:
    """One row per attn_implementation the device can run, plus the static cache; never raises:
    a config that cannot be read is one row saying so (loading the model will say it again)."""
    import torch
    from transformers import AutoModelForCausalLM

    from harness.backends.attention import ATTENTION_BACKENDS
    from harness.backends.cache import supports_static_cache
    from harness.errors import first_line
    from harness.models.loading import model_config

    category = model_category(spec.name)
    try:
        config = model_config(spec)
    except Exception as exc:  # noqa: BLE001 - reported as the row's reason
        return (Capability("config", category, False, f"cannot read the config: {type(exc).__name__}: {first_line(exc)}"),)
    runnable = {c.name for c in device_caps if c.available}
    implementations = list(dict.fromkeys(b.attn_implementation for b in ATTENTION_BACKENDS.values() if b.name in runnable))
    rows, built = [], None
    for impl in implementations:
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, attn_implementation=impl,
                                                         trust_remote_code=getattr(spec, "allow_remote_code", False))
        except ImportError:
            continue  # a package, not the model: the device matrix has that row
        except Exception as exc:  # noqa: BLE001 - transformers raises ValueError, NotImplementedError, ...
            rows.append(Capability(impl, category, False, refusal_reason(spec.name, impl, first_line(exc))))
            continue
        rows.append(Capability(impl, category, True, f"{type(model).__name__} accepts it"))
        built = built or model
    if built is not None:
        why_not = supports_static_cache(built)
        rows.append(Capability("static_cache", category, why_not is None, why_not or "StaticCache + torch.compile applies"))
    return tuple(rows)


def refusals(rows) -> dict[str, str]:
    """attn_implementation -> reason, for the model factory: a refused variant skips without a load."""
    return {c.name: c.reason for c in rows if not c.available and c.name != "static_cache"}


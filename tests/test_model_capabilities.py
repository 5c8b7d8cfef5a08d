"""The model's own capability rows: transformers' answer for each implementation the device runs."""

from harness.backends.capabilities import Capability
from harness.models.capabilities import probe_model, refusals
from harness.models.loading import ModelSpec

DEVICE_RUNS = (Capability("eager", "attention", True, ""), Capability("sdpa_math", "attention", True, ""),
               Capability("flex_attention", "attention", True, ""),
               Capability("flash_attention_2", "attention", False, "package missing"))


def rows_of(preset: str) -> dict[str, Capability]:
    return {c.name: c for c in probe_model(ModelSpec(preset, "preset"), DEVICE_RUNS)}


def test_a_model_that_accepts_every_runnable_implementation_has_only_yes_rows():
    rows = rows_of("tiny:llama")
    assert {name: c.available for name, c in rows.items()} == {
        "eager": True, "sdpa": True, "flex_attention": True, "static_cache": True}
    assert all(c.category == "model tiny:llama" for c in rows.values())


def test_refusals_carry_transformers_reason_and_reach_the_model_factory():
    rows = rows_of("tiny:falcon-alibi")
    assert not rows["flex_attention"].available
    assert "FalconForCausalLM does not support" in rows["flex_attention"].reason
    assert not rows["static_cache"].available and "ALiBi" in rows["static_cache"].reason
    assert refusals(rows.values()) == {"flex_attention": rows["flex_attention"].reason}  # a cache is no attn variant


def test_an_unreadable_config_is_a_row_not_an_exception(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    (row,) = probe_model(ModelSpec(str(tmp_path), "hf_dir", str(tmp_path)), DEVICE_RUNS)
    assert row.name == "config" and not row.available and "cannot read the config" in row.reason

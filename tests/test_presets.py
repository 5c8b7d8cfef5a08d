"""Tiny presets: each builds, is small, is deterministic, and has its family's defining feature."""

import pytest
import torch

from harness.models.loading import resolve_model
from harness.models.presets import PRESETS, TINY_PRESETS, build_preset

CPU = torch.device("cpu")


def test_tiny_all_expands_to_every_tiny_preset():
    assert [s.name for s in resolve_model("tiny:all")] == list(TINY_PRESETS)
    assert all(not s.trained for s in resolve_model("tiny:all"))


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_preset_is_small_and_runs(name):
    model = build_preset(name, CPU, torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 10_000_000
    out = model(torch.randint(0, 49152, (2, 24))).logits
    assert out.shape == (2, 24, 49152) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_preset_is_deterministic(name):
    a = build_preset(name, CPU, torch.float32)
    b = build_preset(name, CPU, torch.float32)
    for (ka, pa), (kb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(pa, pb), ka


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_a_remembered_build_is_the_fresh_build(name, monkeypatch):
    """Later builds of a preset in a process copy the first build's weights instead of initialising
    (harness.models.presets._TINY_WEIGHTS): parameters, buffers, tied embeddings and logits must be
    a fresh build's, for another attention implementation and dtype too."""
    from harness.models import presets

    for dtype, attn in ((torch.float32, "eager"), (torch.bfloat16, "sdpa")):
        monkeypatch.setattr(presets, "_TINY_WEIGHTS", {})
        fresh = build_preset(name, CPU, dtype, attn_implementation=attn)
        remembered = build_preset(name, CPU, dtype, attn_implementation=attn)
        assert presets._TINY_WEIGHTS, "the second build did not come from the remembered weights"
        for (ka, a), (kb, b) in zip(list(fresh.state_dict().items()) + list(fresh.named_buffers()),
                                    list(remembered.state_dict().items()) + list(remembered.named_buffers())):
            assert ka == kb and a.dtype == b.dtype and torch.equal(a, b), ka
        tied = [m.get_output_embeddings().weight is m.get_input_embeddings().weight for m in (fresh, remembered)]
        assert tied[0] == tied[1], f"tied embeddings: fresh {tied[0]}, remembered {tied[1]}"
        ids = torch.randint(0, 49152, (1, 16))
        with torch.no_grad():
            assert torch.equal(fresh(ids).logits, remembered(ids).logits)


def kv_heads(config):
    if getattr(config, "multi_query", False):
        return 1
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


@pytest.mark.parametrize("name, feature", [
    ("tiny:llama", lambda c: kv_heads(c) < c.num_attention_heads),
    ("tiny:mistral", lambda c: c.sliding_window is not None and kv_heads(c) < c.num_attention_heads),
    ("tiny:gpt2", lambda c: c.model_type == "gpt2"),
    ("tiny:falcon-alibi", lambda c: c.alibi),
    ("tiny:falcon-mqa", lambda c: kv_heads(c) == 1),
    ("tiny:qwen2", lambda c: c.model_type == "qwen2"),
])
def test_preset_has_its_family_feature(name, feature):
    assert feature(PRESETS[name].make_config())


@pytest.mark.parametrize("name", ["random:llama-7b", "random:mistral-7b", "random:llama-1b"])
def test_large_presets_have_their_advertised_size(name):
    config = PRESETS[name].make_config()
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    expected = {"random:llama-7b": 6.74, "random:mistral-7b": 7.24, "random:llama-1b": 1.24}[name]
    assert billions == pytest.approx(expected, rel=0.03)

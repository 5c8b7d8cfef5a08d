"""Acceptance: the model under test loads, tokenises and answers like the model it claims to be.

These run on trained models only; random-weight presets skip them, since they have no answers.
"""

import pytest

from harness.inference.generation_basics import chat_greedy, gguf_header_for

pytestmark = pytest.mark.acceptance


def test_capital_of_france_answer_contains_paris(trained_quality, reference_model, tokenizer, record_result):
    answer = chat_greedy(reference_model, tokenizer, "What is the capital of France?", max_new_tokens=24)
    record_result("chat", "answer", answer.strip()[:80], threshold="contains 'Paris'", passed="Paris" in answer)
    assert "Paris" in answer, f"greedy answer to 'What is the capital of France?' lacks 'Paris': {answer!r}"


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Numbers 3.14159 and 2,718; symbols: <>{}[]() and émigré café naïve — “quotes”.",
])
def test_tokenizer_round_trips_text(trained, tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    assert tokenizer.decode(ids) == text


def test_chat_template_marks_roles(trained, tokenizer):
    if not getattr(tokenizer, "chat_template", None):
        pytest.skip(f"{trained.name} has no chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    assert "hello" in text and text.rstrip() != "hello"


def test_config_matches_gguf_header(trained, reference_model):
    header = gguf_header_for(trained)
    if header is None:
        pytest.skip(f"{trained.name} was not loaded from a GGUF file")
    cfg = reference_model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (
        header["block_count"], header["attention.head_count"], header["attention.head_count_kv"], header["embedding_length"])


def test_default_model_is_smollm2_shape(trained, reference_model):
    if trained.kind != "default":
        pytest.skip("only the embedded default model has a known shape")
    cfg = reference_model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)

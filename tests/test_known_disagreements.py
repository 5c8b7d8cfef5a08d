"""Known transformers disagreements are recognised by the feature that causes them, not a model's name."""

from transformers import FalconConfig, LlamaConfig

from harness.equivalence.attention_model import known_disagreement


def test_any_falcon_checkpoint_with_alibi_gets_the_explanation():
    users_own = FalconConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, alibi=True)
    reason = known_disagreement(users_own)
    assert reason and "Falcon with ALiBi" in reason and "modeling_falcon.py" in reason


def test_models_without_the_feature_get_none():
    assert known_disagreement(FalconConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, alibi=False)) is None
    assert known_disagreement(LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)) is None

"""Known transformers disagreements and bugs are recognised by the feature that causes them, not a model's name."""

from transformers import FalconConfig, LlamaConfig

from harness.backends.cache import CACHE_TYPES, OFFLOAD_PREFETCH_RACE
from harness.equivalence.attention_model import known_disagreement


def test_any_falcon_checkpoint_with_alibi_gets_the_explanation():
    users_own = FalconConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, alibi=True)
    reason = known_disagreement(users_own)
    assert reason and "Falcon with ALiBi" in reason and "modeling_falcon.py" in reason


def test_models_without_the_feature_get_none():
    assert known_disagreement(FalconConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, alibi=False)) is None
    assert known_disagreement(LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)) is None


def test_a_known_transformers_bug_xfails_only_on_the_releases_before_its_fix(known_transformers_bug):
    import pytest

    known_transformers_bug(True, "fixed long ago", fixed_in=(1, 0))  # the installed release has the fix
    known_transformers_bug(False, "not this case", fixed_in=(99, 0))
    with pytest.raises(pytest.xfail.Exception, match="offloaded cache prefetches.*passes on transformers 99.0"):
        known_transformers_bug(True, OFFLOAD_PREFETCH_RACE[0], fixed_in=(99, 0))


def test_both_offloaded_caches_name_the_prefetch_race_fixed_in_5_20():
    assert OFFLOAD_PREFETCH_RACE[1] == (5, 20)
    offloaded = [name for name, kind in CACHE_TYPES.items() if kind.accelerator_bug == OFFLOAD_PREFETCH_RACE]
    assert offloaded == ["offloaded", "offloaded-static"]

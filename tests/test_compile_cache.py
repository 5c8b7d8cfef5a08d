"""Compile caches live under the harness cache, keyed by versions and device; a user's own setting wins."""

import os

import torch

from harness.performance.compile_cache import CACHE_VARIABLES, cache_key, cache_use, enable_persistent_compile_caches


def test_caches_are_keyed_by_torch_transformers_and_device(tmp_path, monkeypatch):
    for variable in CACHE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    paths = enable_persistent_compile_caches(tmp_path, torch.device("cpu"))
    key = cache_key(torch.device("cpu"))
    assert torch.__version__.split("+")[0] in key and "transformers" in key and key.endswith("cpu")
    assert paths["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile" / key / "inductor")
    assert all(os.path.isdir(p) for p in paths.values())


def test_a_variable_the_user_set_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    paths = enable_persistent_compile_caches(tmp_path, torch.device("cpu"))
    assert paths["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"
    assert paths["TRITON_CACHE_DIR"].startswith(str(tmp_path))


def test_cache_use_reports_inductor_counters():
    use = cache_use()
    assert set(use) == {"fxgraph_cache_hit", "fxgraph_cache_miss"} and all(v >= 0 for v in use.values())

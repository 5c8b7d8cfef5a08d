"""Compile caches live under the harness cache, keyed by versions and device; a user's own setting wins."""

import os

import pytest
import torch

from harness.performance.compile_cache import (CACHE_VARIABLES, RECOMPILE_LIMIT, cache_key, cache_use,
                                               enable_persistent_compile_caches, probes_file, refuse_eager_fallback,
                                               remembered_probe)


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


def test_a_probe_that_worked_is_remembered_and_one_that_failed_is_probed_again(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_HARNESS_CACHE", str(tmp_path))
    cpu, calls = torch.device("cpu"), []

    def probe(answer):
        def run():
            calls.append(answer)
            return answer
        return run

    assert remembered_probe("k", cpu, torch.float32, probe("no compiler")) == "no compiler"
    assert remembered_probe("k", cpu, torch.float32, probe("no compiler")) == "no compiler"
    assert remembered_probe("k", cpu, torch.float32, probe(None)) is None
    assert remembered_probe("k", cpu, torch.float32, probe("broken since")) is None  # remembered: not run
    assert remembered_probe("k", cpu, torch.float16, probe("fp16 fails")) == "fp16 fails"  # the dtype is part of the key
    assert calls == ["no compiler", "no compiler", None, "fp16 fails"]
    assert probes_file(cpu).parent.name == cache_key(cpu)


def test_a_package_upgrade_forgets_what_worked(tmp_path, monkeypatch):
    from importlib import metadata

    monkeypatch.setenv("LLM_HARNESS_CACHE", str(tmp_path))
    cpu, calls = torch.device("cpu"), []
    versions = iter(["1.0", "1.0", "2.0"])
    monkeypatch.setattr(metadata, "version", lambda package: next(versions))
    for _ in range(3):
        remembered_probe("q", cpu, None, lambda: calls.append(1), packages=("somepkg",))
    assert len(calls) == 2  # 1.0 probed once, then 2.0 probed again


def test_a_function_compiled_past_the_limit_fails_instead_of_running_eagerly():
    """torch.compile's own answer past its recompile limit is to run the function uncompiled for the rest
    of the process; under the harness that is an error, so no check reports an eager run as compiled."""
    import torch._dynamo
    from torch._dynamo.exc import FailOnRecompileLimitHit

    def double(x):
        return x * 2

    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=False):
        refuse_eager_fallback(limit=3)
        compiled = torch.compile(double, backend="eager", dynamic=False)
        for n in (1, 2, 3):
            assert torch.equal(compiled(torch.ones(n)), torch.full((n,), 2.0))
        with pytest.raises(FailOnRecompileLimitHit):
            compiled(torch.ones(4))


def test_the_harness_session_refuses_eager_fallback_at_its_limit():
    import torch._dynamo

    assert torch._dynamo.config.fail_on_recompile_limit_hit
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT

"""Every kind of bad input ends in one clear line, never a traceback wall."""

import json

import pytest

SUITE = """
def test_model_loads(model_spec, reference_model):
    assert reference_model is not None
"""


def run_with(pytester, *args):
    pytester.makepyfile(test_probe=SUITE)
    return pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider", *args)


def assert_one_line_usage_error(result, *fragments):
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    err = [line for line in result.stderr.lines if line.strip()]
    assert len(err) == 1, f"expected one line, got: {err}"
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    for fragment in fragments:
        assert fragment in err[0], err[0]


def test_nonexistent_model_path(pytester):
    assert_one_line_usage_error(run_with(pytester, "--model", "/no/such/model"), "no such path")


def test_unknown_preset(pytester):
    assert_one_line_usage_error(run_with(pytester, "--model", "tiny:transformer-xl"), "unknown preset", "tiny:llama")


def test_corrupt_gguf(pytester):
    bad = pytester.path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00\xff" * 500)
    assert_one_line_usage_error(run_with(pytester, "--model", str(bad)), "not a readable GGUF file")


def test_truncated_real_gguf(pytester):
    from harness.models.loading import default_gguf_path

    truncated = pytester.path / "truncated.gguf"
    truncated.write_bytes(default_gguf_path().read_bytes()[: 1 << 20])
    assert_one_line_usage_error(run_with(pytester, "--model", str(truncated)), "not a readable GGUF file")


def test_unsupported_dtype(pytester):
    assert_one_line_usage_error(run_with(pytester, "--model", "tiny:llama", "--dtype", "int8"), "--dtype int8")


def test_cuda_requested_without_gpu(pytester):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_one_line_usage_error(run_with(pytester, "--model", "tiny:llama", "--device", "cuda"), "no CUDA device")


def test_bad_memory_budget(pytester):
    assert_one_line_usage_error(run_with(pytester, "--model", "tiny:llama", "--memory-budget", "lots"), "as a size")


def _hf_dir(root, name, config, weight_file):
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    (d / weight_file).write_bytes(b"\x00" * 16)
    return d


def test_remote_code_needs_permission(pytester):
    d = _hf_dir(pytester.path, "remote", {"model_type": "custom", "auto_map": {"AutoModelForCausalLM": "m.M"}},
                "model.safetensors")
    assert_one_line_usage_error(run_with(pytester, "--model", str(d)), "--allow-remote-code")


def test_pickle_checkpoint_needs_permission(pytester):
    d = _hf_dir(pytester.path, "pickled", {"model_type": "llama"}, "pytorch_model.bin")
    assert_one_line_usage_error(run_with(pytester, "--model", str(d)), "--allow-pickle")


def test_pickle_permission_gets_past_the_gate(pytester):
    d = _hf_dir(pytester.path, "pickled", {"model_type": "llama"}, "pytorch_model.bin")
    result = run_with(pytester, "--model", str(d), "--allow-pickle")
    assert result.ret != pytest.ExitCode.USAGE_ERROR


def test_directory_without_config(pytester):
    d = pytester.path / "empty"
    d.mkdir()
    assert_one_line_usage_error(run_with(pytester, "--model", str(d)), "no config.json")


def test_hub_id_missing_from_local_cache(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    assert_one_line_usage_error(run_with(pytester, "--model", "someorg/somemodel"), "not in the local Hugging Face cache")


def test_thresholds_file_with_unknown_key(pytester):
    f = pytester.path / "thresholds.json"
    f.write_text(json.dumps({"tolerances": {"attention_error_fudge": 3}}))
    assert_one_line_usage_error(run_with(pytester, "--model", "tiny:llama", "--thresholds", str(f)), "unknown tolerance")


def test_broken_weights_fail_the_test_in_one_line(pytester):
    d = _hf_dir(pytester.path, "garbage", {"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                                           "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2},
                "model.safetensors")
    result = run_with(pytester, "--model", str(d))
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*cannot load*"])
    assert "Traceback" not in result.stdout.str()

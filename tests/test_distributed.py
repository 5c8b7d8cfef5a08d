"""Multi-process plumbing: launcher environment, one xdist worker per GPU, rank counts, and planted
faults in tensor-parallel results that the TP suite's comparison must catch."""

import os
import sys
from pathlib import Path

import pytest

from harness import gpu_workers
from harness.gpu_workers import gpu_for_worker, pin_xdist_worker_to_gpu
from harness.inference.distributed import MULTICAST_OFF, launch_env, torchrun_command
from harness.inference.tensor_parallel import rank_count_skip_reason, rank_counts_available, tp_split_skip_reason
from harness.errors import HarnessUsageError

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# NVLink multicast stays off in everything the harness starts


def test_launch_env_turns_multicast_off_even_when_the_caller_turned_it_on():
    env = launch_env({"NCCL_NVLS_ENABLE": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "0", "PATH": "/bin"})
    assert {k: env[k] for k in MULTICAST_OFF} == {
        "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    assert env["PATH"] == "/bin"


def test_launch_env_makes_this_checkout_importable_first():
    env = launch_env({"PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO_ROOT), "/elsewhere"]


def test_torchrun_command_is_standalone_with_one_process_per_rank():
    cmd = torchrun_command(4, "harness.inference.tp_worker", ["--job", "j.json"], python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=4",
                   "-m", "harness.inference.tp_worker", "--job", "j.json"]


def test_launched_processes_see_multicast_off(monkeypatch):
    """The variables reach a real child: what a torchrun rank inherits."""
    import subprocess

    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    code = "import os; print(os.environ['NCCL_NVLS_ENABLE'], os.environ['TORCH_SYMM_MEM_DISABLE_MULTICAST'], os.environ['NVSHMEM_DISABLE_NVLS'])"
    out = subprocess.run([sys.executable, "-c", code], env=launch_env(), capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "1", "1"]


# ---------------------------------------------------------------------------------------------
# Rank counts and which models split


@pytest.mark.parametrize("devices, expected", [(0, ()), (1, ()), (2, (2,)), (3, (2,)), (4, (2, 4)), (8, (2, 4, 8))])
def test_rank_counts_fit_the_device_count(devices, expected):
    assert rank_counts_available(devices) == expected


def test_rank_count_skips_state_what_is_missing():
    assert rank_count_skip_reason(2, "cuda", 2) is None
    assert rank_count_skip_reason(4, "cuda", 2) == "tensor parallelism over 4 ranks needs 4 GPUs; 2 visible to this process"
    assert rank_count_skip_reason(2, "cuda", 1, pinned_gpu="3").endswith(
        "(a pytest-xdist worker pinned to GPU 3: run the TP suite without -n)")
    assert rank_count_skip_reason(2, "cpu", 0) is None
    assert "this run is on cpu" in rank_count_skip_reason(8, "cpu", 0)


def test_heads_that_do_not_divide_are_a_skip_reason():
    from transformers import GPT2Config, LlamaConfig

    smollm2_like = LlamaConfig(num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    assert tp_split_skip_reason(smollm2_like, 2) == (
        "9 attention heads do not divide over 2 ranks; transformers' TP plan shards whole heads")
    assert "3 key/value heads" in tp_split_skip_reason(LlamaConfig(num_attention_heads=6, num_key_value_heads=3, hidden_size=384), 2)
    assert tp_split_skip_reason(LlamaConfig(num_attention_heads=32, num_key_value_heads=8), 8) is None
    assert "no tensor-parallel plan" in tp_split_skip_reason(GPT2Config(), 2)


# ---------------------------------------------------------------------------------------------
# One xdist worker per GPU


def test_each_worker_owns_one_gpu_of_the_visible_list():
    assert [gpu_for_worker(f"gw{i}", 4, ["0", "1", "2", "3"]) for i in range(4)] == ["0", "1", "2", "3"]
    assert gpu_for_worker("gw1", 2, ["4", "6"]) == "6"


def test_more_workers_than_gpus_is_a_usage_error():
    with pytest.raises(HarnessUsageError, match=r"started 8 workers but 4 GPUs are visible .*run with -n 4"):
        gpu_for_worker("gw0", 8, ["0", "1", "2", "3"])


def test_pinning_restricts_a_worker_to_its_gpu_and_is_idempotent():
    env = {"PYTEST_XDIST_WORKER": "gw2", "PYTEST_XDIST_WORKER_COUNT": "4"}
    assert pin_xdist_worker_to_gpu(env, gpu_count=lambda: 4) == "2"
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["NCCL_NVLS_ENABLE"] == "0"
    # a second configure in the same process (pytester in-process runs) must not re-pin within "2"
    assert pin_xdist_worker_to_gpu(env, gpu_count=lambda: 1) == "2"
    assert env["CUDA_VISIBLE_DEVICES"] == "2"


def test_pinning_maps_onto_an_existing_cuda_visible_devices():
    env = {"PYTEST_XDIST_WORKER": "gw1", "PYTEST_XDIST_WORKER_COUNT": "2", "CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}
    assert pin_xdist_worker_to_gpu(env, gpu_count=lambda: pytest.fail("must not count GPUs")) == "GPU-bb"


def test_controller_refuses_more_workers_than_gpus_before_starting_them():
    with pytest.raises(HarnessUsageError, match="started 4 workers but 2 GPUs"):
        gpu_workers.setup_xdist_gpus(planned_workers=4, environ={}, gpu_count=lambda: 2)
    assert gpu_workers.setup_xdist_gpus(planned_workers=2, environ={}, gpu_count=lambda: 2) is None
    assert gpu_workers.setup_xdist_gpus(planned_workers=16, environ={}, gpu_count=lambda: 0) is None  # CPU host


def test_auto_worker_count_is_one_per_gpu():
    assert gpu_workers.auto_worker_count({"CUDA_VISIBLE_DEVICES": "0,2,3"}) == 3
    assert gpu_workers.auto_worker_count({}, gpu_count=lambda: 0) is None


def test_no_pinning_outside_xdist_or_without_gpus():
    outside = {}
    assert pin_xdist_worker_to_gpu(outside, gpu_count=lambda: 8) is None and "CUDA_VISIBLE_DEVICES" not in outside
    cpu_host = {"PYTEST_XDIST_WORKER": "gw0", "PYTEST_XDIST_WORKER_COUNT": "2"}
    assert pin_xdist_worker_to_gpu(cpu_host, gpu_count=lambda: 0) is None and "CUDA_VISIBLE_DEVICES" not in cpu_host


# The lines the harness plugin runs (pytest_configure, pytest_xdist_auto_num_workers), here in a
# conftest so that the test also holds for a plugin that does not carry them yet.
XDIST_CONFTEST = """
import pytest
from harness.gpu_workers import auto_worker_count, setup_xdist_gpus
from harness.errors import HarnessUsageError

def pytest_configure(config):
    try:
        setup_xdist_gpus(planned_workers=len(getattr(config.option, "tx", None) or []))
    except HarnessUsageError as exc:
        raise pytest.UsageError(str(exc)) from None

@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    return auto_worker_count()
"""

PINNING_SUITE = """
import os
import pytest

@pytest.mark.parametrize("case", range(8))
def test_worker_sees_its_gpu(case):
    worker = os.environ["PYTEST_XDIST_WORKER"]
    with open(os.environ["XDIST_PROBE_LOG"], "a") as log:
        log.write(f"{worker} {os.environ['CUDA_VISIBLE_DEVICES']} {os.environ['NCCL_NVLS_ENABLE']}\\n")
"""

MODEL_SUITE = """
import os
import pytest

@pytest.mark.parametrize("case", range(8))
def test_uses_the_model(case, reference_model):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.environ["XDIST_PROBE_LOG"], "a") as log:
        log.write(f"{worker} {id(reference_model)}\\n")
"""


@pytest.fixture
def xdist_run(pytester, monkeypatch):
    """pytest in a subprocess with GPUs 5 and 7 'visible' (ids only read, never opened, so this runs
    on a CPU host) and the plugin's xdist lines in a conftest; returns (run, rows of the probe log)."""
    pytest.importorskip("xdist", reason="pytest-xdist is not installed (pip install -e '.[multigpu]')")
    log = pytester.path / "probe.log"
    monkeypatch.setenv("XDIST_PROBE_LOG", str(log))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    pytester.makeconftest(XDIST_CONFTEST)

    def run(suite, *args):
        pytester.makepyfile(test_probe=suite)
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
        rows = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
        return result, rows

    return run


def test_xdist_auto_starts_one_worker_per_gpu_each_pinned_before_its_tests(xdist_run):
    result, rows = xdist_run(PINNING_SUITE, "-n", "auto", "-p", "no:harness.plugin")
    result.assert_outcomes(passed=8)
    assert {worker: gpu for worker, gpu, _ in rows} == {"gw0": "5", "gw1": "7"}
    assert {nvls for _, _, nvls in rows} == {"0"}


def test_model_fixtures_load_once_per_session_not_per_test(pytester, monkeypatch):
    """Under xdist each worker is one session, so this bounds loads to one per worker."""
    log = pytester.path / "probe.log"
    monkeypatch.setenv("XDIST_PROBE_LOG", str(log))
    pytester.makepyfile(test_probe=MODEL_SUITE)
    result = pytester.runpytest_inprocess("-p", "harness.plugin", "-p", "no:cacheprovider", "--no-header",
                                          "--model", "tiny:llama")
    result.assert_outcomes(passed=8)
    assert len({model for _, model in (line.split() for line in log.read_text().splitlines())}) == 1


@pytest.mark.slow
def test_xdist_workers_with_the_plugin_load_each_model_once(xdist_run):
    """The two above together, end to end: real workers running the harness plugin."""
    result, rows = xdist_run(MODEL_SUITE, "-n", "auto", "-p", "harness.plugin", "--no-header",
                             "--model", "tiny:llama", "--device", "cpu")
    result.assert_outcomes(passed=8)
    models_per_worker = {worker: {model for w, model in rows if w == worker} for worker, _ in rows}
    assert set(models_per_worker) == {"gw0", "gw1"}
    assert all(len(models) == 1 for models in models_per_worker.values()), models_per_worker


def test_xdist_with_more_workers_than_gpus_stops_with_one_line(xdist_run):
    result, rows = xdist_run("def test_nothing():\n    pass\n", "-n", "3", "-p", "no:harness.plugin")
    assert result.ret == pytest.ExitCode.USAGE_ERROR and rows == []
    errors = [line for line in result.stderr.lines if line.strip()]
    assert errors == ["ERROR: pytest-xdist started 3 workers but 2 GPUs are visible (5,7); "
                      "run with -n 2 so that each worker owns one GPU"], result.stderr.str()


# ---------------------------------------------------------------------------------------------
# Planted faults: a broken tensor-parallel result must fail the TP suite's comparisons

FAULT_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def llama_tp_runs(tmp_path_factory):
    """One 2-process gloo launch of tiny:llama, clean and with rank 1's shard of the first sharded
    linear weight scaled, beside the single-device run of the same weights and prompt."""
    import torch

    from harness.inference.distributed import TPJob, TPModel, run_tensor_parallel
    from harness.models.presets import build_preset
    from harness.inference.tp_worker import forward_and_greedy

    folder = tmp_path_factory.mktemp("tp") / "tiny-llama"
    model = build_preset("tiny:llama", torch.device("cpu"), torch.float32)
    model.save_pretrained(folder)
    prompt = tuple(range(100, 124))
    single = forward_and_greedy(model, prompt, FAULT_NEW_TOKENS, 2, label="single device")
    job = TPJob(ranks=2, new_tokens=FAULT_NEW_TOKENS, models=(
        TPModel("clean", str(folder), prompt, 2), TPModel("faulty", str(folder), prompt, 2, fault="scale-shard")))
    return single, run_tensor_parallel(job, timeout_s=300)


def test_planted_fault_control_clean_tp_run_agrees(llama_tp_runs):
    from harness.equivalence.tolerances import Tolerances
    from harness.equivalence.token_agreement import compare_runs

    (_, single), tp = llama_tp_runs
    assert tp["clean"].fault_note == ""
    assert compare_runs(single, tp["clean"].greedy, dtype_name="float32", tolerances=Tolerances()).passed


def test_planted_fault_scaled_shard_fails_greedy_agreement_at_its_logits(llama_tp_runs):
    from harness.equivalence.tolerances import Tolerances
    from harness.equivalence.token_agreement import LOGITS_MISMATCH, compare_runs

    (_, single), tp = llama_tp_runs
    assert tp["faulty"].fault_note == "rank 1's shard of model.layers.0.self_attn.q_proj.weight scaled by 1.25"
    agreement = compare_runs(single, tp["faulty"].greedy, dtype_name="float32", tolerances=Tolerances())
    assert agreement.verdict == LOGITS_MISMATCH and agreement.step == 0, agreement.message
    assert "tensor parallel x2 vs single device: logits at step 0 differ" in agreement.message


def _misorder_vocab_shards(logits, ranks: int):
    """What a gather that concatenates the ranks' lm_head shards in the wrong order returns."""
    import torch

    return torch.cat(list(reversed(logits.chunk(ranks, dim=-1))), dim=-1)


def _scale_vocab_shard(logits, ranks: int, shard: int, factor: float):
    """What a stale or wrongly scaled lm_head shard on one rank returns."""
    out = logits.clone()
    width = -(-logits.shape[-1] // ranks)
    out[..., shard * width:(shard + 1) * width] *= factor
    return out


def _prompt_logits_check(single, candidate):
    from harness.equivalence.tolerances import Tolerances
    from harness.equivalence.prompt_logits import compare_prompt_logits

    return compare_prompt_logits(single, candidate, dtype_name="float32", tolerances=Tolerances(),
                                 label="tiny:llama over 2 ranks vs single device")


def test_planted_fault_control_clean_tp_prompt_logits_agree(llama_tp_runs):
    (single, _), tp = llama_tp_runs
    agreement = _prompt_logits_check(single, tp["clean"].logits)
    assert agreement.passed, agreement.message
    assert agreement.max_error < 1e-5  # fp32 over gloo: only the all-reduce's summation order differs


def test_planted_fault_scaled_shard_fails_prompt_logits_from_the_second_position(llama_tp_runs):
    """A scaled q shard sharpens half the heads' softmax: position 0 attends to itself alone (weight 1
    whatever the scale), so the first wrong position is 1, and the message says so."""
    (single, _), tp = llama_tp_runs
    agreement = _prompt_logits_check(single, tp["faulty"].logits)
    assert not agreement.passed and agreement.first_failing_position == 1, agreement.message
    assert "first position over the limit: 1" in agreement.message
    assert "tiny:llama over 2 ranks vs single device: prompt logits differ by" in agreement.message


def test_planted_fault_misordered_vocab_shards_fail_prompt_logits(llama_tp_runs):
    (single, _), tp = llama_tp_runs
    agreement = _prompt_logits_check(single, _misorder_vocab_shards(tp["clean"].logits, 2))
    assert not agreement.passed and agreement.first_failing_position == 0, agreement.message


def test_planted_fault_one_scaled_vocab_shard_fails_prompt_logits_and_names_its_columns(llama_tp_runs):
    (single, _), tp = llama_tp_runs
    vocab = single.shape[-1]
    agreement = _prompt_logits_check(single, _scale_vocab_shard(tp["clean"].logits, 2, shard=1, factor=1.01))
    assert not agreement.passed, agreement.message
    column = int(agreement.message.split("vocabulary index ")[1].split(" ")[0])
    assert vocab // 2 <= column < vocab, agreement.message  # the error sits in rank 1's half


def test_planted_fault_misordered_shards_fail_greedy_agreement(llama_tp_runs):
    """The same misordering during generation: every step's logits come back permuted."""
    import dataclasses

    from harness.equivalence.tolerances import Tolerances
    from harness.equivalence.token_agreement import compare_runs

    (_, single), tp = llama_tp_runs
    clean = tp["clean"].greedy
    permuted = dataclasses.replace(clean, scores=_misorder_vocab_shards(clean.scores, 2),
                                   logits=_misorder_vocab_shards(clean.logits, 2))
    agreement = compare_runs(single, permuted, dtype_name="float32", tolerances=Tolerances())
    assert not agreement.passed and agreement.step == 0, agreement.message


def test_unknown_planted_fault_is_a_usage_error():
    from harness.inference.distributed import TPModel

    with pytest.raises(HarnessUsageError, match="unknown planted fault 'drop-rank'"):
        TPModel("m", "/m", (1, 2), fault="drop-rank")


@pytest.mark.slow
def test_a_failing_rank_reports_model_rank_and_error_in_one_line(tmp_path):
    """What the TP suite's head-count skip prevents: transformers loads a model whose heads do not
    divide, and the first forward fails inside attention on every rank."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from harness.inference.distributed import TPJob, TPModel, run_tensor_parallel

    config = LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=3, num_key_value_heads=3, head_dim=16)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / "three-heads")
    job = TPJob(ranks=2, new_tokens=2, models=(TPModel("three-heads", str(tmp_path / "three-heads"), (5, 6, 7), 0),))
    with pytest.raises(RuntimeError) as failure:
        run_tensor_parallel(job, timeout_s=300)
    first_line = str(failure.value).splitlines()[0]
    assert first_line.startswith("tensor-parallel run over 2 ranks failed: rank ")
    assert "three-heads: RuntimeError: shape '[1, 3, -1, 16]' is invalid" in first_line, first_line

"""Several processes or GPUs: torchrun launches for tensor parallelism, and one pytest-xdist worker per GPU.

Everything started from here runs with NVLink multicast (NVLS) off in NCCL, PyTorch symmetric
memory and NVSHMEM: on shared multi-GPU hosts a program that uses multicast can put the host's GPUs
out of service for a day or more, and nothing this harness measures needs it.

The tensor-parallel (TP) run itself is `harness.inference.tp_worker`, started by `torchrun`; it writes rank
0's logits and greedy run to a file that `run_tensor_parallel` reads back as `TPResult`s.
`TPSession` is the parent side of suites/test_tensor_parallel.py (inputs, launches, the
single-device reference) and `compare_prompt_logits` its logits rule.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.backends.capabilities import dtype_name
from harness.errors import HarnessUsageError

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
TP_RANK_COUNTS = (2, 4, 8)
# gloo processes on CPU are for checking the plumbing, not for scale: CI has 2 cores.
CPU_TP_RANK_COUNTS = (2,)
# Set in a pinned xdist worker so that a second pytest_configure in the same process (pytester's
# in-process runs) keeps the first assignment instead of pinning within the already-pinned list.
PINNED_GPU_ENV = "LLM_HARNESS_PINNED_GPU"
PLANTED_FAULTS = ("", "scale-shard")
_WORKER_ID = re.compile(r"^gw(\d+)$")


def force_multicast_off(environ) -> None:
    """Set the multicast-off variables in `environ` (a dict or os.environ), overriding any other value."""
    environ.update(MULTICAST_OFF)


def launch_env(base: dict | None = None) -> dict[str, str]:
    """The environment for a process the harness starts: `base` (default os.environ), multicast off,
    and this checkout importable, so `python -m harness.inference.tp_worker` works without a pip install."""
    env = dict(os.environ if base is None else base)
    force_multicast_off(env)
    root = str(Path(__file__).resolve().parents[2])
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in paths if p != root])
    return env


def torchrun_command(nproc: int, module: str, args: list[str], *, python: str | None = None) -> list[str]:
    """`python -m torch.distributed.run` for one host: --standalone picks a free rendezvous port, so
    several launches (one per xdist worker) can run side by side."""
    if nproc < 1:
        raise HarnessUsageError(f"a torchrun launch needs at least one process, not {nproc}")
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={nproc}", "-m", module, *args]


# ---------------------------------------------------------------------------------------------
# Rank counts and whether a model can be split


def rank_counts_available(device_count: int, candidates=TP_RANK_COUNTS) -> tuple[int, ...]:
    """The TP sizes from `candidates` that fit on `device_count` devices."""
    return tuple(n for n in candidates if n <= device_count)


def rank_count_skip_reason(ranks: int, device_type: str, device_count: int, pinned_gpu: str | None = None) -> str | None:
    """Why a TP run with `ranks` processes cannot happen here, or None when it can. pinned_gpu: the
    GPU pin_xdist_worker_to_gpu gave this process, if any."""
    if device_type == "cuda":
        if ranks in rank_counts_available(device_count):
            return None
        reason = f"tensor parallelism over {ranks} ranks needs {ranks} GPUs; {device_count} visible to this process"
        if pinned_gpu is not None:
            reason += f" (a pytest-xdist worker pinned to GPU {pinned_gpu}: run the TP suite without -n)"
        return reason
    if device_type == "cpu":
        if ranks in CPU_TP_RANK_COUNTS:
            return None
        return (f"tensor parallelism over {ranks} ranks needs {ranks} GPUs; this run is on cpu, where only "
                f"{', '.join(map(str, CPU_TP_RANK_COUNTS))} gloo processes are launched")
    return f"tensor parallelism is run on cuda (nccl) or cpu (gloo), not on {device_type}"


def tp_split_skip_reason(config, ranks: int) -> str | None:
    """Why transformers' tp_plan="auto" cannot split a model of this config over `ranks` ranks.

    The plan shards q/k/v projections column-wise and the attention reshapes each shard into
    whole heads, so both head counts must divide evenly; otherwise transformers loads the model and
    the first forward fails inside attention ("shape [..., -1, head_dim] is invalid").
    """
    plan = getattr(config, "base_model_tp_plan", None)
    if not plan:
        return f"{type(config).__name__} has no tensor-parallel plan in transformers (base_model_tp_plan is empty)"
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for what, count in (("attention heads", heads), ("key/value heads", kv_heads)):
        if count is not None and count % ranks:
            return f"{count} {what} do not divide over {ranks} ranks; transformers' TP plan shards whole heads"
    return None


# ---------------------------------------------------------------------------------------------
# One pytest-xdist worker per GPU


def xdist_worker_index(worker_id: str) -> int:
    """'gw3' -> 3."""
    match = _WORKER_ID.match(worker_id or "")
    if not match:
        raise HarnessUsageError(f"unexpected pytest-xdist worker id {worker_id!r}; expected gw<N>")
    return int(match.group(1))


def visible_gpu_ids(environ, gpu_count=None) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (indices or UUIDs).

    With CUDA_VISIBLE_DEVICES set its entries are the answer, read without touching CUDA; otherwise
    `gpu_count()` (default torch.cuda.device_count, which asks NVML and so leaves CUDA uninitialised
    and CUDA_VISIBLE_DEVICES still effective) gives 0..n-1.
    """
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    if gpu_count is None:
        import torch

        gpu_count = torch.cuda.device_count
    return [str(i) for i in range(gpu_count())]


def gpu_for_worker(worker_id: str, worker_count: int, gpu_ids: list[str]) -> str:
    """The one GPU xdist worker `worker_id` of `worker_count` owns."""
    index = xdist_worker_index(worker_id)
    if worker_count > len(gpu_ids):
        raise HarnessUsageError(
            f"pytest-xdist started {worker_count} workers but {len(gpu_ids)} GPUs are visible "
            f"({','.join(gpu_ids)}); run with -n {len(gpu_ids)} so that each worker owns one GPU")
    return gpu_ids[index]


def setup_xdist_gpus(planned_workers: int = 0, environ=None, gpu_count=None) -> str | None:
    """The plugin's pytest_configure hook for `pytest -n N`. In an xdist worker: pin it to its GPU
    (pin_xdist_worker_to_gpu). In the controller, before any worker starts: refuse more workers
    than visible GPUs with a one-line error instead of N worker tracebacks. CPU hosts: no-op."""
    environ = os.environ if environ is None else environ
    if environ.get("PYTEST_XDIST_WORKER"):
        return pin_xdist_worker_to_gpu(environ, gpu_count)
    if planned_workers > 0:
        gpu_ids = visible_gpu_ids(environ, gpu_count)
        if gpu_ids:
            force_multicast_off(environ)  # workers inherit the controller's environment
            gpu_for_worker("gw0", planned_workers, gpu_ids)
    return None


def auto_worker_count(environ=None, gpu_count=None) -> int | None:
    """Workers for `pytest -n auto`: one per visible GPU, or None (xdist's default, one per CPU)
    on a host without GPUs. For the plugin's pytest_xdist_auto_num_workers hook."""
    gpu_ids = visible_gpu_ids(os.environ if environ is None else environ, gpu_count)
    return len(gpu_ids) or None


def pin_xdist_worker_to_gpu(environ=None, gpu_count=None) -> str | None:
    """In a pytest-xdist worker, make exactly one GPU visible: worker gwN gets the N-th visible GPU.

    Call before anything initialises CUDA (the plugin's pytest_configure): CUDA reads
    CUDA_VISIBLE_DEVICES once, at initialisation. Returns the GPU given to this worker, or None
    outside xdist or on a host without GPUs (workers then share the CPU).
    """
    environ = os.environ if environ is None else environ
    worker = environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return None
    force_multicast_off(environ)
    if environ.get(PINNED_GPU_ENV):
        return environ[PINNED_GPU_ENV]
    gpu_ids = visible_gpu_ids(environ, gpu_count)
    if not gpu_ids:
        return None
    worker_count = int(environ.get("PYTEST_XDIST_WORKER_COUNT") or xdist_worker_index(worker) + 1)
    gpu = gpu_for_worker(worker, worker_count, gpu_ids)
    environ["CUDA_VISIBLE_DEVICES"] = gpu
    environ[PINNED_GPU_ENV] = gpu
    return gpu


# ---------------------------------------------------------------------------------------------
# The tensor-parallel run


@dataclass(frozen=True)
class TPModel:
    """One model of a TP job. source: what from_pretrained reads (a directory, or a hub id in the
    local cache); input_ids: one prompt (the model's chat template), forwarded and then continued;
    fault: a planted fault for the harness's own tests ("scale-shard"), else ""."""

    name: str
    source: str
    input_ids: tuple[int, ...]
    pad_token_id: int | None = None
    trust_remote_code: bool = False
    fault: str = ""

    def __post_init__(self):
        if self.fault not in PLANTED_FAULTS:
            raise HarnessUsageError(f"unknown planted fault {self.fault!r}; known: {', '.join(PLANTED_FAULTS[1:])}")


@dataclass(frozen=True)
class TPJob:
    """What harness.inference.tp_worker runs: every model once over `ranks` processes, in one launch (a launch
    costs interpreter and process-group start-up, most of a CPU run's time)."""

    ranks: int
    models: tuple[TPModel, ...]
    new_tokens: int
    dtype: str = "float32"
    attn_implementation: str = "eager"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TPJob":
        data = json.loads(text)
        data["models"] = tuple(TPModel(**{**m, "input_ids": tuple(m["input_ids"])}) for m in data["models"])
        return cls(**data)


@dataclass
class TPResult:
    """Rank 0's view of one model's TP run, on the CPU.

    logits: the forward on the prompt (positions x vocab, float32), gathered over the vocabulary;
    greedy: a harness.inference.generation.GreedyRun of the continuation (tokens, per-step scores and logits),
    for harness.equivalence.token_agreement; local_parameters: elements rank 0 holds (fewer than the model's
    when TP really split it); fault_note: what a planted fault changed, else "".
    """

    name: str
    ranks: int
    logits: object
    greedy: object
    local_parameters: int
    device: str
    fault_note: str = ""


def result_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / f"model-{index}.pt"


def error_path(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / f"error-rank{rank}.txt"


def run_tensor_parallel(job: TPJob, *, timeout_s: float = 900, out_dir: Path | None = None) -> dict[str, TPResult]:
    """Launch harness.inference.tp_worker under torchrun for `job`; return {model name: TPResult}.

    A failed run raises RuntimeError whose first line names the model, the rank and the error the
    worker caught (the full torchrun output follows, for the traceback).
    """
    import torch

    from harness.inference.generation import GreedyRun

    with tempfile.TemporaryDirectory(prefix="harness-tp-") as tmp:
        out = Path(out_dir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        job_file = out / "job.json"
        job_file.write_text(job.to_json())
        cmd = torchrun_command(job.ranks, "harness.inference.tp_worker", ["--job", str(job_file), "--out", str(out)])
        output, returncode = _run_process_group(cmd, launch_env(), timeout_s)
        errors = [error_path(out, r).read_text().strip() for r in range(job.ranks) if error_path(out, r).is_file()]
        if returncode != 0 or errors:
            first = errors[0] if errors else f"torchrun exited with status {returncode}"
            raise RuntimeError(f"tensor-parallel run over {job.ranks} ranks failed: {first}\n--- torchrun output (tail) ---\n"
                               + "\n".join(output.splitlines()[-40:]))
        results = {}
        for index, model in enumerate(job.models):
            data = torch.load(result_path(out, index), map_location="cpu", weights_only=True)
            run = GreedyRun(label=f"tensor parallel x{job.ranks}", prompt_length=len(model.input_ids),
                            tokens=tuple(data["tokens"].tolist()), scores=data["scores"], logits=data["step_logits"])
            results[model.name] = TPResult(name=model.name, ranks=job.ranks, logits=data["logits"], greedy=run,
                                           local_parameters=int(data["local_parameters"]),
                                           device=data["device"], fault_note=data["fault_note"])
        return results


def _run_process_group(cmd: list[str], env: dict, timeout_s: float) -> tuple[str, int]:
    """Run `cmd` in its own process group, so a timeout ends torchrun and every rank it started."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise RuntimeError(f"tensor-parallel run exceeded {timeout_s:.0f} s and was stopped; output tail:\n"
                           + "\n".join((output or "").splitlines()[-40:])) from None
    return output, proc.returncode


# ---------------------------------------------------------------------------------------------
# The comparison's parent side: inputs, sources, launches and the single-device reference

RANDOM_PROMPT_LENGTH = 32


@dataclass
class SingleDeviceRun:
    """The reference a TP run is compared with: same weights, dtype, attention and prompt, one device."""

    logits: object
    greedy: object
    parameters: int


def model_config(spec):
    """The transformers config of a ModelSpec, without loading weights."""
    from transformers import AutoConfig

    from harness.models.loading import model_source_dir
    from harness.models.presets import get_preset

    if spec.kind == "preset":
        return get_preset(spec.name).make_config()
    return AutoConfig.from_pretrained(model_source_dir(spec), local_files_only=True,
                                      trust_remote_code=spec.allow_remote_code)


class TPSession:
    """The TP comparisons of one pytest session: one torchrun launch per rank count covering every
    model of the run that splits over it, made when first asked for (start-up is most of a CPU
    launch's time), and one single-device reference per model.

    specs: the run's ModelSpecs; device, dtype: the run's; workdir: where presets are saved for
    the ranks to load; tokenizer_for(spec): the spec's tokenizer or None (large random presets).
    """

    def __init__(self, specs, device, dtype, seed: int, new_tokens: int, workdir: Path, tokenizer_for):
        self.specs, self.device, self.dtype, self.seed = list(specs), device, dtype, seed
        self.new_tokens, self.workdir = new_tokens, Path(workdir)
        self.tokenizer_for = functools.lru_cache(maxsize=None)(tokenizer_for)
        self._configs: dict[str, object] = {}
        self._inputs: dict[str, tuple[int, ...]] = {}
        self._sources: dict[str, str] = {}
        self._launches: dict[int, dict | Exception] = {}
        self._references: dict[str, SingleDeviceRun] = {}

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def config(self, spec):
        if spec.name not in self._configs:
            self._configs[spec.name] = model_config(spec)
        return self._configs[spec.name]

    def split_skip_reason(self, spec, ranks: int) -> str | None:
        reason = tp_split_skip_reason(self.config(spec), ranks)
        return f"{spec.name}: {reason}" if reason else None

    def prompt_ids(self, spec) -> tuple[int, ...]:
        """The chat prompt's ids; large random presets, which ship no tokenizer, get seeded random ids."""
        if spec.name not in self._inputs:
            import torch

            tokenizer = self.tokenizer_for(spec)
            if tokenizer is None:
                generator = torch.Generator().manual_seed(self.seed)
                ids = torch.randint(3, self.config(spec).vocab_size, (RANDOM_PROMPT_LENGTH,), generator=generator)
            else:
                from harness.inference.generation import chat_inputs, prompt_for_seed

                ids = chat_inputs(tokenizer, prompt_for_seed(self.seed), "cpu")["input_ids"][0]
            self._inputs[spec.name] = tuple(ids.tolist())
        return self._inputs[spec.name]

    def pad_token_id(self, spec) -> int | None:
        tokenizer = self.tokenizer_for(spec)
        if tokenizer is not None:
            from harness.inference.generation import pad_id

            return pad_id(tokenizer)
        config = self.config(spec)
        return config.pad_token_id if config.pad_token_id is not None else config.eos_token_id

    def source(self, spec) -> str:
        """What the ranks' from_pretrained reads. Presets are built as the harness's model loader
        builds them (same seed, same device, hence the same weights) and saved once."""
        if spec.name not in self._sources:
            from harness.models.loading import model_source_dir

            if spec.kind == "preset":
                from harness.models.presets import build_preset

                folder = self.workdir / spec.name.replace(":", "-")
                model = build_preset(spec.name, self.device, self.dtype)
                model.save_pretrained(folder)
                del model
                self._sources[spec.name] = str(folder)
            else:
                self._sources[spec.name] = model_source_dir(spec)
        return self._sources[spec.name]

    def tp_run(self, spec, ranks: int, timeout_s: float = 1800) -> TPResult:
        """This spec's result from the launch over `ranks` (RuntimeError if that launch failed)."""
        if ranks not in self._launches:
            models = tuple(TPModel(other.name, self.source(other), self.prompt_ids(other), self.pad_token_id(other),
                                   other.allow_remote_code)
                           for other in self.specs if self.split_skip_reason(other, ranks) is None)
            job = TPJob(ranks=ranks, models=models, new_tokens=self.new_tokens, dtype=self.dtype_name)
            try:
                self._launches[ranks] = run_tensor_parallel(job, timeout_s=timeout_s)
            except RuntimeError as exc:
                self._launches[ranks] = exc
        launched = self._launches[ranks]
        if isinstance(launched, Exception):
            raise RuntimeError(str(launched))
        return launched[spec.name]

    def single_device(self, spec, load_model) -> SingleDeviceRun:
        """load_model(): the harness's eager model in the run's dtype on the run's device."""
        if spec.name not in self._references:
            from harness.inference.tp_worker import forward_and_greedy

            model = load_model()
            logits, run = forward_and_greedy(model, self.prompt_ids(spec), self.new_tokens, self.pad_token_id(spec),
                                             label="single device")
            self._references[spec.name] = SingleDeviceRun(logits, run, sum(p.numel() for p in model.parameters()))
        return self._references[spec.name]


@dataclass(frozen=True)
class LogitsAgreement:
    """Forward logits of a TP run against the single-device run, position by position."""

    passed: bool
    max_error: float
    worst_position: int
    first_failing_position: int | None
    limit: float
    message: str


def compare_prompt_logits(reference, candidate, *, dtype_name: str, tolerances, label: str) -> LogitsAgreement:
    """The greedy rule's logits bound (harness.equivalence.token_agreement: max |candidate - reference| <=
    Tolerances.generation_logit_rel(dtype) x max |reference|, per row) applied to every position of
    a forward over the prompt. reference, candidate: positions x vocab."""
    from harness.equivalence.token_agreement import relative_logit_error

    limit = tolerances.generation_logit_rel(dtype_name)
    if tuple(reference.shape) != tuple(candidate.shape):
        return LogitsAgreement(False, float("inf"), 0, 0, limit,
                               f"{label}: logits of shape {tuple(candidate.shape)}, reference {tuple(reference.shape)}")
    errors = [relative_logit_error(r, c) for r, c in zip(reference, candidate)]
    worst = max(range(len(errors)), key=errors.__getitem__)
    first = next((i for i, e in enumerate(errors) if e > limit), None)
    where = f"position {worst} of {len(errors)}"
    if first is None:
        return LogitsAgreement(True, errors[worst], worst, None, limit,
                               f"{label}: prompt logits within {errors[worst]:.3g} relative (worst at {where}; "
                               f"allowed {limit:g} for {dtype_name})")
    column = int((candidate[worst].float() - reference[worst].float()).abs().argmax())
    return LogitsAgreement(False, errors[worst], worst, first, limit,
                           f"{label}: prompt logits differ by {errors[worst]:.3g} relative to the reference's largest "
                           f"logit at {where}, vocabulary index {column} (allowed {limit:g} for {dtype_name}); "
                           f"first position over the limit: {first}")

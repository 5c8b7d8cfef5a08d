"""Launching the processes the harness starts, and the tensor-parallel (TP) job they run.

Everything started from here runs with NVLink multicast (NVLS) off in NCCL, PyTorch symmetric
memory and NVSHMEM: on shared multi-GPU hosts a program that uses multicast can put the host's GPUs
out of service for a day or more, and nothing this harness measures needs it.

The TP run itself is `harness.inference.tp_worker`, started by `torchrun`; it reads a `TPJob` and
writes rank 0's logits and greedy run to a file that `run_tensor_parallel` reads back as `TPResult`s.
Which rank counts run, and the parent side of suites/test_tensor_parallel.py: harness.inference.tensor_parallel;
one pytest-xdist worker per GPU: harness.gpu_workers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.errors import HarnessUsageError

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
PLANTED_FAULTS = ("", "scale-shard")


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

"""One rank of a tensor-parallel run; `torchrun` starts one process per rank (harness.inference.distributed).

    python -m torch.distributed.run --standalone --nproc-per-node=N -m harness.inference.tp_worker --job JOB --out DIR

Each model of the job is loaded with transformers' own tensor parallelism (tp_plan="auto": the
model's base_model_tp_plan, colwise q/k/v/gate/up, rowwise o/down, lm_head gathered), on
cuda:LOCAL_RANK with nccl or on cpu with gloo (transformers picks the backend from the device).
Rank 0 writes the forward's logits and the greedy continuation to DIR/model-<i>.pt; a rank that
fails writes its one-line error to DIR/error-rank<r>.txt before torchrun reports the crash.
"""

from __future__ import annotations

import argparse
import inspect
import os
from pathlib import Path

from harness.errors import first_line
from harness.inference.distributed import TPJob, error_path, force_multicast_off, result_path

# A factor far outside any rounding: a scaled shard must fail every comparison rule.
FAULT_SHARD_SCALE = 1.25


def tensor_parallel_kwargs() -> dict:
    """from_pretrained arguments for tp_plan="auto" on transformers 5.17 and later.

    Newer releases take the plan in a DistributedConfig and deprecate the bare tp_plan argument;
    earlier 5.x releases only know tp_plan.
    """
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto"}
    if "tp_plan" in inspect.signature(DistributedConfig).parameters:
        return {"distributed_config": DistributedConfig(tp_plan="auto")}
    return {"tp_plan": "auto"}


def local_parameter_count(model) -> int:
    """Elements this rank holds: a sharded (DTensor) parameter counts its local shard only."""
    return sum(_local(p).numel() for p in model.parameters())


def _local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def plant_shard_fault(model, rank: int, world_size: int) -> str:
    """Scale the last rank's shard of the first sharded linear weight: what a wrong shard offset or a
    stale shard would do. Embeddings are passed over: a prompt may not touch the scaled vocabulary
    rows. Returns a note naming what was changed (identical on every rank)."""
    import torch

    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or weight is None:
            continue
        local = _local(weight)
        if local is not weight and local.numel() < weight.numel():
            if rank == world_size - 1:
                with torch.no_grad():
                    local.mul_(FAULT_SHARD_SCALE)
            return f"rank {world_size - 1}'s shard of {name}.weight scaled by {FAULT_SHARD_SCALE}"
    raise RuntimeError("planted fault scale-shard: no sharded (DTensor) linear weight found; was TP applied?")


def forward_and_greedy(model, input_ids, new_tokens: int, pad_token_id: int, label: str):
    """What a TP run is judged by: the forward's logits on the prompt (positions x vocab, float32 on
    the CPU) and harness.inference.generation's greedy run forced to `new_tokens`. The single-device
    reference runs this same function."""
    import torch

    from harness.inference.generation import greedy

    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=model.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        logits = _full(model(**inputs).logits)[0].float().cpu()
    run = greedy(model, inputs, label=label, pad_token_id=pad_token_id, new_tokens=new_tokens)
    return logits, run


def run_job(job: TPJob, out_dir: Path, rank: int, world_size: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    if world_size != job.ranks:
        raise RuntimeError(f"the job asks for {job.ranks} ranks but torchrun started {world_size}")
    dtype = getattr(torch, job.dtype)
    for index, spec in enumerate(job.models):
        try:
            model = AutoModelForCausalLM.from_pretrained(
                spec.source, dtype=dtype, attn_implementation=job.attn_implementation, local_files_only=True,
                trust_remote_code=spec.trust_remote_code, **tensor_parallel_kwargs())
            model.eval()
            fault_note = plant_shard_fault(model, rank, world_size) if spec.fault == "scale-shard" else ""
            logits, run = forward_and_greedy(model, spec.input_ids, job.new_tokens, spec.pad_token_id,
                                             label=f"tensor parallel x{world_size}")
        except Exception as exc:
            raise RuntimeError(f"{spec.name}: {type(exc).__name__}: {first_line(exc)}") from exc
        if rank == 0:
            torch.save({"logits": logits, "tokens": torch.tensor(run.tokens), "scores": run.scores,
                        "step_logits": run.logits, "local_parameters": local_parameter_count(model),
                        "device": str(model.device), "fault_note": fault_note}, result_path(out_dir, index))
        del model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, type=Path, help="JSON written by harness.inference.distributed.TPJob")
    parser.add_argument("--out", required=True, type=Path, help="directory for results and per-rank errors")
    args = parser.parse_args(argv)
    force_multicast_off(os.environ)  # also when started by hand, with an environment of its own
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    job = TPJob.from_json(args.job.read_text())
    try:
        run_job(job, args.out, rank, world_size)
    except BaseException as exc:
        error_path(args.out, rank).write_text(f"rank {rank}: {first_line(exc)}\n")
        raise
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

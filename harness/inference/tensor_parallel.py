"""The tensor-parallel (TP) comparison's parent side: which rank counts run here, whether a model
splits, and `TPSession` (inputs, sources, one torchrun launch per rank count, the single-device
reference) for suites/test_tensor_parallel.py. The launch itself: harness.inference.distributed;
the logits rule: harness.equivalence.prompt_logits.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

from harness.backends.capabilities import dtype_name
from harness.inference.distributed import TPJob, TPModel, TPResult, run_tensor_parallel

TP_RANK_COUNTS = (2, 4, 8)
# gloo processes on CPU are for checking the plumbing, not for scale: CI has 2 cores.
CPU_TP_RANK_COUNTS = (2,)


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
# The comparison's parent side: inputs, sources, launches and the single-device reference

RANDOM_PROMPT_LENGTH = 32


@dataclass
class SingleDeviceRun:
    """The reference a TP run is compared with: same weights, dtype, attention and prompt, one device."""

    logits: object
    greedy: object
    parameters: int


class TPSession:
    """The TP comparisons of one pytest session: one torchrun launch per rank count covering every
    model of the run that splits over it, made when first asked for (start-up is most of a CPU
    launch's time), and one single-device reference per model.

    specs: the run's ModelSpecs; device, dtype: the run's; workdir: where presets are saved for
    the ranks to load; tokenizer_for(spec): the spec's tokenizer or None (large random presets);
    computed_once(key, compute): shares a launch between the xdist workers of a run (default: none).
    """

    def __init__(self, specs, device, dtype, seed: int, new_tokens: int, workdir: Path, tokenizer_for,
                 computed_once=None):
        self.specs, self.device, self.dtype, self.seed = list(specs), device, dtype, seed
        # computed_once(key, compute): the plugin's computed_once_per_run, so xdist workers launch once
        self.computed_once = computed_once or (lambda key, compute: compute())
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
            from harness.models.loading import model_config

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
                # the key leaves out where each worker saved the presets: the same seeded weights
                same_work = dataclasses.replace(job, models=tuple(dataclasses.replace(m, source="") for m in models))
                self._launches[ranks] = self.computed_once(f"tensor-parallel launch: {same_work!r}",
                                                           lambda: run_tensor_parallel(job, timeout_s=timeout_s))
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


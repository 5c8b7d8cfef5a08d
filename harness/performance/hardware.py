"""The hardware a run's timings belong to, and whether two runs had the same.

A time measured on one CPU or GPU says nothing about another: the same `bash .ci/run` took 336 s
(median of three) on a 2-core Xeon with AVX-512 and AMX and 830 s on a 2-core AMD EPYC with AVX2
(session 22), and the default model's GPU decode medians differed 1.4-2.5x between two H200 hosts
(sessions 18 and 21). So a benchmark baseline is judged only against a run on the same hardware
(harness.performance.regression), and every report names it (results.json's environment).

The CPU is named with its family, model and stepping: cloud machines often report a generic name
("Intel(R) Xeon(R) Processor") for generations that differ in speed and instruction sets.
"""

from __future__ import annotations

import os
import platform

from harness.errors import HarnessUsageError

# Where the harness writes the record into pytest-benchmark's machine_info (plugin hook), so that
# every benchmarks.json, and every baseline pytest-benchmark saves, carries it.
MACHINE_INFO_KEY = "harness_hardware"
# What must be equal for two runs' times to be compared, with the words a refusal uses for each.
COMPARED = {"cpu": "CPU", "cpus": "CPUs", "accelerator": "device"}


def cpu_model(cpuinfo_text: str | None = None) -> str:
    """'AMD EPYC (family 25 model 1 stepping 1)' from /proc/cpuinfo; platform.processor() elsewhere."""
    if cpuinfo_text is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo_text = f.read()
        except OSError:
            cpuinfo_text = ""
    fields: dict[str, str] = {}
    for line in cpuinfo_text.splitlines():
        if not line.strip():
            break  # the first processor describes them all
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    numbers = [f"{label} {fields[key]}" for key, label in (("cpu family", "family"), ("model", "model"),
                                                            ("stepping", "stepping")) if fields.get(key)]
    return f"{name} ({' '.join(numbers)})" if numbers else name


def run_hardware(device) -> dict:
    """{'cpu': model, 'cpus': usable CPUs, 'accelerator': the GPU's name, or 'cpu'} for a run on `device`."""
    accelerator = "cpu"
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        accelerator = torch.cuda.get_device_name(device)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "cpus": cpus, "accelerator": accelerator}


def hardware_of(benchmark_document: dict) -> dict | None:
    """The hardware record in a pytest-benchmark JSON document (None: written without the harness)."""
    found = (benchmark_document.get("machine_info") or {}).get(MACHINE_INFO_KEY)
    return found if isinstance(found, dict) else None


def hardware_differences(baseline: dict | None, current: dict | None) -> list[str]:
    """"CPU 'A' -> 'B'" for each COMPARED field the two records hold differently (none when either
    record is missing: a document written without the harness cannot be checked)."""
    if baseline is None or current is None:
        return []
    return [f"{words} {baseline.get(field)!r} -> {current.get(field)!r}" for field, words in COMPARED.items()
            if baseline.get(field) != current.get(field)]


def check_same_hardware(baseline_document: dict, current_document: dict) -> None:
    """Raise HarnessUsageError when two pytest-benchmark documents ran on other hardware: no verdict
    on speed can come from comparing them."""
    differences = hardware_differences(hardware_of(baseline_document), hardware_of(current_document))
    if differences:
        raise HarnessUsageError(
            f"the baseline ran on other hardware ({'; '.join(differences)}): its times say nothing about "
            "this machine's; record a baseline here (python -m harness.gate --save-baseline FILE)")

"""The GPU CI gate and model acceptance run: one command that runs every suite and writes the report.

    python -m harness.gate --model PATH_OR_PRESET [--profile quick|full] [--baseline FILE]
                           [--memory-budget 70GiB] [--thresholds FILE] [-- extra pytest args]

Exit status 0 only when every equivalence, agreement and budget check passed (pytest's status is
passed through). On a GPU with a small model the tests that do not measure the device run in up
to six pytest processes side by side, then the exclusive ones (speed, memory) alone
(harness.sharding); the processes' reports are merged into one (harness.reporting.merge).
Benchmarks are recorded to the run's report directory; with --baseline they are compared against
it and a regression beyond --max-regression fails the gate.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness.config import DEFAULT_MODEL, cache_root
from harness.performance.compile_cache import bytecode_kept
from harness.profiles import GATE_PROFILES


def build_command(opts, extra: list[str], report_dir: str | None = None) -> tuple[list[str], dict]:
    # suite files named after `--` replace the default of every suite
    selected = [a for a in extra if not a.startswith("-") and Path(a.split("::")[0]).exists()]
    targets = [] if selected else [str(Path(opts.suites))]
    cmd = [sys.executable, "-m", "pytest", *targets, "-p", "no:cacheprovider",
           "--model", opts.model, "--device", opts.device, "--dtype", opts.dtype,
           "--report-dir", report_dir or opts.report_dir, "-rfEs", "--durations=15"]
    if opts.memory_budget:
        cmd += ["--memory-budget", opts.memory_budget]
    if opts.thresholds:
        cmd += ["--thresholds", opts.thresholds]
    if opts.attn:
        cmd += ["--attn", opts.attn]
    profile = GATE_PROFILES[opts.profile]  # quick: no slow tests, the CI-sized search; full: everything
    cmd += (["--run-slow"] if profile.run_slow else []) + extra
    env = bytecode_kept(dict(os.environ, HYPOTHESIS_PROFILE=profile.name), cache_root())
    env.setdefault("HF_HUB_OFFLINE", "1")
    return cmd, env


# ---------------------------------------------------------------------------------------------
# Side by side on one device (harness.sharding): how many processes, and their commands

# Session 18, H200 with 16 CPUs, the default model's quick gate (shards taking from one queue):
# 4 processes 153 s cold, 106 / 106 s warm; 6 processes 144 s (caches cleared), 91 / 95 s warm.
# Each process compiles (inductor's workers) and runs generate()'s Python loop: 2 CPUs apiece at least.
MAX_JOBS = 6
CPUS_PER_JOB = 2
# A model whose weights exceed this runs in one process: the harness sizes its references by the
# device's free memory (harness.models.reference_sizing), which processes side by side would race for.
SHARED_DEVICE_MAX_WEIGHT_BYTES = 2 * 2**30


def visible_gpu_count(device: str) -> int:
    if device == "cpu" or os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:  # no driver, no NVML: a CPU host as far as the gate is concerned
        return 0


def model_weight_bytes(model: str) -> int | None:
    """The largest model's weight files on disk (None: unknown, e.g. a hub id, or a large preset)."""
    from harness.models.presets import PRESETS

    largest = 0
    for text in (m.strip() for m in model.split(",") if m.strip()):
        if text in ("default", DEFAULT_MODEL) or text.startswith("tiny:"):
            continue
        if text.startswith("random:"):
            preset = PRESETS.get(text)
            if preset is None or preset.large:
                return None
            continue
        path = Path(text).expanduser()
        if not path.exists():
            return None
        files = [path] if path.is_file() else [f for f in path.rglob("*")
                                               if f.suffix in (".safetensors", ".gguf", ".bin", ".pt", ".pth")]
        largest = max(largest, sum(f.stat().st_size for f in files))
    return largest


def resolve_jobs(opts, extra: list[str]) -> tuple[int, str]:
    """(processes for the side-by-side phase, why that many)."""
    if opts.jobs != "auto":
        return max(1, int(opts.jobs)), "--jobs"
    if any(a in ("-m", "-n", "--shard") or a.startswith(("-m=", "--shard=")) for a in extra):
        return 1, "the extra pytest arguments choose the selection"
    if opts.memory_budget:
        return 1, "a memory budget is checked with NVML, which reads the whole device"
    if not visible_gpu_count(opts.device):
        return 1, "no GPU: the CPU's cores are already busy in one process"
    weights = model_weight_bytes(opts.model)
    if weights is None or weights > SHARED_DEVICE_MAX_WEIGHT_BYTES:
        return 1, "a large (or unknown-size) model: references are sized by the device's free memory"
    return max(1, min(MAX_JOBS, (os.cpu_count() or 1) // CPUS_PER_JOB)), "GPU, small model"


@dataclass(frozen=True)
class Process:
    name: str
    selection: list[str]  # the pytest arguments that pick this process's tests
    cmd: list[str]
    env: dict
    report_dir: Path


def phase_commands(opts, extra: list[str], jobs: int, parts_root: Path) -> list[Process]:
    """Every process of a side-by-side run: the shards (run together), then the exclusive tests
    (alone, last)."""
    from harness.sharding import EXCLUSIVE_MARKER, QUEUE_VARIABLE, SHARED_DEVICE_VARIABLE

    processes = []
    for k in range(1, jobs + 1):
        selection = ["-m", f"not {EXCLUSIVE_MARKER}", "--shard", f"{k}/{jobs}"]
        cmd, env = build_command(opts, extra + selection, str(parts_root / f"shard{k}"))
        processes.append(Process(f"shard {k}/{jobs}", selection, cmd,
                                 {**env, SHARED_DEVICE_VARIABLE: "1", QUEUE_VARIABLE: str(parts_root / "queue")},
                                 parts_root / f"shard{k}"))
    selection = ["-m", EXCLUSIVE_MARKER]
    cmd, env = build_command(opts, extra + selection, str(parts_root / "exclusive"))
    processes.append(Process("exclusive", selection, cmd, env, parts_root / "exclusive"))
    return processes


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m harness.gate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model under test (see pytest --help, --model)")
    p.add_argument("--profile", choices=sorted(GATE_PROFILES), default="quick")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attn", default="", help="attention implementations to test (default: all available)")
    p.add_argument("--memory-budget", default=None, help="device memory budget per test, e.g. 70GiB")
    p.add_argument("--thresholds", default=None, help="JSON file with the acceptance thresholds of your repo")
    p.add_argument("--baseline", default=None, help="pytest-benchmark JSON of an earlier run to compare against")
    p.add_argument("--save-baseline", default=None, metavar="FILE", help="copy this run's benchmarks.json to FILE")
    p.add_argument("--max-regression", default="10%", help="allowed median slowdown vs the baseline (default 10%%)")
    p.add_argument("--report-dir", default="reports")
    p.add_argument("--suites", default=str(Path(__file__).resolve().parent.parent / "suites"))
    p.add_argument("--jobs", default="auto", help="pytest processes side by side on the GPU for the tests that do not "
                   "measure the device (auto: up to 6 for a small model on a GPU, one per 2 CPUs, else 1)")
    p.add_argument("--dry-run", action="store_true", help="print the pytest command(s) and exit")
    if "--" in argv:
        i = argv.index("--")
        return p.parse_args(argv[:i]), argv[i + 1:]
    return p.parse_args(argv), []


def main(argv=None) -> int:
    opts, extra = parse(sys.argv[1:] if argv is None else argv)
    if opts.jobs != "auto" and not opts.jobs.isdigit():
        print(f"harness.gate: --jobs expects a number or auto, got {opts.jobs!r}", file=sys.stderr)
        return 4
    jobs, why = resolve_jobs(opts, extra)
    if opts.dry_run:
        if jobs == 1:
            print(" ".join(build_command(opts, extra)[0]))
        for process in phase_commands(opts, extra, jobs, Path(opts.report_dir) / ".gate-parts") if jobs > 1 else []:
            print(f"# {process.name}\n{' '.join(process.cmd)}")
        return 0
    if not Path(opts.suites).is_dir():
        print(f"harness.gate: no suites directory at {opts.suites}", file=sys.stderr)
        return 4
    if jobs == 1:
        status = _run_one(*build_command(opts, extra), opts)
    else:
        print(f"harness.gate: {jobs} processes side by side, then the exclusive tests alone ({why})", flush=True)
        status = _run_phases(opts, extra, jobs)
    return max(status, _benchmarks_after_run(opts))


def _run_one(cmd, env, opts) -> int:
    child = subprocess.Popen(cmd, env=env)
    try:
        return child.wait()
    except KeyboardInterrupt:  # pytest got the same interrupt: let it print its summary and write the report
        status = child.wait()
        print(f"harness.gate: interrupted; the report under {opts.report_dir}/latest holds the tests that ran",
              file=sys.stderr)
        return status or 130


def _run_phases(opts, extra, jobs) -> int:
    import shutil
    from types import SimpleNamespace

    from harness.reporting.report import new_run_dir
    from harness.reporting.merge import merge_run_dirs

    started = time.monotonic()
    parts_root = Path(opts.report_dir) / f".gate-parts-{os.getpid()}"
    for folder in ("logs", "queue"):
        (parts_root / folder).mkdir(parents=True, exist_ok=True)
    processes = phase_commands(opts, extra, jobs, parts_root)
    interrupted = False
    try:
        _run_processes(processes, parts_root)
    except KeyboardInterrupt:
        interrupted = True
    parts = [((p.report_dir / "latest").resolve(), {"name": p.name, "selection": " ".join(p.selection)})
             for p in processes]
    model_name = next((d.name.split("-", 2)[-1] for d, _ in parts if d.is_dir()), "run")
    run_dir = new_run_dir(Path(opts.report_dir), [SimpleNamespace(name=model_name)])
    try:
        summary = merge_run_dirs(parts, run_dir, time.monotonic() - started)
    except (FileNotFoundError, ValueError) as exc:
        print(f"harness.gate: no report: {exc}; the processes' logs are in {parts_root}", file=sys.stderr)
        return max(_part_statuses(parts_root)) or 3
    shutil.copytree(parts_root / "logs", run_dir / "logs")
    shutil.rmtree(parts_root, ignore_errors=True)
    print(f"harness.gate: {summary['verdict']} in {summary['wall_time_s']:.0f} s; report {run_dir / 'report.md'}, "
          f"each process's output in {run_dir / 'logs'}", flush=True)
    return 130 if interrupted else summary["exit_status"]


def _run_processes(processes: list[Process], parts_root: Path) -> None:
    """Start every process at once (the exclusive one imports, collects and sets up its
    beside_shards tests, then waits for the shards: harness.sharding); when the shards are done,
    let it run; print each one's summary line and failures as it ends."""
    from harness.sharding import GATE_STARTED_VARIABLE, HISTORY_VARIABLE, START_AFTER_VARIABLE

    flag = parts_root / "shards-done"
    began = repr(time.time())
    history = Path(processes[0].report_dir).parent.parent / "latest" / "results.json"
    threads = str(max(1, (os.cpu_count() or 1) // max(1, len(processes) - 1)))
    running = []
    for process in processes:
        env = {**process.env, GATE_STARTED_VARIABLE: began}
        if history.is_file():  # the shards split by the previous run's durations (harness.sharding)
            env.setdefault(HISTORY_VARIABLE, str(history.resolve()))
        if process is processes[-1]:
            env[START_AFTER_VARIABLE] = str(flag)
        else:
            env.setdefault("OMP_NUM_THREADS", threads)  # the shards share the host's cores
        log = parts_root / "logs" / f"{process.name.replace(' ', '-').replace('/', '-of-')}.log"
        with open(log, "w") as out:
            child = subprocess.Popen(process.cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
            running.append((process.name, log, child))
    try:
        for i, (name, log, child) in enumerate(running):
            if i == len(running) - 1:
                flag.touch()
            _report_process(name, log, child.wait())
    except KeyboardInterrupt:  # from a terminal every child got it too; from `timeout -s INT` only the gate
        import signal

        flag.touch()
        for _name, _log, child in running:
            try:
                child.wait(timeout=2)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGINT)  # pytest stops, prints its summary and writes its report
        for _name, _log, child in running:
            child.wait()
        raise


def _report_process(name: str, log: Path, status: int) -> None:
    lines = log.read_text(errors="replace").splitlines()
    last = next((line.strip("= ") for line in reversed(lines) if line.strip()), "no output")
    print(f"harness.gate: {name}: {last} (exit {status})", flush=True)
    for line in lines:
        if line.startswith(("FAILED ", "ERROR ")):
            print(f"  {line}", flush=True)
    (log.parent / f"{log.stem}.status").write_text(str(status))


def _part_statuses(parts_root: Path) -> list[int]:
    found = [int(p.read_text()) for p in (parts_root / "logs").glob("*.status")]
    return found or [3]


def _benchmarks_after_run(opts) -> int:
    """Compare with / save the baseline from the run's benchmarks.json (reports/latest)."""
    import shutil

    current = Path(opts.report_dir) / "latest" / "benchmarks.json"
    if (opts.baseline or opts.save_baseline) and not current.is_file():
        print(f"harness.gate: no benchmarks were recorded ({current} missing)", file=sys.stderr)
        return 1 if opts.baseline else 0
    status = 0
    if opts.baseline:
        status = subprocess.call([sys.executable, "-m", "harness.performance.regression", opts.baseline, str(current),
                                  "--fail", f"median:{opts.max_regression}"])
    if opts.save_baseline:
        shutil.copyfile(current, opts.save_baseline)
        print(f"harness.gate: baseline saved to {opts.save_baseline}")
    return status


if __name__ == "__main__":
    sys.exit(main())

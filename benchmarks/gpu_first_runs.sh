#!/usr/bin/env bash
# Issue 15's first GPU runs, prepared for a short device lease (one GPU; written without one, so never run yet):
# the survey protocol on shape:t5-large and then shape:t5-3b (bf16 autocast, Table 3's microbatches), and LoRA on
# shape:llama-1b against the peft library. Each stage has its own time limit so that a slow one cannot eat the
# others; whatever finished is in OUT. Every measurement is a fresh process, and each loads its random-init model
# again (T5-3B: about 11 GB of fp32 weights per process), hence few repeats.
#
#   bash benchmarks/gpu_first_runs.sh OUT_DIR [SECONDS_PER_STAGE]
set -uo pipefail
out=${1:?usage: gpu_first_runs.sh OUT_DIR [SECONDS_PER_STAGE]}
limit=${2:-180}
data=${PEFTLAB_DATA_DIR:-../shared/data}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>&1
stage() {  # NAME ARGS...: one bench run under the stage limit, its log and exit status kept
    local name=$1; shift
    timeout "$limit" peftlab bench "$@" --device cuda --dtype bf16 --output "$out/$name" > "$out/$name.log" 2>&1
    echo "$name: exit $?" >> "$out/stages.txt"
}
stage llama-1b-lora --model shape:llama-1b --methods lora --compare-peft --no-full --batch 8 --seq 512 \
    --response 64 --repeats 5 --warmup 2
stage survey-t5-large --model shape:t5-large --protocol survey --data-dir "$data" --repeats 3 --warmup 1
stage survey-t5-3b --model shape:t5-3b --protocol survey --data-dir "$data" --repeats 2 --warmup 1 \
    --methods lora-qv,lora-all,houlsby-64,pfeiffer-64,ia3,ln
cat "$out/stages.txt"

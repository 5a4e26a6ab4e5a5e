#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md within a short device lease: the `gpu` variant's sizes
# with fewer timed blocks. `t5`: T5-Large with LoRA on q,v, LoRA on every linear layer,
# (IA)^3 and full fine-tuning; `llama`: LLaMA-2-7B with LoRA on q,v. Page, PNG, JSON and
# the log go to $2.
#   bash scripts/bench_gpu.sh t5 /tmp/gpu_bench; bash scripts/bench_gpu.sh llama /tmp/gpu_bench
set -uo pipefail
which=$1 out=${2:-gpu_bench}
mkdir -p "$out"
common=(--config=configs/bench.py:gpu --config.run.blocks=3 --config.run.steps_per_block=5
        --config.run.infer_blocks=2 --config.run.timeout_s=240 --config.run.models="$which")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "$which" = t5 ]; then
  extra=(--config.run.methods=lora_qv,lora_all,ia3,full)
else
  extra=(--config.run.methods=lora_qv --config.run.merged=false)
fi
python3 bench.py "${common[@]}" "${extra[@]}" --out="$out/$which.md" \
  --json_out="$out/$which.json" 2>"$out/$which.log"
echo "$which exit $?"

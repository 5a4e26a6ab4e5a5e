#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md within a short device lease: the `gpu` variant's sizes
# with fewer timed blocks and no merged generation (the base model's speed), one model per
# call. The JSON and the log go to $OUT_DIR/$NAME.{json,log}; the page is made from the
# JSON afterwards (python -m peft_jax.bench.report).
#   bash scripts/bench_gpu.sh t5 /tmp/gpu --config.run.models=t5 --config.run.methods=lora_qv
set -uo pipefail
name=$1 out=$2
shift 2
mkdir -p "$out"
python3 bench.py --config=configs/bench.py:gpu --config.run.blocks=3 \
  --config.run.steps_per_block=5 --config.run.infer_blocks=2 --config.run.timeout_s=240 \
  --config.run.merged=false "$@" --png="/tmp/$name.png" --json_out="$out/$name.json" \
  2>"$out/$name.log" | grep -v '^{"rows"'
echo "$name exit ${PIPESTATUS[0]}"

#!/usr/bin/env bash
# Device session 1: kernel probe + step profiles (issue 11). Output: /tmp/prof/*.json, logs.
export MLX_PTX_CACHE_DIR=/tmp/ptx
mkdir -p /tmp/prof
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())"
t0=$(date +%s)
python3 benchmarks/probe_kernels.py --json /tmp/prof/probe_kernels.json
echo "probe done after $(( $(date +%s) - t0 )) s"
for m in smollm2-135m-q4 qwen2.5-coder-0.5b-q4; do
  for t in lora dora; do
    for p in none examples/optimized_program.py; do
      n=$(basename $p .py); s=$(date +%s)
      python3 benchmarks/profile_step.py --model $m --fine-tune-type $t --program $p --length 1023 \
        --json /tmp/prof/profile_${m%%-*}_${t}_${n}.json 2>&1 | tail -32
      echo "profile $m $t $p: $(( $(date +%s) - s )) s"
    done
  done
done
echo "all done after $(( $(date +%s) - t0 )) s"

#!/usr/bin/env bash
# The issue-11 evidence in one GPU job, most needed first: bash benchmarks/run_issue11.sh OUT
# 1. the optimized program's full evaluation (`python evaluator.py`: combined score, stage 3's rows at
#    4x1023); on a cold machine it pays the kernel compiling (minutes: 927 s on the H100 of 2026-12-06b);
# 2. the benchmark table's training rows (8x1023; --no-micro: stage 2 has the kernels), with the programs
#    in TABLE_EXTRA beside the optimized one (e.g. an earlier version, to compare them on one machine:
#    `git show 072de79:examples/optimized_program.py > p072.py` before the run, TABLE_EXTRA=p072.py);
# 3. the starting program's evaluation; 4. whole-step profiles (time, peak, primitives a layer);
# 5. the optimized program's evaluation again, on a warm machine.
# PTX_OUT=DIR also packs the compiled kernels there in 15 MB parts, to carry to a later machine and
# unpack before any MLX runs:  cat DIR/ptx.tgz.* | tar -C "$KERNEL_LAB_CACHE" -xzf -
# (kernel_lab.machine.cache_dir()).
set -u
out=$1; mkdir -p $out/table
stamp() { echo "[$(date +%H:%M:%S)] $*"; }
S="bash benchmarks/gpu_session.sh $out"
EVAL_PROGRAMS=examples/optimized_program.py $S evaluate
stamp "benchmark table, training rows"
python -m kernel_lab.benchmark ${TABLE_EXTRA:-} examples/optimized_program.py --budget table --no-micro \
  --out $out/table > $out/table/benchmark.log 2>&1; tail -24 $out/table/benchmark.log
EVAL_PROGRAMS=initial_program.py $S evaluate
$S candidates
mv $out/evaluate/optimized_program.log $out/evaluate/optimized_program_first.log
mv $out/evaluate/optimized_program.json $out/evaluate/optimized_program_first.json 2>/dev/null
EVAL_PROGRAMS=examples/optimized_program.py $S evaluate
if [ -n "${PTX_OUT:-}" ]; then
  mkdir -p "$PTX_OUT"; stamp "packing the PTX cache into $PTX_OUT"
  tar -C "$(python -c "from kernel_lab.machine import cache_dir; print(cache_dir())")" -czf - mlx-ptx | split -b 15M - "$PTX_OUT/ptx.tgz."
  ls -l "$PTX_OUT"
fi

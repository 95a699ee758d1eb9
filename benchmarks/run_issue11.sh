#!/usr/bin/env bash
# The issue-11 evidence in one GPU job: bash benchmarks/run_issue11.sh OUT
# The optimized program's full evaluation, the benchmark table (the optimized program against stock;
# the starting program's rows are in earlier tables), the starting program's full evaluation, then
# whole-step profiles of stock and the optimized program on every row. The first section pays the
# cold machine's kernel compiling.
set -u
out=$1
S="bash benchmarks/gpu_session.sh $out"
EVAL_PROGRAMS=examples/optimized_program.py $S evaluate
mkdir -p $out/table; echo "[$(date +%H:%M:%S)] benchmark table"
python -m kernel_lab.benchmark examples/optimized_program.py --budget table --out $out/table \
  > $out/table/benchmark.log 2>&1; tail -30 $out/table/benchmark.log
EVAL_PROGRAMS=initial_program.py $S evaluate
$S candidates

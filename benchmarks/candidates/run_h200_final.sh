#!/usr/bin/env bash
# The issue-11 evidence in one GPU job: bash benchmarks/candidates/run_h200_final.sh OUT
# The optimized program's full evaluation, the benchmark table (starting and optimized programs
# against stock), the starting program's full evaluation, then whole-step profiles of stock and the
# optimized program on every row. The first section pays the cold machine's kernel compiling.
set -u
out=$1
S="bash benchmarks/gpu_session.sh $out"
EVAL_PROGRAMS=examples/optimized_program.py $S evaluate
TABLE_PROGRAMS=examples/optimized_program.py $S table
EVAL_PROGRAMS=initial_program.py $S evaluate
$S candidates

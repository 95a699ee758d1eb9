#!/usr/bin/env bash
# The day's last GPU run (2026-11-22, session 7): bash benchmarks/candidates/run_h200_final.sh OUT
# Whole-step profiles of stock and the optimized program (every row), the optimized program's full
# evaluation, the table with the optimized program and v4 (its previous version), then the starting
# program's full evaluation.
set -u
out=$1
S="bash benchmarks/gpu_session.sh $out"
$S candidates
EVAL_PROGRAMS=examples/optimized_program.py $S evaluate
TABLE_PROGRAMS="examples/optimized_program.py benchmarks/candidates/v4_fewer_nodes.py" $S table
EVAL_PROGRAMS=initial_program.py $S evaluate

#!/usr/bin/env bash
# The candidates' GPU run (2026-11-22, session 6): bash benchmarks/candidates/run_h200.sh OUT
# Whole-step profiles (mlx-lm's per-step cache clearing, bf16, 8 x 1023) of the programs that differ
# in each row, then the candidate's full evaluation, then the table with every candidate.
set -u
out=$1 C=benchmarks/candidates O=examples/optimized_program.py
S="bash benchmarks/gpu_session.sh $out"
CANDIDATE_ROWS=smollm2-135m-q4:dora CANDIDATES="$O $C/v1_swiglu.py $C/v2_dora_one_dequant.py $C/v4_fewer_nodes.py" $S candidates
CANDIDATE_ROWS=smollm2-135m-q4:lora CANDIDATES="$O $C/v1_swiglu.py $C/v4_fewer_nodes.py $C/v5_qmm_forward.py" $S candidates
CANDIDATE_ROWS=qwen2.5-coder-0.5b-q4:lora CANDIDATES="$O $C/v4_fewer_nodes.py $C/v5_qmm_forward.py" $S candidates
CANDIDATE_ROWS=qwen2.5-coder-0.5b-q4:dora CANDIDATES="$O $C/v4_fewer_nodes.py" $S candidates
EVAL_PROGRAMS="$C/v4_fewer_nodes.py" $S evaluate
TABLE_PROGRAMS="$O $C/v4_fewer_nodes.py $C/v5_qmm_forward.py" $S table

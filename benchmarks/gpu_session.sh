#!/usr/bin/env bash
# The GPU evidence of issues 10 and 11, one section at a time (after ../shared/device's install):
#   bash benchmarks/gpu_session.sh OUT SECTION...
# Sections: fresh (on a new machine: `evaluator.py --warmup`, then the optimized, stock and starting
# programs' full evaluations), startup (where a child's start-up goes), noise (stage 3's spread over
# 6 windows a side, every step's seconds in the JSON), warm (those evaluations alone), evals (each program's full evaluation, cold then warm), repeat (stage 3 stock vs stock and
# the optimized program, 3 evaluations each), legit (the legit corpus on CUDA), table (the
# benchmark table), variants (micro vs macro ordering), profiles (step profiles), diagnose (GPU clocks
# and host CPU beside one-step profiles in separate processes and 3 stage-3 evaluations), cleared (the
# bare step with and without mlx-lm's per-step cache clearing), candidates (whole-step profiles of
# programs side by side at the table's sizes, mlx-lm's per-step cache clearing), evaluate (full
# evaluations of EVAL_PROGRAMS), compute
# (legitimate programs' LoRA/DoRA gradients against stock's in bfloat16 at stage 3's sizes). Each writes logs
# and JSON under OUT/<section>/. "Cold": MLX's kernel cache (MLX_PTX_CACHE_DIR) and the CUDA
# driver's (CUDA_CACHE_PATH) start empty, as on a new machine; "warm": the same caches again.
# Narrower runs: PROFILE_MODELS (profiles), VARIANT_BASES (variants), LEGIT_SEEDS (legit); other
# programs: CANDIDATES, CANDIDATE_ROWS and CANDIDATE_BATCH (candidates: 8 rows, or 4 as stage 3), TABLE_PROGRAMS (table), EVAL_PROGRAMS (evaluate).
set -u
out=$1; shift
mkdir -p "$out"
# Scripts run here directly (profile_step.py, compute_gradcheck.py, ...) share the evaluator's kernel
# cache, which a carried cache fills, instead of MLX's default under /tmp (3-4 minutes of compiling).
export MLX_PTX_CACHE_DIR=${MLX_PTX_CACHE_DIR:-$(cd "$(dirname "$0")/.." && python -c \
  "from kernel_lab.machine import ptx_cache_dir; print(ptx_cache_dir())")}
stamp() { echo "[$(date +%H:%M:%S)] $*"; }
# One process timing Qwen's LoRA step at 4x1023 (no parts): qwen_step PROGRAM CLEAR_CACHE_FLAG STEPS SUFFIX
qwen_step() {
  local p=$1 cc=$2 n=$(basename $1 .py)${2:+_cleared}$4
  stamp "qwen lora step, $p $cc${4:+, process ${4#_}}"
  python benchmarks/profile_step.py --model qwen2.5-coder-0.5b-q4 --fine-tune-type lora --program $p \
    --batch 4 --length 1023 --steps $3 --no-parts $cc --json $out/$section/step_$n.json \
    > $out/$section/step_$n.log 2>&1; grep "^step" $out/$section/step_$n.log
}
for section in "$@"; do
  mkdir -p "$out/$section"; cd "$(dirname "$0")/.." || exit 1
  case $section in
  fresh|warm)  # fresh: a new machine's warm-up (cold), then evaluations; warm: the evaluations alone
    run() { local name=$1; shift; stamp "$name"; local start=$(date +%s)
      KERNEL_LAB_REPORT_DIR=$out/$section "$@" > $out/$section/$name.log 2>&1
      echo "wall $(( $(date +%s) - start )) s" | tee -a $out/$section/$name.log
      grep -E "^(combined_score|micro_score|macro_score|training_speedup|memory_ratio|stage[123]_seconds|warmup_seconds|warm-up done|error)" \
        $out/$section/$name.log | cut -c1-400 | tr '\n' ' '; echo; }
    [ $section = fresh ] && run warmup env KERNEL_LAB_SEED=1 python evaluator.py --warmup
    run optimized_new python evaluator.py examples/optimized_program.py --seed 1 --json
    run stock_warm python evaluator.py examples/stock_program.py --seed 1 --json
    run optimized_warm python evaluator.py examples/optimized_program.py --seed 1 --json
    run initial_warm python evaluator.py initial_program.py --seed 1 --json ;;
  startup)  # where a child's start-up goes on this machine
    stamp "start-up"; python benchmarks/startup.py --runs 2 2>&1 | tee $out/$section/startup.log ;;
  noise)  # stage 3's spread with 6 windows a side; the JSON has every step's seconds
    for p in examples/optimized_program.py none; do
      n=$(basename $p .py); stamp "stage 3 of $p, 6 windows"
      python -m kernel_lab.stage3 $p --budget gpu --repeat $([ $p = none ] && echo 2 || echo 3) \
        --option windows=6 --json $out/$section/$n.json > $out/$section/$n.log 2>&1; tail -12 $out/$section/$n.log
    done ;;
  evaluate)
    for p in ${EVAL_PROGRAMS:-examples/optimized_program.py}; do
      n=$(basename $p .py); stamp "evaluate $p"; start=$(date +%s)
      KERNEL_LAB_REPORT_DIR=$out/$section python evaluator.py $p --seed 1 --json > $out/$section/$n.log 2>&1
      echo "wall $(( $(date +%s) - start )) s" | tee -a $out/$section/$n.log
      grep -E "^(combined_score|micro_score|macro_score|training_speedup|memory_ratio|stage[123]_seconds|error)" \
        $out/$section/$n.log | cut -c1-400 | tr '\n' ' '; echo
    done ;;
  candidates)  # one process per program and row, programs side by side within a row
    b=${CANDIDATE_BATCH:-8}  # rows of 1023 tokens: 8 as the table, 4 as stage 3
    for row in ${CANDIDATE_ROWS:-smollm2-135m-q4:lora smollm2-135m-q4:dora qwen2.5-coder-0.5b-q4:lora qwen2.5-coder-0.5b-q4:dora}; do
      m=${row%%:*} t=${row##*:}
      for p in none ${CANDIDATES:-examples/optimized_program.py}; do
        n=${m%%-*}_${t}_$(basename $p .py)$([ $b = 8 ] || echo _b$b); stamp "step $m $t $p, ${b}x1023"
        python benchmarks/profile_step.py --model $m --fine-tune-type $t --program $p --batch $b --length 1023 \
          --dtype bfloat16 --clear-cache --no-parts --json $out/$section/$n.json > $out/$section/$n.log 2>&1
        grep -E "^(step|graph|kept|of which)|Error" $out/$section/$n.log | cut -c1-240
      done
    done ;;
  evals)
    for p in initial_program.py examples/optimized_program.py examples/stock_program.py; do
      n=$(basename $p .py); caches=/tmp/gpu-caches/$n; rm -rf $caches; mkdir -p $caches/ptx $caches/cuda
      for run in cold warm; do
        stamp "evaluate $p ($run)"; start=$(date +%s)
        MLX_PTX_CACHE_DIR=$caches/ptx CUDA_CACHE_PATH=$caches/cuda KERNEL_LAB_REPORT_DIR=$out/$section \
          python evaluator.py $p --seed 1 --json > $out/$section/${n}_$run.log 2>&1
        echo "wall $(( $(date +%s) - start )) s" | tee -a $out/$section/${n}_$run.log
        grep -E "^(combined_score|micro_score|macro_score|training_speedup|memory_ratio|stage[123]_seconds|error)" \
          $out/$section/${n}_$run.log | tr '\n' ' '; echo
      done
    done ;;
  repeat)
    for p in none examples/optimized_program.py; do
      n=$(basename $p .py); stamp "stage 3 of $p, 3 evaluations"
      python -m kernel_lab.stage3 $p --budget gpu --repeat 3 --json $out/$section/$n.json \
        > $out/$section/$n.log 2>&1; tail -12 $out/$section/$n.log
    done ;;
  legit)
    stamp "legit corpus"
    MLX_ENABLE_TF32=0 python tests/legit/legit_corpus.py --seeds ${LEGIT_SEEDS:-0-19} \
      --names stock,initial-program,optimized > $out/$section/programs.log 2>&1; tail -5 $out/$section/programs.log
    MLX_ENABLE_TF32=0 python tests/legit/legit_corpus.py --seeds 0-2 > $out/$section/all.log 2>&1
    tail -30 $out/$section/all.log ;;
  table)
    stamp "benchmark table"
    python -m kernel_lab.benchmark initial_program.py ${TABLE_PROGRAMS:-examples/optimized_program.py} --budget table \
      --out $out/$section > $out/$section/benchmark.log 2>&1; tail -40 $out/$section/benchmark.log ;;
  variants)
    stamp "micro vs macro"
    python benchmarks/micro_vs_macro.py write /tmp/variants > /dev/null
    for base in ${VARIANT_BASES:-initial optimized}; do  # one base's variants a run: 15 sides at once may not fit
      python -m kernel_lab.benchmark /tmp/variants/${base}_*.py initial_program.py examples/optimized_program.py \
        --budget gpu --model smollm2-135m-q4 --fine-tune-type lora --out $out/$section/$base \
        > $out/$section/$base.log 2>&1
      python benchmarks/micro_vs_macro.py analyze $out/$section/$base/benchmark.json | tee $out/$section/$base.txt
    done ;;
  profiles)
    for m in ${PROFILE_MODELS:-smollm2-135m-q4 qwen2.5-coder-0.5b-q4}; do for t in lora dora; do
      for p in none examples/optimized_program.py; do
        stamp "profile $m $t $p"
        python benchmarks/profile_step.py --model $m --fine-tune-type $t --program $p --length 1023 \
          --json $out/$section/${m%%-*}_${t}_$(basename $p .py).json > $out/$section/${m%%-*}_${t}_$(basename $p .py).log 2>&1
        tail -22 $out/$section/${m%%-*}_${t}_$(basename $p .py).log
      done; done; done ;;
  cleared)  # the bare step with and without mlx-lm's per-step mx.clear_cache(), one process each
    for p in none examples/optimized_program.py; do for cc in "" --clear-cache; do
      qwen_step "$p" "$cc" 20 ""
    done; done ;;
  diagnose)  # where stage 3's spread between processes comes from: the GPU's clocks, the host's share
    nvidia-smi -q > $out/$section/nvidia-smi-q.txt 2>&1; nvidia-smi topo -m > $out/$section/topo.txt 2>&1
    lscpu > $out/$section/lscpu.txt 2>&1
    reasons=clocks_event_reasons.active
    nvidia-smi --query-gpu=$reasons --format=csv > /dev/null 2>&1 || reasons=clocks_throttle_reasons.active
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,$reasons \
      --format=csv -lms 200 > $out/$section/smi.csv 2>&1 & sampler=$!
    # one process each, in turn; --clear-cache frees MLX's buffer cache after every step as mlx-lm's
    # train() does by default (stage 3 runs train(); the bare step ran faster: 62 vs ~100 ms)
    for i in 1 2 3; do for p in none examples/optimized_program.py; do for cc in "" --clear-cache; do
      qwen_step "$p" "$cc" 30 "_$i"
    done; done; done
    stamp "stage 3 of examples/optimized_program.py, 3 evaluations"
    python -m kernel_lab.stage3 examples/optimized_program.py --budget gpu --repeat 3 \
      --json $out/$section/optimized.json > $out/$section/optimized.log 2>&1; tail -14 $out/$section/optimized.log
    kill $sampler ;;
  compute)  # legitimate programs' gradients in bfloat16 at stage 3's sizes: can grad_check_compute be on?
    for m in smollm2-135m-q4 qwen2.5-coder-0.5b-q4; do
      stamp "bfloat16 gradient distances, $m"
      python benchmarks/compute_gradcheck.py --model $m --layers -1 --batch 4 --length 1023 stock \
        examples/optimized_program.py initial_program.py > $out/$section/${m%%-*}.log 2>&1
      tail -8 $out/$section/${m%%-*}.log
    done ;;
  *) echo "unknown section $section" ;;
  esac
  stamp "section $section done"
done

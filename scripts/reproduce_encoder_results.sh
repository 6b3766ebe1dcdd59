#!/usr/bin/env bash
# Reproduce the paper's encoder findings at small scale: fine-tune five GLUE tasks, analyse their deltas, sweep
# DARE / DropOnly / magnitude pruning / masking fine-tuned weights over drop rates with 3 mask seeds, compare DARE,
# DAREx-q (a rescale chosen on unlabelled examples) and DropOnly at p = 0.99-0.999, merge all 10
# pairs with the five methods without and with DARE (3 DARE seeds, both Fisher estimators), then repeat the core of
# it for two more fine-tuning seeds (the seeds_* steps) and write the tables and figures.
#
#   scripts/reproduce_encoder_results.sh                                   # all-MiniLM-L6-v2 on 2 CPU cores
#   scripts/reproduce_encoder_results.sh --model bert-base-uncased --gpu 0  # the paper's encoder, on a GPU
#   scripts/reproduce_encoder_results.sh --smoke                           # tiny caps: checks the plumbing
#   scripts/reproduce_encoder_results.sh --part models; ... --part merges; ... --part seeds
#                                                                 # the same in three resumable parts
#
# Every step is one of the project's scripts with --resume (or its own skip of finished training runs): run the
# same command again after an interruption and only what is missing is computed. Copy and edit for ablations.
# On a CPU the independent calls of a step run --jobs at a time (default: one per core, one thread each), since
# one single-threaded process per core is faster than one process using all cores on these small models.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=all-MiniLM-L6-v2
OUT=results/glue_reproduction
GLUE_DIR=${MERGELM_GLUE_DIR:-../shared/data/glue}
GPU=-1
SMOKE=0
JOBS=""
STEPS="train deltas sweep darex merge seeds_train seeds_sweep seeds_merge summary"
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    --output_dir) OUT=$2; shift 2 ;;
    --glue_dir) GLUE_DIR=$2; shift 2 ;;
    --gpu) GPU=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;   # e.g. --steps "train sweep" to run only those
    --part)                         # the recording in three parts of at most about 2.5 h each on 2 cores
      case "$2" in
        models) STEPS="train deltas sweep darex" ;;   # fine-tuning, delta analysis, sweeps, extreme rates
        merges) STEPS="merge summary" ;;              # pairwise merges, tables and figures
        seeds) STEPS="seeds_train seeds_sweep seeds_merge summary" ;;   # fine-tuning seeds 1 and 2
        *) echo "--part must be models, merges or seeds, got $2" >&2; exit 2 ;;
      esac
      shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;     # calls run at the same time (default: CPU cores, or 1 with --gpu)
    --smoke) SMOKE=1; shift ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

TASKS="cola sst2 mrpc stsb rte"
LR=3e-5                     # one learning rate for every task (MiniLM learns all five with it)
RATES="0.0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 0.99"
EXTREME_RATES="0.99 0.995 0.999"   # the darex step: where 1/(1-p) stops being the best rescale (DAREx)
SEEDS="0 1 2"
# More fine-tuning seeds (the seeds_* steps), each repeating a cut of the recording on its own fine-tuned models:
# the sweeps at SEED_RATES (DARE, DropOnly, magnitude pruning, mask seeds SEEDS) and the merges of SEED_METHODS
# without and with DARE (DARE seeds SEED_DARE_SEEDS). The cut keeps the part within about 2.5 h on 2 cores: Fisher
# and RegMean stay at fine-tuning seed 0 (their statistics make them 3-4 times dearer), and each DARE seed of these
# merges costs about as much as the plain merges (about 22 min for the two fine-tuning seeds).
FINETUNE_SEEDS="1 2"
SEED_RATES="0.0 0.5 0.9 0.99"
SEED_METHODS="average_merging task_arithmetic ties_merging"
SEED_DARE_SEEDS="0"
GRID=reduced                # a subset of the paper's grid (each method's glue_reduced values, model_merging_methods/registry.py)
# task, epochs, extra training flags (SST-2 capped at 8,000 of its 60,614 train examples); longest first
TRAIN_SPECS=("rte 5" "mrpc 3" "sst2 3 --max_train_samples 8000" "stsb 3" "cola 3")
EVAL_CAPS=()                                 # test = the full GLUE dev set
MERGE_CAPS=(--max_validation_samples 500)    # merge selection on at most 500 validation examples per task
if [ "$SMOKE" = 1 ]; then
  TASKS="rte mrpc"; RATES="0.0 0.5 0.99"; EXTREME_RATES="0.99"; SEEDS="0 1"; GRID=quick
  FINETUNE_SEEDS="1"; SEED_RATES="0.0 0.99"; SEED_METHODS="task_arithmetic"; SEED_DARE_SEEDS="0 1"
  TRAIN_SPECS=("rte 1 --max_train_samples 32" "mrpc 1 --max_train_samples 32")
  EVAL_CAPS=(--max_eval_samples 16); MERGE_CAPS=(--max_eval_samples 16)
fi
COMMON=(--language_model_name "$MODEL" --glue_dir "$GLUE_DIR" --output_dir "$OUT" --gpu "$GPU"
        --batch_size 16 --max_seq_length 128)
if [ -z "$JOBS" ]; then
  if [ "$GPU" -ge 0 ]; then JOBS=1; else JOBS=$(nproc); fi
fi
if [ "$GPU" -lt 0 ] && [ "$JOBS" -gt 1 ]; then
  export OMP_NUM_THREADS=$(( $(nproc) / JOBS > 1 ? $(nproc) / JOBS : 1 ))
fi

step() { echo "[$(date +%H:%M:%S), $((SECONDS / 60)) min] $*"; }
wants() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
cmd() { printf '%q ' "$@"; }   # one command line, quoted, for run_jobs
# run_jobs LINE...: run the command lines, $JOBS at a time; fails when one of them fails
run_jobs() { printf '%s\0' "$@" | xargs -0 -n 1 -P "$JOBS" bash -c; }

# train_calls SEED...: the fine-tuning calls of every task for these seeds, longest task first
train_calls() {
  calls=()
  for spec in "${TRAIN_SPECS[@]}"; do
    for seed in "$@"; do
      read -r task epochs extra <<< "$spec"
      # shellcheck disable=SC2086  # $extra holds flags
      calls+=("$(cmd python train_plms_glue.py "${COMMON[@]}" --dataset_name "$task" --num_runs 1 --seed "$seed" \
        --num_epochs "$epochs" --learning_rate $LR --warmup_ratio 0.06 --group_by_length $extra \
        ${EVAL_CAPS[@]+"${EVAL_CAPS[@]}"})")
    done
  done
}

if wants train; then
  step "fine-tune $(for spec in "${TRAIN_SPECS[@]}"; do printf '%s, ' "${spec%% *}"; done)$JOBS at a time"
  train_calls 0
  run_jobs "${calls[@]}"
fi

if wants deltas && [ ! -f "$OUT/delta_analysis/analysis.json" ]; then
  step "delta analysis of the fine-tuned models against $MODEL (the paper's SFT range: |delta| within 0.002-0.005)"
  # shellcheck disable=SC2086
  python analyze_deltas.py --pretrained_model "$MODEL" --quiet --output_dir "$OUT/delta_analysis" \
    --finetuned_models $(for t in $TASKS; do ls -d "$OUT/train_plms_glue/$t/$(basename "$MODEL")"/*/model; done)
fi

if wants sweep; then
  step "drop-rate sweeps: DARE, DropOnly (no rescale), magnitude pruning, DARE on the fine-tuned weights"
  calls=()
  # shellcheck disable=SC2086
  for variant in "" "--use_weight_rescale" "--use_weight_rescale --weight_format finetuned_weight" \
                 "--mask_strategy magnitude"; do   # longest first: DropOnly, DARE, fine-tuned weights, magnitude
    calls+=("$(cmd python inference_plms_glue.py "${COMMON[@]}" --learning_rate $LR --dataset_names $TASKS \
      --weight_mask_rate $RATES --seeds $SEEDS $variant ${EVAL_CAPS[@]+"${EVAL_CAPS[@]}"} --resume)")
  done
  run_jobs "${calls[@]}"
fi

if wants darex; then
  step "extreme drop rates: DARE, DAREx-q (the rescale chosen on unlabelled training examples), DropOnly"
  calls=()
  # shellcheck disable=SC2086
  for variant in "--use_weight_rescale --rescale_search last_layer" "--use_weight_rescale" ""; do
    calls+=("$(cmd python inference_plms_glue.py "${COMMON[@]}" --learning_rate $LR --dataset_names $TASKS \
      --weight_mask_rate $EXTREME_RATES --seeds $SEEDS $variant ${EVAL_CAPS[@]+"${EVAL_CAPS[@]}"} --resume)")
  done
  run_jobs "${calls[@]}"
fi

if wants merge; then
  MERGE=(python merge_plms_glue.py "${COMMON[@]}" --learning_rate $LR --dataset_names $TASKS --grid $GRID
         --fisher_estimator mergelm exact "${MERGE_CAPS[@]}" --resume)
  # two groups of about equal cost (Fisher's statistics are the dearest), so that two jobs finish together
  METHOD_GROUPS=("fisher_merging" "average_merging task_arithmetic regmean_merging ties_merging")
  step "pairwise merges without DARE: 5 methods, grid $GRID"
  calls=()
  for group in "${METHOD_GROUPS[@]}"; do
    # shellcheck disable=SC2086  # $group holds method names
    calls+=("$(cmd "${MERGE[@]}" --merging_method_name $group)")
  done
  run_jobs "${calls[@]}"
  step "pairwise merges with DARE: the plain runs' settings, then the drop rate; seeds $SEEDS"
  calls=()
  for seed in $SEEDS; do
    for group in "${METHOD_GROUPS[@]}"; do
      # shellcheck disable=SC2086
      calls+=("$(cmd "${MERGE[@]}" --merging_method_name mask_merging --use_weight_rescale --seeds "$seed" \
        --mask_apply_method $group)")
    done
  done
  run_jobs "${calls[@]}"
fi

if wants seeds_train; then
  step "fine-tune every task with seeds $FINETUNE_SEEDS"
  # shellcheck disable=SC2086
  train_calls $FINETUNE_SEEDS
  run_jobs "${calls[@]}"
fi

if wants seeds_sweep; then
  step "sweeps of the fine-tuning seeds $FINETUNE_SEEDS at p = $SEED_RATES: DARE, DropOnly, magnitude pruning"
  calls=()
  # shellcheck disable=SC2086
  for train_seed in $FINETUNE_SEEDS; do
    for variant in "" "--use_weight_rescale" "--mask_strategy magnitude"; do
      calls+=("$(cmd python inference_plms_glue.py "${COMMON[@]}" --learning_rate $LR --dataset_names $TASKS \
        --train_seed "$train_seed" --weight_mask_rate $SEED_RATES --seeds $SEEDS $variant \
        ${EVAL_CAPS[@]+"${EVAL_CAPS[@]}"} --resume)")
    done
  done
  run_jobs "${calls[@]}"
fi

if wants seeds_merge; then
  step "pairwise merges of the fine-tuning seeds $FINETUNE_SEEDS: $SEED_METHODS, without and with DARE (seeds $SEED_DARE_SEEDS)"
  plain=(); dare=()   # the DARE merges start from the plain runs' chosen settings, so those run first
  # shellcheck disable=SC2086
  for train_seed in $FINETUNE_SEEDS; do
    SEED_MERGE=(python merge_plms_glue.py "${COMMON[@]}" --learning_rate $LR --dataset_names $TASKS --grid $GRID
                --train_seed "$train_seed" "${MERGE_CAPS[@]}" --resume)
    plain+=("$(cmd "${SEED_MERGE[@]}" --merging_method_name $SEED_METHODS)")
    for seed in $SEED_DARE_SEEDS; do
      dare+=("$(cmd "${SEED_MERGE[@]}" --merging_method_name mask_merging --use_weight_rescale --seeds "$seed" \
        --mask_apply_method $SEED_METHODS)")
    done
  done
  run_jobs "${plain[@]}"
  run_jobs "${dare[@]}"
fi

if wants summary; then
  step "tables and figures"
  python summarize_results.py --results_dir "$OUT"
fi
step "done"

#!/usr/bin/env bash
# LoRA adapters and DARE on delta W = scale * B A: train PEFT LoRA adapters (rank 8 on every Linear layer of the
# encoder, the classifier head trained whole) of all-MiniLM-L6-v2 on five GLUE tasks, sweep DARE / DropOnly /
# magnitude pruning on each adapter's delta W with 3 mask seeds, sweep PEFT's factor-wise DARE on each adapter, merge
# the 10 adapter pairs with and without DARE (ours on delta W) and with PEFT's dare_linear / dare_ties, then write
# the tables.
#
#   scripts/reproduce_lora_results.sh                 # all-MiniLM-L6-v2 on 2 CPU cores
#   scripts/reproduce_lora_results.sh --smoke         # tiny caps: checks the plumbing
#   scripts/reproduce_lora_results.sh --steps "train"  # only some steps (train deltas sweep merge summary)
#   scripts/reproduce_lora_results.sh --model bert-base-uncased --gpu 0
#
# Every step resumes: run the same command again after an interruption and only what is missing is computed.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=all-MiniLM-L6-v2
OUT=results/lora_reproduction
GLUE_DIR=${MERGELM_GLUE_DIR:-../shared/data/glue}
GPU=-1
SMOKE=0
JOBS=""
STEPS="train deltas sweep merge summary"
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    --output_dir) OUT=$2; shift 2 ;;
    --glue_dir) GLUE_DIR=$2; shift 2 ;;
    --gpu) GPU=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --merge_seeds) MERGE_SEEDS_FLAG=$2; shift 2 ;;  # DARE seeds of the merges (default 0 1 2)
    --smoke) SMOKE=1; shift ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

TASKS="cola sst2 mrpc stsb rte"
LR=5e-4                     # LoRA's usual learning rate for BERT-size encoders
RANK=8                      # lora_alpha = 2 x rank (scale 2)
RATES="0.0 0.1 0.3 0.5 0.7 0.9 0.99"
SEEDS="0 1 2"
MERGE_SEEDS="0 1 2"          # DARE seeds of the merges (ours and PEFT's)
GRID=reduced
TRAIN_SPECS=("rte 5" "mrpc 3" "sst2 3 --max_train_samples 8000" "stsb 3" "cola 3")
EVAL_CAPS=()
MERGE_CAPS=(--max_validation_samples 500)
MERGE_SEEDS_FLAG=${MERGE_SEEDS_FLAG:-}
if [ "$SMOKE" = 1 ]; then
  TASKS="rte mrpc"; RATES="0.0 0.5 0.99"; SEEDS="0 1"; MERGE_SEEDS="0"; GRID=quick
  TRAIN_SPECS=("rte 1 --max_train_samples 32" "mrpc 1 --max_train_samples 32")
  EVAL_CAPS=(--max_eval_samples 16); MERGE_CAPS=(--max_eval_samples 16)
fi
if [ -n "$MERGE_SEEDS_FLAG" ]; then MERGE_SEEDS=$MERGE_SEEDS_FLAG; fi
COMMON=(--language_model_name "$MODEL" --glue_dir "$GLUE_DIR" --output_dir "$OUT" --gpu "$GPU"
        --batch_size 16 --max_seq_length 128)
PICK=(--learning_rate $LR --lora_rank $RANK)
if [ -z "$JOBS" ]; then
  if [ "$GPU" -ge 0 ]; then JOBS=1; else JOBS=$(nproc); fi
fi
if [ "$GPU" -lt 0 ] && [ "$JOBS" -gt 1 ]; then
  export OMP_NUM_THREADS=$(( $(nproc) / JOBS > 1 ? $(nproc) / JOBS : 1 ))
fi

step() { echo "[$(date +%H:%M:%S), $((SECONDS / 60)) min] $*"; }
wants() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
cmd() { printf '%q ' "$@"; }
run_jobs() { printf '%s\0' "$@" | xargs -0 -n 1 -P "$JOBS" bash -c; }

if wants train; then
  step "LoRA adapters (rank $RANK) for $(for spec in "${TRAIN_SPECS[@]}"; do printf '%s, ' "${spec%% *}"; done)$JOBS at a time"
  calls=()
  for spec in "${TRAIN_SPECS[@]}"; do
    read -r task epochs extra <<< "$spec"
    # shellcheck disable=SC2086  # $extra holds flags
    calls+=("$(cmd python train_plms_glue.py "${COMMON[@]}" --dataset_name "$task" --num_runs 1 --num_epochs "$epochs" \
      --learning_rate $LR --lora_rank $RANK --warmup_ratio 0.06 --group_by_length $extra ${EVAL_CAPS[@]+"${EVAL_CAPS[@]}"})")
  done
  run_jobs "${calls[@]}"
fi
if wants deltas; then
  step "|delta W| of the adapters against the paper's SFT range"
  # shellcheck disable=SC2046
  python scripts/lora_delta_ranges.py --output_dir "$OUT/delta_ranges" \
    --adapters $(for t in $TASKS; do ls -d "$OUT/train_plms_glue/$t/$(basename "$MODEL")"/*lora_rank=$RANK*/model; done) \
    > /dev/null
fi

if wants sweep; then
  step "drop-rate sweeps on each adapter's delta W (DARE, DropOnly, magnitude pruning) and PEFT's factor-wise DARE"
  calls=()
  # shellcheck disable=SC2086
  for variant in "" "--use_weight_rescale" "--mask_strategy magnitude"; do
    calls+=("$(cmd python inference_plms_glue.py "${COMMON[@]}" "${PICK[@]}" --dataset_names $TASKS \
      --weight_mask_rate $RATES --seeds $SEEDS $variant ${EVAL_CAPS[@]+"${EVAL_CAPS[@]}"} --resume)")
  done
  for seed in $SEEDS; do   # PEFT's operator on each adapter alone (add_weighted_adapter dare_linear's factors)
    # shellcheck disable=SC2086
    calls+=("$(cmd python peft_lora_glue.py sweep "${COMMON[@]}" "${PICK[@]}" --dataset_names $TASKS \
      --weight_mask_rate ${RATES#0.0 } --seeds "$seed" ${EVAL_CAPS[@]+"${EVAL_CAPS[@]}"} --resume)")
  done
  run_jobs "${calls[@]}"
fi

MERGE_METHODS="average_merging task_arithmetic ties_merging"
if wants merge; then
  MERGE=(python merge_plms_glue.py "${COMMON[@]}" "${PICK[@]}" --dataset_names $TASKS --grid $GRID
         "${MERGE_CAPS[@]}" --resume)
  PEFT_MERGE=(python peft_lora_glue.py merge "${COMMON[@]}" "${PICK[@]}" --dataset_names $TASKS "${MERGE_CAPS[@]}"
              --resume)
  # the plain runs first: every DARE run then takes its method's selection from them instead of searching again
  step "pairwise merges of the adapters without DARE: ours ($MERGE_METHODS), PEFT's linear and ties"
  # shellcheck disable=SC2086
  calls=("$(cmd "${MERGE[@]}" --merging_method_name $MERGE_METHODS)"
         "$(cmd "${PEFT_MERGE[@]}" --combination_type dare_linear --seeds)"
         "$(cmd "${PEFT_MERGE[@]}" --combination_type dare_ties --seeds)")
  run_jobs "${calls[@]}"
  step "pairwise merges with DARE: ours on delta W, PEFT's dare_linear / dare_ties on the factors; seeds $MERGE_SEEDS"
  calls=()
  for seed in $MERGE_SEEDS; do
    # shellcheck disable=SC2086
    calls+=("$(cmd "${MERGE[@]}" --merging_method_name mask_merging --use_weight_rescale --seeds "$seed" \
               --mask_apply_method $MERGE_METHODS)"
            "$(cmd "${PEFT_MERGE[@]}" --combination_type dare_linear --seeds "$seed")"
            "$(cmd "${PEFT_MERGE[@]}" --combination_type dare_ties --seeds "$seed")")
  done
  run_jobs "${calls[@]}"
fi

if wants summary; then
  step "tables"
  python summarize_results.py --results_dir "$OUT"
fi
step "done"

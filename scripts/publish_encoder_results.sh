#!/usr/bin/env bash
# Copy a reproduction's results (without model weights) into the repository:
#   scripts/publish_encoder_results.sh [results dir] [destination]
#   defaults: results/glue_reproduction -> reproductions/glue_minilm
#   the LoRA recording: scripts/publish_encoder_results.sh results/lora_reproduction reproductions/glue_minilm_lora
# Writes <dest>/tables (summary.md, CSVs, summary.json, figures), <dest>/delta_analysis (or delta_ranges) and
# <dest>/runs (every run folder's config.json / metrics.json / grid.json). To resume a reproduction from the published runs:
#   cp -r <dest>/runs results/glue_reproduction && scripts/reproduce_encoder_results.sh
# (the fine-tuning runs are trained again, since their weights are not published; finished sweeps and merges are
# skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-results/glue_reproduction}
DEST=${2:-reproductions/glue_minilm}
mkdir -p "$DEST"
rm -rf "$DEST/runs" "$DEST/delta_analysis" "$DEST/delta_ranges"
mkdir -p "$DEST/runs"
tar -C "$SRC" --exclude=model --exclude='*.log' --exclude=./summary --exclude=./delta_analysis \
  --exclude=./delta_ranges -cf - . | tar -C "$DEST/runs" -xf -
for analysis in delta_analysis delta_ranges; do   # the encoder's analyze_deltas.py, the adapters' |delta W|
  if [ -d "$SRC/$analysis" ]; then cp -r "$SRC/$analysis" "$DEST/$analysis"; fi
done
python summarize_results.py --results_dir "$DEST/runs" --output_dir "$DEST/tables" > /dev/null
echo "published $SRC -> $DEST ($(find "$DEST/runs" -name metrics.json | wc -l) runs)"

#!/usr/bin/env bash
# The whole pipeline on synthetic data: stages 00-06, then the demo's scores. Usage: run_demo.sh CONFIG [KEY=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/demo.yaml}
shift || true
py=.venv/bin/python
start=$(date +%s)
for stage in 00_make_synthetic_data 01_tile_slides 02_merge_external 03_cache_embeddings 04_train_cv 05_infer_test 06_ensemble_submit; do
  echo "=== ${stage} ==="
  "$py" "scripts/${stage}.py" --config "$config" "$@"
done
echo "=== results ($(( $(date +%s) - start )) s) ==="
"$py" scripts/score_demo.py --config "$config" "$@"

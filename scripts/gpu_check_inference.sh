#!/usr/bin/env bash
# One-go GPU check of stage 05's pipelined inference (issue 13), for a machine with one or more GPUs.
# Runs the inference tests on the GPU (pipelined = bit-equal to in-process, the cosine bound, the budget), then
# the benchmark with every visible GPU: default encoder and ViT-B/16 (random weights), 4 decoder processes
# as on Kaggle. Paste the RESULT lines (each names its card) into the issue. About 6-9 minutes on one H100.
#   usage: bash scripts/gpu_check_inference.sh [extra bench_inference.py arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; print('GPUs:', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
"$PY" -m pytest -q -x -p no:cacheprovider tests/test_inference_scale.py -k "pipelined or cosine or jpeg or budget" 2>&1 | tail -3
"$PY" scripts/bench_inference.py --workers 4 --tmas 16 --wsis 2 --wsi-mpx 300 "$@" 2>&1 | grep -v "^INFO"

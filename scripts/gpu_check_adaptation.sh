#!/usr/bin/env bash
# One-go GPU check of stage 02b, encoder adaptation (issue 27), for a machine with a GPU and the demo's tiles
# (make demo, or stages 00-02 of configs/demo.yaml). Runs the adaptation tests on CUDA (autocast, the torchrun
# test stays on gloo/CPU), then bench_adaptation.py: per method the pipeline ratio and kNN probe on the GPU, and
# the projected wall time of 2000 DINO+LoRA steps at batch 64 for ViT-S/16 and ViT-B/16 (the card is named).
# Paste the RESULT lines into the issue. Unmeasured on a GPU so far.
#   usage: bash scripts/gpu_check_adaptation.sh [extra bench_adaptation.py arguments]
source "$(dirname "$0")/gpu_check_common.sh"
"$PY" -m pytest -q -x -p no:cacheprovider tests/test_adaptation.py 2>&1 | tail -3
PYTHONPATH="$PWD/scripts:$PYTHONPATH" "$PY" scripts/bench_adaptation.py --config configs/demo.yaml --steps 200 \
    adapt.batch_size=64 adapt.num_workers=8 "$@" 2>&1 | grep --line-buffered "RESULT\|steps/s with\|no GPU"

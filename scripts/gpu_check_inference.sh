#!/usr/bin/env bash
# One-go GPU check of stage 05's pipelined inference (issue 13), for a machine with one or more GPUs.
# Runs the inference tests on the GPU (pipelined = bit-equal to in-process, the cosine bound, the budget), the
# encoder alone (bench_encoder.py: precisions, formats, new batch sizes), then the benchmark with every visible GPU: default encoder and ViT-B/16 (random weights), with 4 decoder processes
# as on Kaggle and with stage 05's default (inference.decoders: auto, one per core: does the GPU keep up when the
# decoders are many?).
# Paste the RESULT lines (each names its card) into the issue. About 6 minutes on one H100 with 16 cores
# (the tests 1.5, the encoder 0.7, the benchmark 3.3 with 8 TMAs and 2 WSIs before batch padding).
# Since commit 1cb3862 the decoders import no torch and tile batches travel as numpy arrays in shared memory
# (inference/decoding.py), no longer as torch tensors: these RESULT lines are that transport's first GPU figures.
#   usage: bash scripts/gpu_check_inference.sh [extra bench_inference.py arguments]
#   PY=python3 bash scripts/gpu_check_inference.sh   # another interpreter than the project's .venv
source "$(dirname "$0")/gpu_check_common.sh"
"$PY" -m pytest -q -x -p no:cacheprovider tests/test_inference_scale.py -k "(pipelined or cosine or jpeg or budget) and not bench" 2>&1 | tail -3
# issue 26's methods on CUDA (runtime.device auto): AdaBN's re-estimation and stage 05's adapted encoder, stain
# normalisation in the pipelined consumer threads, CORAL's deferred predictions; unmeasured on a GPU so far
"$PY" -m pytest -q -x -p no:cacheprovider tests/test_bn_adaptation.py tests/test_stain_normalisation.py tests/test_coral.py 2>&1 | tail -3
PYTHONPATH="$PWD/scripts:$PYTHONPATH" "$PY" scripts/bench_encoder.py 2>&1 | grep --line-buffered -v "^INFO"
"$PY" scripts/bench_inference.py --workers "4,auto" --tmas 8 --wsis 2 --wsi-mpx 300 "$@" 2>&1 | grep --line-buffered -v "^INFO"

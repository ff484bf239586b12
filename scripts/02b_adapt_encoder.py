#!/usr/bin/env python
"""Stage 02b (optional, pip install '.[adapt]'): continue training the configured encoder on stage 01's tiles
(adapt.method dino | moco | supcon | finetune; adapt.trainable lora | last_blocks | full) and write
{processed}/encoders/{adapt.name}/model.safetensors for features.weights. Several GPUs:
torchrun --nproc_per_node N scripts/02b_adapt_encoder.py --config ..."""

from ubc_ocean.cli import main

if __name__ == "__main__":
    raise SystemExit(main("ubc_ocean.adaptation.stage:run", __doc__))

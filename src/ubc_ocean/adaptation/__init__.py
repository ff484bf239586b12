"""Encoder adaptation (issue 27): training the configured encoder on the competition's own tiles before stage 03.
Its libraries (peft for LoRA) are the ``adapt`` extra: nothing here is imported by inference or the Kaggle bundle."""

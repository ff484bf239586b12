"""Stage 00: a deterministic, UBC-OCEAN-shaped synthetic data set with class-specific tissue morphology."""

from ubc_ocean.synthetic.generate import generate, render_slide, run

__all__ = ["generate", "render_slide", "run"]

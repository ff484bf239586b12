"""The competition's supplemental masks: one RGB PNG per annotated training WSI, any size (often downsampled),
tumour red, stroma green, necrosis blue, anything else unannotated.

Only what synthetic TMA cores need lives here: the tumour share of the mask, shrunk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ubc_ocean.slides.reader import SlideError, _error_text


def tumour_fraction_view(path: str | Path, max_side: int) -> np.ndarray:
    """The mask's tumour pixels (R > 127, G < 128, B < 128) as a float32 view in [0, 1] whose longest side
    is at most ``max_side`` (each value the tumour share of the mask pixels it covers). Decoded once,
    streaming; a mask that does not decode raises :class:`SlideError` naming the file."""
    import pyvips

    try:
        image = pyvips.Image.new_from_file(str(path), access="sequential", fail_on="error")
        if image.bands < 3:
            raise SlideError(f"supplemental mask {path}: {image.bands} band(s), expected RGB")
        tumour = ((image[0] > 127) & (image[1] < 128) & (image[2] < 128)).cast("float") / 255.0
        scale = min(1.0, max_side / max(image.width, image.height))
        if scale < 1.0:
            tumour = tumour.resize(scale, kernel="linear")  # box-averages first: shares, not a subsample
        return np.clip(tumour.numpy().astype(np.float32), 0.0, 1.0)
    except pyvips.Error as err:
        raise SlideError(f"supplemental mask {path}: {_error_text(err)}") from err

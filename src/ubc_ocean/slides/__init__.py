"""Slide readers: streaming PNG through pyvips, pyramidal formats through openslide, one interface."""

from ubc_ocean.slides.magnification import is_tma_by_size, native_magnification
from ubc_ocean.slides.reader import SlideError, SlideReader, open_slide

__all__ = ["SlideError", "SlideReader", "is_tma_by_size", "native_magnification", "open_slide"]

"""Keep long streaming runs in flat memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)
_M_ARENA_MAX = -8  # glibc's mallopt parameter number


@functools.cache
def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's per-thread malloc arenas (a no-op elsewhere); returns whether it applied.

    Tiles decoded on one thread and JPEG-encoded on others otherwise spread over one arena per thread,
    and their fragmentation makes the resident size grow with the slide, not with the work in flight.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        log.debug("mallopt unavailable; malloc arenas left as they are")
        return False

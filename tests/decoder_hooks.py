"""Decoder process entry points for the tests: a spawned decoder process imports this module by name.

:func:`decode_or_die` is the real decoder, except that the slides named in ``$UBC_OCEAN_TEST_DOOMED_SLIDES``
(comma-separated image ids) kill their process (SIGKILL, as the OOM killer or a native crash would) after
their first tile batch is put on the queue: at once, or, with ``$UBC_OCEAN_TEST_DIE_LATE`` set, only once
the batch has left the process and waits on the queue for an encoder.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from ubc_ocean.inference import decoding

DOOMED = "UBC_OCEAN_TEST_DOOMED_SLIDES"
LATE = "UBC_OCEAN_TEST_DIE_LATE"


class _DoomedBatches(decoding.SlideBatches):
    def __iter__(self) -> Iterator[np.ndarray]:
        doomed = str(self.job.spec.image_id) in os.environ.get(DOOMED, "").split(",")
        for batch in super().__iter__():
            yield batch
            if doomed:
                if os.environ.get(LATE):
                    time.sleep(0.3)  # the queue's feeder thread has sent the batch by then
                os.kill(os.getpid(), signal.SIGKILL)


def decode_or_die(cfg: Mapping, jobs: Any, batches: Any) -> None:
    """The decoder process's loop, with the doomed slides' batches."""
    decoding.SlideBatches = _DoomedBatches  # this process only: it was started for the test
    decoding.decode_slides(cfg, jobs, batches)


def exit_at_start(cfg: Mapping, jobs: Any, batches: Any) -> None:
    """A decoder process that cannot start (a broken install): it exits before reading any job."""
    raise SystemExit(1)

"""Pipelined fused inference: decoder processes feed tile batches to one encoder consumer per device.

::

    decoder process 1 ── its own queue ─ forwarder thread ─┐                   ┌─ consumer thread, cuda:0
    decoder process 2 ── its own queue ─ forwarder thread ─┼─ bounded queue ───┼─ consumer thread, cuda:1
    ...   (one slide each: SlideBatches; uint8 batches      ┘ (queue_depth)     └─ ...
           in shared memory)
                                  results (features per batch, slide ends) ─> FusedPipeline.run (the caller)

* Decoding (PNG, tiling, the tile round trip) runs in ``workers`` processes (``inference.decoders``,
  :func:`decoder_count`: by default one per core when a GPU encodes; forked from a fork server on Linux,
  else spawned: :func:`ubc_ocean.parallel.process_context`), one slide each; the
  caller's ``next_job`` is asked for a slide whenever a decoder is idle, so a time budget decides each
  slide's mode with the rates measured so far.
* Batches travel as uint8 arrays in shared memory (:func:`~ubc_ocean.inference.decoding.share_batch`:
  decoders import no torch), each decoder's through a queue of its own (one batch)
  that a thread of this process forwards to the consumers' queue of ``queue_depth`` batches: memory is
  bounded by ``queue_depth + 3 x workers + consumers`` batches, never by the slide. A decoder's own queue
  dies with it: a process killed while writing to a shared queue would leave that queue's lock or slot
  taken, and every other decoder blocked on it.
* One consumer thread per device (every visible GPU by default, :func:`ubc_ocean.device.visible_devices`)
  copies each batch to pinned memory, then to its device without blocking, and runs the encoder under
  autocast (:func:`ubc_ocean.features.embed.embed_batches`; which also normalises the tiles' stain with
  ``features.stain_normalisation``, on the CPU). The GIL is released while CUDA works.
* On the CPU with one worker it stays simple: each slide is decoded and embedded in this process, in turn.

A slide that fails (bad file, encoder error) is a ``failed`` :class:`SlideResult`; a decoder process that
dies (a native crash, the OOM killer) costs the slide it held, and is replaced; one that Python exits (it
could not start or run its loop, which no slide causes) stops the run. Each batch's block of shared
memory is named after its decoder process: the consumer that takes it unlinks it, and the blocks a run
leaves (batches still queued when it stops, a decoder killed before sending the block it made) are
removed when the run ends.
"""

from __future__ import annotations

import copy
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ubc_ocean.config import ConfigError
from ubc_ocean.device import visible_devices
from ubc_ocean.encoders.registry import Encoder
from ubc_ocean.features.embed import embed_batches, encoder_from_config, inference_options, prepare_encoder
from ubc_ocean.inference.decoding import (
    SlideBatches,
    SlideJob,
    TiledSlide,
    decode_slides,
    failure_message,
    receive_batch,
    remove_batches_of,
    unexpected_error,
)
from ubc_ocean.inference.fused import assemble
from ubc_ocean.parallel import in_environment, one_line, process_context, usable_cores
from ubc_ocean.stain_normalisation import StainReference

log = logging.getLogger(__name__)
POLL_S = 0.2  # how often a waiting loop looks at its stop signal and at its decoder processes
LIVENESS_S = 1.0  # how often the caller's loop looks at its decoder processes while messages keep coming


@dataclass
class SlideResult:
    """One slide's outcome: ``done`` with its features, coords and facts, or ``failed`` with a message (and
    ``error``, the exception's type when it was unexpected: not a bad file's error nor a dead decoder); with
    the CPU seconds its decoding took, the pixels it decoded, and the encoder seconds of its tiles."""

    job: SlideJob
    status: str
    features: np.ndarray | None = None
    coords: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    message: str = ""
    error: str = ""
    decode_s: float = 0.0
    decoded_pixels: int = 0
    encode_s: float = 0.0

    @property
    def tiles(self) -> int:
        return 0 if self.features is None else len(self.features)


@dataclass
class PipelineStats:
    """Wall time of :meth:`FusedPipeline.run` and the seconds each consumer spent computing."""

    devices: list[str]
    wall_s: float = 0.0
    busy_s: dict[str, float] = field(default_factory=dict)
    tiles: int = 0

    @property
    def busy_fraction(self) -> float:
        """Fraction of the wall time the consumers computed, averaged over them (``gpu_busy`` on GPUs)."""
        if self.wall_s <= 0 or not self.devices:
            return 0.0
        return sum(self.busy_s.values()) / (self.wall_s * len(self.devices))


def failed_result(job: SlideJob, err: BaseException) -> SlideResult:
    """The ``failed`` result of a slide whose work raised ``err``."""
    return SlideResult(job, "failed", message=failure_message(job, err), error=unexpected_error(err))


def decoder_count(setting: int | str, workers: int, devices: list[torch.device], cores: int) -> int:
    """Stage 05's decoder processes: ``inference.decoders`` when it is a number; ``auto``: one per core when a
    GPU encodes (PNG decoding is then the bottleneck: one process feeding a GPU leaves it waiting), else
    ``runtime.workers`` (on the CPU the encoder competes with the decoders for the same cores)."""
    if setting != "auto":
        return max(1, int(setting))
    if any(device.type == "cuda" for device in devices):
        return max(1, cores)
    return max(1, int(workers))


class FusedPipeline:
    """Embeds the slides a caller hands out, decoding and encoding at once (see the module's notes)."""

    def __init__(self, cfg: Mapping, devices: list[torch.device] | None = None, workers: int | None = None,
                 queue_depth: int | None = None, stain: StainReference | None = None):
        self.cfg = cfg
        self.devices = devices or visible_devices(cfg["runtime"]["device"])
        self.workers = max(1, int(workers)) if workers is not None else decoder_count(
            cfg["inference"]["decoders"], int(cfg["runtime"]["workers"]), self.devices, usable_cores())
        self.queue_depth = max(1, int(cfg["inference"]["queue_depth"] if queue_depth is None else queue_depth))
        self.stats = PipelineStats([str(d) for d in self.devices])
        base = encoder_from_config(cfg)
        self.encoders = [prepare_encoder(base if i == 0 else copy.deepcopy(base), device)
                         for i, device in enumerate(self.devices)]
        self._options = inference_options(cfg["features"], stain)  # the stain normalisation included
        auto = workers is None and cfg["inference"]["decoders"] == "auto"
        log.info("fused inference: %s%s", self.describe(), " (inference.decoders: auto)" if auto else "")

    def describe(self) -> str:
        """How slides are decoded and encoded, in words."""
        devices = ", ".join(str(device) for device in self.devices)
        if self.in_process:
            return f"decoding and encoding take turns in this process on {devices}"
        many = self.workers > 1
        return f"{self.workers} decoder process{'es feed' if many else ' feeds'} the encoder on {devices}"

    @property
    def in_process(self) -> bool:
        """One worker on the CPU: decode and encode take turns in this process, as simple as can be."""
        return self.workers <= 1 and all(device.type == "cpu" for device in self.devices)

    def run(self, next_job: Callable[[], SlideJob | None],
            should_stop: Callable[[], bool] = lambda: False) -> Iterator[SlideResult]:
        """Yield a :class:`SlideResult` per slide as each completes, asking ``next_job`` for the next slide
        whenever a decoder is free (None: no more). When ``should_stop`` turns true, slides in flight are
        abandoned (no result) and the run ends; leaving the loop early does the same."""
        started = time.perf_counter()
        try:
            if self.in_process:
                yield from self._run_in_process(next_job, should_stop)
            else:
                yield from self._run_pipelined(next_job, should_stop)
        finally:
            self.stats.wall_s += time.perf_counter() - started

    # --- the simple way: one process -------------------------------------------------------------------

    def _run_in_process(self, next_job: Callable[[], SlideJob | None],
                        should_stop: Callable[[], bool]) -> Iterator[SlideResult]:
        encoder, device = self.encoders[0], self.devices[0]
        while not should_stop():
            job = next_job()
            if job is None:
                return
            batches = SlideBatches(job, self.cfg)
            chunks, encode_s = [], 0.0
            try:
                for batch in batches:
                    if should_stop():
                        return
                    tick = time.perf_counter()
                    chunks += list(embed_batches(encoder, [batch], device, **self._options))
                    encode_s += time.perf_counter() - tick
                features, coords, info = assemble(chunks, batches.result, encoder.out_dim)
            except ConfigError:
                raise
            except Exception as err:  # one bad slide never stops the run
                yield failed_result(job, err)
                continue
            finally:
                self._count(str(device), encode_s)
            self.stats.tiles += len(features)
            yield SlideResult(job, "done", features, coords, info, decode_s=batches.result.decode_s,
                              decoded_pixels=batches.result.decoded_pixels, encode_s=encode_s)

    def _count(self, device: str, seconds: float) -> None:
        self.stats.busy_s[device] = self.stats.busy_s.get(device, 0.0) + seconds

    # --- the pipelined way: decoder processes and consumer threads ---------------------------------------

    def _run_pipelined(self, next_job: Callable[[], SlideJob | None],
                       should_stop: Callable[[], bool]) -> Iterator[SlideResult]:
        context = process_context()
        batches: queue.Queue = queue.Queue(maxsize=self.queue_depth)
        results: queue.Queue = queue.Queue()
        stop = threading.Event()
        decoders = [_Decoder(context, index, self.cfg, batches, stop) for index in range(self.workers)]
        # not daemons: a consumer left computing by a stopped run ends after its batch, and the interpreter
        # waits for it at exit (killing a thread inside torch aborts the process)
        consumers = [threading.Thread(target=self._consume, args=(encoder, device, batches, results, stop),
                                      name=f"encoder-{device}")
                     for encoder, device in zip(self.encoders, self.devices, strict=True)]
        for thread in consumers:
            thread.start()
        slides: dict[int, _Slide] = {}
        keys = iter(range(1 << 62))
        exhausted = finished = False
        checked = time.monotonic()
        try:
            while True:
                for decoder in decoders:  # hand a slide to every idle decoder
                    if decoder.key is None and not exhausted and not should_stop():
                        job = next_job()
                        if job is None:
                            exhausted = True
                        else:
                            key = next(keys)
                            slides[key] = _Slide(job)
                            decoder.give(key, job)
                if exhausted and not slides:
                    finished = True
                    return
                if should_stop():
                    return
                if time.monotonic() - checked >= LIVENESS_S:  # also while other slides keep messages coming
                    checked = time.monotonic()
                    yield from self._replace_dead(decoders, slides)
                try:
                    message = results.get(timeout=POLL_S)
                except queue.Empty:
                    checked = time.monotonic()
                    yield from self._replace_dead(decoders, slides)
                    continue
                yield from self._handle(message, slides, decoders)
        finally:
            stop.set()
            for decoder in decoders:
                decoder.close()
            for thread in consumers:  # idle at the end; when stopped (a deadline), a batch being encoded is not
                thread.join(timeout=10 if finished else 0)  # waited for: the thread ends after it, by itself
            left = remove_batches_of(pid for decoder in decoders for pid in decoder.pids)
            if left:
                log.debug("removed %d tile batches no encoder took", left)

    def _handle(self, message: tuple, slides: dict[int, _Slide], decoders: list[_Decoder]) -> Iterator[SlideResult]:
        kind, key = message[0], message[1]
        if kind == "crash":  # a consumer thread's own bug: not a slide's problem
            raise message[2]
        if kind == "fatal":
            raise ConfigError(message[2])
        if kind == "lost":  # a batch that could not be received: most likely its decoder died
            for decoder in decoders:
                if decoder.key == key:
                    decoder.process.join(timeout=1.0)  # a dying process: let it be gone
            yield from self._replace_dead(decoders, slides)  # then its slide fails as the decoder's death
            kind = "encode_failed"  # else (a live decoder) with the consumer's words
        if kind in ("end", "failed"):  # the decoder is free again
            for decoder in decoders:
                if decoder.key == key:
                    decoder.key = None
        slide = slides.get(key)
        if slide is None:  # a slide already failed: its late messages are dropped
            return
        if kind == "features":
            _, _, index, features, seconds = message
            slide.chunks[index] = features
            slide.encode_s += seconds
        elif kind == "end":
            slide.tiled = message[2]
        elif kind in ("failed", "encode_failed"):  # the decoder's message names the file; the consumer's not
            del slides[key]
            text = message[2] if kind == "failed" else f"{slide.job.spec.path.name}: {message[2]}"
            yield SlideResult(slide.job, "failed", message=text, error=message[3])
            return
        if slide.complete:
            del slides[key]
            yield self._done(slide)

    def _done(self, slide: _Slide) -> SlideResult:
        tiled = slide.tiled
        chunks = [slide.chunks[i] for i in range(tiled.n_batches)]
        try:
            features, coords, info = assemble(chunks, tiled, self.encoders[0].out_dim)
        except RuntimeError as err:
            return failed_result(slide.job, err)
        self.stats.tiles += len(features)
        return SlideResult(slide.job, "done", features, coords, info, decode_s=tiled.decode_s,
                           decoded_pixels=tiled.decoded_pixels, encode_s=slide.encode_s)

    def _replace_dead(self, decoders: list[_Decoder], slides: dict[int, _Slide]) -> Iterator[SlideResult]:
        for decoder in decoders:
            if decoder.process.is_alive():
                continue
            key, code = decoder.key, decoder.process.exitcode
            if key is None or (code is not None and code > 0):
                # Python exited it: every slide's error is caught and sent, so it could not start or run its
                # loop (a broken install), which no slide causes and every new process would repeat
                raise RuntimeError(f"a decoder process exited with code {code} outside any slide's work; run "
                                   "with inference.decoders=1 runtime.device=cpu to see the error in this process")
            decoder.restart()
            slide = slides.pop(key, None) if key is not None else None
            if slide is not None:
                log.warning("%s: its decoder process died (exit code %s); a new one takes the next slide",
                            slide.job.spec.slide_id, code)
                yield SlideResult(slide.job, "failed", message=f"{slide.job.spec.path.name}: the decoder process "
                                  "died while reading it (a crash in a native decoder, or out of memory)")

    def _consume(self, encoder: Encoder, device: torch.device, batches: Any, results: queue.Queue,
                 stop: threading.Event) -> None:
        """One device's consumer: encode each batch that arrives, pass every other message on."""
        failed: set[int] = set()
        try:
            while not stop.is_set():
                try:
                    message = batches.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if message[0] != "batch":
                    results.put(message)
                    continue
                _, key, index, payload = message
                try:  # its shared memory comes from the decoder process, which may have died since
                    tiles = torch.from_numpy(receive_batch(payload))
                except Exception as err:
                    failed.add(key)
                    results.put(("lost", key, f"tile batch {index} could not be received from its decoder "
                                 f"process: {type(err).__name__}: {one_line(str(err))}", ""))  # no bug's error
                    continue
                if key in failed:
                    continue
                tick = time.perf_counter()
                try:
                    features = next(embed_batches(encoder, [tiles], device, **self._options))
                except Exception as err:  # an encoder error (CUDA, OOM) fails this slide only
                    failed.add(key)
                    results.put(("encode_failed", key, f"batch {index}: unexpected {type(err).__name__}: "
                                 f"{one_line(str(err))}", type(err).__name__))
                    continue
                seconds = time.perf_counter() - tick
                self._count(str(device), seconds)
                results.put(("features", key, index, features, seconds))
        except Exception as err:
            results.put(("crash", -1, err))


@dataclass
class _Slide:
    """A slide in flight: its features per batch so far, and its tiling facts once the decoder ends it."""

    job: SlideJob
    chunks: dict[int, np.ndarray] = field(default_factory=dict)
    tiled: TiledSlide | None = None
    encode_s: float = 0.0

    @property
    def complete(self) -> bool:
        return self.tiled is not None and len(self.chunks) == self.tiled.n_batches


class _Decoder:
    """One decoder process with its own job queue, so the caller knows which slide each one holds, and its
    own output queue, forwarded to the consumers' ``batches`` by a thread until ``stop`` or a restart."""

    def __init__(self, context: Any, index: int, cfg: Mapping, batches: queue.Queue, stop: threading.Event):
        self.context, self.index, self.cfg, self.batches, self.stop = context, index, cfg, batches, stop
        self.key: int | None = None
        self.pids: list[int] = []  # every process this decoder has been (restarts included)
        self._start()

    def _start(self) -> None:
        self.jobs = self.context.SimpleQueue()
        self.output = self.context.Queue(maxsize=1)
        self.retired = threading.Event()
        self.process = self.context.Process(target=in_environment, name=f"decoder-{self.index}", daemon=True,
                                            args=(dict(os.environ), decoder_entry, self.cfg, self.jobs, self.output))
        self.process.start()
        self.pids.append(self.process.pid)
        threading.Thread(target=_forward, args=(self.output, self.batches, self.stop, self.retired),
                         name=f"forward-decoder-{self.index}", daemon=True).start()

    def give(self, key: int, job: SlideJob) -> None:
        self.key = key
        self.jobs.put((key, job))

    def restart(self) -> None:
        """A new process, with new queues: the dead one's are dropped with whatever it left in them."""
        self.key = None
        self.retired.set()
        self.process.join(timeout=0)
        self.output.cancel_join_thread()
        self._start()

    def close(self) -> None:
        """End the process at once: idle, or abandoned mid-slide, it holds nothing of value (its unsent
        batches' blocks are removed when the run ends), and a time budget has no seconds for a graceful exit."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self.retired.set()
        self.output.cancel_join_thread()


def _forward(source: Any, target: queue.Queue, stop: threading.Event, retired: threading.Event) -> None:
    """Pass one decoder's messages on to the consumers' queue, until the run stops or the decoder is replaced
    (a thread of the caller's process; it ends too if a message is cut short by its writer's death, and one
    left waiting on such a message holds nothing the others need)."""
    while not (stop.is_set() or retired.is_set()):
        try:
            message = source.get(timeout=POLL_S)
        except queue.Empty:
            continue
        except Exception:  # a message its dying writer cut short: the liveness check fails its slide
            return
        while not (stop.is_set() or retired.is_set()):
            try:
                target.put(message, timeout=POLL_S)
                break
            except queue.Full:
                continue


# What a decoder process runs (a seam: tests point it at a module of theirs that decoder processes import).
decoder_entry: Callable[[Mapping, Any, Any], None] = decode_slides

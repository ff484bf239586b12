#!/usr/bin/env python
"""Benchmark stage 05's pipelined fused inference on a synthetic test set with the real composition, scaled
down, and project the full hidden test set (1500 TMAs + 500 WSIs of 1.6 gigapixels) on a Kaggle machine.

The set: TMAs of about 3000x3000 px (40x, white background) and WSIs of several hundred megapixels (20x,
black background, with ~3000 px thumbnails as the competition gives), PNGs whose compression ratio is
printed (real ones: about 4.7:1; the synthetic renders, already textured, about 3:1: their decoding is
if anything dearer than real PNGs'). Each encoder (the default, and a ViT-B/16 with random weights: timing
only) embeds the TMAs, then the WSIs, through :class:`~ubc_ocean.inference.pipeline.FusedPipeline` with
``--workers`` decoder processes and one consumer per visible GPU. Measured per image: the decoders' seconds
(decoding, tiling, the JPEG round trip) and the encoder's seconds per tile. The projection gives the full
set's decoding to ``--kaggle-cores`` decoder processes (cores assumed as fast as this machine's) and its
tiles (WSIs at the tile cap) to the consumers, overlapped: hours = max(decode / cores, encode / GPUs).
It also prints the cosine similarity of stage 01+03 features (JPEG tiles on disk) and fused features on
one TMA. Lines start with ``RESULT`` per encoder::

    RESULT tma_s=<wall s per TMA> wsi_s_per_gpx=<wall s per WSI gigapixel> projected_hours=<full set>
           gpu_busy=<encoder busy fraction of the wall time> overlap=<ideal wall / wall> device=<devices>
           encoder=<name> workers=<decoder processes>

``overlap`` says how well decoding and encoding overlap whatever the bottleneck: the ideal wall time of a
set is the larger of its decoding seconds shared by the decoders and its encoding seconds shared by the
consumers; 1.0 is a perfect pipeline (decoders and consumers that take turns score about 0.5 when both cost
the same). A fast GPU fed by few cores is idle most of the time (``gpu_busy`` low) with ``overlap`` near 1:
the decoders bound the run. ``--workers 4,14`` measures several decoder counts on the same test set;
``auto`` is stage 05's own choice (``inference.decoders: auto``).

``--quick`` shrinks everything for a smoke test (its figures mean nothing): the default encoder at input
size 64, two small TMAs and a 2-megapixel WSI, in one process.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyvips
import timm
import torch

from ubc_ocean import layout
from ubc_ocean.config import load_config
from ubc_ocean.device import resolve_device, visible_devices
from ubc_ocean.features.embed import encoder_from_config, prepare_encoder
from ubc_ocean.features.stage import embed_tile_folder
from ubc_ocean.inference.decoding import SlideJob
from ubc_ocean.inference.fused import embed_slide_streaming
from ubc_ocean.inference.pipeline import FusedPipeline
from ubc_ocean.sources import SlideSpec
from ubc_ocean.synthetic import render_slide
from ubc_ocean.tiling.stage import tile_slide

HIDDEN_TMAS, HIDDEN_WSIS, HIDDEN_WSI_GPX = 1500, 500, 1.6
HIDDEN_TILE_CAP = 2000  # tiling.max_tiles_per_slide's default: the tiles of a real WSI in the projection


def write_png(rgb: np.ndarray | pyvips.Image, path: Path) -> float:
    """Save a PNG (libvips' default compression); returns its compression ratio (raw RGB bytes / file)."""
    image = rgb if isinstance(rgb, pyvips.Image) else pyvips.Image.new_from_array(rgb)
    image.pngsave(str(path))
    return image.width * image.height * 3 / path.stat().st_size


def make_test_set(folder: Path, tmas: int, tma_side: int, wsis: int, wsi_mpx: float, base_side: int) -> list:
    """The synthetic test images as ``SlideSpec``; a WSI is a rendered base tiled (mirrored) to its size."""
    folder.mkdir(parents=True, exist_ok=True)
    specs, ratios = [], []
    for i in range(tmas):
        rgb, _ = render_slide("HGSC", tma_side, tma_side, is_tma=True, hospital=1, seed=i)
        path = folder / f"tma{i}.png"
        ratios.append(write_png(rgb, path))
        specs.append(SlideSpec("test", f"tma{i}", path, None, None, expected_size=(tma_side, tma_side),
                               competition_scale=True))
    width = int(np.sqrt(wsi_mpx * 1e6 * 4 / 3))
    height = int(width * 3 / 4)
    for i in range(wsis):
        rgb, _ = render_slide("EC", base_side, base_side * 3 // 4, is_tma=False, hospital=1, seed=100 + i)
        base = pyvips.Image.new_from_array(rgb)
        across = int(np.ceil(width / base.width)) + 1
        down = int(np.ceil(height / base.height)) + 1
        image = base.replicate(across, down).crop(0, 0, width, height)
        path = folder / f"wsi{i}.png"
        ratios.append(write_png(image, path))
        thumbnail = folder / f"wsi{i}_thumbnail.png"
        pyvips.Image.thumbnail(str(path), 3000).pngsave(str(thumbnail))
        specs.append(SlideSpec("test", f"wsi{i}", path, thumbnail, None, expected_size=(width, height),
                               competition_scale=True))
    print(f"test set: {tmas} TMAs {tma_side}x{tma_side}, {wsis} WSIs {width}x{height} "
          f"({width * height / 1e6:.0f} Mpx); PNG compression {np.mean(ratios):.1f}:1 (real: ~4.7:1)")
    return specs


def random_vit_weights(folder: Path) -> Path:
    """A ViT-B/16 with random weights, as a local file (timing only: its features mean nothing)."""
    path = folder / "vit_b16_random.pth"
    torch.save(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).state_dict(), path)
    return path


def encoder_overrides(name: str, work: Path) -> list[str]:
    """Config overrides of a benchmarked encoder: a timm name, or ``vit_b16_random`` (a ViT-B/16 with random
    weights saved under ``work``)."""
    if name == "vit_b16_random":
        return ["features.encoder=vit_base_patch16_224", f"features.weights={random_vit_weights(work)}"]
    return [f"features.encoder={name}"]


def card_name(device: torch.device) -> str:
    """A GPU's model name without spaces (as RESULT lines print it), else the device type."""
    return torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else device.type


def make_warmup(folder: Path) -> SlideSpec:
    """A small TMA for the decoders' and the encoder's first steps (see :func:`run_set`)."""
    rgb, _ = render_slide("HGSC", 512, 512, is_tma=True, hospital=1, seed=999)
    write_png(rgb, folder / "warmup.png")
    return SlideSpec("test", "warmup", folder / "warmup.png", None, None, expected_size=(512, 512),
                     competition_scale=True)


def run_set(cfg, specs: list[SlideSpec], warmup: SlideSpec,  # type: ignore[no-untyped-def]
            workers: int | None) -> tuple[float, list, FusedPipeline]:
    """Wall seconds, results and pipeline of one run over ``specs``, as a running stage 05 sees them.

    Every decoder first takes a warm-up image (a small TMA: the process's start, its imports, the encoder's
    first batches); the clock, and the encoder's busy time, start when the first real image is handed out.
    Decoders still starting then make the run a little slower than a steady one: the figures err on the
    slow side, by at most the decoders' start-up jitter."""
    pipeline = FusedPipeline(cfg, workers=workers)
    warmups = [SlideJob(replace(warmup, image_id=f"{warmup.image_id}{i}")) for i in range(pipeline.workers)]
    jobs = iter(warmups + [SlideJob(s) for s in specs])
    clock: dict = {}

    def next_job() -> SlideJob | None:
        job = next(jobs, None)
        if job is not None and not any(job is w for w in warmups) and not clock:
            clock.update(started=time.perf_counter(), busy=dict(pipeline.stats.busy_s))
        return job

    results = []
    for result in pipeline.run(next_job):
        if result.status != "done":
            raise RuntimeError(f"benchmark image failed: {result.message}")
        if not any(result.job is w for w in warmups):
            results.append(result)
    started, busy_before = clock["started"], clock["busy"]
    wall = max(1e-3, time.perf_counter() - started)
    pipeline.stats.wall_s = wall
    pipeline.stats.busy_s = {d: v - busy_before.get(d, 0.0) for d, v in pipeline.stats.busy_s.items()}
    return wall, results, pipeline


def bench_encoder(cfg, specs: list[SlideSpec], warmup: SlideSpec, workers: int | None,  # type: ignore[no-untyped-def]
                  kaggle_cores: int, label: str) -> str:
    """One encoder's figures with ``workers`` decoder processes (None: stage 05's own choice,
    ``inference.decoders: auto``), as its ``RESULT`` line."""
    tmas = [s for s in specs if s.image_id.startswith("tma")]
    wsis = [s for s in specs if s.image_id.startswith("wsi")]
    tma_wall, tma_results, tma_pipe = run_set(cfg, tmas, warmup, workers)
    wsi_wall, wsi_results, wsi_pipe = run_set(cfg, wsis, warmup, workers)
    workers = tma_pipe.workers
    results = tma_results + wsi_results
    gpx = sum(r.decoded_pixels for r in wsi_results) / 1e9
    tma_decode = np.mean([r.decode_s for r in tma_results])
    tma_tiles = np.mean([r.tiles for r in tma_results])
    wsi_decode_per_gpx = sum(r.decode_s for r in wsi_results) / gpx
    encode_per_tile = sum(r.encode_s for r in results) / max(1, sum(r.tiles for r in results))
    wsi_tiles_per_gpx = sum(r.tiles for r in wsi_results) / gpx  # at this WSI size (the cap binds on real ones)
    measuring_cap = int(cfg["tiling"]["max_tiles_per_slide"]) or 1 << 30
    capped = any(r.tiles >= measuring_cap for r in wsi_results)  # the tissue density is then unknown: the cap
    hidden_wsi_tiles = HIDDEN_TILE_CAP if capped else min(HIDDEN_TILE_CAP, wsi_tiles_per_gpx * HIDDEN_WSI_GPX)
    consumers = len(tma_pipe.devices)
    decode_s = HIDDEN_TMAS * tma_decode + HIDDEN_WSIS * HIDDEN_WSI_GPX * wsi_decode_per_gpx
    encode_s = (HIDDEN_TMAS * tma_tiles + HIDDEN_WSIS * hidden_wsi_tiles) * encode_per_tile
    hours = max(decode_s / kaggle_cores, encode_s / consumers) / 3600
    busy = (sum(tma_pipe.stats.busy_s.values()) + sum(wsi_pipe.stats.busy_s.values())) / (
        (tma_wall + wsi_wall) * consumers)
    ideal = ideal_wall(tma_results, workers, consumers) + ideal_wall(wsi_results, workers, consumers)
    device = "+".join(tma_pipe.stats.devices)
    if device.startswith("cuda"):
        device += f"({card_name(torch.device('cuda', 0))})"
    print(f"[{label}] TMAs: {tma_wall / len(tmas):.2f} s wall each ({tma_decode:.2f} s decoding in a worker, "
          f"{tma_tiles:.0f} tiles); WSIs: {wsi_wall / gpx:.1f} s wall per Gpx ({wsi_decode_per_gpx:.1f} s decoding "
          f"per Gpx in a worker, {wsi_tiles_per_gpx:.0f} tiles per Gpx before the cap); encoder "
          f"{1000 * encode_per_tile:.2f} ms/tile on {device}")
    print(f"[{label}] projection, {kaggle_cores} decoder cores + {consumers} x {device}: decoding "
          f"{decode_s / 3600 / kaggle_cores:.2f} h, encoding {encode_s / 3600 / consumers:.2f} h "
          f"({hidden_wsi_tiles:.0f} tiles per WSI) -> {hours:.2f} h overlapped")
    print(f"[{label}] {workers} decoders: busy {tma_pipe.stats.busy_fraction:.2f} on TMAs, "
          f"{wsi_pipe.stats.busy_fraction:.2f} on WSIs; overlap {ideal / (tma_wall + wsi_wall):.2f} of the ideal")
    return (f"RESULT tma_s={tma_wall / len(tmas):.3f} wsi_s_per_gpx={wsi_wall / gpx:.1f} projected_hours={hours:.2f} "
            f"gpu_busy={busy:.2f} overlap={ideal / (tma_wall + wsi_wall):.2f} device={device} encoder={label} "
            f"workers={workers}")


def ideal_wall(results: list, workers: int, consumers: int) -> float:
    """A set's wall time with perfect overlap: its decoding shared by the decoders, or its encoding shared
    by the consumers, whichever is longer."""
    return max(sum(r.decode_s for r in results) / workers, sum(r.encode_s for r in results) / consumers)


def cosine_check(cfg, spec: SlideSpec) -> str:  # type: ignore[no-untyped-def]
    """Stage 01+03 (JPEG tiles on disk) vs fused features of one image: min and mean cosine over tiles."""
    device = resolve_device(cfg["runtime"]["device"])
    encoder = prepare_encoder(encoder_from_config(cfg), device)
    assert tile_slide(spec, cfg).status == "done"
    stored, _, _ = embed_tile_folder(layout.slide_tiles_dir(cfg, spec.source, spec.image_id), encoder, cfg, device)
    fused, _, _ = embed_slide_streaming(spec, cfg, encoder, device)
    a, b = stored.astype(np.float64), fused.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return (f"cosine stage01+03 vs fused on {spec.image_id} ({len(cos)} tiles): min {cos.min():.5f} "
            f"mean {cos.mean():.5f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, figures meaningless")
    parser.add_argument("--tmas", type=int, default=8)
    parser.add_argument("--tma-side", type=int, default=3000)
    parser.add_argument("--wsis", type=int, default=1)
    parser.add_argument("--wsi-mpx", type=float, default=300.0)
    parser.add_argument("--workers", default=str(os.cpu_count() or 1),
                        help="decoder processes, or auto (stage 05's default, inference.decoders: auto); a "
                        "comma-separated list measures each on the same test set")
    parser.add_argument("--kaggle-cores", type=int, default=4)
    parser.add_argument("--encoders", default="efficientnet_lite0,vit_b16_random")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-tiles", type=int, default=0, help="tile cap while measuring; 0 (default): the "
                        f"real {HIDDEN_TILE_CAP} tiles per {HIDDEN_WSI_GPX} Gpx scaled to --wsi-mpx, so a WSI's "
                        "per-tile work per Gpx is a real one's (the projection always counts "
                        f"{HIDDEN_TILE_CAP} tiles per real WSI)")
    args = parser.parse_args()
    if args.quick:  # the default encoder alone, small, in one process: seconds
        args.tmas, args.tma_side, args.wsis, args.wsi_mpx, args.workers = 2, 768, 1, 2.0, "1"
        args.encoders = "efficientnet_lite0"
    worker_counts = [None if w.strip() == "auto" else int(w) for w in str(args.workers).split(",")]
    if args.max_tiles <= 0:  # a real WSI's planned tiles per gigapixel: its decoding per Gpx is then a real one's
        args.max_tiles = max(64, round(HIDDEN_TILE_CAP * args.wsi_mpx / 1000 / HIDDEN_WSI_GPX))
    work = Path(tempfile.mkdtemp(prefix="bench_inference-"))
    specs = make_test_set(work / "test_images", args.tmas, args.tma_side, args.wsis, args.wsi_mpx,
                          base_side=768 if args.quick else 4096)
    warmup = make_warmup(work / "test_images")
    overrides = [f"paths.data_root={work}", f"runtime.device={args.device}", f"features.batch_size={args.batch_size}",
                 f"tiling.max_tiles_per_slide={args.max_tiles}"]
    if args.quick:
        overrides += ["tiling.max_tiles_per_slide=16", "features.input_size=64"]
    lines = []
    for name in args.encoders.split(","):
        cfg = load_config(None, [*overrides, *encoder_overrides(name, work)])
        for workers in worker_counts:
            lines.append(bench_encoder(cfg, specs, warmup, workers, args.kaggle_cores, name))
            print(lines[-1], flush=True)  # at once too: a run cut short keeps its figures
    cfg = load_config(None, overrides)
    print(cosine_check(cfg, specs[0]))
    print(f"devices visible: {[str(d) for d in visible_devices(args.device)]}; decoder processes here: "
          f"{args.workers} on {os.cpu_count()} cores (shared machines make these figures noisy)")
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

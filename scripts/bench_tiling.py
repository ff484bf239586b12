#!/usr/bin/env python
"""Benchmark stage-01 tiling against the PNG decode floor and a naive full load.

Makes two tissue-like PNG WSIs (black background, a thumbnail beside each, as in the real data), the
larger with 4x the pixels of the smaller (default 100 and 400 megapixels), then measures, each in a
fresh process: stage-01 tiling of the slide (time, peak RSS), a pure pyvips sequential decode of the
same file, and a naive PIL full load. Prints the ratios; the last line is machine-readable:

    RESULT decode_ratio=<tiling/decode throughput> rss_growth=<large/small peak RSS>
           naive_mem_ratio=<naive/tiling peak RSS> tiling_peak_mb=<the large slide's tiling process>
           (all on one line)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Each child times its own work (interpreter start-up and imports excluded: a stage pays them once for
# hundreds of slides) and prints the seconds; peak RSS is the whole child's.
CHILD_DECODE = """
import sys, time
import pyvips
start = time.perf_counter()
image = pyvips.Image.new_from_file(sys.argv[1], access="sequential")
image.avg()  # forces every pixel to be decoded, in order, with nothing kept
print(time.perf_counter() - start)
"""

CHILD_NAIVE = """
import sys, time
import numpy as np
from PIL import Image
Image.MAX_IMAGE_PIXELS = None
start = time.perf_counter()
array = np.asarray(Image.open(sys.argv[1]).convert("RGB"))
print(time.perf_counter() - start)
"""

CHILD_TILE = """
import sys
from pathlib import Path
from ubc_ocean.config import load_config
from ubc_ocean.sources import SlideSpec
from ubc_ocean.tiling.stage import tile_slide
import time
png, thumb, out, tile_size, cap = sys.argv[1:6]
cfg = load_config(None, [f"paths.data_root={out}", f"tiling.tile_size={tile_size}",
                         f"tiling.max_tiles_per_slide={cap}"])
start = time.perf_counter()
result = tile_slide(SlideSpec("bench", Path(png).stem, Path(png), thumbnail=Path(thumb) if thumb != "-" else None,
                              is_tma=False,
                              competition_scale=True), cfg)
seconds = time.perf_counter() - start
assert result.status == "done", result
print(result.count, seconds)
"""

CHILD_MEASURE = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
if done.returncode:
    sys.exit(done.stderr)
peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(peak_kb, done.stdout.strip().splitlines()[-1])
"""


def make_png(path: Path, width: int, height: int, seed: int) -> Path:
    """A tissue-like PNG: Perlin blobs of stain-coloured texture on black, plus a ~3000 px thumbnail."""
    import pyvips

    blobs = pyvips.Image.perlin(width, height, cell_size=1024, uchar=True, seed=seed)
    texture = pyvips.Image.perlin(width, height, cell_size=6, uchar=True, seed=seed + 1)
    noise = pyvips.Image.gaussnoise(width, height, sigma=18, mean=0, seed=seed + 2)
    detail = texture * 0.6 + noise
    stained = (detail * [-0.35, -0.55, -0.3] + [215, 150, 200]).cast("uchar")
    image = (blobs > 118).ifthenelse(stained, [0, 0, 0])
    image.pngsave(str(path), compression=2)
    pyvips.Image.thumbnail(str(path), 3000).pngsave(str(path.with_name(f"{path.stem}_thumbnail.png")))
    return path


def measure(command: list[str]) -> tuple[float, list[str]]:
    """Peak RSS (MB) of ``command`` run alone in a fresh process, and the words of its last output line."""
    words = subprocess.run([sys.executable, "-c", CHILD_MEASURE, *command], capture_output=True, text=True,
                           check=True).stdout.split()
    return float(words[0]) / 1024, words[1:]


def bench_one(png: Path, work: Path, tile_size: int, cap: int, thumbnails: bool) -> dict:
    import pyvips

    header = pyvips.Image.new_from_file(str(png))
    megapixels = header.width * header.height / 1e6
    thumb = png.with_name(f"{png.stem}_thumbnail.png") if thumbnails else "-"
    decode_mb, (decode_s,) = measure([sys.executable, "-c", CHILD_DECODE, str(png)])
    out = work / f"out-{png.stem}"
    shutil.rmtree(out, ignore_errors=True)
    tile_mb, (tiles, tile_s) = measure([sys.executable, "-c", CHILD_TILE, str(png), str(thumb), str(out),
                                         str(tile_size), str(cap)])
    naive_mb, (naive_s,) = measure([sys.executable, "-c", CHILD_NAIVE, str(png)])
    decode_s, tile_s, naive_s = float(decode_s), float(tile_s), float(naive_s)
    return {"file": png.name, "megapixels": round(megapixels, 1), "tiles": int(tiles),
            "tiling_s": tile_s, "tiling_rss_mb": tile_mb, "decode_s": decode_s, "decode_rss_mb": decode_mb,
            "naive_s": naive_s, "naive_rss_mb": naive_mb,
            "decode_ratio": decode_s / tile_s, "naive_mem_ratio": naive_mb / tile_mb}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-side", type=int, default=10000, help="small PNG is side x side (default 10000)")
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--max-tiles", type=int, default=2000, help="tiling.max_tiles_per_slide")
    parser.add_argument("--workdir", type=Path, help="keep the PNGs here (default: a temporary folder)")
    parser.add_argument("--without-thumbnails", action="store_true",
                        help="tile as if no thumbnail existed: the tissue mask is built in the decoding pass")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_tiling-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = {"small": args.small_side, "large": 2 * args.small_side}  # 4x the pixels
    rows = []
    for name, side in sizes.items():
        png = work / f"{name}.png"
        if not png.exists():
            start = time.perf_counter()
            make_png(png, side, side, seed=7)
            print(f"made {png.name}: {side}x{side} in {time.perf_counter() - start:.1f} s", flush=True)
        rows.append(bench_one(png, work, args.tile_size, args.max_tiles, not args.without_thumbnails))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'':6} {'MP':>6} {'tiles':>6} {'tiling s':>9} {'decode s':>9} {'naive s':>8} "
          f"{'tiling MB':>10} {'naive MB':>9} {'tile/decode':>12}")
    for name, row in zip(sizes, rows, strict=True):
        print(f"{name:6} {row['megapixels']:6.0f} {row['tiles']:6d} {row['tiling_s']:9.2f} {row['decode_s']:9.2f} "
              f"{row['naive_s']:8.2f} {row['tiling_rss_mb']:10.0f} {row['naive_rss_mb']:9.0f} "
              f"{row['decode_ratio']:12.2f}")
    large = rows[-1]
    rss_growth = large["tiling_rss_mb"] / rows[0]["tiling_rss_mb"]
    print(f"RESULT decode_ratio={large['decode_ratio']:.3f} rss_growth={rss_growth:.3f} "
          f"naive_mem_ratio={large['naive_mem_ratio']:.2f} tiling_peak_mb={large['tiling_rss_mb']:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The one command-line front door every numbered stage script uses."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ubc_ocean.config import Config, ConfigError, load_config

log = logging.getLogger("ubc_ocean")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("pyvips").setLevel(logging.WARNING)  # libvips is chatty at INFO


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides are dotted keys, e.g. tiling.tile_size=256 mil.epochs=10 "
        "(every key: src/ubc_ocean/config/defaults.yaml).",
    )
    parser.add_argument("--config", default="configs/default.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("--workers", type=int, help="processes, one slide each (runtime.workers)")
    parser.add_argument("--shard", help="i/n: process only the i-th of n deterministic slide shards")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (runtime.device)")
    parser.add_argument("--log-level", help="DEBUG | INFO | WARNING (runtime.log_level)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    for flag, key in (("workers", "workers"), ("shard", "shard"), ("device", "device"), ("log_level", "log_level")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"runtime.{key}={value}")
    return load_config(args.config, overrides)


def main(run: Callable[[Config], Any], description: str, argv: Sequence[str] | None = None) -> int:
    """Parse ``--config`` and overrides, set up logging and call the stage's ``run(cfg)``."""
    args = build_parser(description).parse_args(argv)
    try:
        cfg = config_from_args(args)
        setup_logging(cfg.runtime.log_level)
        run(cfg)  # stages check their free-form sections (sources, per-model keys) and raise ConfigError
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0

"""The one command-line front door every numbered stage script uses."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ubc_ocean.config import Config, ConfigError, load_config
from ubc_ocean.io_utils import MissingInput
from ubc_ocean.parallel import RunFailed

log = logging.getLogger("ubc_ocean")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("pyvips").setLevel(logging.WARNING)  # libvips is chatty at INFO


def build_parser(description: str) -> argparse.ArgumentParser:
    """Flags and ``KEY=VALUE`` overrides, in any order (parse with ``parse_intermixed_args``)."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides are dotted keys, e.g. tiling.tile_size=256 mil.epochs=10, before or after the flags "
        "(every key: src/ubc_ocean/config/defaults.yaml).",
    )
    parser.add_argument("--config", default="configs/default.yaml", help="YAML config (default: %(default)s)")
    # No type=int: the config schema checks the value and names runtime.workers when it is bad.
    parser.add_argument("--workers", help="processes, one slide each (runtime.workers)")
    parser.add_argument("--shard", help="i/n: process only the i-th of n deterministic slide shards")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (runtime.device)")
    parser.add_argument("--log-level", help="DEBUG | INFO | WARNING (runtime.log_level)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The checked config of parsed arguments (flags become ``runtime.*`` overrides, applied last)."""
    overrides = list(args.overrides)
    for flag, key in (("workers", "workers"), ("shard", "shard"), ("device", "device"), ("log_level", "log_level")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"runtime.{key}={value}")
    return load_config(args.config, overrides)


def require_data_root(cfg: Config) -> None:
    """Refuse a ``paths.data_root`` that does not exist (every stage but 00, which creates it, reads it)."""
    root = Path(cfg.paths.data_root)
    if not root.is_dir():
        raise ConfigError(f"paths.data_root must be an existing folder (stage 00 creates the synthetic one); "
                          f"got '{root}'")


def config_error(err: ConfigError) -> int:
    """Print ``config error: <one line>`` on stderr; the exit status of a config error (2)."""
    print(f"config error: {' '.join(str(err).splitlines())}", file=sys.stderr)
    return 2


def missing_input(err: MissingInput) -> int:
    """Print ``missing input: <path> <problem>: <what makes it>`` on stderr; its exit status (2)."""
    print(f"missing input: {' '.join(str(err).splitlines())}", file=sys.stderr)
    return 2


def main(
    run: Callable[[Config], Any] | str,
    description: str,
    argv: Sequence[str] | None = None,
    *,
    creates_data_root: bool = False,
    arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Parse ``--config``, flags and overrides (in any order), check the config whole, set up logging and
    call the stage's ``run(cfg)``. A bad config is one ``config error:`` line on stderr and exit status 2,
    before ``run`` starts; ``paths.data_root`` must exist unless the stage ``creates_data_root``. A missing
    input (:class:`~ubc_ocean.io_utils.MissingInput`: stages run out of order, no data downloaded) is one
    ``missing input:`` line naming the file and what makes it, exit status 2. A stage where every slide
    tried failed with the same unexpected exception (:class:`AllTasksFailed`) ends with one error line and
    exit status 1, as does any other :class:`RunFailed` (a benchmark configuration that failed while the
    others' results were written).

    ``run`` may be named as ``"package.module:function"``: it is imported only once the config is good,
    so a bad config is refused without the seconds that torch and friends take to import.

    ``arguments`` adds a tool's own flags to the parser; their values are passed to ``run`` by keyword
    (``--slides a,b`` -> ``run(cfg, slides="a,b")``, ``--out DIR`` -> ``out=...``).
    """
    parser = build_parser(description)
    common = {action.dest for action in parser._actions}  # the front door's own flags
    if arguments is not None:
        arguments(parser)
    args = parser.parse_intermixed_args(argv)
    extra = {key: value for key, value in vars(args).items() if key not in common}
    try:
        cfg = config_from_args(args)
        if not creates_data_root:
            require_data_root(cfg)
        setup_logging(cfg.runtime.log_level)
        if isinstance(run, str):
            module, _, name = run.partition(":")
            run = getattr(importlib.import_module(module), name)
        run(cfg, **extra)  # stages may still raise ConfigError for what the config cannot know (an encoder's sizes)
    except ConfigError as err:
        return config_error(err)
    except MissingInput as err:  # an input not made yet: the stage before was not run, or no data downloaded
        return missing_input(err)
    except RunFailed as err:  # each slide's row (each configuration's result) is written; the run failed
        log.error("%s", err)
        return 1
    return 0

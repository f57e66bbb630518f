"""The ``mspray`` console script (``ray_jobs/`` call the same :func:`main`).

Every sub-command is registered explicitly in :data:`COMMANDS`, one module per command
group; each parses arguments and calls the library. Flags that set configuration are
derived from :mod:`mspray.config` (:mod:`mspray.cli.flags`). Run ``mspray <command>
--help`` for the options.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from mspray.cli.demo import add_demo
from mspray.cli.evaluate import add_evaluate
from mspray.cli.score import add_calibrate, add_report, add_score
from mspray.cli.serve import add_deploy, add_export, add_serve
from mspray.cli.train import add_build_bank, add_train
from mspray.config import ConfigError
from mspray.config.run import RunContext, use_run

#: Every sub-command, in ``--help`` order.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_train,
    add_evaluate,
    add_calibrate,
    add_build_bank,
    add_score,
    add_serve,
    add_deploy,
    add_export,
    add_report,
    add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``mspray`` parser with every sub-command of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="mspray",
        description="Multi-scale patch-based anomaly detection (MSPBA) on Ray: train on "
        "normal images, then get a per-pixel anomaly map and an image score for every image.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    # Also accepted after the sub-command (`mspray train ... -q`); SUPPRESS keeps the
    # top-level value when the flag is not repeated there.
    for p in sub.choices.values():
        p.add_argument(
            "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars"
        )
        p.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``mspray`` command; returns its exit code (2 for a usage or config error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # the one place the CLI's --quiet and --address reach the library
    run = RunContext(progress=not args.quiet, address=getattr(args, "ray_address", None))
    try:
        with use_run(run):
            return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"mspray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

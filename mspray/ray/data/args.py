"""Command-line options of the Ray Data commands, shared by ``mspray`` and ``ray_jobs/``.

Nothing here imports Ray or torch at module level, so ``mspray --help`` stays fast.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from collections.abc import Callable

log = logging.getLogger("mspray")

#: mspray.lease.DEFAULT_TTL_S (not imported: keep ``--help`` free of heavy imports)
DEFAULT_LEASE_TTL_S = 300.0

SCORE_DESCRIPTION = """\
Score every image under an input prefix (local folder or s3://) with a model bundle on a
Ray Data actor pool, and write one Parquet row per image to the output folder.

Rows: path, image_score, is_anomalous, score_<scale> for each scale, threshold,
model_version, error, scored_at, map_path. A bad input (missing, zero-byte, truncated,
not an image, over score.max_image_bytes or score.max_image_pixels) never fails the run:
its row has `error` set and null scores.

Resumable and idempotent: a run first reads the paths already in the output and scores
only the others, and every part file is written atomically, so rerunning after a crash or
on the same day ends with exactly one row per image. One run at a time per output: a run
takes the output's lease (OUTPUT/_lease/, an S3 conditional put or an exclusive local
create) before reading it; a second run started meanwhile waits up to --lease-wait
seconds, then exits with status 3 naming the holder. The lease is renewed while the run
lives and released at its end (also on failure); a crashed run's lease is taken over
--lease-ttl seconds after its last renewal. Input keys with a `.`, `..` or empty path
segment (possible on S3) are never read: they get an error row.
"""

SCORE_EPILOG = """\
output layout:
  OUTPUT/part-<hash>.parquet   rows of one work unit (--part-size images); <hash> is a
                               hash of its input paths, so a retried unit overwrites it
  OUTPUT/_maps/<path under the input prefix>.png   heatmap panels (with --maps)
  OUTPUT/_runs/<time>-<id>.json                   summary of each run (counts, timing)
  OUTPUT/_lease/<generation>.json                 the lease: holder, expiry
  Read the rows with pandas.read_parquet(OUTPUT) or ray.data.read_parquet(OUTPUT).

templates:
  {date}, {year}, {month}, {day} in --input / --output are filled from --date (default:
  today, UTC), for nightly cron runs over s3://bucket/archive/{date}/.

examples:
  mspray score --bundle s3://models/screws/v3 --input s3://line1/archive/{date}/ \\
      --output s3://line1/scores/{date}/ --workers 8 --maps
  mspray score --bundle ./bundle --input ./images --output ./scores --workers 2
"""

BUILD_BANK_DESCRIPTION = """\
Build the per-scale patch banks of a model bundle from normal images on a Ray Data actor
pool: every actor loads the bundle's encoders once and embeds batches of images; large
banks are coreset-reduced per shard on the actors and globally on the driver
(bank.coreset_ratio of all patches are kept). The result is saved as a NEW version of the
bundle (ROOT/versions/<id>/, every file checksummed in its meta.json) and ROOT/latest is
moved to it only once it is complete; the version it started from (e.g. the one being
served) is never modified. --bundle may be a root (its latest version is used) or a
version URI. Prints the result as JSON, with the new version's URI under version_uri.

Without --append the images are split like training does (train.val_fraction held out,
train.seed): the bank is built from the rest and the threshold is recalibrated on the
held-out images. With --append the images are added to the existing banks without
retraining (coreset-reduced against the existing bank, or all patches with --append-all);
the threshold is kept.
"""

BUILD_BANK_EPILOG = """\
examples:
  mspray build-bank --bundle s3://models/screws/v3 --data mvtec:s3://data/mvtec \\
      --category screw --workers 4
  mspray build-bank --bundle ./bundle --data folder:./new_good_images --append
"""


def _pool_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray")
    g.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="actors in the pool, each loads the model once (default: one per "
        "GPU with GPUs, else one per free CPU of the cluster)",
    )
    g.add_argument(
        "--gpus-per-worker",
        type=float,
        metavar="G",
        help="GPUs per actor (default: 1 if the config's bank.use_gpu or "
        "train.use_gpu is set, else 0)",
    )
    g.add_argument(
        "--cpus-per-worker",
        type=float,
        default=1.0,
        metavar="C",
        help="CPUs per actor, also its torch threads (default: %(default)s)",
    )
    g.add_argument(
        "--io-threads",
        type=int,
        default=4,
        metavar="T",
        help="reader threads per actor, overlapping S3 latency with compute (default: %(default)s)",
    )
    g.add_argument(
        "--address",
        help="Ray cluster address (default: $RAY_ADDRESS, else a "
        "local Ray with at least 4 logical CPUs)",
    )


def add_score_args(p: argparse.ArgumentParser) -> None:
    """Options of ``mspray score`` / ``ray_jobs/score.py``."""
    p.add_argument("--bundle", required=True, help="model bundle (local path or s3://)")
    p.add_argument(
        "--input",
        required=True,
        help="folder or s3:// prefix of images (searched recursively; may contain {date})",
    )
    p.add_argument(
        "--output",
        required=True,
        help="output folder or s3:// prefix for Parquet parts and heatmaps (may contain {date})",
    )
    p.add_argument(
        "--date",
        type=dt.date.fromisoformat,
        metavar="YYYY-MM-DD",
        help="date for {date} templates (default: today, UTC)",
    )
    p.add_argument(
        "--maps", action="store_true", help="also write a heatmap PNG per image under OUTPUT/_maps/"
    )
    p.add_argument(
        "--part-size",
        type=int,
        default=256,
        metavar="N",
        help="images per work unit = rows per Parquet part (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="B",
        help="images per forward pass (default: the bundle's score.batch_size)",
    )
    p.add_argument("--bank-gpu", action="store_true", help="faiss search on GPU when present")
    p.add_argument(
        "--summary-json",
        metavar="FILE",
        help="also write the run summary (counts, timing) to this file",
    )
    # one run per output (issue 11)
    p.add_argument(
        "--lease-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="when another run holds the output, wait this long for it to finish, then "
        "exit with status 3 (default: %(default)s, exit at once)",
    )
    p.add_argument(
        "--lease-ttl",
        type=float,
        default=DEFAULT_LEASE_TTL_S,
        metavar="SECONDS",
        help="a run renews its lease every TTL/3 s; a crashed run's lease is taken over "
        "this long after its last renewal (default: %(default)s)",
    )
    _pool_args(p)


def add_build_bank_args(p: argparse.ArgumentParser) -> None:
    """Options of ``mspray build-bank`` / ``ray_jobs/build_bank.py``."""
    p.add_argument(
        "--bundle", required=True, help="model bundle with trained encoders (local path or s3://)"
    )
    p.add_argument(
        "--data",
        required=True,
        help="normal images: mvtec:ROOT, btad:ROOT, "
        "folder:PATH or s3://bucket/prefix (the training split is used)",
    )
    p.add_argument("--category", help="category of an mvtec/btad dataset")
    p.add_argument(
        "--out",
        help="bundle root to save the new version under (default: the root of --bundle); "
        "its `latest` pointer is moved to the new version",
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="add the images to the existing banks instead of rebuilding them",
    )
    p.add_argument(
        "--append-all", action="store_true", help="with --append: add every patch, no coreset"
    )
    p.add_argument(
        "--no-calibrate",
        action="store_true",
        help="keep the bundle's threshold instead of recalibrating it on the held-out images",
    )
    g = p.add_argument_group("bank")
    g.add_argument("--coreset-ratio", type=float, help="fraction of patches kept")
    g.add_argument(
        "--max-candidates",
        type=int,
        help="global coreset candidate budget (bank.coreset_max_candidates); "
        "beyond it each shard is reduced on its actor first",
    )
    g.add_argument("--index", choices=["flat", "ivf"], help="faiss index type")
    g.add_argument("--batch-size", type=int, metavar="B", help="images per forward pass")
    g.add_argument("--bank-gpu", action="store_true", help="faiss on GPU when present")
    _pool_args(p)


def add_evaluate_ray_args(p: argparse.ArgumentParser) -> None:
    """The Ray Data options of ``mspray evaluate``."""
    g = p.add_argument_group("Ray Data (large test sets)")
    g.add_argument(
        "--ray",
        action="store_true",
        help="load and score the images on a Ray Data actor pool (same JSON)",
    )
    g.add_argument("--workers", type=int, metavar="N", help="actors in the pool (implies --ray)")
    g.add_argument("--gpus-per-worker", type=float, metavar="G", help="GPUs per actor")
    g.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")


def _pool(args: argparse.Namespace, cfg):
    from mspray.ray.runtime import PoolOptions, default_gpus

    return PoolOptions(
        workers=args.workers,
        gpus_per_worker=default_gpus(cfg, getattr(args, "gpus_per_worker", None)),
        cpus_per_worker=getattr(args, "cpus_per_worker", 1.0),
    )


def run_score(args: argparse.Namespace) -> int:
    """``mspray score``: prints the summary line; exit 1 if an image ended with no row or
    with two (never for bad images, which get error rows), 3 if another run holds the
    output's lease."""
    from mspray import storage
    from mspray.lease import LeaseHeld
    from mspray.ray.data.results import expand_date
    from mspray.ray.data.scoring import score_prefix
    from mspray.ray.runtime import bundle_config

    overrides = {"score.batch_size": args.batch_size}
    if args.bank_gpu:
        overrides["bank.use_gpu"] = True
    cfg = bundle_config(args.bundle, overrides)
    try:
        summary = score_prefix(
            args.bundle,
            expand_date(args.input, args.date),
            expand_date(args.output, args.date),
            pool=_pool(args, cfg),
            maps=args.maps,
            part_size=args.part_size,
            overrides=overrides,
            io_threads=args.io_threads,
            progress=not getattr(args, "quiet", False),
            address=args.address,
            lease_wait=args.lease_wait,
            lease_ttl=args.lease_ttl,
        )
    except LeaseHeld as e:
        print(f"mspray score: {e}", file=sys.stderr, flush=True)
        return 3
    if args.summary_json:
        from dataclasses import asdict

        storage.write_text(args.summary_json, json.dumps(asdict(summary), indent=2) + "\n")
    print(summary.line(), flush=True)
    return 0 if summary.missing == 0 and summary.duplicates == 0 else 1


def run_build_bank(args: argparse.Namespace) -> int:
    """``mspray build-bank``: prints the result as JSON."""
    from dataclasses import asdict

    from mspray.data.datasets import train_paths
    from mspray.ray.data.banks import build_banks
    from mspray.ray.runtime import bundle_config

    if args.append_all and not args.append:
        raise ValueError("--append-all needs --append")
    overrides = {
        "bank.coreset_ratio": args.coreset_ratio,
        "bank.coreset_max_candidates": args.max_candidates,
        "bank.index": args.index,
        "score.batch_size": args.batch_size,
    }
    if args.bank_gpu:
        overrides["bank.use_gpu"] = True
    cfg = bundle_config(args.bundle, overrides)
    uris = train_paths(args.data, args.category)
    log.info("%d images from %s", len(uris), args.data)
    result = build_banks(
        args.bundle,
        uris,
        out=args.out,
        append=args.append,
        append_all=args.append_all,
        calibrate=not args.no_calibrate,
        pool=_pool(args, cfg),
        overrides=overrides,
        io_threads=args.io_threads,
        progress=not getattr(args, "quiet", False),
        address=args.address,
    )
    print(json.dumps(asdict(result), indent=2), flush=True)
    return 0


def run_evaluate_ray(args: argparse.Namespace) -> dict:
    """The metrics dict of ``mspray evaluate --ray``."""
    from mspray.data.datasets import test_samples
    from mspray.ray.data.evaluation import evaluate_ray
    from mspray.ray.runtime import bundle_config

    overrides = {"score.batch_size": getattr(args, "batch_size", None)}
    cfg = bundle_config(args.bundle, overrides)
    return evaluate_ray(
        args.bundle,
        test_samples(args.data, args.category),
        maps_dir=args.maps,
        pool=_pool(args, cfg),
        overrides=overrides,
        progress=not getattr(args, "quiet", False),
        address=args.address,
    )


def job_main(
    name: str,
    description: str,
    epilog: str,
    add_args: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    argv: list[str] | None = None,
) -> int:
    """Entry point of a ``ray_jobs/`` script: parse, set up logging, run."""
    p = argparse.ArgumentParser(
        prog=name,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2

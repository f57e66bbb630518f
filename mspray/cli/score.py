"""``mspray score``, ``mspray report`` and ``mspray calibrate``: production images."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import asdict

from mspray.cli.flags import (
    SCORE_BUNDLE_HELP,
    SCORE_POOL_KEYS,
    add_bundle_flag,
    add_config_flags,
    add_device_flag,
    add_pool_args,
    add_shared_fs_flag,
    flag_values,
    pool_from_args,
    print_json,
    refuse_node_local,
)
from mspray.config import ConfigError, MSPrayConfig

SCORE_EPILOG = """\
Rows: path, image_score, is_anomalous, score_<scale> for each scale, threshold,
model_version, error, scored_at, map_path, model (the bundle's name with --bundle NAME=URI
and --route/--manifest; a path that matches no model gets an error row). A bad input
(missing, zero-byte, truncated, not an image, over score.max_image_bytes or
score.max_image_pixels) never fails the run: its row has `error` set and null scores.
A transient fault (S3 throttling, timeouts, 5xx,
a model failure such as CUDA out of memory) is retried with backoff; if it persists, its
unit writes no part, the run exits 1 (failed_units, missing) and a rerun retries it.
--retry-errors also rescores the parts holding error rows (e.g. after fixing the files).

Decoding runs on CPU Ray Data tasks (--decode-cpus each); the model actors only score and
write. The actor pool autoscales between --min-workers and --workers.

Resumable and idempotent: a run first reads the paths already in the output and scores
only the others, and every part file is written atomically, so rerunning after a crash or
on the same day ends with exactly one row per image. One run at a time per output: a run
takes the output's lease (OUTPUT/_lease/, an S3 conditional put or an exclusive local
create) before reading it; a second run started meanwhile waits up to --lease-wait
seconds, then exits with status 3 naming the holder. The lease is renewed while the run
lives and released at its end (also on failure); a crashed run's lease is taken over
--lease-ttl seconds after its last renewal. Input keys with a `.`, `..` or empty path
segment (possible on S3) are never read: they get an error row.

output layout:
  OUTPUT/part-<hash>.parquet   rows of one work unit (--part-size images); <hash> is a
                               hash of its input paths, so a retried unit overwrites it
  OUTPUT/_maps/<hh>/<path under the input prefix>.png  heatmap panels (with --maps);
                               <hh>: 2 hex digits of a hash of the path (256 prefixes)
  OUTPUT/_runs/<time>-<id>.json                   summary of each run (counts, timing)
  OUTPUT/_lease/<generation>.json                 the lease: holder, expiry
  OUTPUT/_report.html                             the run's report page (mspray report)
  Read the rows with pandas.read_parquet(OUTPUT) or ray.data.read_parquet(OUTPUT).

nightly runs over a growing archive:
  --input-manifest takes an S3 Inventory report (or any list of paths) instead of listing
  the prefix; --modified-since last-run scores only what changed since the last complete
  run, and reads only the parts written since then; --dry-run shows what a run would do.

templates:
  {date}, {year}, {month}, {day} in --input / --output are filled from --date (default:
  today, UTC), for nightly cron runs over s3://bucket/archive/{date}/.

examples:
  mspray score --bundle s3://models/screws/v3 --input s3://line1/archive/{date}/ \\
      --output s3://line1/scores/{date}/ --workers 8 --maps
  mspray score --bundle ./bundle --input ./images --output ./scores --workers 2
  mspray score --bundle screw=s3://models/screw --bundle nut=s3://models/nut \\
      --input s3://line1/archive/{date}/ --route 's3://line1/archive/{date}/{model}/**' \\
      --output s3://line1/scores/{date}/      # one run, each image by its own bundle
"""


def add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="batch-score an image prefix to Parquet (+ heatmaps) on Ray Data; resumable",
        description="Score every image under an input prefix (local folder or s3://) with a "
        "model bundle on an autoscaling Ray Data actor pool, and write one Parquet row per "
        "image to the output folder.",
        epilog=SCORE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_bundle_flag(p, "score", SCORE_BUNDLE_HELP)
    p.add_argument(
        "--input",
        required=True,
        help="folder or s3:// prefix of images (searched recursively; may contain {date})",
    )
    p.add_argument(
        "--route",
        metavar="TEMPLATE",
        help="with --bundle NAME=URI ...: which bundle scores an image, from its path: "
        "'PREFIX/{model}/**' ({model} = one path segment naming the bundle, * and ** "
        "wildcards; may contain {date}); a path matching no model gets an error row",
    )
    p.add_argument(
        "--manifest",
        metavar="FILE",
        help="with --bundle NAME=URI ...: a Parquet or CSV file of path,model (paths "
        "relative to --input or absolute); exactly these images are scored",
    )
    p.add_argument(
        "--input-manifest",
        metavar="FILE",
        help="score the images this Parquet/CSV file (or folder of them) names instead of "
        "listing --input: an S3 Inventory report (bucket, key, last_modified_date), a 'path' "
        "column of URIs, or a 'key' column relative to --input; a 'model' column picks the "
        "bundle with --bundle NAME=URI",
    )
    p.add_argument(
        "--modified-since",
        metavar="DATE|last-run",
        help="only images modified at or after this date / ISO time (S3 LastModified, the "
        "manifest's last_modified_date), or 'last-run': since the output's last complete "
        "run; only the parts written since then are read to skip what is scored",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="plan only: read the manifest (or listing) and the output, print the pending and "
        "skipped counts and the units (and --summary-json them), score and write nothing",
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
        default=None,
        metavar="N",
        help="images per work unit = rows per Parquet part (default: sized for the cluster, "
        "several units per actor, at most 256)",
    )
    p.add_argument(
        "--summary-json", metavar="FILE", help="also write the run summary (counts, timing) here"
    )
    p.add_argument(
        "--lease-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="when another run holds the output, wait this long for it to finish, then exit "
        "with status 3 (default: %(default)s, exit at once)",
    )
    p.add_argument(
        "--lease-ttl",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="a run renews its lease every TTL/3 s; a crashed run's lease is taken over this "
        "long after its last renewal (default: %(default)s)",
    )
    p.add_argument(
        "--retry-errors",
        action="store_true",
        help="also rescore the images that have an error row (their parts are rewritten)",
    )
    add_config_flags(
        p,
        "cfg",
        MSPrayConfig,
        ["score.batch_size", "score.runtime", "score.precision", "score.device", "bank.use_gpu"],
    )
    add_pool_args(p, SCORE_POOL_KEYS)
    add_shared_fs_flag(p)
    p.set_defaults(func=cmd_score)


def cmd_score(args: argparse.Namespace) -> int:
    """Prints the summary line; exit 1 if an image ended with no row or with two (a unit
    failed on a transient fault; never for bad images, which get error rows), 3 if another
    run holds the output's lease."""
    from mspray import storage
    from mspray.artifacts.lease import LeaseHeld
    from mspray.artifacts.output import expand_date
    from mspray.ray.data.scoring import score_prefix

    named = getattr(args, "score:models", None)
    bundle = named or getattr(args, "score:bundle_uri", None)
    if not bundle:
        raise ConfigError("--bundle is required")
    if named and getattr(args, "score:bundle_uri", None):
        raise ConfigError("--bundle: name every bundle (NAME=URI) when giving several")
    source, dest = expand_date(args.input, args.date), expand_date(args.output, args.date)
    bundles = list(named.values()) if named else [bundle]
    refuse_node_local(
        args,
        [
            ("--input", source),
            ("--output", dest),
            *(("--bundle", b) for b in bundles),
            *((f, m) for f, m in (("--input-manifest", args.input_manifest),) if m),
        ],
    )
    try:
        summary = score_prefix(
            bundle,
            source,
            dest,
            route=expand_date(args.route, args.date) if args.route else None,
            manifest=args.manifest,
            input_manifest=args.input_manifest,
            modified_since=args.modified_since,
            dry_run=args.dry_run,
            pool=pool_from_args(args),
            maps=args.maps,
            part_size=args.part_size,
            overrides=flag_values(args, "cfg"),
            progress=not args.quiet,
            address=args.address,
            lease_wait=args.lease_wait,
            lease_ttl=args.lease_ttl,
            retry_errors=args.retry_errors,
        )
    except LeaseHeld as e:
        print(f"mspray score: {e}", file=sys.stderr, flush=True)
        return 3
    if args.summary_json:
        storage.write_text(args.summary_json, json.dumps(asdict(summary), indent=2) + "\n")
    if args.dry_run:
        print(summary.plan_line(), flush=True)
        return 0
    print(summary.line(), flush=True)
    if summary.stages_line():
        print(summary.stages_line(), flush=True)
    return 0 if summary.missing == 0 and summary.duplicates == 0 else 1


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="(re)build the report page of a scoring output from its Parquet rows",
        description="Write OUTPUT/_report.html from the Parquet rows and run summaries of a "
        "scoring output folder (local or s3://): counts, errors by reason, per-model score "
        "histogram against the threshold, anomaly rate vs. calibration, a drift check "
        "(Kolmogorov-Smirnov test against the calibration images' scores) and the most "
        "anomalous images with their heatmaps. `mspray score` writes it at the end of every "
        "run; this rebuilds it, e.g. with another --top-k or a bundle's calibration.",
    )
    p.add_argument("output", metavar="OUTPUT", help="scoring output folder or s3:// prefix")
    p.add_argument(
        "--bundle",
        action="append",
        default=[],
        metavar="URI",
        help="bundle whose calibration to compare with, matched to the rows by model "
        "version (repeatable; default: the calibration recorded by the scoring runs)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=20,
        metavar="K",
        help="most anomalous images shown per model (default: %(default)s)",
    )
    p.add_argument(
        "--inline-images",
        action="store_true",
        help="embed the heatmaps in the page (one file to send) instead of linking _maps/",
    )
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from mspray.report import build_report

    print(build_report(args.output, args.bundle, args.top_k, args.inline_images))
    return 0


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="reset a bundle's threshold from new production images; writes a new bundle",
        description="Score every image under --input with the bundle and set the threshold "
        "that promises --target-fpr false alarms on such images: the order statistic of "
        "their scores when they are all normal (--normal), or, with at most a fraction R "
        "anomalous (--expected-anomaly-rate R), of the scores left after the R highest. "
        "Banks and fusion stats are kept. The new version records the "
        "promise and how many images the previous threshold flagged (meta.json "
        "'calibration').",
    )
    p.add_argument("--bundle", required=True, help="bundle directory (local path or s3://)")
    p.add_argument("--input", required=True, help="folder / s3:// prefix of production images")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--normal", action="store_true", help="all the input images are normal")
    g.add_argument(
        "--expected-anomaly-rate",
        type=float,
        metavar="R",
        help="at most this fraction of the input images is anomalous",
    )
    p.add_argument(
        "--target-fpr",
        type=float,
        help="false-alarm rate to promise (default: the bundle's score.target_fpr)",
    )
    p.add_argument(
        "--out",
        help="bundle root to save the new version under (default: the root of --bundle, whose "
        "`latest` then names it; the version it came from is never modified)",
    )
    add_device_flag(p, "where the model runs")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from mspray.decisions.calibration import recalibrate_bundle

    out, cal = recalibrate_bundle(
        args.bundle,
        args.input,
        args.out,
        normal=args.normal,
        expected_anomaly_rate=args.expected_anomaly_rate,
        target_fpr=args.target_fpr,
        device=args.device,
        progress=not args.quiet,
    )
    from mspray.artifacts.bundle import read_meta

    meta = read_meta(out)
    print_json({"bundle": out, "version": meta["version"], **meta["calibration"]})
    return 0

"""``mspray score``, ``mspray report`` and ``mspray calibrate``: production images."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from mspray.cli.flags import (
    SCORE_BUNDLE_HELP,
    SCORE_POOL_KEYS,
    add_bundle_flag,
    add_config_flags,
    add_pool_args,
    add_shared_fs_flag,
    flag_values,
    pool_from_args,
    print_json,
    refuse_node_local,
)
from mspray.config import MSPrayConfig, validate
from mspray.config.runs import CalibrateRun, ScoreRun, run_fields

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
    add_config_flags(p, "score", ScoreRun, run_fields(ScoreRun))
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
    from mspray.ray.data.scoring import score_prefix

    run = validate(ScoreRun, flag_values(args, "score")).dated()
    refuse_node_local(
        args,
        [
            ("--input", run.input),
            ("--output", run.output),
            *(("--bundle", b) for b in [*run.models.values(), run.bundle_uri] if b),
            *((f, m) for f, m in (("--input-manifest", run.input_manifest),) if m),
        ],
    )
    try:
        summary = score_prefix(run, pool=pool_from_args(args), overrides=flag_values(args, "cfg"))
    except LeaseHeld as e:
        print(f"mspray score: {e}", file=sys.stderr, flush=True)
        return 3
    if run.summary_json:
        storage.write_text(run.summary_json, json.dumps(asdict(summary), indent=2) + "\n")
    if run.dry_run:
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
    add_config_flags(p, "cal", CalibrateRun, ["bundle", "input"])
    # exactly one of the two promises: argparse refuses both or neither (a usage error)
    promise = p.add_mutually_exclusive_group(required=True)
    add_config_flags(promise, "cal", CalibrateRun, ["normal", "expected_anomaly_rate"])
    add_config_flags(p, "cal", CalibrateRun, ["target_fpr", "out", "device"])
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from mspray.decisions.calibration import recalibrate_bundle

    out, cal = recalibrate_bundle(validate(CalibrateRun, flag_values(args, "cal")))
    from mspray.artifacts.bundle import read_meta

    meta = read_meta(out)
    print_json({"bundle": out, "version": meta["version"], **meta["calibration"]})
    return 0

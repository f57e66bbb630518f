"""The ``mspray`` console script (``ray_jobs/`` call the same :func:`main`).

Every sub-command is registered explicitly in :data:`COMMANDS`; each one parses arguments and
calls the library. Flags that set configuration are not declared here: they are derived from
the fields of :mod:`mspray.config` (name, type, choices, help), and ``--set KEY=VALUE`` sets
any other field. Run ``mspray <command> --help`` for the options.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any

from pydantic import BaseModel

from mspray.config import (
    ConfigError,
    MSPrayConfig,
    PoolConfig,
    ServeConfig,
    field_info,
    validate,
    with_overrides,
)
from mspray.train.recipes import RECIPES, apply_recipe

log = logging.getLogger("mspray")

DATA_HELP = "mvtec:ROOT, btad:ROOT, folder:PATH or s3://bucket/prefix"


# ---------------------------------------------------------------------------- config flags
def add_config_flags(
    p: argparse.ArgumentParser | Any, prefix: str, root: type[BaseModel], keys: Iterable[str]
) -> None:
    """One flag per dotted config ``key`` of ``root``, derived from the field: its ``cli``
    name (else ``--<field-name>``), type, choices and description. Parsed values land in
    ``args`` as ``<prefix>:<key>`` (``None`` when the flag is absent)."""
    for key in keys:
        info = field_info(root, key)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        cli = extra.get("cli")
        name = cli if isinstance(cli, str) else "--" + key.rsplit(".", 1)[-1].replace("_", "-")
        default = info.get_default(call_default_factory=True)
        shown = json.dumps(list(default) if isinstance(default, tuple) else default)
        kw: dict[str, Any] = {"dest": f"{prefix}:{key}", "default": None}
        kw["help"] = f"{info.description} [{key}; default: {shown}]"
        ann = _strip_optional(info.annotation)
        if ann is bool:
            # --no-x turns a default-on setting off; --x turns a default-off one on
            kw.update(action="store_const", const=not name.startswith("--no-"))
        elif typing.get_origin(ann) is tuple:
            kw.update(type=_csv(typing.get_args(ann)[0]), metavar="A,B,...")
        elif typing.get_origin(ann) is typing.Literal:
            kw.update(choices=list(typing.get_args(ann)))
        else:
            kw.update(type=ann, metavar=key.rsplit(".", 1)[-1].upper())
        p.add_argument(name, **kw)


def flag_values(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    """The config flags given on the command line under ``prefix``: ``{dotted key: value}``."""
    head = prefix + ":"
    return {
        k[len(head) :]: v for k, v in vars(args).items() if k.startswith(head) and v is not None
    }


def _strip_optional(ann: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return ann


def _csv(kind: Any) -> Callable[[str], tuple]:
    base = str if typing.get_origin(kind) is typing.Literal else kind

    def parse(text: str) -> tuple:
        return tuple(base(x.strip()) for x in text.split(",") if x.strip())

    return parse


def _set_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw  # a bare string


def add_model_config_args(p: argparse.ArgumentParser, keys: Iterable[str]) -> None:
    """``--config FILE``, ``--set KEY=VALUE`` and the flags of ``keys`` (MSPrayConfig)."""
    g = p.add_argument_group("configuration (mspray/config.py; flags override --config)")
    g.add_argument("--config", metavar="JSON", help="start from this config file (local or s3://)")
    g.add_argument(
        "--set",
        action="append",
        type=_set_value,
        default=[],
        metavar="KEY=VALUE",
        help="set any config field, e.g. --set train.lam=0.01 --set model.scales=[64,32]",
    )
    add_config_flags(g, "cfg", MSPrayConfig, keys)


def config_from_args(args: argparse.Namespace, base: MSPrayConfig | None = None) -> MSPrayConfig:
    """The config: ``base`` (or ``--config``, or the defaults), then ``train --recipe``, then
    ``--set``, then flags."""
    cfg = base or MSPrayConfig()
    if getattr(args, "config", None):
        from mspray import storage

        cfg = MSPrayConfig.from_json(storage.read_text(args.config))
    if getattr(args, "recipe", None):  # a preset: applied first, the flags override it
        cfg = apply_recipe(cfg, args.recipe)
    over = dict(getattr(args, "set", None) or [])
    over.update(flag_values(args, "cfg"))
    if "model.scales" in over and "model.strides" not in over:
        # the paper's stride of each chosen scale, so `--scales 64,32` alone is valid
        default = dict(zip(MSPrayConfig().model.scales, MSPrayConfig().model.strides, strict=True))
        over["model.strides"] = tuple(default.get(s, s) for s in over["model.scales"])
    return with_overrides(cfg, over) if over else cfg


POOL_KEYS = ("workers", "min_workers", "gpus_per_worker", "cpus_per_worker", "io_threads")
SCORE_POOL_KEYS = (*POOL_KEYS, "decode_cpus")


def add_pool_args(p: argparse.ArgumentParser, keys: Iterable[str] = POOL_KEYS) -> None:
    g = p.add_argument_group("Ray (actor pool)")
    add_config_flags(g, "pool", PoolConfig, keys)
    g.add_argument(
        "--address",
        help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray with at least 4 "
        "logical CPUs)",
    )


def pool_from_args(args: argparse.Namespace) -> PoolConfig:
    return validate(PoolConfig, flag_values(args, "pool"))


# ---------------------------------------------------------------------------- train
TRAIN_KEYS = (
    "model.image_size",
    "model.scales",
    "model.strides",
    "model.pretrained",
    "model.weights_path",
    "model.fusion",
    "train.epochs",
    "train.max_steps",
    "train.batch_size",
    "train.samples_per_image",
    "train.lr",
    "train.losses",
    "train.seed",
    "train.device",
    "train.workers",
    "train.use_gpu",
    "train.storage",
    "bank.coreset_ratio",
    "bank.use_gpu",
    "score.target_fpr",
    "score.calibration",
)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train all scales on normal images and write a bundle",
        description="Train the per-scale encoders on the normal training images, build the "
        "patch banks, calibrate the threshold on held-out normal images and write a model "
        "bundle. With --workers N the encoders train on Ray Train (DDP) and the banks and "
        "the threshold are then built on a Ray Data actor pool (as build-bank does).",
    )
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--category", help="category (sub-folder) of an mvtec/btad dataset")
    p.add_argument("--out", required=True, help="bundle directory (local path or s3://)")
    p.add_argument(
        "--run-name",
        help="Ray Train run name; rerunning with the same name and storage resumes from its "
        "last checkpoint (default: a new name, logged)",
    )
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument(
        "--no-banks",
        action="store_true",
        help="only train and save the encoders; build the banks and the threshold afterwards "
        "on Ray Data with `mspray build-bank --bundle OUT --data ...`",
    )
    p.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        help="training preset applied before --set and the flags below (which override it): "
        "paper (the defaults: ImageNet weights, lr 1e-5) or random-init (from scratch: lr 1e-3, "
        "128 px; see mspray/train/recipes.py)",
    )
    add_model_config_args(p, TRAIN_KEYS)
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from mspray.bundle import version_uri
    from mspray.data.datasets import train_paths
    from mspray.fit import fit_detector

    cfg = config_from_args(args)
    uris = train_paths(args.data, args.category)
    log.info("training on %d normal images from %s", len(uris), args.data)
    trainer = None
    if cfg.train.workers > 0:
        from mspray.ray.train import default_storage_for, ray_scale_trainer

        trainer = ray_scale_trainer(
            address=args.address,
            run_name=args.run_name,
            storage=cfg.train.storage or default_storage_for(args.out),
            progress=not args.quiet,
        )
    # On Ray the banks and the threshold are built on a Ray Data actor pool afterwards (as
    # `build-bank` does), so the job's driver never holds the training images.
    det = fit_detector(
        cfg,
        uris,
        out=args.out,
        trainer=trainer,
        progress=not args.quiet,
        build_banks=trainer is None and not args.no_banks,
    )
    summary = {
        "bundle": args.out,
        "version": det.version,
        "version_uri": version_uri(args.out, det.version),
        "threshold": det.threshold,
        "bank_sizes": {str(s): b.ntotal for s, b in det.banks.items()},
        "pretrained_loaded": det.meta.get("pretrained_loaded"),
    }
    if trainer is not None and not args.no_banks:
        from mspray.ray.data.banks import build_banks

        result = build_banks(args.out, uris, progress=not args.quiet, address=args.address)
        summary.update(
            version=result.version,
            version_uri=result.version_uri,
            threshold=result.threshold,
            bank_sizes={str(s): n for s, n in result.bank_sizes.items()},
        )
    _print_json(summary)
    return 0


# ---------------------------------------------------------------------------- evaluate
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="metrics of a bundle on a labelled test set",
        description="Score the test split and write the metrics JSON (image_auroc, "
        "pixel_auroc, pixel_aupro, f1_max, threshold, n_images, seconds_per_image; pixel "
        "metrics null without ground truth masks).",
    )
    p.add_argument("--bundle", required=True, help="bundle directory (local path or s3://)")
    p.add_argument("--data", required=True, help="mvtec:ROOT, btad:ROOT or s3://bucket/prefix")
    p.add_argument("--category", help="category of an mvtec/btad dataset")
    p.add_argument("--json", required=True, metavar="OUT.json", help="metrics file to write")
    p.add_argument("--maps", metavar="DIR", help="write heatmap overlay PNGs here")
    p.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto (default)")
    add_config_flags(
        p, "cfg", MSPrayConfig, ["score.batch_size", "score.runtime", "score.precision"]
    )
    p.add_argument(
        "--ray",
        action="store_true",
        help="load and score the images on a Ray Data actor pool (same JSON); implied by --workers",
    )
    add_pool_args(p, ("workers", "gpus_per_worker"))
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mspray import storage
    from mspray.data.datasets import test_samples

    samples = test_samples(args.data, args.category)
    pool = pool_from_args(args)
    overrides = flag_values(args, "cfg")
    if args.ray or pool.workers:
        from mspray.ray.data.evaluation import evaluate_ray

        metrics = evaluate_ray(
            args.bundle,
            samples,
            maps_dir=args.maps,
            pool=pool,
            overrides=overrides,
            progress=not args.quiet,
            address=args.address,
        )
    else:
        from mspray.bundle import load_bundle
        from mspray.device import resolve_device
        from mspray.evaluate import evaluate

        over = {k: v for k, v in overrides.items() if k in ("score.runtime", "score.precision")}
        config = bundle_config_with(args.bundle, over) if over else None
        det = load_bundle(args.bundle, device=resolve_device(args.device), config=config)
        metrics = evaluate(
            det,
            samples,
            maps_dir=args.maps,
            batch_size=overrides.get("score.batch_size"),
            progress=not args.quiet,
        )
    text = json.dumps(metrics, indent=2)
    storage.write_text(args.json, text + "\n")
    print(text)
    return 0


# ---------------------------------------------------------------------------- build-bank
BUILD_BANK_EPILOG = """\
Without --append the images are split like training does (train.val_fraction held out,
train.seed): the bank is built from the rest and the threshold is recalibrated on the
held-out images. With --append the images are added to the existing banks without
retraining (coreset-reduced against the existing bank, or all patches with --append-all);
the threshold is kept.

examples:
  mspray build-bank --bundle s3://models/screws/v3 --data mvtec:s3://data/mvtec \\
      --category screw --workers 4
  mspray build-bank --bundle ./bundle --data folder:./new_good_images --append
"""


def _add_build_bank(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build-bank",
        help="build or extend a bundle's patch banks on Ray Data",
        description="Build the per-scale patch banks of a model bundle from normal images on "
        "a Ray Data actor pool: every actor loads the bundle's encoders once and embeds "
        "batches of images; large banks are coreset-reduced per shard on the actors and "
        "globally on the driver. The result is saved as a NEW version of the bundle "
        "(ROOT/versions/<id>/, every file checksummed) and ROOT/latest moves to it once it is "
        "complete; the version it started from (e.g. the one being served) is never modified.",
        epilog=BUILD_BANK_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--bundle", required=True, help="model bundle with trained encoders (local or s3://)"
    )
    p.add_argument("--data", required=True, help=DATA_HELP + " (the training split is used)")
    p.add_argument("--category", help="category of an mvtec/btad dataset")
    p.add_argument(
        "--out",
        help="bundle root to save the new version under (default: the root of --bundle); its "
        "`latest` pointer is moved to the new version",
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
    add_config_flags(
        g,
        "cfg",
        MSPrayConfig,
        [
            "bank.coreset_ratio",
            "bank.coreset_max_candidates",
            "bank.index",
            "bank.use_gpu",
            "score.batch_size",
        ],
    )
    add_pool_args(p)
    p.set_defaults(func=cmd_build_bank)


def cmd_build_bank(args: argparse.Namespace) -> int:
    from mspray.data.datasets import train_paths
    from mspray.ray.data.banks import build_banks

    if args.append_all and not args.append:
        raise ValueError("--append-all needs --append")
    uris = train_paths(args.data, args.category)
    log.info("%d images from %s", len(uris), args.data)
    result = build_banks(
        args.bundle,
        uris,
        out=args.out,
        append=args.append,
        append_all=args.append_all,
        calibrate=not args.no_calibrate,
        pool=pool_from_args(args),
        overrides=flag_values(args, "cfg"),
        progress=not args.quiet,
        address=args.address,
    )
    _print_json(asdict(result))
    return 0


# ---------------------------------------------------------------------------- score
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
  OUTPUT/_maps/<path under the input prefix>.png   heatmap panels (with --maps)
  OUTPUT/_runs/<time>-<id>.json                   summary of each run (counts, timing)
  OUTPUT/_lease/<generation>.json                 the lease: holder, expiry
  OUTPUT/_report.html                             the run's report page (mspray report)
  Read the rows with pandas.read_parquet(OUTPUT) or ray.data.read_parquet(OUTPUT).

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


def _add_score(sub: argparse._SubParsersAction) -> None:
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
        ["score.batch_size", "score.runtime", "score.precision", "bank.use_gpu"],
    )
    add_pool_args(p, SCORE_POOL_KEYS)
    p.set_defaults(func=cmd_score)


def cmd_score(args: argparse.Namespace) -> int:
    """Prints the summary line; exit 1 if an image ended with no row or with two (a unit
    failed on a transient fault; never for bad images, which get error rows), 3 if another
    run holds the output's lease."""
    from mspray import storage
    from mspray.lease import LeaseHeld
    from mspray.ray.data.results import expand_date
    from mspray.ray.data.scoring import score_prefix

    named = getattr(args, "score:models", None)
    bundle = named or getattr(args, "score:bundle_uri", None)
    if not bundle:
        raise ConfigError("--bundle is required")
    if named and getattr(args, "score:bundle_uri", None):
        raise ConfigError("--bundle: name every bundle (NAME=URI) when giving several")
    try:
        summary = score_prefix(
            bundle,
            expand_date(args.input, args.date),
            expand_date(args.output, args.date),
            route=expand_date(args.route, args.date) if args.route else None,
            manifest=args.manifest,
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
    print(summary.line(), flush=True)
    return 0 if summary.missing == 0 and summary.duplicates == 0 else 1


# ---------------------------------------------------------------------------- serve
SERVE_EPILOG = """\
routes:
  POST /v1/predict[?map=true]  one image as the raw body (image/*, application/octet-stream)
                               or a multipart/form-data file field 'file'; returns
                               {image_score, is_anomalous, threshold, model_version}, and
                               with map=true also scale_scores and anomaly_map_png (base64);
                               ?model=NAME (or header serve_multiplexed_model_id: NAME)
                               picks one of several bundles (--bundle NAME=URI)
  GET  /v1/models              served names, bundle versions, which are loaded
  GET  /v1/model[?model=NAME]  bundle config, version, scales, bank sizes, limits
  GET  /v1/stats               executed batch sizes and rejections of the replica
  GET  /healthz

examples:
  mspray serve --bundle runs/bottle
  mspray serve --bundle s3://models/bottle --port 8080 --replicas 1 --max-replicas 4
  mspray serve --bundle screw=s3://models/screw --bundle bottle=s3://models/bottle
  curl --data-binary @img.png -H 'content-type: image/png' 'localhost:8000/v1/predict?model=screw'
  curl --data-binary @img.png -H 'content-type: image/png' localhost:8000/v1/predict
  curl -F file=@img.png 'localhost:8000/v1/predict?map=true'
"""


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP endpoint for a bundle on Ray Serve (batched, autoscaled); blocks until Ctrl-C",
        description="Serve a model bundle over HTTP with Ray Serve: concurrent requests are "
        "batched into one forward pass and one bank search, and bad input gets a 4xx JSON "
        "error. Blocks until Ctrl-C (or SIGTERM), then removes the endpoint. Without "
        "--address a local Ray is started with at least 4 logical CPUs. For a cluster and "
        "zero-downtime model swaps, use serve_config.yaml with `serve deploy` instead.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    g = p.add_argument_group("serving (mspray.config.ServeConfig)")
    # bundle_uri and models share the one repeatable --bundle [NAME=]URI flag
    derived = [f for f in ServeConfig.model_fields if f not in ("bundle_uri", "models")]
    add_config_flags(g, "serve", ServeConfig, derived)
    add_bundle_flag(g, "serve", SERVE_BUNDLE_HELP)
    p.set_defaults(func=cmd_serve)


# issue 12: one repeatable flag for a bare bundle and for named ones
class _BundleAction(argparse.Action):
    """``--bundle URI`` sets ``<prefix>:bundle_uri``; ``--bundle NAME=URI`` (repeatable)
    adds to ``<prefix>:models``."""

    def __call__(self, parser: Any, namespace: Any, value: Any, option: Any = None) -> None:
        prefix = self.dest.split(":", 1)[0]
        name, uri = split_named_bundle(value)
        if name is None:
            if getattr(namespace, f"{prefix}:bundle_uri", None):
                parser.error("--bundle: give one bare URI, or name each one (NAME=URI)")
            setattr(namespace, f"{prefix}:bundle_uri", uri)
            return
        models = dict(getattr(namespace, f"{prefix}:models", None) or {})
        if name in models:
            parser.error(f"--bundle: model {name!r} given twice")
        models[name] = uri
        setattr(namespace, f"{prefix}:models", models)


def split_named_bundle(text: str) -> tuple[str | None, str]:
    """``"NAME=URI"`` -> ``(NAME, URI)``; a bare URI (also one with ``=`` in its path, as
    long as what precedes it is not a model name) -> ``(None, URI)``."""
    from mspray.config import MODEL_NAME

    name, sep, uri = text.partition("=")
    if sep and uri and MODEL_NAME.fullmatch(name):
        return name, uri
    return None, text


SERVE_BUNDLE_HELP = (
    "model bundle (local path or s3://); repeat as --bundle NAME=URI to serve several "
    "bundles, picked per request with ?model=NAME [bundle_uri, models]"
)
SCORE_BUNDLE_HELP = (
    "model bundle (local path or s3://); repeat as --bundle NAME=URI to score each image "
    "with its own bundle (with --route or --manifest)"
)


def add_bundle_flag(p: argparse.ArgumentParser | Any, prefix: str, help: str) -> None:
    """``--bundle [NAME=]URI``, repeatable (see :class:`_BundleAction`)."""
    p.add_argument(
        "--bundle", dest=f"{prefix}:bundle", action=_BundleAction, metavar="[NAME=]URI", help=help
    )


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    values = flag_values(args, "serve")
    values.pop("bundle", None)
    cfg = validate(ServeConfig, values)
    if not cfg.named_models():
        raise ConfigError("--bundle is required")
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    from mspray.ray.serve.run import serve_forever

    cfg = serve_config_from_args(args)  # validated before anything starts
    return serve_forever(cfg, host=args.host, port=args.port, address=args.address)


# ---------------------------------------------------------------------------- demo
def bundle_config_with(bundle: str, overrides: dict[str, Any]) -> MSPrayConfig:
    """The bundle's config with dotted runtime ``overrides`` (e.g. ``score.runtime``)."""
    from mspray.bundle import read_config

    return read_config(bundle).replace(**overrides)


# ---------------------------------------------------------------------------- calibrate
def _add_calibrate(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from mspray.calibration import recalibrate_bundle

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
    from mspray.bundle import read_meta

    meta = read_meta(out)
    _print_json({"bundle": out, "version": meta["version"], **meta["calibration"]})
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="synthetic data -> train -> evaluate, end to end",
        description="Make a synthetic dataset, train all three scales, build banks, "
        "evaluate, print a metrics table and write heatmap overlays.",
    )
    p.add_argument("--out", default="mspray-demo", help="working folder (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per scale (demo default 3)")
    p.add_argument(
        "--local",
        action="store_true",
        help="skip the Ray layers: plain single-process training and scoring",
    )
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from mspray.demo import run_demo

    run_demo(args.out, epochs=args.epochs, use_ray=not args.local, progress=not args.quiet)
    return 0


# ---------------------------------------------------------------------------- export
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a bundle as ONNX encoders, faiss banks and a JSON spec",
        description="Write encoder_<scale>.onnx (dynamic batch and image size), "
        "bank_<scale>.faiss and mspray_export.json (scales, strides, normalisation, fusion "
        "stats, threshold) to --out. Score them without torch with "
        "`python -m mspray.export_runtime OUT image.png`. Needs onnx (pip install "
        "'mspray[export]').",
    )
    p.add_argument("--bundle", required=True, help="bundle directory (local path or s3://)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format")
    p.add_argument("--out", required=True, help="output directory (local)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from mspray.export import export_bundle

    spec = export_bundle(args.bundle, args.out, args.format)
    print(json.dumps({"out": args.out, "scales": spec["scales"], "version": spec["version"]}))
    return 0


# ---------------------------------------------------------------------------- main
def _print_json(data: dict) -> None:
    print(json.dumps(data, indent=2, default=str), flush=True)


# ---------------------------------------------------------------------------- report
def _add_report(sub: argparse._SubParsersAction) -> None:
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


#: Every sub-command, in ``--help`` order.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_train,
    _add_evaluate,
    _add_calibrate,
    _add_build_bank,
    _add_score,
    _add_serve,
    _add_export,
    _add_report,
    _add_demo,
]


def build_parser() -> argparse.ArgumentParser:
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
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"mspray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

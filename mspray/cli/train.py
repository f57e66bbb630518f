"""``mspray train`` and ``mspray build-bank``: encoders, then patch banks and threshold."""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict

from mspray.cli.flags import (
    add_address_flag,
    add_config_flags,
    add_model_config_args,
    add_pool_args,
    add_shared_fs_flag,
    config_from_args,
    dataset_root,
    flag_values,
    pool_from_args,
    print_json,
    refuse_node_local,
)
from mspray.config import MSPrayConfig, validate
from mspray.config.runs import BankRun, TrainRun, run_fields
from mspray.train.recipes import RECIPES

log = logging.getLogger("mspray")

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


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train all scales on normal images and write a bundle",
        description="Train the per-scale encoders on the normal training images, build the "
        "patch banks, calibrate the threshold on held-out normal images and write a model "
        "bundle. With --workers N the encoders train on Ray Train (DDP) and the banks and "
        "the threshold are then built on a Ray Data actor pool (as build-bank does).",
    )
    add_config_flags(p, "run", TrainRun, ["data", "category", "out", "run_name"])
    add_address_flag(p)
    add_shared_fs_flag(p)
    add_config_flags(p, "run", TrainRun, ["banks"])
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
    from mspray.artifacts.bundle import version_uri
    from mspray.data.datasets import train_paths
    from mspray.pipeline.steps import fit_detector

    cfg = config_from_args(args)
    run = validate(TrainRun, flag_values(args, "run"))
    uris = train_paths(run.data, run.category)
    log.info("training on %d normal images from %s", len(uris), run.data)
    executor = None
    if cfg.train.workers > 0:
        from mspray.ray.executor import RayExecutor
        from mspray.ray.train import default_storage_for, ray_scale_trainer

        storage = cfg.train.storage or default_storage_for(run.out)
        refuse_node_local(
            args,
            [("--data", dataset_root(run.data)), ("--out", run.out), ("--storage", storage)],
        )
        # Ray Train for the scales, Ray Data for the banks and the threshold: the job's
        # driver never holds the training images. The steps are the in-process ones.
        executor = RayExecutor(trainer=ray_scale_trainer(run_name=run.run_name, storage=storage))
    det = fit_detector(cfg, uris, out=run.out, executor=executor, build_banks=run.banks)
    print_json(
        {
            "bundle": run.out,
            "version": det.version,
            "version_uri": version_uri(run.out, det.version),
            "threshold": det.threshold,
            "calibration": det.meta.get("calibration", {}).get("source"),
            # a widened false-alarm promise, or a fallback, is said here, not only in meta.json
            "calibration_warning": det.meta.get("calibration", {}).get("warning"),
            "bank_sizes": {str(s): b.ntotal for s, b in det.banks.items()},
            "pretrained_loaded": det.meta.get("pretrained_loaded"),
            "steps": {r["step"]: r["seconds"] for r in det.meta["pipeline"]["steps"]},
        }
    )
    return 0


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


def add_build_bank(sub: argparse._SubParsersAction) -> None:
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
    add_config_flags(p, "run", BankRun, run_fields(BankRun))
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
    add_shared_fs_flag(p)
    p.set_defaults(func=cmd_build_bank)


def cmd_build_bank(args: argparse.Namespace) -> int:
    from mspray.data.datasets import train_paths
    from mspray.pipeline.steps import build_banks
    from mspray.ray.executor import RayExecutor

    run = validate(BankRun, flag_values(args, "run"))
    refuse_node_local(args, [("--data", dataset_root(run.data)), ("--bundle", run.bundle)])
    uris = train_paths(run.data, run.category)
    log.info("%d images from %s", len(uris), run.data)
    executor = RayExecutor(pool=pool_from_args(args))
    result = build_banks(
        run.bundle,
        uris,
        executor,
        out=run.out,
        append=run.append,
        append_all=run.append_all,
        calibrate=run.calibrate,
        overrides=flag_values(args, "cfg"),
    )
    print_json(asdict(result))
    return 0

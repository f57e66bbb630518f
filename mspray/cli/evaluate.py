"""``mspray evaluate``: metrics of a bundle on a labelled test set, in-process or on Ray."""

from __future__ import annotations

import argparse
import json

from mspray.cli.flags import (
    add_config_flags,
    add_device_flag,
    add_pool_args,
    add_shared_fs_flag,
    dataset_root,
    flag_values,
    pool_from_args,
    refuse_node_local,
)
from mspray.config import MSPrayConfig


def add_evaluate(sub: argparse._SubParsersAction) -> None:
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
    add_device_flag(p, "where the model runs without --ray")
    add_config_flags(
        p, "cfg", MSPrayConfig, ["score.batch_size", "score.runtime", "score.precision"]
    )
    p.add_argument(
        "--ray",
        action="store_true",
        help="load and score the images on a Ray Data actor pool (same JSON); implied by --workers",
    )
    add_pool_args(p, ("workers", "gpus_per_worker"))
    add_shared_fs_flag(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mspray import storage
    from mspray.data.datasets import test_samples

    samples = test_samples(args.data, args.category)
    pool = pool_from_args(args)
    overrides = flag_values(args, "cfg")
    if args.ray or pool.workers:
        from mspray.ray.data.evaluation import evaluate_ray

        refuse_node_local(
            args,
            [("--data", dataset_root(args.data)), ("--maps", args.maps), ("--bundle", args.bundle)],
        )
        metrics = evaluate_ray(
            args.bundle,
            samples,
            maps_dir=args.maps,
            pool=pool,
            overrides=overrides,
        )
    else:
        from mspray.artifacts.bundle import load_bundle, load_config
        from mspray.device import resolve_device
        from mspray.evaluation.evaluate import evaluate

        over = {k: v for k, v in overrides.items() if k in ("score.runtime", "score.precision")}
        config = load_config(args.bundle, over) if over else None
        det = load_bundle(args.bundle, device=resolve_device(args.device), config=config)
        metrics = evaluate(
            det,
            samples,
            maps_dir=args.maps,
            batch_size=overrides.get("score.batch_size"),
        )
    text = json.dumps(metrics, indent=2)
    storage.write_text(args.json, text + "\n")
    print(text)
    return 0

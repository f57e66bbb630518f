"""The ``mspray`` console script.

Subcommands: ``train``, ``evaluate``, ``calibrate``, ``build-bank``, ``score``, ``serve``,
``demo``. Each one only parses arguments, builds an :class:`~mspray.config.MSPrayConfig` and
calls the library. Run ``mspray <command> --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from mspray.config import ConfigError, MSPrayConfig

log = logging.getLogger("mspray")


# ---------------------------------------------------------------------------- config options
def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model / training configuration")
    g.add_argument(
        "--config",
        metavar="JSON",
        help="start from this config file (the options below override it)",
    )
    g.add_argument("--epochs", type=int, help="training epochs per scale (0 = no training)")
    g.add_argument(
        "--max-minutes", type=float, help="training time budget per scale (0 = no limit)"
    )
    g.add_argument("--scales", help="comma-separated patch sizes, e.g. 64,32,16")
    g.add_argument("--strides", help="comma-separated inference strides, one per scale")
    g.add_argument("--image-size", type=int, help="images are resized to this square size")
    g.add_argument(
        "--no-pretrained", action="store_true", help="random init instead of ImageNet VGG16 weights"
    )
    g.add_argument(
        "--weights",
        metavar="PATH",
        help="local or s3:// VGG16 weights file "
        "(default: the torch hub cache, downloading if needed)",
    )
    g.add_argument("--device", help="cpu, cuda[:N] or auto (default)")
    g.add_argument("--batch-size", type=int, help="samples per loss per optimiser step")
    g.add_argument("--samples-per-image", type=int, help="samples per image per loss per epoch")
    g.add_argument("--lr", type=float, help="Adam learning rate")
    g.add_argument("--losses", help="comma-separated subset of svdd,cos,ssl,kmeans")
    g.add_argument("--coreset-ratio", type=float, help="fraction of bank patches kept")
    g.add_argument("--fusion", choices=["sum", "zscore"], help="how scale maps are combined")
    g.add_argument(
        "--target-fpr", type=float, help="false-alarm rate the threshold promises (0.01)"
    )
    g.add_argument(
        "--calibration",
        choices=["crossfit", "holdout"],
        help="calibration scores: cross-fitted over all normal images (default) or held-out",
    )
    g.add_argument("--seed", type=int)
    g.add_argument("--bank-gpu", action="store_true", help="faiss search on GPU when present")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def config_from_args(args: argparse.Namespace) -> MSPrayConfig:
    """Build the config: file (if any), then command-line overrides."""
    cfg = MSPrayConfig()
    if getattr(args, "config", None):
        from mspray import storage

        cfg = MSPrayConfig.from_json(storage.read_text(args.config))
    over: dict = {}
    pairs = [
        ("epochs", "train.epochs", None),
        ("max_minutes", "train.max_minutes", None),
        ("image_size", "model.image_size", None),
        ("device", "train.device", None),
        ("batch_size", "train.batch_size", None),
        ("samples_per_image", "train.samples_per_image", None),
        ("lr", "train.lr", None),
        ("seed", "train.seed", None),
        ("coreset_ratio", "bank.coreset_ratio", None),
        ("fusion", "model.fusion", None),
        ("target_fpr", "score.target_fpr", None),
        ("calibration", "score.calibration", None),
        ("weights", "model.weights_path", None),
        ("scales", "model.scales", _ints),
        ("strides", "model.strides", _ints),
        ("losses", "train.losses", lambda s: tuple(x for x in s.split(",") if x)),
        ("workers", "train.workers", None),
        ("storage", "train.storage", None),
    ]
    for attr, key, conv in pairs:
        value = getattr(args, attr, None)
        if value is not None:
            over[key] = conv(value) if conv else value
    if "model.scales" in over and "model.strides" not in over:
        default = dict(zip(MSPrayConfig().model.scales, MSPrayConfig().model.strides, strict=True))
        over["model.strides"] = (
            tuple(default[s] for s in over["model.scales"] if s in default) or over["model.scales"]
        )
    if getattr(args, "no_pretrained", False):
        over["model.pretrained"] = False
    if getattr(args, "use_gpu", False):
        over["train.use_gpu"] = True
    if getattr(args, "bank_gpu", False):
        over["bank.use_gpu"] = True
    return cfg.replace(**over) if over else cfg


# ---------------------------------------------------------------------------- commands
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train all scales on normal images and write a bundle",
        description="Train the per-scale encoders on the normal training "
        "images, build the patch banks, calibrate the threshold on held-out "
        "normal images and write a model bundle.",
    )
    p.add_argument(
        "--data", required=True, help="mvtec:ROOT, btad:ROOT, folder:PATH or s3://bucket/prefix"
    )
    p.add_argument("--category", help="category (sub-folder) of an mvtec/btad dataset")
    p.add_argument("--out", required=True, help="bundle directory (local path or s3://)")
    p.add_argument(
        "--workers",
        type=int,
        help="train with Ray Train on N DDP workers (0 = plain single-process training)",
    )
    p.add_argument("--use-gpu", action="store_true", help="Ray Train workers use one GPU each")
    p.add_argument(
        "--storage",
        help="Ray Train checkpoint storage, local path or s3:// "
        "(default: OUT.ray_runs next to the bundle)",
    )
    p.add_argument(
        "--run-name",
        help="Ray Train run name; rerunning with the same name and "
        "storage resumes from its last checkpoint (default: a new name, logged)",
    )
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument(
        "--no-banks",
        action="store_true",
        help="only train and save the encoders; build the banks and the threshold afterwards "
        "on Ray Data with `mspray build-bank --bundle OUT --data ...`",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from mspray.data.datasets import train_paths
    from mspray.fit import fit_detector

    cfg = config_from_args(args)
    uris = train_paths(args.data, args.category)
    log.info("training on %d normal images from %s", len(uris), args.data)
    trainer = None
    if cfg.train.workers > 0:
        from mspray.train.ray_train import default_storage_for, ray_scale_trainer

        trainer = ray_scale_trainer(
            address=args.address,
            run_name=args.run_name,
            storage=cfg.train.storage or default_storage_for(args.out),
            progress=not args.quiet,
        )
    det = fit_detector(
        cfg,
        uris,
        out=args.out,
        trainer=trainer,
        progress=not args.quiet,
        build_banks=not args.no_banks,
    )
    print(
        json.dumps(
            {
                "bundle": args.out,
                "version": det.version,
                "threshold": det.threshold,
                "bank_sizes": {str(s): b.ntotal for s, b in det.banks.items()},
                "pretrained_loaded": det.meta.get("pretrained_loaded"),
            },
            indent=2,
        )
    )
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="metrics of a bundle on a labelled test set",
        description="Score the test split and write the metrics JSON "
        "(image_auroc, pixel_auroc, pixel_aupro, f1_max, threshold, n_images, "
        "seconds_per_image; pixel metrics null without ground truth masks).",
    )
    p.add_argument("--bundle", required=True, help="bundle directory (local path or s3://)")
    p.add_argument("--data", required=True, help="mvtec:ROOT, btad:ROOT or s3://bucket/prefix")
    p.add_argument("--category", help="category of an mvtec/btad dataset")
    p.add_argument("--json", required=True, metavar="OUT.json", help="metrics file to write")
    p.add_argument("--maps", metavar="DIR", help="write heatmap overlay PNGs here")
    p.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto")
    p.add_argument("--batch-size", type=int, help="images per forward pass")
    from mspray.scoring.args import add_evaluate_ray_args

    add_evaluate_ray_args(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mspray import storage
    from mspray.bundle import load_bundle
    from mspray.data.datasets import test_samples
    from mspray.evaluate import evaluate
    from mspray.train.loop import resolve_device

    if getattr(args, "ray", False) or getattr(args, "workers", None):
        from mspray.scoring.args import run_evaluate_ray

        metrics = run_evaluate_ray(args)
    else:
        det = load_bundle(args.bundle, device=resolve_device(args.device))
        samples = test_samples(args.data, args.category)
        metrics = evaluate(
            det, samples, maps_dir=args.maps, batch_size=args.batch_size, progress=not args.quiet
        )
    text = json.dumps(metrics, indent=2)
    storage.write_text(args.json, text + "\n")
    print(text)
    return 0


# ---------------------------------------------------------------------------- calibrate
def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="reset a bundle's threshold from new production images; writes a new bundle",
        description="Score every image under --input with the bundle and set the threshold "
        "that promises --target-fpr false alarms on such images: the order statistic of "
        "their scores when they are all normal (--normal), or, with at most a fraction R "
        "anomalous (--expected-anomaly-rate R), of the scores left after the R highest. "
        "Banks and fusion stats are kept. The new bundle (a new version) records the "
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
        "--out", help="new bundle directory (default: BUNDLE-recal-<UTC time> next to it)"
    )
    p.add_argument("--in-place", action="store_true", help="overwrite the bundle itself")
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
        in_place=args.in_place,
        device=args.device,
        progress=not args.quiet,
    )
    from mspray.bundle import load_bundle

    meta = load_bundle(out, with_banks=False).meta
    print(json.dumps({"bundle": out, "version": meta["version"], **meta["calibration"]}, indent=2))
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="synthetic data -> train -> evaluate, end to end",
        description="Make a synthetic dataset, train all three scales, build "
        "banks, evaluate, print a metrics table and write heatmap overlays.",
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


def _delegate(name: str, help: str, module: str, prefix: str, run: str):
    """A subcommand whose options, help text and runner live in a Ray-layer module
    (``<prefix>DESCRIPTION``, ``<prefix>EPILOG``, ``add_<name>_args`` and ``run``); the
    module is imported only when the parser is built."""

    def add(sub: argparse._SubParsersAction) -> None:
        import importlib

        mod = importlib.import_module(module)
        p = sub.add_parser(
            name,
            help=help,
            description=getattr(mod, f"{prefix}DESCRIPTION"),
            epilog=getattr(mod, f"{prefix}EPILOG"),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        getattr(mod, f"add_{name.replace('-', '_')}_args")(p)
        p.set_defaults(func=getattr(mod, run))

    return add


_add_build_bank = _delegate(
    "build-bank",
    "build or extend a bundle's patch banks on Ray Data",
    "mspray.scoring.args",
    "BUILD_BANK_",
    "run_build_bank",
)
_add_score = _delegate(
    "score",
    "batch-score an image prefix to Parquet (+ heatmaps) on Ray Data; resumable",
    "mspray.scoring.args",
    "SCORE_",
    "run_score",
)
_add_serve = _delegate(
    "serve",
    "HTTP endpoint for a bundle on Ray Serve (batched, autoscaled); blocks until Ctrl-C",
    "mspray.serve.cli",
    "",
    "run_serve",
)


#: Subcommands; the Ray layers register theirs here as well.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_train,
    _add_evaluate,
    _add_demo,
    _add_calibrate,
    _add_build_bank,
    _add_score,
    _add_serve,
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
    # Also accepted after the subcommand (`mspray train ... -q`); SUPPRESS keeps the
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

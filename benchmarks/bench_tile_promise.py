"""The false-alarm promise on overlapping tiles of one photograph (issue 30 item 5), and the
cost of cross-calibration's fold banks (item 4).

Training tiles overlap heavily and are named in random order; the normal test tiles come from
a part of the photograph no training tile touches (:func:`mspray.data.tiles.make_tile_dataset`).
Untrained encoders (``--epochs 0``): the decision, not the features, is under test. Prints the
calibration's promise, how many new normal tiles were flagged against it, and the time spent
in the calibration's steps.

    python benchmarks/bench_tile_promise.py --grid 5 --stride 8 --test-good 40
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from mspray.config import tiny_config
from mspray.config.run import use_run
from mspray.data.datasets import test_samples, train_paths
from mspray.data.tiles import make_tile_dataset
from mspray.evaluation.evaluate import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64, help="tile size (px)")
    ap.add_argument("--grid", type=int, default=5, help="training square: grid × size px")
    ap.add_argument("--stride", type=int, default=8, help="training tile stride (px)")
    ap.add_argument("--test-good", type=int, default=40, help="new normal test tiles")
    ap.add_argument("--coreset", type=float, default=0.1, help="bank.coreset_ratio")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--photo", action="store_true",
        help="cut the tiles from a real photograph (scikit-learn's china.jpg) instead of gravel",
    )  # fmt: skip
    args = ap.parse_args()
    if args.photo:
        import numpy as np
        from sklearn.datasets import load_sample_image

        from mspray.data import tiles

        photo = load_sample_image("china.jpg").astype(np.float32) / 255
        tiles.gravel = lambda rng, h, w: photo[:h, :w]  # the same layout, a real photograph
    try:
        from mspray.pipeline.steps import fit_detector
    except ImportError:  # before the pipeline split
        from mspray.fit import fit_detector

    with tempfile.TemporaryDirectory() as root:
        make_tile_dataset(
            root, "tiles", size=args.size, grid=args.grid, stride=args.stride,
            n_test_good=args.test_good, n_test_defect=6, seed=args.seed,
        )  # fmt: skip
        cfg = tiny_config(**{
            "train.epochs": 0, "model.image_size": args.size, "train.seed": args.seed,
            "bank.coreset_ratio": args.coreset,
        })  # fmt: skip
        uris = train_paths(f"mvtec:{root}", "tiles")
        t0 = time.perf_counter()
        det = fit_detector(cfg, uris, None)
        fit_s = time.perf_counter() - t0
        fa = evaluate(det, test_samples(f"mvtec:{root}", "tiles"))["false_alarms"]
    cal = det.meta["calibration"]
    keys = ("source", "n", "fold_order", "gap", "near_duplicate_pairs", "promised_fpr")
    print(json.dumps({k: cal.get(k) for k in keys}))
    print(json.dumps({k: cal[k] for k in cal if k.startswith(("honest", "widen", "timing"))}))
    lo, hi = cal["fpr_interval"]
    print(
        f"{len(uris)} train tiles (stride {args.stride}), {fa['n_normal']} new normal tiles: "
        f"flagged {fa['flagged']} ({fa['observed_fpr']:.1%}) against a promise of "
        f"{cal['promised_fpr']:.1%} [{lo:.1%}, {hi:.1%}]; "
        f"within: {fa['flagged'] <= fa['n_normal'] * hi}; fit {fit_s:.0f} s"
    )


if __name__ == "__main__":
    with use_run(progress=False):  # figures, not bars
        main()

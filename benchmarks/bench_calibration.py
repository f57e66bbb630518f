"""False-alarm rate at the calibrated threshold vs what it promises, per calibration method.

Synthetic fabric sets (64 px, untrained random-init encoders: the decision is under test,
not the features):

- ``iid``: independent images (the default synthetic texture set);
- ``overlap``: consecutive crops of one long strip under a fixed camera, each overlapping
  the next 7 (step 8 px), test crops further along the strip;
- ``drift``: the same, with the test and production crops brighter (+0.06) and with more
  contrast (x1.15) than the training crops.

Methods: the old rule (0.99 quantile of the held-out 10 %), the order statistic for
``target_fpr`` on the same held-out scores, the order statistic on cross-fitted scores of
all training images (the new default), and recalibration of the cross-fitted bundle on a
production batch (120 images, 5 % anomalous: trimmed estimator with R = 0.05; and the same
batch's normal crops only: ``--normal``). For each: the promised false-alarm rate with its
95 % interval, the count of false alarms that promise predicts on the test normals
(Beta-Binomial), the observed count, the true-positive rate and the image AUROC.

    nice python benchmarks/bench_calibration.py [--target-fpr 0.01] [--n-train 150]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import numpy as np
import torch

from mspray.config import tiny_config
from mspray.config.run import use_run
from mspray.data.datasets import test_samples, train_paths
from mspray.data.images import load_images
from mspray.data.synthetic import make_strip_dataset, make_synthetic_dataset
from mspray.decisions.calibration import calibrate_normal_images, recalibrate, score_images
from mspray.decisions.summaries import calibrate
from mspray.evaluation.evaluate import evaluate
from mspray.pipeline.steps import fit_detector, split_holdout
from mspray.storage import list_files

# the test suite's tiny detector, untrained, with exact banks and a wider embedding
BASE = {
    "model.embed_dim": 32,
    "train.epochs": 0,
    "train.val_fraction": 0.1,
    "bank.coreset_ratio": 1.0,
}


def make_sets(root: str, n_train: int, n_test: int, n_prod: int) -> dict[str, dict]:
    """The three scenarios: category, and the production folders (None for iid)."""
    n_def = n_test // 3
    make_synthetic_dataset(root, "iid", n_train, n_test, n_def, size=64, seed=5)
    sets = {"iid": {"category": "iid", "production": None}}
    strip = {"n_train": n_train, "n_test_good": n_test, "n_test_defect": n_def, "size": 64}
    make_strip_dataset(root, "overlap", step=8, seed=1, **strip)
    sets["overlap"] = {"category": "overlap", "production": None}
    drift = {"brightness": 0.06, "contrast": 1.15, "step": 8, "seed": 2, "n_production": n_prod}
    make_strip_dataset(root, "drift", production_anomaly_rate=0.05, **strip, **drift)
    # same strip, same positions: its production crops are the normal ones of the batch above
    make_strip_dataset(root, "drift_normal", production_anomaly_rate=0.0, **strip, **drift)
    sets["drift"] = {
        "category": "drift",
        "production": f"{root}/drift/production",
        "production_normal": f"{root}/drift_normal/production",
    }
    return sets


def row(scenario: str, method: str, metrics: dict) -> dict:
    cal, fa = metrics["calibration"], metrics["false_alarms"]
    at = metrics["at_threshold"]
    pos = at["true_positives"] + at["false_negatives"]
    return {
        "scenario": scenario,
        "method": method,
        "n_cal": cal["n"],
        "promised": cal["promised_fpr"],
        "interval": cal["fpr_interval"],
        "expected": fa["expected_flagged"],
        "flagged": fa["flagged"],
        "m": fa["n_normal"],
        "within": fa["within_promise"],
        "tpr": at["true_positives"] / pos,
        "auroc": metrics["image_auroc"],
    }


def run_scenario(root: str, name: str, spec: dict, target: float) -> list[dict]:
    data = f"mvtec:{root}"
    samples = test_samples(data, spec["category"])
    uris = train_paths(data, spec["category"])
    cfg = tiny_config(**BASE, **{"score.target_fpr": target})
    rows = []
    # one detector (banks from the 90 % training split), recalibrated four ways
    det = fit_detector(cfg.replace(**{"score.calibration": "holdout"}), uris)
    train_uris, val_uris = split_holdout(uris, cfg.train.val_fraction, cfg.train.seed)
    val = load_images(val_uris, 64)
    det.cfg = cfg.replace(**{"score.threshold_quantile": 0.99, "score.calibration": "holdout"})
    calibrate(det, val)
    rows.append(row(name, "holdout q0.99 (old)", evaluate(det, samples)))
    det.cfg = cfg.replace(**{"score.calibration": "holdout"})
    calibrate(det, val)
    rows.append(row(name, "holdout order-stat", evaluate(det, samples)))
    det.cfg = cfg  # crossfit, measured gap
    names = sorted(uris)
    in_bank = np.isin(names, train_uris)
    calibrate_normal_images(det, load_images(names, 64), in_bank)
    rows.append(row(name, "crossfit order-stat", evaluate(det, samples)))
    if spec["production"]:
        # recalibrate copies of the crossfit detector's decision (banks and stats are kept)
        threshold, meta = det.threshold, dict(det.meta)
        prod = score_images(det, load_images(list_files(spec["production"]), 64))
        recalibrate(det, prod, expected_anomaly_rate=0.05)
        rows.append(row(name, "recal trimmed R=0.05", evaluate(det, samples)))
        det.threshold, det.meta = threshold, meta
        imgs = load_images(list_files(spec["production_normal"]), 64)
        recalibrate(det, score_images(det, imgs), normal=True)
        rows.append(row(name, "recal --normal", evaluate(det, samples)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target-fpr", type=float, default=0.01)
    p.add_argument("--n-train", type=int, default=120)
    p.add_argument("--n-test", type=int, default=90)
    p.add_argument("--n-production", type=int, default=120)
    p.add_argument("--scenarios", default="iid,overlap,drift")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        sets = make_sets(root, args.n_train, args.n_test, args.n_production)
        print(f"target_fpr={args.target_fpr}; interval: 95 %; expected: false alarms the")
        print("promise predicts on the m test normals (Beta-Binomial 95 %); within: inside it\n")
        print(HEAD)
        print("-" * len(HEAD), flush=True)
        for name in args.scenarios.split(","):
            for r in run_scenario(root, name, sets[name], args.target_fpr):
                print_row(r)
    print(f"\n{time.perf_counter() - t0:.0f} s")


HEAD = (
    f"{'scenario':9} {'method':22} {'n_cal':>5} {'promised [95% CI]':>22} "
    f"{'expected':>9} {'flagged/m':>10} {'within':>6} {'TPR':>5} {'AUROC':>5}"
)


def print_row(r: dict) -> None:
    ci = f"{r['promised']:.3f} [{r['interval'][0]:.3f},{r['interval'][1]:.3f}]"
    exp = f"{r['expected'][0]}-{r['expected'][1]}"
    obs = f"{r['flagged']}/{r['m']}"
    print(
        f"{r['scenario']:9} {r['method']:22} {r['n_cal']:>5} {ci:>22} {exp:>9} {obs:>10} "
        f"{'yes' if r['within'] else 'NO':>6} {r['tpr']:5.2f} {r['auroc']:5.3f}",
        flush=True,
    )


if __name__ == "__main__":
    with use_run(progress=False):  # figures, not bars
        main()

"""Make docs/report.png: a real scoring run's report page, rendered by headless Chromium.

A small detector is trained in-process on a synthetic texture set, one "night" of test
images (good and defective) is batch-scored with Ray Data (``score_prefix`` writes the
report at its end), and Chromium takes a screenshot of ``_report.html``::

    python docs/report_screenshot.py [--work /tmp/mspray-report] [--out docs/report.png]

Needs ``chromium`` on the PATH.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from mspray.config import PoolConfig, tiny_config
from mspray.config.run import use_run
from mspray.config.runs import ScoreRun
from mspray.data.datasets import train_paths
from mspray.data.synthetic import make_synthetic_dataset
from mspray.pipeline.steps import fit_detector
from mspray.ray.data.scoring import score_prefix
from mspray.report import REPORT_NAME, build_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/mspray-report", help="working folder")
    ap.add_argument("--out", default=str(Path(__file__).with_name("report.png")))
    ap.add_argument("--top-k", type=int, default=8)
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    # the test suite's tiny detector (64 px, random init): minutes on 2 CPU cores
    cfg = tiny_config(**{"score.batch_size": 8})
    data = work / "data"
    make_synthetic_dataset(str(data), "synthetic", 40, 24, 12, size=64, seed=0)
    bundle = str(work / "bundle")
    fit_detector(cfg, train_paths(f"mvtec:{data}", "synthetic"), out=bundle)
    night = work / "archive" / "2024-03-07"
    shutil.copytree(data / "synthetic" / "test", night)
    (night / "good" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (night / "good" / "empty.png").write_bytes(b"")
    out = str(work / "scores" / "2024-03-07")
    with use_run(progress=False):
        score_prefix(
            ScoreRun(bundle=bundle, input=str(night), output=out, maps=True),
            pool=PoolConfig(workers=1),
        )
    report = build_report(out, top_k=args.top_k)  # the run wrote one; fewer images here
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [shutil.which("chromium") or "chromium", "--headless", "--no-sandbox",
             "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=10000",
             "--hide-scrollbars", "--window-size=1100,1900",
             f"--screenshot={os.path.abspath(args.out)}", Path(report).as_uri()],
            check=True, capture_output=True,
        )  # fmt: skip
    print(f"{REPORT_NAME}: {report}\nscreenshot: {args.out}")


if __name__ == "__main__":
    main()

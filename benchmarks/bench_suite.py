"""Wall time of test-suite selections at two revisions, run side by side.

The tree of ``--base`` (a git revision) is exported to a temporary folder; each selection is
then run with ``python -m pytest -q -p no:cacheprovider`` in that tree and in this checkout,
alternating which goes first, ``--repeats`` times. Printed per selection: the wall seconds
of each run, the medians and their ratio (this checkout / base), the pass/fail line of
each, and the 1-minute load average before and after (the machine is shared: compare
ratios, not seconds across runs). Each run gets its own ``RAY_TMPDIR``, so a Ray cluster
that one run starts is never found by the other.

    nice python benchmarks/bench_suite.py --base abe9287 --repeats 1 \\
        tests/ray/train/test_ray_train.py \\
        "tests/ray/data/test_device_faults.py tests/ray/data/test_device_fault_limits.py"
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def export_tree(rev: str, dst: Path) -> None:
    """The files of ``rev`` (tracked ones only) under ``dst``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)


def run_pytest(tree: Path, selection: str, ray_tmp: Path) -> tuple[float, str]:
    """Wall seconds of one pytest run of ``selection`` in ``tree`` and its last line."""
    env = {**os.environ, "PYTHONPATH": str(tree), "RAY_TMPDIR": str(ray_tmp)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0"]
    start = time.perf_counter()
    r = subprocess.run(
        [*cmd, *shlex.split(selection)], cwd=tree, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    return seconds, lines[-1] if lines else f"exit {r.returncode}"


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print one block per selection."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("selections", nargs="+", help="pytest arguments, one quoted string each")
    ap.add_argument("--base", default="HEAD~1", help="git revision to compare against")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bs", dir="/tmp") as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        export_tree(args.base, base)
        trees = {"base": base, "this": REPO}
        for selection in args.selections:
            times: dict[str, list[float]] = {"base": [], "this": []}
            print(f"== {selection}  (load before: {os.getloadavg()[0]:.1f})", flush=True)
            for i in range(args.repeats):
                order = ("base", "this") if i % 2 == 0 else ("this", "base")
                for name in order:
                    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir=tmp))
                    seconds, last = run_pytest(trees[name], selection, ray_tmp)
                    times[name].append(seconds)
                    print(f"  {name:4s} {seconds:7.1f} s  {last}", flush=True)
            b, t = statistics.median(times["base"]), statistics.median(times["this"])
            print(f"  median base {b:.1f} s, this {t:.1f} s, ratio this/base {t / b:.2f}"
                  f"  (load after: {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Planning a night at scale: ``mspray score --input-manifest M --dry-run`` on synthetic
manifests of 100k, 1M and 10M keys, with an empty output and with an output that already
holds half of them (parts of 256 rows, as a real run writes them).

Per size and case it prints the driver's peak RSS (the ``mspray score`` process alone; Ray's
own processes are separate), the time from the start of planning to the first unit, the
total planning time (manifest read, already-scored check, units cut and counted) and the
whole command's wall time (Ray's start included), and the RSS ratio to the smallest size.
The goals (issue 28): RSS at 10M <= 1.3x the 100k figure; planning 10M keys < 10 minutes on
the 2-core machine.

    python benchmarks/bench_plan_scale.py                       # 100k, 1M
    python benchmarks/bench_plan_scale.py --sizes 100000 1000000 10000000

The manifests and outputs go under ``--work`` (default a temp folder, removed after).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

CHUNK = 1_000_000
PART_ROWS = 256
#: The driver, run as a child: the mspray CLI, then its own peak RSS as JSON on stdout.
DRIVER = (
    "import json, resource, sys\n"
    "from mspray.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print(json.dumps({'rc': rc, 'rss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))\n"
)


def _paths(root: str, start: int, stop: int) -> pa.Array:
    """Synthetic archive keys: root/day-DD/camC/IIIIIIIII.png (30 days, 8 cameras)."""
    i = np.arange(start, stop)
    days = pa.array(np.char.mod("day-%02d", i % 30))
    cams = pa.array(np.char.mod("cam%d", (i // 30) % 8))
    names = pa.array(np.char.mod("%09d.png", i))
    return pc.binary_join_element_wise(root, days, cams, names, "/")


def make_manifest(path: str, root: str, n: int) -> None:
    """A Parquet manifest of ``n`` keys (a ``path`` column), written a million at a time."""
    with pq.ParquetWriter(path, pa.schema([("path", pa.string())])) as w:
        for start in range(0, n, CHUNK):
            w.write_table(pa.table({"path": _paths(root, start, min(n, start + CHUNK))}))


def make_half_done(out: str, root: str, n: int) -> None:
    """An output holding every other key of the manifest, in parts of 256 rows."""
    from mspray.artifacts.output import result_schema, write_part

    os.makedirs(out, exist_ok=True)
    schema = result_schema([32])
    for start in range(0, n, CHUNK):
        paths = _paths(root, start, min(n, start + CHUNK)).take(
            pa.array(np.arange(0, min(CHUNK, n - start), 2))
        )
        for i in range(0, len(paths), PART_ROWS):
            chunk = paths.slice(i, PART_ROWS)
            cols = {"path": chunk, "model_version": pa.array(["v1"] * len(chunk))}
            table = pa.table(
                {f.name: cols.get(f.name, pa.nulls(len(chunk), f.type)) for f in schema},
                schema=schema,
            )
            write_part(out, table)


def dry_run(manifest: str, root: str, out: str, work: str) -> dict:
    """One ``mspray score --dry-run`` in a child process: its summary and peak RSS."""
    summary = os.path.join(work, "summary.json")
    cmd = [sys.executable, "-c", DRIVER, "-q", "score", "--bundle", "unused-by-a-dry-run",
           "--input", root, "--output", out, "--input-manifest", manifest, "--dry-run",
           "--summary-json", summary]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"dry run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    rss = json.loads(res.stdout.strip().splitlines()[-1])["rss_kb"] / 1024
    return {**json.loads(open(summary).read()), "rss_mb": rss, "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--work", help="folder for the manifests and outputs (kept)")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="bench_plan_scale-")
    print(f"CPU: AMD EPYC (Zen 3), AVX2, no AVX-512 ({os.cpu_count()} cores, "
          f"{platform.machine()}); driver = the mspray score process")  # fmt: skip
    head = (f"{'keys':>10} {'output':>9} {'pending':>9} {'skipped':>9} {'units':>7} "
            f"{'peak RSS MB':>11} {'x smallest':>10} {'first unit s':>12} {'plan s':>8} "
            f"{'wall s':>7}")  # fmt: skip
    print(head)
    base: dict[str, float] = {}
    try:
        for n in args.sizes:
            root = os.path.join(work, f"in{n}")
            manifest = os.path.join(work, f"manifest-{n}.parquet")
            make_manifest(manifest, root, n)
            empty, half = os.path.join(work, f"out{n}-empty"), os.path.join(work, f"out{n}-half")
            make_half_done(half, root, n)
            for case, out in (("empty", empty), ("half", half)):
                r = dry_run(manifest, root, out, work)
                base.setdefault(case, r["rss_mb"])
                print(f"{n:>10} {case:>9} {r['pending']:>9} {r['skipped']:>9} {r['units']:>7} "
                      f"{r['rss_mb']:>11.0f} {r['rss_mb'] / base[case]:>10.2f} "
                      f"{r['first_unit_seconds']:>12.1f} {r['plan_seconds']:>8.1f} "
                      f"{r['wall']:>7.1f}", flush=True)  # fmt: skip
            shutil.rmtree(half, ignore_errors=True)
            os.remove(manifest)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

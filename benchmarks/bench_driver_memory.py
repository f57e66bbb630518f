"""Driver peak memory of a Ray Data bank build (with calibration) for N vs 4N images.

Each build runs ``mspray.pipeline.steps.build_banks`` on a ``RayExecutor`` in a fresh child
process (its own local Ray: GCS, raylet and actors are other processes), and the child reports
its own peak RSS (``ru_maxrss``): the driver's memory only; also its RSS once Ray is up and the
model loaded, just before the build, so the build's own working memory shows apart from the
~0.6 GB of torch and Ray every driver carries. Same bundle (random-init encoders), same
settings, only the number of normal images differs. The candidate budget is small so that both
sizes go through the per-shard coreset, and calibration is the default cross-fit, so the run
shows whether anything on the driver still grows with the image count. The child also samples
(every 0.2 s) the PSS of its Ray workers (``ray::`` processes: actors, decode and coreset
tasks): the largest one and their sum, so worker memory shows next to the driver's.

    python benchmarks/bench_driver_memory.py [--n 16] [--image-size 256]

``--pythonpath DIR`` runs the builds against another checkout of mspray (e.g. a
``git worktree`` of an older commit), for a before/after comparison in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import json, os, resource, sys, threading, time
from mspray.artifacts.bundle import load_bundle
from mspray.config import PoolConfig
from mspray.config.run import use_run
from mspray.data.datasets import train_paths
from mspray.pipeline.steps import build_banks
from mspray.ray.executor import RayExecutor
from mspray.ray.runtime import init_ray
bundle, spec, n, out, over = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
uris = sorted(train_paths(spec, "synthetic"))[:n]
peak = {"worker": 0, "workers": 0}  # KiB: largest Ray worker's PSS, sum over Ray workers
stop = threading.Event()

def kib(pid, path, key):
    try:
        for line in open(f"/proc/{pid}/{path}"):
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0

def workers():
    # Ray workers descend from this driver (it started the local Ray): ray::<task or actor>
    kids = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
            cmd = open(f"/proc/{pid}/cmdline").read()
        except OSError:
            continue
        kids.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append((int(pid), cmd))
    out, todo = [], [os.getpid()]
    while todo:
        for pid, cmd in kids.get(todo.pop(), []):
            todo.append(pid)
            if cmd.startswith("ray::"):
                out.append(pid)
    return out

def sample():
    while not stop.wait(0.2):
        pss = [kib(p, "smaps_rollup", "Pss:") for p in workers()]
        peak["worker"] = max([peak["worker"], *pss])
        peak["workers"] = max(peak["workers"], sum(pss))

with use_run(progress=False):
    init_ray()
    load_bundle(bundle, with_banks=False)  # the model, as build_banks loads it
    base = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
    t0 = time.perf_counter()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    r = build_banks(bundle, uris, RayExecutor(pool=PoolConfig(workers=2)), out=out,
                    overrides=json.loads(over))
stop.set()
sampler.join()
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "base_rss_mb": base, "seconds": time.perf_counter() - t0,
                  "worker_pss_mb": peak["worker"] / 1024, "workers_pss_mb": peak["workers"] / 1024,
                  "bank_sizes": r.bank_sizes, "n_images": r.n_images}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="N: images of the small build")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--max-candidates", type=int, default=20_000)
    ap.add_argument("--coreset-ratio", type=float, default=0.02)
    ap.add_argument("--pythonpath", default=None, help="import mspray from this checkout")
    args = ap.parse_args()

    from mspray.artifacts.bundle import save_bundle
    from mspray.config import MSPrayConfig
    from mspray.config.run import use_run
    from mspray.data.datasets import train_paths
    from mspray.data.synthetic import make_synthetic_dataset
    from mspray.pipeline.steps import fit_detector

    root = tempfile.mkdtemp(prefix="mspray-drvmem-")
    n_all = 4 * args.n
    make_synthetic_dataset(
        root, "synthetic", n_train=n_all, n_test_good=1, n_test_defect=1, size=args.image_size
    )
    spec = f"mvtec:{root}"
    cfg = MSPrayConfig().replace(
        **{"model.image_size": args.image_size, "model.pretrained": False, "train.epochs": 0}
    )
    with use_run(progress=False):
        det = fit_detector(cfg, sorted(train_paths(spec, "synthetic"))[:4])
    bundle = os.path.join(root, "bundle")
    save_bundle(det, bundle)
    over = json.dumps(
        {
            "bank.coreset_max_candidates": args.max_candidates,
            "bank.coreset_ratio": args.coreset_ratio,
        }
    )
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    rows = {}
    for n in (args.n, n_all):
        out = os.path.join(root, f"out{n}")
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, bundle, spec, str(n), out, over],
            env=env,
            cwd=root,  # not the repository: `python -c` puts the cwd first on sys.path
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode:
            sys.exit(f"build of {n} images failed:\n{proc.stderr[-4000:]}")
        rows[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"{args.image_size}px, candidate budget {args.max_candidates}, coreset ratio "
        f"{args.coreset_ratio}, cross-calibration, 2 actors"
        + (f", mspray from {args.pythonpath}" if args.pythonpath else "")
    )
    print(
        "| images | driver peak RSS MB | RSS before the build MB | peak - before MB "
        "| largest worker PSS MB | all workers PSS MB | build s | bank sizes |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for n, r in rows.items():
        sizes = "/".join(str(v) for v in r["bank_sizes"].values())
        work = r["peak_rss_mb"] - r["base_rss_mb"]
        print(
            f"| {n} | {r['peak_rss_mb']:.0f} | {r['base_rss_mb']:.0f} | {work:.0f} "
            f"| {r['worker_pss_mb']:.0f} | {r['workers_pss_mb']:.0f} "
            f"| {r['seconds']:.0f} | {sizes} |"
        )
    small, big = rows[args.n], rows[n_all]
    ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
    print(f"driver peak memory 4N / N: {ratio:.2f}x (goal <= 1.10x)")
    for key, what in (
        ("worker_pss_mb", "largest Ray worker"),
        ("workers_pss_mb", "all Ray workers"),
    ):
        print(f"{what} peak PSS 4N / N: {big[key] / max(small[key], 1e-9):.2f}x")
    grow = (big["peak_rss_mb"] - small["peak_rss_mb"]) / (n_all - args.n) * 1024
    print(f"growth of the peak per extra image: {grow:.0f} KB")


if __name__ == "__main__":
    main()

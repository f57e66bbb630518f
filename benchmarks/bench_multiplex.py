"""Multiplexed serving: throughput with 2 models vs 1 behind one deployment, and the
latency of a request that has to load its model first (cold model).

Bounded and local: a local Ray, Serve's HTTP proxy on 127.0.0.1, two tiny bundles built on
two synthetic categories (untrained encoders, ``train.epochs=0``: scoring costs the same as
with trained ones). Three apps run side by side, one replica each with the same CPUs:

- ``one``: models {a}; every request names a.
- ``two``: models {a, b}, LRU of 2; the clients alternate a and b (``?model=``), so each
  model gets half the traffic and batches are split by model.
- ``cold``: models {a, b}, LRU of 1; one client alternating a and b, so every request
  unloads one model and loads the other before it is scored.

``one`` and ``two`` are measured in alternating rounds, so a change in machine load hits
both alike.

    python benchmarks/bench_multiplex.py
    python benchmarks/bench_multiplex.py --bundle-a runs/screw --bundle-b runs/nut

Measured on the 2-core CPU dev machine (no GPU), heavily shared (load average 16-21 from
other jobs), ``nice python benchmarks/bench_multiplex.py``: 16 clients, 2x320 requests per
app, 64 px, scales 32/16, one replica with 2 CPUs:

    | app | models | requests | failed | req/s  | p50 ms | p99 ms | mean batch |
    |-----|--------|----------|--------|--------|--------|--------|------------|
    | one |      1 |      640 |      0 |   17.0 |  904.5 | 1537.9 |       1.95 |
    | two |      2 |      640 |      0 |   17.6 |  888.2 | 1429.1 |       1.66 |
    throughput 2 models / 1 model: 1.03x
    cold model (load + score, LRU of 1, 10 requests): median 915 ms, max 2150 ms;
    warm (same requests, model loaded): median 110 ms; cold load cost ~805 ms

Two models cost no throughput here: batches are split by model (mean batch 1.66 vs
1.95), but on a CPU this loaded the forward pass gains little from batching. A cold model
costs about 0.8 s on this machine for a tiny bundle (read config, weights and faiss banks,
one warm-up pass); it grows with bank size and on S3. Absolute figures are ~4x below an
idle machine (bench_serve.py measured 72 req/s batched at load average 2-3).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import tempfile
import time

import httpx
import numpy as np

# the serving benchmark's load generator and test image (benchmarks/ is on sys.path when a
# benchmark runs as a script)
from bench_serve import load as serve_load
from bench_serve import test_image

from mspray.config.run import use_run


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle-a", help="first bundle (default: a tiny synthetic one)")
    p.add_argument("--bundle-b", help="second bundle (default: a tiny synthetic one)")
    p.add_argument("--image-size", type=int, default=64, help="synthetic bundle image size")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--requests", type=int, default=320, help="requests per app per round")
    p.add_argument("--rounds", type=int, default=2, help="alternating measurement rounds")
    p.add_argument("--cold-loads", type=int, default=10, help="cold-model requests")
    p.add_argument("--replica-cpus", type=float, default=2, help="CPUs (torch threads)")
    return p.parse_args()


def make_bundle(root: str, category: str, seed: int, size: int) -> str:
    from mspray.config import MSPrayConfig
    from mspray.data.datasets import train_paths
    from mspray.data.synthetic import make_synthetic_dataset
    from mspray.pipeline.steps import fit_detector

    make_synthetic_dataset(
        root, category, n_train=8, n_test_good=1, n_test_defect=1, size=size, seed=seed
    )
    cfg = MSPrayConfig().replace(
        **{
            "model.image_size": size,
            "model.scales": (32, 16),
            "model.strides": (4, 4),
            "model.pretrained": False,
            "train.epochs": 0,
            "train.val_fraction": 0.25,
            "train.seed": seed,
        }
    )
    out = f"{root}/bundle_{category}"
    fit_detector(cfg, train_paths(f"mvtec:{root}", category), out=out)
    return out


def load(url: str, image: bytes, models: list[str], clients: int, n: int):
    """bench_serve's closed-loop load, request i naming ``models[i % len(models)]``."""
    return serve_load(url, image, clients, n, models=models, timeout=300)


def main() -> None:
    args = parse_args()
    import ray
    from ray import serve

    from mspray.config import ServeConfig
    from mspray.ray.serve import build_app

    tmp = tempfile.TemporaryDirectory(prefix="bench_multiplex_")
    a = args.bundle_a or make_bundle(tmp.name, "cat_a", 1, args.image_size)
    b = args.bundle_b or make_bundle(tmp.name, "cat_b", 2, args.image_size)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    apps = {
        "one": ({"a": a}, 2, ["a"]),
        "two": ({"a": a, "b": b}, 2, ["a", "b"]),
        "cold": ({"a": a, "b": b}, 1, ["a", "b"]),
    }
    urls = {}
    for name, (models, lru, _) in apps.items():
        cfg = ServeConfig(
            models=models,
            max_num_models_per_replica=lru,
            replicas=1,
            num_cpus=args.replica_cpus,
        )
        serve.run(build_app(cfg), name=f"bench-{name}", route_prefix=f"/{name}")
        urls[name] = f"http://127.0.0.1:{port}/{name}"
    info = httpx.get(urls["one"] + "/v1/model").json()
    image = test_image(info["image_size"])
    measured = ["one", "two"]
    for name in measured:  # warm-up: loads both models, connections, first batches
        asyncio.run(load(urls[name] + "/v1/predict", image, apps[name][2], args.clients, 64))
    before = {n: httpx.get(urls[n] + "/v1/stats").json() for n in measured}
    results: dict[str, dict] = {n: {"lat": [], "wall": 0.0, "fail": 0} for n in measured}
    for r in range(args.rounds):
        for name in measured if r % 2 == 0 else measured[::-1]:
            lat, wall, fail = asyncio.run(
                load(urls[name] + "/v1/predict", image, apps[name][2], args.clients, args.requests)
            )
            results[name]["lat"].append(lat)
            results[name]["wall"] += wall
            results[name]["fail"] += fail

    # cold model: LRU of 1, one client alternating a and b -> every request loads its model;
    # the same requests on "two" (both loaded) are the warm reference, interleaved
    cold, warm = [], []
    for i in range(args.cold_loads + 1):
        m = ["a", "b"][i % 2]
        for name, sink in (("cold", cold), ("two", warm)):
            t = time.perf_counter()
            r = httpx.post(
                urls[name] + "/v1/predict",
                content=image,
                headers={"content-type": "image/png"},
                params={"model": m},
                timeout=300,
            )
            assert r.status_code == 200, r.text
            if i > 0:  # the very first one also starts the replica's multiplexer
                sink.append(time.perf_counter() - t)

    print(
        f"\nMultiplexed serving: {args.clients} clients, {args.rounds}x{args.requests} "
        f"requests per app, 1 replica each ({args.replica_cpus:g} CPUs, "
        f"{info['torch_threads']} torch threads), image {info['image_size']}px, "
        f"scales {info['scales']}, bank sizes {info['bank_sizes']}\n"
    )
    head = "| app | models | requests | failed | req/s  | p50 ms | p99 ms | mean batch |"
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    throughput = {}
    for name in measured:
        lat = np.concatenate(results[name]["lat"]) * 1000
        throughput[name] = len(lat) / results[name]["wall"]
        after = httpx.get(urls[name] + "/v1/stats").json()
        sizes = {
            int(k): v - before[name]["batch_sizes"].get(k, 0)
            for k, v in after["batch_sizes"].items()
        }
        mean_batch = sum(k * v for k, v in sizes.items()) / max(sum(sizes.values()), 1)
        print(
            f"| {name} | {len(apps[name][0]):>6} | {len(lat):>8} | {results[name]['fail']:>6} "
            f"| {throughput[name]:>6.1f} | {np.percentile(lat, 50):>6.1f} "
            f"| {np.percentile(lat, 99):>6.1f} | {mean_batch:>10.2f} |"
        )
    print(f"\nthroughput 2 models / 1 model: {throughput['two'] / throughput['one']:.2f}x")
    c_ms, w_ms = statistics.median(cold) * 1000, statistics.median(warm) * 1000
    print(
        f"cold model (load + score, LRU of 1, {len(cold)} requests): median {c_ms:.0f} ms, "
        f"max {max(cold) * 1000:.0f} ms; warm (same requests, model loaded): median "
        f"{w_ms:.0f} ms; cold load cost ~{c_ms - w_ms:.0f} ms"
    )
    serve.shutdown()
    ray.shutdown()
    tmp.cleanup()


if __name__ == "__main__":
    with use_run(progress=False):  # figures, not bars
        main()

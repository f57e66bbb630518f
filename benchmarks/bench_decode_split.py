"""Decode on CPU tasks vs inside the model actor: images/s of ONE scoring actor.

Two pipelines over the same work units, on one local Ray, alternated ``--repeats`` times:

- ``in-actor``: the actor reads, decodes and resizes its unit itself (on a few reader
  threads, the old pipeline) and then scores it: decoding takes the actor's CPU;
- ``split, N tasks``: the scoring pipeline of ``mspray score``: ``decode_units`` Ray Data
  tasks (at most N at once, 1 CPU each) feed the same actor, which only scores and writes.

Source images are large camera-like PNGs (``--source-size``) resized to the model's
``--image-size``, so decoding costs what it costs on real archives. The rate is the steady
state: images after each run's first unit over the time from the first unit's summary to
the last (actor start-up excluded). Prints a table and the ratio split / in-actor.

    nice python benchmarks/bench_decode_split.py [--n 64] [--source-size 1024]

On a GPU node the model is much faster than here, so decoding in the actor costs a larger
share of its time there than on this CPU-only machine. Figures on the shared 2-core dev VM
(load average 30 from other jobs, defaults): in-actor 2.67 images/s, split with 1 decode
task 3.30 (1.24x), with 2 decode tasks 4.29 (1.61x).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from mspray.config import MSPrayConfig, PoolConfig
from mspray.config.run import use_run
from mspray.data.datasets import train_paths
from mspray.data.synthetic import make_synthetic_dataset
from mspray.pipeline.steps import fit_detector
from mspray.ray.data.plan import DEFAULT, ScoringPlan
from mspray.ray.data.reading import UNIT_SCHEMA, decode_unit, decode_units
from mspray.ray.data.scorer import UnitScorer
from mspray.ray.runtime import init_ray, map_with_detector


class DecodingUnitScorer(UnitScorer):
    """The former design: the scoring actor reads and decodes its own units."""

    def __init__(self, io_threads: int, **kw: Any) -> None:
        super().__init__(**kw)
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(io_threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg = self.det.cfg
        size = cfg.model.image_size
        rows = [
            {**decode_unit(p, size, cfg.score, self.pool), "decoder": self.node, "model": DEFAULT}
            for p in batch.column("paths").to_pylist()
        ]
        return super().__call__(pa.Table.from_pylist(rows, schema=UNIT_SCHEMA))


def run(mode: str, tasks: int, paths: list[str], src: str, part_size: int, bundle: str, cfg,
        out: str) -> float:  # fmt: skip
    """One pipeline over ``paths`` in units of ``part_size``, one actor; the steady images/s."""
    import ray

    pool = PoolConfig(workers=1, min_workers=1, gpus_per_worker=0)
    plan = ScoringPlan.build(bundle, src, out, part_size=part_size, pool=pool)
    units = [{"paths": paths[i : i + part_size], "model": DEFAULT, "size": plan.first.image_size}
             for i in range(0, len(paths), part_size)]  # fmt: skip
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    kw: dict[str, Any] = {"plan": plan}
    if mode == "split":
        ds = ds.map_batches(
            decode_units,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={
                "size": cfg.model.image_size,
                "cfg_json": cfg.score.model_dump_json(),
                "io_threads": 4,
                "input_root": plan.input_root,
            },
            num_cpus=1,
            concurrency=tasks,
        )
        actor = UnitScorer
    else:
        actor, kw = DecodingUnitScorer, {**kw, "io_threads": 4}
    ds = map_with_detector(
        ds, actor, bundle, cfg, pool, n_items=len(units), batch_size=1,
        batch_format="pyarrow", **kw,
    )  # fmt: skip
    stamps, images = [], []
    for row in ds.iter_rows():
        assert row["failure"] is None and row["errors"] == 0, row
        stamps.append(time.perf_counter())
        images.append(row["images"])
    return sum(images[1:]) / (stamps[-1] - stamps[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="images per run")
    ap.add_argument("--source-size", type=int, default=1024, help="side of the source PNGs")
    ap.add_argument("--image-size", type=int, default=128, help="model input size")
    ap.add_argument("--part-size", type=int, default=4)
    ap.add_argument("--tasks", default="1,2", help="decode task counts to try")
    ap.add_argument("--repeats", type=int, default=2, help="alternations; best of each")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench_decode_split_"))
    cfg = MSPrayConfig().replace(
        **{
            "model.image_size": args.image_size,
            "model.pretrained": False,
            "train.epochs": 0,
            "bank.coreset_ratio": 0.1,
            "score.batch_size": 8,
        }
    )
    data = str(work / "data")
    make_synthetic_dataset(data, n_train=4, n_test_good=0, n_test_defect=0, size=args.image_size)
    bundle = str(work / "bundle")
    fit_detector(cfg, train_paths(f"mvtec:{data}", "synthetic"), out=bundle)
    src = str(work / "src")
    make_synthetic_dataset(src, n_train=args.n, n_test_good=0, n_test_defect=0,
                           size=args.source_size)  # fmt: skip
    paths = sorted(str(p) for p in Path(src).rglob("*.png"))[: args.n]
    tasks = [int(t) for t in args.tasks.split(",")]

    import ray

    init_ray(min_cpus=1 + max(tasks))
    load = os.getloadavg()[0]
    best: dict[str, float] = {}
    for r in range(args.repeats):
        for name, mode, t in [("in-actor", "actor", 0), *[(f"split, {t} tasks", "split", t)
                                                          for t in tasks]]:  # fmt: skip
            out = str(work / f"out_{mode}{t}_{r}")
            rate = run(mode, t, paths, src, args.part_size, bundle, cfg, out)
            best[name] = max(best.get(name, 0.0), rate)
    ray.shutdown()
    print(f"\n{len(paths)} PNGs {args.source_size}px -> model {args.image_size}px, "
          f"units of {args.part_size}, one actor (1 CPU), {os.cpu_count()} cores, "
          f"load {load:.1f}, best of {args.repeats}")  # fmt: skip
    print(f"{'pipeline':<18} {'images/s':>9} {'vs in-actor':>12}")
    for name, rate in best.items():
        print(f"{name:<18} {rate:>9.2f} {rate / best['in-actor']:>11.2f}x")


if __name__ == "__main__":
    with use_run(progress=False):  # figures, not bars
        main()

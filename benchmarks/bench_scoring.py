"""Batch scoring on Ray Data against ``mspray evaluate`` in-process, on the same images.

One local Ray (started as ``mspray score`` starts it), one bundle (random-init encoders,
all three scales, banks from synthetic normal images), synthetic test images; every scoring
run goes through the public ``score_prefix`` with the defaults of ``mspray score`` (actors,
threads and unit size chosen for the machine) into a fresh output folder, and the same
images are scored in this process the way ``mspray evaluate`` does (``mspray.evaluation.evaluate``,
torch on every core). The two alternate ``--repeats`` times; the best of each is shown.

Scoring throughput is given end to end (the pipeline, actor start-up included) and in steady
state (from the first part to the last, minus the first unit of each actor); evaluate's as
wall time (decoding included) and model time (its ``seconds_per_image``).

``--actors`` adds runs with 1 and 2 actors (units of ``--part-size``); ``--memory`` adds
peak memory for N vs 4N images: sampled every 0.2 s over this process and its descendants
(GCS, raylet, Ray workers): the sum of their PSS, the PSS of the largest scoring actor and
the driver's own RSS; each run starts once the previous run's actors have exited.

    python benchmarks/bench_scoring.py [--n 96] [--image-size 256] [--actors] [--memory]

Run it on an otherwise idle machine (the load average is printed), since the actors compete
with everything else for the cores.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from mspray import storage
from mspray.artifacts.bundle import load_bundle
from mspray.config import MSPrayConfig, PoolConfig
from mspray.config.run import use_run
from mspray.config.runs import ScoreRun
from mspray.data.datasets import test_samples, train_paths
from mspray.data.synthetic import make_synthetic_dataset
from mspray.device import resolve_device
from mspray.evaluation.evaluate import evaluate
from mspray.pipeline.steps import fit_detector
from mspray.ray.data.scoring import score_prefix
from mspray.ray.data.summary import ScoreSummary
from mspray.ray.runtime import init_ray


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(pid))
    return kids


def _tree(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _kib(pid: int, path: str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0", 1)[0]
    except OSError:
        return ""


def _actors() -> list[int]:
    """Scoring actor processes of this process's Ray."""
    return [p for p in _tree(os.getpid()) if _name(p).startswith("ray::MapWorker")]


def wait_for_no_actors(timeout: float = 60.0) -> None:
    """Actors of the previous run exit asynchronously; measure the next run without them."""
    deadline = time.monotonic() + timeout
    while _actors() and time.monotonic() < deadline:
        time.sleep(0.2)


class MemorySampler:
    """Peaks, sampled in a thread: the sum of PSS over this process tree, the PSS of the
    largest scoring actor, and the driver's RSS (KiB)."""

    def __init__(self, every: float = 0.2) -> None:
        self.every = every
        self.peak_tree = self.peak_actor = self.peak_driver = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            pss = {p: _kib(p, "smaps_rollup", "Pss:") for p in _tree(me)}
            actors = [pss[p] for p in pss if _name(p).startswith("ray::MapWorker")]
            self.peak_tree = max(self.peak_tree, sum(pss.values()))
            self.peak_actor = max([self.peak_actor, *actors])
            self.peak_driver = max(self.peak_driver, _kib(me, "status", "VmRSS:"))
            self._stop.wait(self.every)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def steady_rate(s: ScoreSummary) -> float:
    """Images/s from the first part to the last, without each actor's first unit (mostly
    computed before the first part arrived)."""
    window = s.score_seconds - s.first_part_seconds
    unit = s.scored / max(1, s.parts)
    return max(s.scored - s.actors * unit, 0) / window if window > 0 else float("nan")


def run(bundle: str, inp: str, out: str, pool: PoolConfig, part_size: int | None, sample: bool):
    """One scoring run into a fresh ``out``; memory is sampled only when asked, since
    reading /proc costs CPU that a timed run on 2 cores would feel."""
    wait_for_no_actors()
    with MemorySampler() if sample else contextlib.nullcontext() as mem:
        s = score_prefix(
            ScoreRun(bundle=bundle, input=inp, output=out, part_size=part_size), pool=pool
        )
    assert s.missing == 0 and s.duplicates == 0 and s.errors == 0, s.line()
    return s, mem


def run_evaluate(bundle: str, inp: str) -> tuple[float, dict]:
    """``mspray evaluate`` in this process on the images of ``inp``: (wall s, metrics)."""
    det = load_bundle(bundle, device=resolve_device("auto"))
    samples = test_samples(f"folder:{inp}")
    t0 = time.perf_counter()
    metrics = evaluate(det, samples)
    return time.perf_counter() - t0, metrics


def _row(label: str, s: ScoreSummary) -> str:
    return (
        f"{label:<34}{s.scored:>7}{s.score_seconds:>8.1f}{s.scored / s.score_seconds:>11.2f}"
        f"{steady_rate(s):>14.2f}{s.first_part_seconds:>12.1f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=96, help="images of the set (N)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--part-size", type=int, default=4, help="unit size of the --actors runs")
    ap.add_argument("--repeats", type=int, default=2, help="alternations; the best is shown")
    ap.add_argument("--actors", action="store_true", help="also 1 vs 2 actors")
    ap.add_argument("--memory", action="store_true", help="also peak memory, N vs 4N")
    ap.add_argument("--workdir", help="default: a temp folder")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scoring_"))
    size, n, ps = args.image_size, args.n, args.part_size

    cfg = MSPrayConfig().replace(
        **{
            "model.image_size": size,
            "model.pretrained": False,
            "train.epochs": 0,
            "bank.coreset_ratio": 0.1,
            "score.batch_size": 8,
        }
    )
    data = str(work / "data")
    make_synthetic_dataset(data, n_train=8, n_test_good=4 * n, n_test_defect=0, size=size)
    bundle = str(work / "bundle")
    fit_detector(cfg, train_paths(f"mvtec:{data}", "synthetic"), out=bundle)
    images = storage.list_files(f"{data}/synthetic/test/good")
    small, large = work / "in_n", work / "in_4n"
    for i, p in enumerate(images):
        for d in [small, large] if i < n else [large]:
            d.mkdir(exist_ok=True)
            (d / Path(p).name).write_bytes(Path(p).read_bytes())

    init_ray()
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 0))
    load = os.getloadavg()[0]
    best: dict[str, ScoreSummary] = {}
    best_eval: tuple[float, dict] | None = None

    def keep(key: str, s: ScoreSummary) -> None:
        if key not in best or steady_rate(s) > steady_rate(best[key]):
            best[key] = s

    # Alternate the contenders, so a burst of load from other processes hits all alike.
    for r in range(args.repeats):
        wall, metrics = run_evaluate(bundle, str(small))
        if best_eval is None or wall < best_eval[0]:
            best_eval = (wall, metrics)
        s, _ = run(bundle, str(small), str(work / f"out_default_{r}"), PoolConfig(), None, False)
        keep("default", s)
        if args.actors:
            for w in (1, 2):
                out = str(work / f"out_n_{w}_{r}")
                keep(f"{w}", run(bundle, str(small), out, PoolConfig(workers=w), ps, False)[0])

    print(
        f"\n{size}x{size} images, scales {cfg.model.scales}, local Ray with {cpus} logical "
        f"CPUs on {os.cpu_count()} cores; load average {load:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end; best of {args.repeats}"
    )
    head = f"{'run':<34}{'images':>7}{'wall s':>8}{'img/s e2e':>11}{'img/s steady':>14}"
    head += f"{'start-up s':>12}"
    print(head)
    print("-" * len(head))
    wall, metrics = best_eval
    model_rate = 1.0 / metrics["seconds_per_image"]
    print(
        f"{'evaluate, in-process':<34}{metrics['n_images']:>7}{wall:>8.1f}"
        f"{metrics['n_images'] / wall:>11.2f}{model_rate:>14.2f}{'':>12}"
    )
    d = best["default"]
    unit = round(d.scored / max(1, d.parts))
    print(_row(f"score, defaults ({d.actors} actors, ~{unit}/unit)", d))
    for w in (1, 2) if args.actors else ():
        print(_row(f"score, {w} actor(s), units of {ps}", best[f"{w}"]))
    print(
        f"score / evaluate per image: end to end {d.scored / d.score_seconds * wall / n:.2f}x, "
        f"steady {steady_rate(d) / model_rate:.2f}x of evaluate's model time "
        f"(evaluate's steady column: 1 / seconds_per_image, decoding excluded)"
    )
    if args.actors:
        one, two = best["1"], best["2"]
        e2e = (two.scored / two.score_seconds) / (one.scored / one.score_seconds)
        print(f"speed-up 2 vs 1 actors: steady {steady_rate(two) / steady_rate(one):.2f}x, "
              f"end to end {e2e:.2f}x")  # fmt: skip
    if args.memory:
        memory(bundle, small, large, work)


def memory(bundle: str, small: Path, large: Path, work: Path) -> None:
    """Peak memory of a default scoring run over N and over 4N images."""
    s1, mem1 = run(bundle, str(small), str(work / "out_n_mem"), PoolConfig(), None, True)
    s4, mem4 = run(bundle, str(large), str(work / "out_4n_mem"), PoolConfig(), None, True)
    head = f"\n{'run (memory, defaults)':<24}{'images':>7}{'wall s':>8}{'tree PSS MiB':>14}"
    head += f"{'actor PSS MiB':>15}{'driver RSS MiB':>16}"
    print(head)
    print("-" * (len(head) - 1))
    for label, s, m in (("N", s1, mem1), ("4N", s4, mem4)):
        print(
            f"{label:<24}{s.scored:>7}{s.score_seconds:>8.1f}{m.peak_tree / 1024:>14.0f}"
            f"{m.peak_actor / 1024:>15.0f}{m.peak_driver / 1024:>16.0f}"
        )
    print(
        f"peak memory 4N / N: process tree {mem4.peak_tree / mem1.peak_tree:.2f}x, largest "
        f"actor {mem4.peak_actor / mem1.peak_actor:.2f}x, driver "
        f"{mem4.peak_driver / mem1.peak_driver:.2f}x (flat = 1.0)"
    )


if __name__ == "__main__":
    with use_run(progress=False):  # figures, not bars
        main()

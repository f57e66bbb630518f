"""GPU throughput of every scoring and training path, with the share of time the GPUs are busy.

Ready for the first machine with GPUs; on a machine without CUDA it says so and exits 0.
Four parts, each timed while a sampler reads every GPU's utilisation (NVML through
``torch.cuda.utilization``, else ``nvidia-smi``) every 0.1 s:

1. ``Detector.predict`` in this process on GPU 0 (fp32, fp16, bf16; bank search on the GPU):
   images/s and where the time goes per stage (CUDA-synchronised stage timers);
2. batch scoring on Ray Data (``score_prefix``, one actor per GPU by the defaults):
   images/s in total and per GPU, end to end and steady state;
3. Serve (``benchmarks/bench_serve.py`` with this script's bundle, one replica on one GPU):
   requests/s per GPU;
4. training (``benchmarks/bench_train.py --use-gpu``): steps (samples)/s for 1 → N GPU workers.

    python benchmarks/bench_gpu.py [--images 512] [--image-size 256] [--parts 1,2,3,4]

Parts 2-4 start a local Ray each (or join ``RAY_ADDRESS``); run nothing else on the GPUs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from mspray.config.run import use_run

HERE = Path(__file__).resolve().parent


class GpuBusy:
    """Samples each GPU's utilisation (percent of time a kernel ran) in a thread."""

    def __init__(self, period: float = 0.1) -> None:
        self.period, self.samples = period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> list[float]:
        try:
            return [float(torch.cuda.utilization(i)) for i in range(torch.cuda.device_count())]
        except Exception:  # no pynvml: ask nvidia-smi
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout
            return [float(v) for v in out.split()]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._read())
            except Exception:
                return
            self._stop.wait(self.period)

    def __enter__(self) -> GpuBusy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def text(self) -> str:
        if not self.samples:
            return "GPU busy: not measurable (no NVML, no nvidia-smi)"
        per_gpu = [statistics.mean(s[i] for s in self.samples) for i in range(len(self.samples[0]))]
        return "GPU busy: " + ", ".join(f"gpu{i} {v:.0f}%" for i, v in enumerate(per_gpu))


def make_data(work: Path, args: argparse.Namespace) -> tuple[str, str, str]:
    """A bundle (random-init encoders, three scales, GPU-built banks) and a folder of test
    images; returns (bundle, dataset spec, image folder)."""
    from mspray.config import MSPrayConfig
    from mspray.data.datasets import train_paths
    from mspray.data.synthetic import make_synthetic_dataset
    from mspray.pipeline.steps import fit_detector

    root = work / "data"
    make_synthetic_dataset(
        str(root), "synthetic", n_train=20, n_test_good=4, n_test_defect=4,
        size=args.image_size, seed=5,
    )  # fmt: skip
    images = work / "images"
    images.mkdir()
    src = sorted((root / "synthetic" / "test").rglob("*.png"))
    for i in range(args.images):  # the same few test images, many times
        (images / f"{i:05d}.png").write_bytes(src[i % len(src)].read_bytes())
    cfg = MSPrayConfig().replace(
        **{
            "model.image_size": args.image_size,
            "model.pretrained": False,
            "train.epochs": 0,
            "train.device": "cuda",
        }
    )
    bundle = str(work / "bundle")
    fit_detector(cfg, train_paths(f"mvtec:{root}", "synthetic"), out=bundle)
    return bundle, f"mvtec:{root}", str(images)


def part_inprocess(bundle: str, folder: str, args: argparse.Namespace) -> None:
    from mspray.artifacts.bundle import load_bundle, load_config
    from mspray.data.images import load_image
    from mspray.detector import stage_seconds_per_image

    paths = sorted(Path(folder).glob("*.png"))[: args.batch * 8]
    x = torch.stack([load_image(str(p), args.image_size) for p in paths]).cuda()
    print(f"\n[1] Detector.predict on {torch.cuda.get_device_name(0)}, batch {args.batch}")
    for precision in ("fp32", "fp16", "bf16"):
        cfg = load_config(bundle, {"score.precision": precision})
        det = load_bundle(bundle, device="cuda", config=cfg)
        det.predict(x[: args.batch])  # warm-up: kernels, bank upload
        torch.cuda.synchronize()
        timings: dict[str, float] = {}
        with GpuBusy() as busy:
            t0 = time.perf_counter()
            for i in range(0, len(x), args.batch):
                det.predict(x[i : i + args.batch], timings)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        stages = stage_seconds_per_image(timings, len(x), det.scales)
        table = " ".join(f"{k} {v * 1e3:.2f}" for k, v in stages.items())
        print(f"  {precision:<5} {len(x) / wall:8.1f} images/s  ms/img: {table}  {busy.text()}")


def part_scoring(bundle: str, folder: str, work: Path) -> None:
    from mspray.config.runs import ScoreRun
    from mspray.ray.data.scoring import score_prefix
    from mspray.ray.runtime import init_ray

    n_gpu = torch.cuda.device_count()
    init_ray()
    print(f"\n[2] batch scoring on Ray Data, {n_gpu} GPU(s), defaults of mspray score")
    for rep in range(2):  # the first run includes actor start-up and CUDA warm-up
        with GpuBusy() as busy:
            s = score_prefix(ScoreRun(bundle=bundle, input=folder, output=str(work / f"out{rep}")))
        window = s.score_seconds - s.first_part_seconds
        unit = s.scored / max(1, s.parts)
        steady = max(s.scored - s.actors * unit, 0) / window if window > 0 else float("nan")
        print(
            f"  run {rep}: {s.scored} images, {s.actors} actors, {s.scored / s.score_seconds:.1f}"
            f" images/s end to end ({s.scored / s.score_seconds / n_gpu:.1f} per GPU), steady "
            f"{steady:.1f} ({steady / n_gpu:.1f} per GPU)  {busy.text()}"
        )


def _run_script(cmd: list[str]) -> None:
    with GpuBusy() as busy:
        res = subprocess.run([sys.executable, *cmd], capture_output=True, text=True)
    print("\n".join("  " + line for line in (res.stdout + res.stderr).strip().splitlines()[-25:]))
    print(f"  exit {res.returncode}; {busy.text()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512, help="images of the scoring runs")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="batch of part 1")
    ap.add_argument("--parts", default="1,2,3,4")
    ap.add_argument("--workdir", help="default: a temp folder")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device on this machine; nothing to measure (exit 0).")
        return
    parts = {int(p) for p in args.parts.split(",")}
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mspray-gpu-"))
    n = torch.cuda.device_count()
    print(f"{n} GPU(s): {torch.cuda.get_device_name(0)}; torch {torch.__version__}; work {work}")
    t0 = time.perf_counter()
    bundle, spec, folder = make_data(work, args)
    print(f"bundle built on GPU in {time.perf_counter() - t0:.0f} s")
    if 1 in parts:
        part_inprocess(bundle, folder, args)
    if 2 in parts:
        part_scoring(bundle, folder, work)
    if 3 in parts:
        print("\n[3] Serve, one replica (benchmarks/bench_serve.py)")
        _run_script([str(HERE / "bench_serve.py"), "--bundle", bundle, "--requests", "512"])
    if 4 in parts:
        print(f"\n[4] training, 1 → {n} GPU workers (benchmarks/bench_train.py --use-gpu)")
        _run_script([str(HERE / "bench_train.py"), "--use-gpu"])


if __name__ == "__main__":
    with use_run(progress=False):  # figures, not bars
        main()

"""Patch-bank search speed: faiss exact search vs the machine's sgemm, and coreset speed-up.

1. Exact ``IndexFlatL2`` min-distance search of ``images`` query grids (``grid²`` patches
   each, 61×61 = 3721 for a 256 image at stride 4) against an N×D bank, as achieved GFLOP/s
   (FLOPs = 2·M·N·D, the inner products that dominate) next to sgemm of the same shapes
   measured in the same run with torch.matmul: (a) full shape, ``M×D @ D×N`` per image with
   the M×N product written out (bound by memory writes at D = 64), and (b) the same FLOPs in
   cache-sized tiles (4096×D @ D×1024, faiss's own blocking), the compute ceiling. The ratio
   is taken against the faster of the two. faiss is timed one image per call and with all
   images in one call.
2. The same queries against a greedy coreset bank (``--ratio`` of N, PatchBank.build) and an
   IVF bank: search speed-up over the full exact bank, and for IVF the share of queries whose
   distance equals the exact one.
3. The scoring search at the bank sizes scoring sees (``--search-banks``, coreset-sized;
   or ``--search-data encoder``: the banks and queries of bench_e2e's encoders):
   faiss ``IndexFlatL2`` next to the exact torch searches (:class:`mspray.bank.search.TorchSearch`,
   fp32 and bf16/fp16 pre-selection, and :class:`mspray.bank.search.CellSearch`, which scores only
   the k-means cells that can hold the nearest row: the share it scored is printed) and the
   tiled sgemm ceiling of the same FLOPs (the dense product), as a ratio table (x faiss,
   % of sgemm: above 100 % only by skipping work); every torch row is checked equal to the
   fp32 exact search.
   ``--search-only`` runs only this part.

Times are the median of ``--repeats`` runs. ``--use-gpu`` runs the same on faiss-gpu (and
torch CUDA for sgemm) when present. ``--tune`` also sweeps faiss's BLAS block sizes.

    python benchmarks/bench_bank.py [--bank-n 200000] [--dim 64] [--images 4] [--use-gpu]
    python benchmarks/bench_bank.py --search-only [--search-banks 6000,20000] [--threads 1]
    python benchmarks/bench_bank.py --search-only --search-data encoder   # patch embeddings
    python benchmarks/bench_bank.py --search-only --search-data encoder --encoder-train 80
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import faiss
import numpy as np
import torch

from mspray.bank import PatchBank
from mspray.bank.search import CellSearch, TorchSearch
from mspray.config import BankConfig
from mspray.config.run import use_run
from mspray.detector import cpu_has_native_bf16


def median_times(fns: list[Callable[[], object]], repeats: int, sync: bool = False) -> list[float]:
    """Median wall time of each of ``fns``, run round-robin (one warm-up round first) so that
    load from other processes hits all of them alike and their ratios stay meaningful."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats + 1):
        for i, fn in enumerate(fns):
            if sync:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if sync:
                torch.cuda.synchronize()
            if r:
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def sgemm_full(q: torch.Tensor, bt: torch.Tensor, per_call: int) -> Callable[[], None]:
    """``per_call×D @ D×N`` matmuls over all queries, the M×N product written each time."""
    out = torch.empty(per_call, bt.shape[1], device=q.device)

    def run() -> None:
        for s in range(0, q.shape[0], per_call):
            blk = q[s : s + per_call]
            torch.matmul(blk, bt, out=out[: blk.shape[0]])

    return run


def sgemm_tiled(q: torch.Tensor, b: torch.Tensor, qbs: int, dbs: int) -> Callable[[], None]:
    """Same FLOPs as ``q @ b.T`` in ``qbs×dbs`` tiles written to one reused buffer."""
    out = torch.empty(qbs, dbs, device=q.device)

    def run() -> None:
        for i in range(0, q.shape[0], qbs):
            qi = q[i : i + qbs]
            for j in range(0, b.shape[0], dbs):
                bj = b[j : j + dbs]
                torch.matmul(qi, bj.T, out=out[: qi.shape[0], : bj.shape[0]])

    return run


def row(name: str, seconds: float, flops: float | None = None, note: str = "") -> None:
    gf = f"{flops / seconds / 1e9:9.1f}" if flops else f"{'':>9}"
    print(f"  {name:<44} {seconds * 1e3:10.1f} {gf}  {note}")


def run(args: argparse.Namespace, gpu: bool) -> None:
    rng = np.random.default_rng(args.seed)
    n, d, m_img = args.bank_n, args.dim, args.grid**2
    m = m_img * args.images
    bank_x = rng.standard_normal((n, d), dtype=np.float32)
    queries = rng.standard_normal((m, d), dtype=np.float32)
    flops = 2.0 * m * n * d
    device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    sync = device == "cuda"
    base = BankConfig(coreset_ratio=1.0, index="flat", search_chunk=m, use_gpu=gpu)
    where = "faiss-gpu" if gpu else f"faiss-cpu, {torch.get_num_threads()} threads"
    print(f"\n[{where}] bank N={n} D={d}; {args.images} images × {m_img} queries = {m}")
    print(f"  {'what':<44} {'ms (med)':>10} {'GFLOP/s':>9}  note")

    # ---- 1. exact search vs sgemm
    qt, bt = torch.from_numpy(queries).to(device), torch.from_numpy(bank_x).to(device)
    full = PatchBank.build(bank_x, base)
    per_image = PatchBank(full.index, base.replace(search_chunk=m_img))
    t_full, t_tile, t_img, t_all = median_times(
        [
            sgemm_full(qt, bt.T.contiguous(), m_img),
            sgemm_tiled(qt, bt, 4096, 1024),
            lambda: per_image.search(queries),
            lambda: full.search(queries),
        ],
        args.repeats,
        sync,
    )
    del qt, bt
    t_sgemm = min(t_full, t_tile)
    row("torch sgemm, full M×D @ D×N per image", t_full, flops, "writes the M×N product")
    row("torch sgemm, 4096×1024 tiles", t_tile, flops, "compute ceiling")
    row("faiss IndexFlatL2, one image per call", t_img, flops, f"{t_sgemm / t_img:.0%} of sgemm")
    row(
        f"faiss IndexFlatL2, {args.images} images per call",
        t_all,
        flops,
        f"{t_sgemm / t_all:.0%} of sgemm",
    )
    if args.tune and not gpu:
        tune(full, queries, flops, t_sgemm, args.repeats)

    # ---- 2. coreset and IVF, timed round-robin with the full exact bank
    t0 = time.perf_counter()
    core = PatchBank.build(bank_x, base.replace(coreset_ratio=args.ratio))
    t_build = time.perf_counter() - t0
    cfg_ivf = base.replace(index="ivf", ivf_nlist=args.nlist, ivf_nprobe=args.nprobe)
    ivf = PatchBank.build(bank_x, cfg_ivf)
    t_all2, t_core, t_ivf = median_times(
        [lambda: full.search(queries), lambda: core.search(queries), lambda: ivf.search(queries)],
        args.repeats,
    )
    exact, approx = full.search(queries), ivf.search(queries)
    same = float(np.mean(np.isclose(approx, exact, rtol=1e-4, atol=1e-4)))
    row("full exact bank (again, side by side)", t_all2, flops)
    row(
        f"coreset {args.ratio:g} (N={core.ntotal}), {args.images} images/call",
        t_core,
        2.0 * m * core.ntotal * d,
        f"speed-up {t_all2 / t_core:.1f}x (greedy build {t_build:.1f} s)",
    )
    row(
        f"IVF nlist={ivf.index.nlist} nprobe={args.nprobe}, full bank",
        t_ivf,
        None,
        f"speed-up {t_all2 / t_ivf:.1f}x, exact NN for {same:.1%}",
    )
    print(f"  => exact search at {t_sgemm / t_all:.0%} of sgemm (target >= 50%); ", end="")
    print(f"coreset {args.ratio:g} speed-up {t_all2 / t_core:.1f}x (target >= 8x)")


def clustered_sets(args: argparse.Namespace):
    """(label, bank, queries) per ``--search-banks`` size: Gaussian clusters in D dimensions
    (no low-dimensional structure: the hard case for the pre-selection)."""
    rng = np.random.default_rng(args.seed + 1)
    m, d = args.grid**2 * args.images, args.dim
    centers = rng.standard_normal((256, d), dtype=np.float32)
    for n in (int(v) for v in args.search_banks.split(",")):
        bank_x = centers[rng.integers(0, 256, n)] + 0.3 * rng.standard_normal((n, d), np.float32)
        queries = centers[rng.integers(0, 256, m)] + 0.3 * rng.standard_normal((m, d), np.float32)
        yield "clustered", bank_x, queries


def encoder_sets(args: argparse.Namespace):
    """(label, bank, queries) of scales 32 and 16: random-init encoders (as bench_e2e) on
    synthetic 256 px images, banks from ``--encoder-train`` normal images (greedy coreset 0.1,
    at most 20k rows: 80 images reach it), queries from ``--images`` test images at the
    inference stride."""
    import tempfile

    from mspray.config import MSPrayConfig
    from mspray.data.datasets import test_samples, train_paths
    from mspray.data.images import load_images
    from mspray.data.synthetic import make_synthetic_dataset
    from mspray.model.multiscale import MultiScaleEncoder

    root = tempfile.mkdtemp(prefix="mspray-bank-")
    n_train = args.encoder_train
    make_synthetic_dataset(root, "synthetic", n_train=n_train, n_test_good=2, n_test_defect=2,
                           size=256, seed=5)  # fmt: skip
    spec = f"mvtec:{root}"
    cfg = MSPrayConfig().replace(**{"model.image_size": 256, "model.pretrained": False})
    torch.manual_seed(0)
    model = MultiScaleEncoder(cfg).eval()
    train = load_images(train_paths(spec, "synthetic"), 256)
    test = load_images([s.path for s in test_samples(spec, "synthetic")], 256)
    for scale in (32, 16):
        with torch.inference_mode():
            b = torch.cat([model.embed(train[i : i + 4], scale, 4) for i in range(0, n_train, 4)])
            q = model.embed(test[: args.images], scale)
        bank = PatchBank.build(b.reshape(-1, b.shape[-1]).numpy(), BankConfig(coreset_ratio=0.1))
        yield f"encoder {scale}", bank.vectors(), q.reshape(-1, q.shape[-1]).numpy()


def search_table(args: argparse.Namespace, gpu: bool) -> None:
    """Part 3: faiss flat vs the torch search vs the sgemm ceiling, per bank."""
    device = "cuda" if gpu else "cpu"
    sync = gpu
    precisions = ["fp32"] + (["fp16"] if gpu else ["bf16"] if cpu_has_native_bf16() else [])
    where = "cuda" if gpu else f"cpu, {torch.get_num_threads()} threads"
    print(f"\n[search, {where}] {args.images} images of queries, exact results checked")
    cols = f"{'data':<11} {'bank N':>6} {'queries':>7} {'what':<29} {'ms (med)':>9} {'GFLOP/s':>8}"
    cols += f" {'x faiss':>8} {'% sgemm':>8}"
    print("  " + cols + "\n  " + "-" * len(cols))
    sets = encoder_sets(args) if args.search_data == "encoder" else clustered_sets(args)
    for label, bank_x, queries in sets:
        (n, d), m = bank_x.shape, queries.shape[0]
        flops = 2.0 * m * n * d
        bank = PatchBank.build(bank_x, BankConfig(coreset_ratio=1.0, search_chunk=m, use_gpu=gpu))
        qt = torch.from_numpy(queries).to(device)
        bt = torch.from_numpy(bank_x).to(device)
        searchers = {p: TorchSearch(bank_x, device, p, 8) for p in precisions}
        searchers["cells"] = cells = CellSearch(bank_x, device)
        fns = [sgemm_tiled(qt, bt, 4096, 1024), lambda b=bank, q=queries: b.search(q)]
        fns += [lambda s=s, q=qt: s.search(q) for s in searchers.values()]
        t_sgemm, t_faiss, *t_torch = median_times(fns, args.repeats, sync)
        exact = searchers["fp32"].search(qt).cpu()
        names = ["sgemm 4096x1024 tiles", "faiss IndexFlatL2"]
        names += [f"torch {p}" for p in precisions]
        names += [f"torch cells ({cells.scored_fraction:.1%} scored)"]
        for name, t in zip(names, [t_sgemm, t_faiss, *t_torch], strict=True):
            print(
                f"  {label:<11} {n:>6} {m:>7} {name:<29} {t * 1e3:>9.1f} {flops / t / 1e9:>8.1f}"
                f" {t_faiss / t:>8.2f} {t_sgemm / t:>8.0%}"
            )
        for p, s in searchers.items():
            if not torch.equal(s.search(qt).cpu(), exact):
                print(f"  !! torch {p} differs from the exact fp32 search")


def tune(bank: PatchBank, queries: np.ndarray, flops: float, t_sgemm: float, reps: int) -> None:
    """Sweep faiss's BLAS block sizes (process-global knobs); restore the defaults after."""
    cv = faiss.cvar
    default = (cv.distance_compute_blas_query_bs, cv.distance_compute_blas_database_bs)
    for qbs in (1024, 4096, 16384):
        for dbs in (512, 1024, 4096, 16384):
            cv.distance_compute_blas_query_bs, cv.distance_compute_blas_database_bs = qbs, dbs
            (t,) = median_times([lambda: bank.search(queries)], reps)
            mark = " (default)" if (qbs, dbs) == default else ""
            row(f"  tune query_bs={qbs} database_bs={dbs}", t, flops, f"{t_sgemm / t:.0%}{mark}")
    cv.distance_compute_blas_query_bs, cv.distance_compute_blas_database_bs = default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank-n", type=int, default=200_000, help="bank size N")
    ap.add_argument("--dim", type=int, default=64, help="embedding dimension D")
    ap.add_argument("--grid", type=int, default=61, help="query grid side (61² = 3721)")
    ap.add_argument("--images", type=int, default=4, help="images per batched search")
    ap.add_argument("--ratio", type=float, default=0.1, help="coreset ratio")
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch/faiss threads (0 = default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tune", action="store_true", help="sweep faiss BLAS block sizes")
    ap.add_argument("--use-gpu", action="store_true", help="also run on faiss-gpu if present")
    ap.add_argument("--search-banks", default="6000,20000", help="bank sizes of part 3")
    ap.add_argument("--search-only", action="store_true", help="run only part 3")
    ap.add_argument(
        "--encoder-train", type=int, default=20, help="normal images behind the encoder banks"
    )
    ap.add_argument(
        "--search-data", choices=("clustered", "encoder"), default="clustered",
        help="part 3 data: Gaussian clusters, or embeddings of random-init encoders",
    )  # fmt: skip
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # PatchBank passes this on to faiss
    print(f"faiss {faiss.__version__}, torch {torch.__version__}, ", end="")
    print(f"blas threshold (nx·d) {faiss.cvar.distance_compute_blas_threshold}")
    if not args.search_only:
        run(args, gpu=False)
    search_table(args, gpu=False)
    if args.use_gpu and torch.cuda.is_available():
        search_table(args, gpu=True)
    if args.use_gpu and not args.search_only:
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            run(args, gpu=True)
        else:
            print("\n--use-gpu: this faiss has no GPU support / no GPU; GPU rows skipped")


if __name__ == "__main__":
    with use_run(progress=False):  # figures, not bars
        main()

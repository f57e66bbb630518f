"""Ray Train adapter: real Ray processes (TorchTrainer, gloo on CPU), no mocks.

Every test uses the session-scoped ``ray_local`` fixture (one local Ray for the suite).
Sizes are tiny (64×64 images, scale 16, a few samples) so the module runs in about a minute
on two cores.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import ray.cloudpickle
import torch
from fault_hooks import FailOnce

from mspray.artifacts.bundle import read_meta, resolve_bundle
from mspray.config import MSPrayConfig
from mspray.config.run import RunContext, use_run
from mspray.data.datasets import train_paths
from mspray.model.multiscale import build_scale_model, normalize
from mspray.pipeline.steps import split_holdout
from mspray.ray import train as ray_train
from mspray.train.kmeans import LocalComm, TorchDistComm, fit_centers
from mspray.train.loop import ScaleTrainer

pytestmark = pytest.mark.ray

# Ray workers cannot import a pytest test module by name: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

SCALE = 16


def _cfg(**kw) -> MSPrayConfig:
    base = {
        "train.epochs": 3,
        "train.samples_per_image": 4,
        "train.batch_size": 8,
        "train.n_centers": 4,
        "train.center_update_every": 2,
        "train.lr": 1e-3,
        "train.val_fraction": 0.2,
        "model.image_size": 64,
        "model.scales": (SCALE,),
        "model.strides": (4,),
        "model.embed_dim": 16,
        "model.pretrained": False,
    }
    base.update(kw)
    return MSPrayConfig().replace(**base)


def _fit_ray(config: dict, num_workers: int):
    """Run ``config['fn']`` on ``num_workers`` gloo workers; rank 0's return value."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config=config,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers),
        run_config=RunConfig(storage_path=config["storage"]),
    )
    return _map_tensors(trainer.fit().return_value, lambda a: torch.from_numpy(a.copy()))


def _worker_entry(config: dict):
    # Ray Train refuses torch tensors in return values: send numpy arrays.
    return _map_tensors(config["fn"](config), lambda t: t.numpy())


def _map_tensors(obj, fn):
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj if isinstance(obj, str) else fn(obj)


def _gloo_checks(config: dict) -> dict:
    """Every two-worker check of this module in one worker group (a Ray Train run costs
    seconds of process start-up on two cores; what each check computes is independent).
    A check that raises returns its traceback, which its test shows."""
    import traceback

    out = {}
    for name, fn in config["checks"].items():
        try:
            out[name] = fn(config)
        except Exception:
            out[name] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def gloo_checks(ray_local, tmp_path_factory) -> dict:
    """The results of the module's two-worker gloo checks, from one Ray Train run: check
    name -> rank 0's return value (or the traceback of its failure)."""
    checks = {
        "ddp_steps": _ddp_steps,
        "kmeans": _dist_kmeans,
        "kmeans_seed": _dist_kmeans_other_seed_per_rank,
        "loss_subsets": _every_loss_subset,  # last: a DDP failure may leave the group broken
    }
    storage = str(tmp_path_factory.mktemp("gloo_checks"))
    config = {"fn": _gloo_checks, "checks": checks, "cfg": _cfg().to_dict(), "storage": storage}
    return _fit_ray(config, num_workers=2)


def _result(gloo_checks: dict, name: str):
    got = gloo_checks[name]
    assert not isinstance(got, str), got  # the check raised on the workers
    return got


# ---------------------------------------------------------------------------- DDP equality
STEPS = 3
GLOBAL_BATCH = 8


def _fixed_problem(cfg: MSPrayConfig):
    """Images, K-means centers and STEPS global batches, identical on every process."""
    g = torch.Generator().manual_seed(123)
    images = normalize(torch.rand(4, 3, 64, 64, generator=g))
    centers = torch.randn(cfg.train.n_centers, cfg.model.embed_dim, generator=g)
    probe = ScaleTrainer(cfg, SCALE, build_scale_model(cfg, SCALE, None))
    draws = probe.draw(images.shape[0], STEPS * GLOBAL_BATCH, 64, 64, g)
    return images, centers, draws


def _train_steps(cfg: MSPrayConfig, model, comm) -> dict[str, torch.Tensor]:
    """STEPS core optimiser steps; rank r takes its contiguous slice of each global batch."""
    images, centers, draws = _fixed_problem(cfg)
    tr = ScaleTrainer(cfg, SCALE, model, "cpu", comm)
    tr.centers = centers
    per_rank = GLOBAL_BATCH // comm.world_size
    for step in range(STEPS):
        lo = step * GLOBAL_BATCH + comm.rank * per_rank
        idx = torch.arange(lo, lo + per_rank)
        tr.train_step(images, {k: v.take(idx) for k, v in draws.items()})
    return {k: v.detach().clone() for k, v in tr.core.state_dict().items()}


def _ddp_steps(config: dict):
    import ray.train.torch

    cfg = MSPrayConfig.from_dict(config["cfg"])
    torch.set_num_threads(1)
    model = ray.train.torch.prepare_model(build_scale_model(cfg, SCALE, None))
    return _train_steps(cfg, model, TorchDistComm())


def test_two_gloo_workers_match_one_worker_on_the_same_global_batch(gloo_checks):
    # Every loss term is a mean over samples, and DDP averages gradients over ranks, so two
    # ranks with half of a global batch each take the same optimiser step as one process
    # with the whole batch: equal up to float32 reduction order.
    cfg = _cfg()
    assert GLOBAL_BATCH % 2 == 0
    single = _train_steps(cfg, build_scale_model(cfg, SCALE, None), LocalComm())
    ddp = _result(gloo_checks, "ddp_steps")  # _ddp_steps on two workers, with cfg
    init = build_scale_model(cfg, SCALE, None).state_dict()
    moved = max(float((single[k] - init[k]).abs().max()) for k in init)
    assert moved > 1e-4  # the steps did change the weights (lr 1e-3)
    worst = max(float((single[k] - ddp[k]).abs().max()) for k in single)
    # Tolerance 1e-5 absolute: 100× below the 1e-3 Adam step size; the observed difference
    # is float32 reduction-order noise (~7e-7 here).
    assert worst < 1e-5, worst


# ---------------------------------------------------------------------------- k-means
def _shard(rank: int, n: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + rank)
    means = torch.tensor([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0], [0.0, 6.0, 0.0], [0.0, 0.0, 6.0]])
    # Unequal shards with different cluster mixes: the union is what counts.
    pick = torch.randint(0, 4 - rank, (n + 57 * rank,), generator=g)
    return means[pick] + torch.randn(len(pick), 3, generator=g)


def _dist_kmeans(config: dict):
    comm = TorchDistComm()
    centers = fit_centers(_shard(comm.rank), 6, 15, comm, seed=7)
    every = comm.all_gather_cat(centers[None])  # world×K×D: one copy per worker
    return every


def test_distributed_kmeans_equals_single_process_kmeans_on_the_union(gloo_checks):
    every = _result(gloo_checks, "kmeans")  # _dist_kmeans on two workers
    assert every.shape == (2, 6, 3)
    assert torch.equal(every[0], every[1])  # all workers end with identical centers
    union = torch.cat([_shard(0), _shard(1)])  # rank order: the all-gather's order
    ref = fit_centers(union, 6, 15, LocalComm(), seed=7)
    # Same k-means++ init (same gathered sample, same seed); Lloyd sums differ only in
    # float32 summation order. Tolerance 1e-4 absolute on coordinates of magnitude ~6
    # (observed ~1.5e-6).
    assert torch.allclose(every[0], ref, atol=1e-4), (every[0] - ref).abs().max()


def _dist_kmeans_other_seed_per_rank(config: dict):
    # k-means++ is seeded on rank 0 and broadcast: even if ranks disagreed on the seed (or on
    # floating point), every rank starts from rank 0's centers.
    comm = TorchDistComm()
    centers = fit_centers(_shard(0), 6, 3, comm, seed=7 + 100 * comm.rank)
    return comm.all_gather_cat(centers[None])


def test_kmeans_seeding_runs_on_rank_0_and_is_broadcast(gloo_checks):
    every = _result(gloo_checks, "kmeans_seed")  # _dist_kmeans_other_seed_per_rank
    assert torch.equal(every[0], every[1])
    union = torch.cat([_shard(0), _shard(0)])
    assert torch.allclose(every[0], fit_centers(union, 6, 3, LocalComm(), seed=7), atol=1e-4)


def test_ray_train_backend_serves_cpu_and_cuda_tensors(tmp_path):
    """A real process group made from the backend Ray Train gets takes the collectives the
    K-means comm sends: CPU tensors (gloo) without GPUs; with GPUs, CUDA tensors (NCCL) and
    still CPU ones (gloo). The GPU cases run where CUDA and NCCL are present."""
    import torch.distributed as dist
    from ray.train.torch.config import _is_backend_nccl

    from mspray.train.kmeans import collective_device

    cases = [(False, "cpu")]
    if torch.cuda.is_available() and dist.is_nccl_available():
        cases += [(True, "cpu"), (True, "cuda")]
    for i, (use_gpu, device) in enumerate(cases):
        backend = ray_train.torch_backend(use_gpu)
        store = f"file://{tmp_path / f'pg{i}'}"
        dist.init_process_group(backend, init_method=store, rank=0, world_size=1)
        try:
            comm = TorchDistComm(device)
            assert comm.device.type == device
            x = torch.arange(4.0, device=device)
            assert torch.equal(comm.all_reduce_sum(x), x)
            assert torch.equal(comm.broadcast(x + 1), x + 1)
        finally:
            dist.destroy_process_group()
    # with GPUs a worker's collectives follow its model's device: no host copy on CUDA, and
    # a CPU-only tensor never goes to NCCL (also checked on machines without CUDA)
    mixed = ray_train.torch_backend(use_gpu=True)
    assert collective_device(mixed, "cuda:0") == torch.device("cuda:0")
    assert collective_device(mixed, "cpu") == torch.device("cpu")
    assert collective_device(ray_train.torch_backend(use_gpu=False), "cpu").type == "cpu"
    assert _is_backend_nccl(mixed)  # so Ray Train sets up NCCL for the group


# ---------------------------------------------------------------------------- ablation subsets
_LOSS_SUBSETS = [
    tuple(x for i, x in enumerate(("svdd", "cos", "ssl", "kmeans")) if m >> i & 1)
    for m in range(1, 16)
]


def _every_loss_subset(config: dict):
    """DDP fit of one epoch (4 steps) for every non-empty subset of the losses."""
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    comm = TorchDistComm()
    g = torch.Generator().manual_seed(comm.rank)
    # 64 px: scale 16's angle pairs are label-free there, so the SSL term (and head) runs
    images, val = torch.rand(2, 3, 64, 64, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    steps = []
    for losses in _LOSS_SUBSETS:
        cfg = _cfg(
            **{
                "train.losses": losses,
                "train.epochs": 1,
                "train.batch_size": 4,
                "train.n_centers": 3,
                "model.image_size": 64,
                "model.embed_dim": 8,
            }
        )
        model = DistributedDataParallel(build_scale_model(cfg, SCALE, None))
        tr = ScaleTrainer(cfg, SCALE, model, "cpu", comm)
        hist = tr.fit(images, val)
        steps.append(hist[-1]["steps"])
    return torch.tensor(steps)


def test_ddp_trains_with_every_subset_of_the_losses(gloo_checks):
    # With a loss off, its parameters must not exist: DDP fails at step 2 otherwise
    # ("Expected to have finished reduction in the prior iteration ...").
    steps = _result(gloo_checks, "loss_subsets")  # _every_loss_subset on two workers
    # 4 images × 4 samples / global batch 4 = 4 steps per subset.
    assert steps.tolist() == [4.0] * len(_LOSS_SUBSETS)


# ---------------------------------------------------------------------------- determinism
def test_two_gloo_runs_with_one_seed_write_bit_identical_weights(
    ray_local, synthetic_root, tmp_path
):
    from mspray.pipeline.steps import fit_detector
    from mspray.ray.executor import RayExecutor

    over = {"train.epochs": 2, "train.val_fraction": 0.25, "train.workers": 2}
    cfg = _cfg(**over, **{"train.select_every": 1})
    uris = train_paths(f"mvtec:{synthetic_root}", "synthetic")
    for name in ("a", "b"):
        rt = ray_train.ray_scale_trainer(run_name=f"det-{name}", storage=str(tmp_path / "runs"))
        ex = RayExecutor(trainer=rt)
        fit_detector(cfg, uris, out=str(tmp_path / name), executor=ex)
    a, b = (Path(resolve_bundle(str(tmp_path / n)), "model.safetensors") for n in "ab")
    assert a.read_bytes() == b.read_bytes()
    # rank 0 ranked every epoch, the untrained one included, on synthetic anomalies
    run = read_meta(str(tmp_path / "a"))["training"][str(SCALE)]
    assert [c["epoch"] for c in run["candidates"]] == [0, 1, 2]
    assert run["selection"] == "synthetic" and 0 <= run["selected_epoch"] <= 2


# ---------------------------------------------------------------------------- fault tolerance
@pytest.fixture(scope="module")
def split(synthetic_root):
    uris = train_paths(f"mvtec:{synthetic_root}", "synthetic")
    return split_holdout(uris, 0.2, 0)


def test_injected_failure_resumes_from_the_last_checkpoint(ray_local, split, tmp_path):
    marker = str(tmp_path / "failed.marker")
    rt = ray_train.ray_scale_trainer(
        run_name="fault",
        storage=str(tmp_path),
        keep_checkpoints=None,
        epoch_hook=FailOnce(epoch=2, marker=marker, mode="raise"),
    )
    over = {"train.workers": 2, "train.max_failures": 1, "train.select_every": 1}
    models = rt(_cfg(**over), *split)

    assert os.path.exists(marker)  # it did fail once
    result = rt.results[SCALE]
    state = ray_train.load_state(result.checkpoint)
    assert state["epoch"] == 3 and result.metrics["epoch"] == 3
    hist = state["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    # Epoch 1 from the first attempt; the failure hit after epoch 2, before its checkpoint,
    # so the second attempt resumed after epoch 1 and redid exactly one epoch.
    assert [h["start_epoch"] for h in hist] == [0, 1, 1]
    assert len(result.best_checkpoints) == 3  # one checkpoint per finished epoch
    assert result.metrics["world_size"] == 2
    for k in ("svdd", "cos", "ssl", "kmeans", "val_score", "ssl_acc", "spread", "samples_per_s"):
        assert k in result.metrics
    # The candidates survive the resume: epoch 0 (untrained) and every finished epoch once,
    # and the driver gets the weights of the best synthetic-anomaly score (ties: earlier).
    cands = state["candidates"]
    assert [int(c["epoch"]) for c in cands] == [0, 1, 2, 3]
    best = max(cands, key=lambda c: (c["score"], -c["epoch"]))
    assert state["best_epoch"] == int(best["epoch"]) and state["best_val"] == -best["score"]
    for k, v in models[SCALE].state_dict().items():
        assert torch.equal(v, state["best_state"][k])


def test_killed_run_resumes_with_the_same_name(ray_local, split, s3_bucket):
    # Checkpoints in S3 (the local moto server). The worker process is killed (os._exit)
    # after epoch 2, before its checkpoint, and no retries are allowed: the run dies the way
    # a killed job does, with only epoch 1 saved.
    from ray.train import TrainingFailedError

    storage = f"{s3_bucket}/runs"
    cfg = _cfg(**{"train.epochs": 2, "train.workers": 1})
    killed = ray_train.ray_scale_trainer(
        run_name="killed",
        storage=storage,
        epoch_hook=FailOnce(epoch=2, marker=f"{storage}/failed.marker", mode="exit"),
    )
    with pytest.raises(TrainingFailedError):
        killed(cfg.replace(**{"train.max_failures": 0}), *split)

    rerun = ray_train.ray_scale_trainer(run_name="killed", storage=storage)
    rerun(cfg, *split)
    state = ray_train.load_state(rerun.results[SCALE].checkpoint)
    assert state["epoch"] == 2
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    assert [h["start_epoch"] for h in state["history"]] == [0, 1]  # continued after epoch 1

    # Rerunning a finished run trains nothing more and returns the same final state; a
    # step budget is not part of what the state means, so it may change on resume.
    again = ray_train.ray_scale_trainer(run_name="killed", storage=storage)
    again(cfg.replace(**{"train.max_steps": 1000}), *split)
    final = ray_train.load_state(again.results[SCALE].checkpoint)
    assert final["epoch"] == 2 and [h["epoch"] for h in final["history"]] == [1, 2]

    # A config that changes what the saved state means is refused, not silently resumed.
    with pytest.raises(ValueError, match="different model/training config"):
        ray_train.ray_scale_trainer(run_name="killed", storage=storage)(
            _cfg(**{"model.embed_dim": 8, "train.workers": 1}), *split
        )


# ---------------------------------------------------------------------------- run context
@dataclass(frozen=True)
class _RecordRun:
    """Epoch hook: every rank writes the run context it trains in."""

    folder: str

    def __call__(self, *, epoch: int, rank: int, world_size: int) -> None:
        from mspray.config.run import current_run

        Path(self.folder, f"rank{rank}.json").write_text(json.dumps(asdict(current_run())))


def test_the_drivers_run_context_reaches_the_train_workers(ray_local, split, tmp_path):
    # contextvars stay in the driver: the trainer hands the context to its workers
    seen = tmp_path / "seen"
    seen.mkdir()
    rt = ray_train.ray_scale_trainer(storage=str(tmp_path), epoch_hook=_RecordRun(str(seen)))
    with use_run(RunContext(progress=True, address="auto")):  # Ray is up: not joined again
        rt(_cfg(**{"train.workers": 2, "train.epochs": 1}), *split)
    runs = [json.loads(p.read_text()) for p in sorted(seen.glob("rank*.json"))]
    assert runs == [{"progress": True, "address": "auto"}] * 2

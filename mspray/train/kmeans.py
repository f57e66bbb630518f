"""K-means centers for the K-means loss, written for data spread over workers.

The shape follows faiss's distributed k-means (``faiss.contrib.clustering`` with a
``DatasetAssign`` per shard): assignment and per-center sums run where the embeddings are;
only ``K×D`` sums and ``K`` counts travel (an all-reduce). k-means++ initialisation runs on
rank 0 over an all-gathered sample and its centers are broadcast, so all workers start from
identical centers without relying on bit-identical floating point on every rank; the Lloyd
iterations then keep them identical (every rank divides the same all-reduced sums). With
:class:`LocalComm` it is plain k-means.

Device contract: a :class:`Comm` names the device its process group works on
(``comm.device``: CUDA for NCCL, CPU for gloo). Callers go through :func:`reduce_sum`,
:func:`gather_cat` and :func:`broadcast`, which move tensors there and back, so no collective
ever sees a tensor on the wrong device (NCCL accepts CUDA tensors only).
"""

from __future__ import annotations

from typing import Protocol

import torch

from mspray.train.losses import sq_dists


class Comm(Protocol):
    """Collective operations the training loop needs (identity on one process)."""

    rank: int
    world_size: int
    #: Device of the tensors every collective is handed (and returns).
    device: torch.device

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor: ...

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor: ...

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor: ...


class LocalComm:
    """Single process: collectives are the identity."""

    rank = 0
    world_size = 1
    device = torch.device("cpu")

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        return t


def collective_device(backend: str, device: torch.device | str) -> torch.device:
    """Device on which a process group of ``backend`` takes tensors, for a worker whose
    model is on ``device``.

    ``backend`` is a ``torch.distributed`` backend string: ``"gloo"``, ``"nccl"`` or a
    per-device list such as ``"cpu:gloo,cuda:nccl"``. NCCL takes CUDA tensors only, gloo
    CPU ones; with both, the model's device is used (no copy to the host).
    """
    device = torch.device(device)
    groups: dict[str, str] = {}  # device type -> backend serving it
    for part in (p.strip() for p in backend.lower().split(",")):
        if ":" in part:
            dev, name = part.split(":", 1)
            groups[dev] = name
        elif part == "nccl":
            groups["cuda"] = part
        elif part:  # gloo, mpi, ...: host tensors
            groups["cpu"] = part
    if device.type in groups:
        return torch.device("cpu") if device.type == "cpu" else device
    if "cpu" in groups:
        return torch.device("cpu")
    if "cuda" in groups and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    raise ValueError(f"backend {backend!r} has no process group for a model on {device}")


class TorchDistComm:
    """Collectives over an initialised ``torch.distributed`` process group.

    ``device``: where the model lives; the group device (``self.device``) follows from the
    group's backend (:func:`collective_device`).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = collective_device(str(dist.get_backend()), device)

    def _check(self, t: torch.Tensor) -> None:
        # A clear error instead of NCCL's "Tensors must be CUDA and dense".
        if t.device != self.device:
            raise ValueError(f"collective on {t.device}; this group works on {self.device}")

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        self._check(t)
        t = t.clone()
        self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM)
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._check(t)
        t = t.clone()
        self._dist.broadcast(t, src=src)
        return t

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate rank-ordered tensors whose first dimension may differ per rank."""
        self._check(t)
        n = torch.tensor([t.shape[0]], device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        self._dist.all_gather(sizes, n)
        top = int(max(s.item() for s in sizes))
        pad = t.new_zeros((top - t.shape[0], *t.shape[1:]))
        bufs = [t.new_empty((top, *t.shape[1:])) for _ in range(self.world_size)]
        self._dist.all_gather(bufs, torch.cat([t, pad]))
        return torch.cat([b[: int(s.item())] for b, s in zip(bufs, sizes, strict=True)])


def reduce_sum(comm: Comm, t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks, on ``t``'s device (the collective runs on ``comm.device``)."""
    return comm.all_reduce_sum(t.to(comm.device)).to(t.device)


def gather_cat(comm: Comm, t: torch.Tensor) -> torch.Tensor:
    """Rank-ordered concatenation of every rank's ``t``, on ``t``'s device."""
    return comm.all_gather_cat(t.to(comm.device)).to(t.device)


def broadcast(comm: Comm, t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``t`` on every rank (same shape and dtype everywhere), on ``t``'s device."""
    return comm.broadcast(t.to(comm.device), src).to(t.device)


def kmeans_plus_plus(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next center drawn with probability ∝ squared distance."""
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one embedding")
    first = int(torch.randint(0, n, (1,), generator=g))
    centers = [x[first]]
    d2 = sq_dists(x, x[first : first + 1])[:, 0]
    for _ in range(1, min(k, n)):
        total = d2.sum()
        if total <= 0:  # all remaining points coincide with a center
            break
        probs = (d2 / total).double().cpu()
        nxt = int(torch.multinomial(probs, 1, generator=g))
        centers.append(x[nxt])
        d2 = torch.minimum(d2, sq_dists(x, x[nxt : nxt + 1])[:, 0])
    c = torch.stack(centers)
    if c.shape[0] < k:  # fewer distinct points than k: repeat (harmless for the loss)
        c = c[torch.arange(k) % c.shape[0]]
    return c


def assign(x: torch.Tensor, centers: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Index of the nearest center of every row, in chunks to bound memory."""
    return (
        torch.cat(
            [sq_dists(x[i : i + chunk], centers).argmin(1) for i in range(0, x.shape[0], chunk)]
        )
        if x.shape[0]
        else torch.zeros(0, dtype=torch.long, device=x.device)
    )


def lloyd_step(x: torch.Tensor, centers: torch.Tensor, comm: Comm) -> torch.Tensor:
    """One Lloyd iteration: local assignment, all-reduced per-center sums and counts.

    A center that gets no points anywhere keeps its position.
    """
    k = centers.shape[0]
    a = assign(x, centers)
    sums = torch.zeros_like(centers).index_add_(0, a, x)
    counts = torch.bincount(a, minlength=k).to(centers.dtype)
    sums = reduce_sum(comm, sums)
    counts = reduce_sum(comm, counts)
    new = sums / counts.clamp(min=1)[:, None]
    return torch.where(counts[:, None] > 0, new, centers)


@torch.no_grad()
def fit_centers(
    x_local: torch.Tensor, k: int, iters: int, comm: Comm, seed: int, init_sample: int = 20000
) -> torch.Tensor:
    """K centers of the union of every worker's ``x_local`` (float32, n_i×D).

    k-means++ runs on rank 0 over an all-gathered sample of at most ``init_sample`` rows per
    worker, and rank 0's centers are broadcast; Lloyd iterations then use all local rows.
    """
    x_local = x_local.float()
    g = torch.Generator().manual_seed(seed)
    # The per-worker subsample uses a rank-specific stream so shards are not sampled alike.
    gl = torch.Generator().manual_seed(seed * 1000003 + comm.rank)
    if x_local.shape[0] > init_sample:
        idx = torch.randperm(x_local.shape[0], generator=gl)[:init_sample].to(x_local.device)
        sample = x_local[idx]
    else:
        sample = x_local
    gathered = gather_cat(comm, sample)
    if gathered.shape[0] == 0:  # the same on every rank: all raise, none waits
        raise ValueError("k-means needs at least one embedding")
    if comm.rank == 0:
        centers = kmeans_plus_plus(gathered, k, g)
    else:  # overwritten by the broadcast; only shape and dtype matter here
        centers = gathered.new_zeros((k, gathered.shape[1]))
    centers = broadcast(comm, centers)
    for _ in range(iters):
        centers = lloyd_step(x_local, centers, comm)
    return centers

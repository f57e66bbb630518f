"""K-means centers for the K-means loss, written for data spread over workers.

The shape follows faiss's distributed k-means (``faiss.contrib.clustering`` with a
``DatasetAssign`` per shard): assignment and per-center sums run where the embeddings are;
only ``K×D`` sums and ``K`` counts travel (an all-reduce). k-means++ initialisation runs on
an all-gathered sample, with the same seeded generator on every worker, so all workers start
from, and end with, identical centers. With :class:`LocalComm` it is plain k-means.
"""

from __future__ import annotations

from typing import Protocol

import torch

from mspray.train.losses import sq_dists


class Comm(Protocol):
    """Collective operations the training loop needs (identity on one process)."""

    rank: int
    world_size: int

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor: ...

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor: ...


class LocalComm:
    """Single process: collectives are the identity."""

    rank = 0
    world_size = 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        return t


class TorchDistComm:
    """Collectives over an initialised ``torch.distributed`` process group (gloo or nccl)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM)
        return t

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate rank-ordered tensors whose first dimension may differ per rank."""
        n = torch.tensor([t.shape[0]], device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        self._dist.all_gather(sizes, n)
        top = int(max(s.item() for s in sizes))
        pad = t.new_zeros((top - t.shape[0], *t.shape[1:]))
        bufs = [t.new_empty((top, *t.shape[1:])) for _ in range(self.world_size)]
        self._dist.all_gather(bufs, torch.cat([t, pad]))
        return torch.cat([b[: int(s.item())] for b, s in zip(bufs, sizes, strict=True)])


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
    sums = comm.all_reduce_sum(sums)
    counts = comm.all_reduce_sum(counts)
    new = sums / counts.clamp(min=1)[:, None]
    return torch.where(counts[:, None] > 0, new, centers)


@torch.no_grad()
def fit_centers(
    x_local: torch.Tensor, k: int, iters: int, comm: Comm, seed: int, init_sample: int = 20000
) -> torch.Tensor:
    """K centers of the union of every worker's ``x_local`` (float32, n_i×D).

    k-means++ runs on an all-gathered sample of at most ``init_sample`` rows per worker;
    Lloyd iterations then use all local rows. Same ``seed`` on every worker.
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
    gathered = comm.all_gather_cat(sample)
    centers = kmeans_plus_plus(gathered, k, g)
    for _ in range(iters):
        centers = lloyd_step(x_local, centers, comm)
    return centers

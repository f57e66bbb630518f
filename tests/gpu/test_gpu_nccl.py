"""NCCL collectives and a DDP step across the GPUs of this machine (world size = GPUs, 2 at
most; 1 with a single GPU)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        t = torch.full((4,), float(rank + 1), device="cuda")
        dist.all_reduce(t)
        # DDP: one step on rank-dependent data leaves the same weights on every rank
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(
            torch.nn.Linear(8, 2).cuda(), device_ids=[rank]
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(16, 8, device="cuda") + rank
        model(x).square().mean().backward()
        opt.step()
        w = model.module.weight.detach().clone()
        gathered = [torch.empty_like(w) for _ in range(world)]
        dist.all_gather(gathered, w)
        results[rank] = (t.cpu().tolist(), all(torch.equal(g, w) for g in gathered))
    finally:
        dist.destroy_process_group()


def test_nccl_all_reduce_and_ddp_step() -> None:
    assert dist.is_nccl_available()
    world = min(2, torch.cuda.device_count())
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), results), nprocs=world, join=True)
        results = dict(results)
    expected = float(world * (world + 1) // 2)
    assert sorted(results) == list(range(world))
    for summed, same in results.values():
        assert summed == [expected] * 4 and same

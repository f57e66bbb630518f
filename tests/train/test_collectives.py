"""Collectives get tensors on their process group's device (NCCL: CUDA only).

No GPU here, so the group device is played by torch's lazy device (``lazy:0``, a real
second device computed on the CPU): a communicator that says its group works on ``lazy``
and refuses any other tensor is run through a whole fit of a CPU model. The Ray Train
backend string is tested with the adapter (tests/ray/train/test_ray_train.py).
"""

from __future__ import annotations

import pytest
import torch

from mspray.config import MSPrayConfig
from mspray.model.multiscale import build_scale_model
from mspray.train.kmeans import LocalComm, collective_device, fit_centers
from mspray.train.loop import ScaleTrainer


@pytest.fixture(scope="module")
def lazy_device() -> torch.device:
    import torch._lazy.ts_backend

    torch._lazy.ts_backend.init()
    return torch.device("lazy", 0)


class DeviceCheckingComm(LocalComm):
    """World of one whose group works on ``device``; records every tensor's device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.calls: list[str] = []

    def _check(self, op: str, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(op)
        assert t.device == self.device, f"{op} got a tensor on {t.device}, group is {self.device}"
        return t.clone()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._check("all_reduce", t)

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        return self._check("all_gather", t)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        return self._check("broadcast", t)


def test_a_whole_fit_hands_every_collective_a_tensor_on_the_group_device(lazy_device):
    cfg = MSPrayConfig().replace(
        **{
            "train.epochs": 2,
            "train.samples_per_image": 4,
            "train.batch_size": 8,
            "train.n_centers": 3,
            "train.center_update_every": 1,
            "model.image_size": 48,
            "model.scales": (16,),
            "model.strides": (4,),
            "model.embed_dim": 8,
            "model.pretrained": False,
        }
    )
    comm = DeviceCheckingComm(lazy_device)
    tr = ScaleTrainer(cfg, 16, build_scale_model(cfg, 16, None), "cpu", comm)
    g = torch.Generator().manual_seed(0)
    hist = tr.fit(torch.rand(4, 3, 48, 48, generator=g), torch.rand(2, 3, 48, 48, generator=g))
    # Step counts, validation sums, k-means sums/counts, its init sample and broadcast.
    assert {"all_reduce", "all_gather", "broadcast"} <= set(comm.calls)
    assert len(hist) == 2 and tr.centers.device.type == "cpu"
    assert "val_score" in hist[-1]


def test_fit_centers_returns_on_the_data_device(lazy_device):
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    c = fit_centers(x, 3, 5, DeviceCheckingComm(lazy_device), seed=0)
    assert c.device == x.device
    assert torch.allclose(c, fit_centers(x, 3, 5, LocalComm(), seed=0), atol=1e-5)


@pytest.mark.parametrize(
    ("backend", "model_device", "want"),
    [
        ("gloo", "cpu", "cpu"),
        ("gloo", "cuda:1", "cpu"),
        ("cpu:gloo,cuda:nccl", "cuda:1", "cuda:1"),
        ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
        ("nccl", "cuda:0", "cuda:0"),
    ],
)
def test_collective_device_follows_the_backend(backend, model_device, want):
    assert collective_device(backend, model_device) == torch.device(want)


def test_nccl_alone_cannot_serve_a_cpu_model():
    if torch.cuda.is_available():
        pytest.skip("with CUDA, nccl-only falls back to the current GPU")
    with pytest.raises(ValueError, match="no process group"):
        collective_device("nccl", "cpu")


def test_torch_dist_comm_works_on_its_groups_device_and_refuses_others(lazy_device, tmp_path):
    import torch.distributed as dist

    from mspray.train.kmeans import TorchDistComm, reduce_sum

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        comm = TorchDistComm("cpu")
        assert comm.device == torch.device("cpu")
        x = torch.arange(3.0)
        assert torch.equal(comm.all_reduce_sum(x), x)
        # A tensor elsewhere gets a clear error, not the backend's; the helpers move it.
        with pytest.raises(ValueError, match="this group works on cpu"):
            comm.all_reduce_sum(x.to(lazy_device))
        assert torch.equal(reduce_sum(comm, x.to(lazy_device)).cpu(), x)
    finally:
        dist.destroy_process_group()

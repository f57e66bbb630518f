"""What a scoring run reserves and ships, decided without starting Ray: the device and the
resources of an actor come from the scoring config and the cluster's nodes (never from what
the bundle was trained on), units are sized for the actors that can run at once, decoded
units are uint8, and which model failures end an actor's process."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from mspray.config import MSPrayConfig, PoolConfig, ScoreConfig
from mspray.data.images import load_image
from mspray.ray.data.plan import MAX_PART, MIN_PART, ScoringPlan
from mspray.ray.data.reading import decode_unit, to_uint8, unpack_unit
from mspray.ray.runtime import actor_resources, device_fault, gpus_per_actor

CPU_NODES = [{"CPU": 16.0}, {"CPU": 16.0}]
GPU_NODES = [{"CPU": 16.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 32.0, "GPU": 4.0}]


def _cfg(**over) -> MSPrayConfig:
    return MSPrayConfig().replace(**over)


def test_device_comes_from_the_scoring_config_not_the_training_one() -> None:
    pool = PoolConfig()
    trained_on_gpu = _cfg(**{"train.use_gpu": True, "bank.use_gpu": True})
    # trained on GPU, scored on a CPU-only cluster: no GPU is reserved (it would wait forever)
    assert gpus_per_actor(pool, trained_on_gpu, CPU_NODES) == 0
    assert gpus_per_actor(pool, _cfg(**{"score.device": "cpu"}), GPU_NODES) == 0
    # trained on CPU, scored where there are GPUs: auto uses them, cuda asks for them
    assert gpus_per_actor(pool, _cfg(), GPU_NODES) == 1
    assert gpus_per_actor(pool, _cfg(**{"score.device": "cuda"}), CPU_NODES) == 1
    # the pool's explicit setting wins
    assert gpus_per_actor(PoolConfig(gpus_per_worker=0.5), _cfg(), CPU_NODES) == 0.5


def test_gpu_actors_get_cpus_for_their_threads_and_leave_some_for_decoding() -> None:
    res = actor_resources(PoolConfig(), _cfg(), GPU_NODES)
    # CPUs per GPU: 8 and 8; half of the smaller share
    assert (res.gpus, res.cpus) == (1.0, 4.0)
    big = [{"CPU": 96.0, "GPU": 2.0}]
    assert actor_resources(PoolConfig(), _cfg(), big).cpus == 8  # capped
    tiny = [{"CPU": 1.0, "GPU": 1.0}]  # the simulated "GPU" node: its one CPU
    assert actor_resources(PoolConfig(), _cfg(), tiny).cpus == 1
    assert actor_resources(PoolConfig(cpus_per_worker=12), _cfg(), GPU_NODES).cpus == 12
    # CPU actors keep the pool's CPUs
    cpu = actor_resources(PoolConfig(cpus_per_worker=2), _cfg(), CPU_NODES)
    assert (cpu.gpus, cpu.cpus) == (0.0, 2.0)


def test_units_are_sized_for_the_actors_that_run_at_once(tmp_path) -> None:
    plan = ScoringPlan(str(tmp_path), str(tmp_path / "out"), {})
    # 288 images on 2 actors: 36-image units, 4 per actor (one 256-image unit would leave
    # the second actor a 32-image tail)
    assert plan.unit_size(288, 2) == 36
    assert plan.unit_size(10**6, 40) == MAX_PART
    assert plan.unit_size(5, 8) == MIN_PART
    plan.part_size = 4  # given: kept
    assert plan.unit_size(10**6, 40) == 4


def test_decoded_units_are_uint8_and_scale_back_to_the_loaded_images(png_bytes, tmp_path):
    paths = []
    for i, size in enumerate([(32, 32), (50, 40)]):  # one at the model's size, one resized
        (tmp_path / f"{i}.png").write_bytes(png_bytes(size, seed=i))
        paths.append(str(tmp_path / f"{i}.png"))
    with ThreadPoolExecutor(2) as pool:
        row = decode_unit(paths, 32, ScoreConfig(), pool)
    assert len(row["images"]) == 2 * 3 * 32 * 32  # one byte per value, not four
    images = unpack_unit({**row, "paths": paths}, 32).images
    assert images.dtype == torch.uint8
    want = torch.stack([load_image(p, 32) for p in paths])
    assert torch.equal(images[0], to_uint8(want[0]))
    assert torch.equal(images[0].float() / 255, want[0])  # exact at the model's size
    np.testing.assert_allclose(images[1].float() / 255, want[1], atol=0.5 / 255 + 1e-7)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (RuntimeError("CUDA error: an illegal memory access was encountered"), "hardware"),
        (RuntimeError("CUDA error: uncorrectable ECC error encountered"), "hardware"),
        (RuntimeError("NVRM: Xid (PCI:0000:00:1e): 79, GPU has fallen off the bus"), "hardware"),
        (RuntimeError("CUDA error: unspecified launch failure"), "hardware"),
        (RuntimeError("CUDA error: no kernel image is available for execution"), "deterministic"),
        (RuntimeError("CUDA error: device-side assert triggered"), "deterministic"),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm"), "deterministic"),
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), None),
        (RuntimeError("CUDA error: out of memory"), None),
        (RuntimeError("shape mismatch"), None),
        (ValueError("CUDA error: not a runtime error"), None),
    ],
)
def test_which_model_failures_restart_the_actor(error: BaseException, kind: str | None) -> None:
    """Only hardware faults restart the actor; deterministic device errors become error
    rows (a restart would meet them again, for ever)."""
    assert device_fault(error) == kind

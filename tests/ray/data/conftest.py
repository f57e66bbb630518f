"""Fixtures of the Ray Data tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from mspray import storage

#: ``sitecustomize.py`` that injects CUDA faults into the workers that have it on their path
GPU_FAULT_HOOKS = str(Path(__file__).parent / "gpu_fault")


@pytest.fixture
def gpu_fault(tiny_bundle, tmp_path) -> Callable[[int], tuple[Path, Path, dict[str, str]]]:
    """A factory: ``n`` test images of the tiny set copied into ``tmp_path/in``, the fault
    hooks' state folder (``calls.log``, ``every``) and the worker environment that loads
    the hooks (:data:`GPU_FAULT_HOOKS`) on a simulated node."""

    def make(n: int) -> tuple[Path, Path, dict[str, str]]:
        src = storage.list_files(os.path.join(tiny_bundle[1].split(":", 1)[1], "synthetic", "test"))
        inp, state = tmp_path / "in", tmp_path / "fault"
        inp.mkdir()
        state.mkdir()
        for i in range(n):
            shutil.copy(src[i % len(src)], inp / f"{i:03d}.png")
        path = (GPU_FAULT_HOOKS, os.environ.get("PYTHONPATH"))
        env = {"PYTHONPATH": os.pathsep.join(p for p in path if p)}
        env["MSPRAY_TEST_GPU_FAULT"] = str(state)
        return inp, state, env

    return make

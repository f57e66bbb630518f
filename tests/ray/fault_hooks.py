"""Test-only fault injection for Ray Train runs, through ``RayScaleTrainer.epoch_hook``.

Importing this module registers it to be pickled by value, so Ray's worker processes (which
do not have ``tests/`` on their path) can run the hook.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import ray.cloudpickle

from mspray import storage

log = logging.getLogger(__name__)


class InjectedFailure(RuntimeError):
    """Raised by :class:`FailOnce` in ``raise`` mode."""


@dataclass(frozen=True)
class FailOnce:
    """The last rank fails once, after finishing ``epoch`` and before its checkpoint is
    reported. ``mode="exit"`` kills the worker process (no exception, no clean-up, like a
    killed process) instead of raising. ``marker`` (a storage URI) records that it fired, so
    a restarted worker group does not fail again."""

    epoch: int
    marker: str
    mode: str = "raise"

    def __call__(self, *, epoch: int, rank: int, world_size: int) -> None:
        if epoch != self.epoch or rank != world_size - 1 or storage.exists(self.marker):
            return
        storage.write_text(self.marker, f"failed after epoch {epoch} on rank {rank}\n")
        log.warning("injected failure after epoch %d on rank %d (%s)", epoch, rank, self.mode)
        if self.mode == "exit":
            os._exit(1)
        raise InjectedFailure(f"injected failure after epoch {epoch} on rank {rank}")


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

"""Images read and decoded by CPU tasks for the model actors of bank building and calibration.

Scoring's two-stage shape (:mod:`mspray.ray.data.scoring`): Ray Data tasks read and decode
units of images (:func:`mspray.ray.data.reading.decode_units`, uint8, bounded reads, bad
files as error rows) on any node with CPUs, and the model actors only run the model. The
actors find each image's place in the driver's list (and any value that goes with it, such
as its calibration fold) through one table in the object store, keyed by path.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa
import torch

from mspray.config import MSPrayConfig, PoolConfig
from mspray.ray.data.reading import DecodedBatch, decode_memory, decode_units, unpack_unit


def common_root(uris: list[str]) -> str:
    """The deepest folder (or prefix) that holds every one of ``uris``."""
    root = os.path.commonprefix(uris)
    return root[: root.rfind("/") + 1] if "/" in root else ""


def decoded_units(uris: list[str], cfg: MSPrayConfig, pool: PoolConfig) -> Any:
    """A Ray dataset of ``uris`` in units of ``score.batch_size`` images, each unit read and
    decoded by one CPU task (rows of :data:`~mspray.ray.data.reading.UNIT_SCHEMA`)."""
    import ray

    unit = max(1, cfg.score.batch_size)
    rows = [{"paths": uris[i : i + unit]} for i in range(0, len(uris), unit)]
    return ray.data.from_items(rows).map_batches(
        decode_units,
        batch_size=1,  # one unit per task: a decoded unit is one block
        batch_format="pyarrow",
        fn_kwargs={
            "size": cfg.model.image_size,
            "cfg_json": cfg.score.model_dump_json(),
            "io_threads": pool.io_threads,
            "input_root": common_root(uris).rstrip("/"),
        },
        num_cpus=pool.decode_cpus,
        memory=decode_memory(unit, cfg.model.image_size, pool.io_threads),
    )


def units_of(batch: pa.Table, size: int) -> list[DecodedBatch]:
    """The decoded units of a batch, images as float ``[0, 1]``; a unit that could not be
    read (a transient fault that outlived the reader's retries) fails the task."""
    units = []
    for row in batch.to_pylist():
        if row.get("failure"):
            raise RuntimeError(f"images could not be read: {row['failure']}")
        unit = unpack_unit(row, size)
        unit.images = unit.images.float().div_(255.0)
        units.append(unit)
    return units


def lookup(ref: Any) -> dict[str, Any]:
    """The path-keyed table the driver put in the object store (e.g. path -> position)."""
    import ray

    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


def stack(units: list[DecodedBatch], size: int) -> DecodedBatch:
    """Several decoded units as one batch (inputs in order)."""
    images = [u.images for u in units]
    return DecodedBatch(
        [p for u in units for p in u.uris],
        torch.cat(images) if images else torch.empty(0, 3, size, size),
        [e for u in units for e in u.errors],
    )

"""What is left to score: the input dataset (:mod:`~mspray.ray.data.inputs`) minus the
paths the output already holds, as a Ray Data operation, and the work units cut from it.

The anti-join is a broadcast join on a 128-bit hash of the path: one Ray task reads only
the ``path`` (and ``model_version``) column of the parts that matter and returns a sorted
:class:`ScoredIndex` (16 bytes a row, 5M rows = 80 MB) into the object store; the tasks
that mark the input rows read it from there, zero-copy. The driver holds its object ref,
never a path. Which parts matter: all of them, or, with ``since`` (``--modified-since``),
only those written at or after it, because an image modified at ``t`` can only have a row
in a part written after ``t``. A nightly run over a growing archive so reads the parts of
the last night or two, not every old one.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from mspray import storage
from mspray.artifacts.output import is_part

#: Two independent 64-bit hashes of a path (SipHash keys, 16 characters each).
HASH_KEYS = ("mspray-path-hash", "mspray-pathhash2")
#: Rows of the input a units task cuts at once, per unit: the remainder of each batch is a
#: short unit, so one short unit per model per this many.
UNITS_PER_BATCH = 64


def path_hashes(paths: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """``n×2`` uint64: two keyed 64-bit hashes of each path (vectorised)."""
    objects = paths.to_numpy(zero_copy_only=False)
    return np.stack(
        [pd.util.hash_array(objects, hash_key=k, categorize=False) for k in HASH_KEYS], axis=1
    )


@dataclass
class ScoredIndex:
    """The rows already in the output, by path hash, sorted: for :meth:`counts`."""

    hi: np.ndarray  # uint64, sorted
    lo: np.ndarray  # uint64, aligned with hi
    version: np.ndarray  # int32 code into ``versions`` of each row's model_version
    versions: list[str | None]
    parts: int  # parts read

    def counts(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of each hashed path, and the version code of one of them (-1 when none)."""
        left = np.searchsorted(self.hi, hashes[:, 0], "left")
        right = np.searchsorted(self.hi, hashes[:, 0], "right")
        n = right - left
        counts = np.zeros(len(hashes), np.int64)
        code = np.full(len(hashes), -1, np.int32)
        one = np.flatnonzero(n == 1)
        hit = self.lo[left[one]] == hashes[one, 1]
        counts[one[hit]] = 1
        code[one[hit]] = self.version[left[one[hit]]]
        for i in np.flatnonzero(n > 1):  # a path with several rows (or a 64-bit collision)
            same = np.flatnonzero(self.lo[left[i] : right[i]] == hashes[i, 1])
            counts[i] = len(same)
            if len(same):
                code[i] = self.version[left[i] + same[0]]
        return counts, code


def part_files(output: str, since: dt.datetime | None = None) -> list[str]:
    """Filesystem paths of the output's parts (written at or after ``since``, by the
    storage's clock, when given)."""
    fs, path = storage.filesystem(output)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    except (FileNotFoundError, NotADirectoryError):
        return []
    ts = since.astimezone(dt.timezone.utc) if since is not None else None
    return sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and is_part(i.base_name)
        and (ts is None or i.mtime is None or i.mtime >= ts)
    )


def build_index(output: str, since: dt.datetime | None = None) -> ScoredIndex:
    """The :class:`ScoredIndex` of the output's parts (those since ``since``): only the
    ``path`` and ``model_version`` columns are read, batch by batch."""
    files = part_files(output, since)
    his, los, codes = [], [], []
    versions: dict[str | None, int] = {}
    if files:
        fs, _ = storage.filesystem(output)
        data = pads.dataset(files, filesystem=fs, format="parquet")
        for batch in data.to_batches(columns=["path", "model_version"], use_threads=True):
            h = path_hashes(batch.column(0))
            his.append(h[:, 0])
            los.append(h[:, 1])
            v = batch.column(1).dictionary_encode()
            names = [*v.dictionary.to_pylist(), None]  # the last: a null version
            table = np.array([versions.setdefault(x, len(versions)) for x in names], np.int32)
            at = pc.fill_null(v.indices, len(names) - 1).to_numpy(zero_copy_only=False)
            codes.append(table[at])
    hi = np.concatenate(his) if his else np.empty(0, np.uint64)
    lo = np.concatenate(los) if los else np.empty(0, np.uint64)
    code = np.concatenate(codes) if codes else np.empty(0, np.int32)
    order = np.lexsort((lo, hi))
    return ScoredIndex(hi[order], lo[order], code[order], list(versions), len(files))


_INDEX_CACHE: dict[str, Any] = {}


def _index(ref: list[Any]) -> ScoredIndex:
    """The index behind ``[ref]`` (a list, so Ray Data passes the ref itself), kept per
    worker process for the next batches."""
    import ray

    key = ref[0].hex()
    if key not in _INDEX_CACHE:
        _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = ray.get(ref[0])
    return _INDEX_CACHE[key]


def mark_rows(batch: pa.Table, index: list[Any], current: list[str], redo: list[str]) -> pa.Table:
    """Ray Data task: input rows + ``done`` (has a row), ``stale`` (a row by a version not
    in ``current``), ``redo`` (in a part that is rescored whole) and ``rows`` (how many)."""
    idx = _index(index)
    counts, code = idx.counts(path_hashes(batch.column("path")))
    stale_codes = np.array([v is not None and v not in current for v in idx.versions] + [False])
    in_redo = pc.is_in(batch.column("path"), value_set=pa.array(redo, pa.string()))
    return (
        batch.append_column("done", pa.array(counts > 0))
        .append_column(
            "stale",
            pa.array(stale_codes[code]),  # code -1: the extra False
        )
        .append_column("redo", pc.fill_null(in_redo, False))
        .append_column("rows", pa.array(counts))
    )


def pending_rows(batch: pa.Table) -> pa.Table:
    """Ray Data task: the marked rows left to score (no row yet, not in a redone part)."""
    keep = pc.and_(pc.invert(batch.column("done")), pc.invert(batch.column("redo")))
    return batch.select(["path", "model"]).filter(keep)


def unit_rows(batch: pa.Table, size: int, sizes: dict[str, int]) -> pa.Table:
    """Ray Data task: pending rows -> work units of at most ``size`` paths of one model
    each (``size`` column: the model's image size, 0 for a unit of no known model)."""
    paths = batch.column("path").combine_chunks()
    keys = pc.fill_null(batch.column("model"), "").combine_chunks().dictionary_encode()
    groups, offsets, names = [], [0], []
    for k, name in enumerate(keys.dictionary.to_pylist()):
        group = pc.filter(paths, pc.equal(keys.indices, k))
        groups.append(group)
        for i in range(0, len(group), size):
            offsets.append(offsets[-1] + min(size, len(group) - i))
            names.append(name or None)
    values = pa.concat_arrays(groups) if groups else pa.array([], pa.string())
    return pa.table(
        {
            "paths": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values),
            "model": pa.array(names, pa.string()),
            "size": pa.array([sizes.get(n or "", 0) for n in names], pa.int64()),
        }
    )


def tally_rows(batch: pa.Table) -> pa.Table:
    """Ray Data task: one row of counts of marked rows (summed by the driver): images,
    done, stale, redo, missing (no row), duplicates (rows beyond the first), and the
    latest ``modified`` time."""
    rows = batch.column("rows").to_numpy(zero_copy_only=False)
    latest = pc.max(batch.column("modified")).as_py() if "modified" in batch.column_names else None
    return pa.table(
        {
            "images": [batch.num_rows],
            "done": [int(pc.sum(batch.column("done")).as_py() or 0)],
            "stale": [int(pc.sum(batch.column("stale")).as_py() or 0)],
            "redo": [int(pc.sum(batch.column("redo")).as_py() or 0)],
            "missing": [int((rows == 0).sum())],
            "duplicates": [int(np.maximum(rows - 1, 0).sum())],
            "latest": pa.array([latest], pa.timestamp("us", tz="UTC")),
        }
    )


def tally(marked: Any, **kwargs: Any) -> dict[str, Any]:
    """The counts of :func:`tally_rows` over a marked dataset (``kwargs``: map options)."""
    rows = marked.map_batches(tally_rows, batch_format="pyarrow", **kwargs).take_all()
    out: dict[str, Any] = {k: sum(r[k] for r in rows) for k in TALLIED}
    times = [r["latest"] for r in rows if r["latest"] is not None]
    out["latest"] = max(times) if times else None
    return out


TALLIED = ("images", "done", "stale", "redo", "missing", "duplicates")


def _index_ref(output: str, since: dt.datetime | None) -> Any:
    """:func:`build_index` run as a Ray task: the driver only gets the object ref."""
    import ray

    return ray.remote(build_index).options(num_cpus=1).remote(output, since)


def mark_inputs(plan: Any, rules: Any, source: str | None, redo: list[str]) -> tuple[Any, dict]:
    """The plan's input dataset (a manifest ``source`` or the listing), each row marked
    against the output (:func:`mark_rows`), materialized in the object store, and its
    :func:`tally`."""
    from mspray.ray.data.inputs import listing_dataset, manifest_dataset

    inputs = manifest_dataset(source, rules) if source else listing_dataset(rules)
    kwargs = {
        "index": [_index_ref(plan.output, plan.since)],
        "current": [v for v in plan.versions.values() if v is not None],
        "redo": redo,
    }
    marked = inputs.map_batches(mark_rows, batch_format="pyarrow", fn_kwargs=kwargs)
    marked = marked.materialize()
    return marked, tally(marked)


def units_dataset(marked: Any, plan: Any, size: int) -> Any:
    """The pending rows of ``marked`` cut into work units of ``size`` (one unit a block,
    so each goes to its own decode task), streamed."""
    units = marked.map_batches(pending_rows, batch_format="pyarrow").map_batches(
        unit_rows,
        batch_size=size * UNITS_PER_BATCH,
        batch_format="pyarrow",
        fn_kwargs={"size": size, "sizes": plan.image_sizes},
    )
    return units.repartition(target_num_rows_per_block=1)


def check_rows(plan: Any, marked: Any) -> dict[str, Any]:
    """After a run: the inputs marked again against the output's parts (those since the
    plan's ``since``), for ``missing`` and ``duplicates``."""
    kwargs = {"index": [_index_ref(plan.output, plan.since)], "current": [], "redo": []}
    remarked = marked.select_columns(["path", "model"]).map_batches(
        mark_rows, batch_format="pyarrow", fn_kwargs=kwargs
    )
    return tally(remarked)

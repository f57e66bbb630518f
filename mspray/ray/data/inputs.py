"""The images a scoring run is about, as a Ray dataset of ``path, model`` rows: never a
list on the driver.

Two sources:

- a **manifest** (``--input-manifest FILE``, a Parquet or CSV file or a folder of them),
  read by Ray Data tasks: an S3 Inventory report (its ``bucket`` and ``key`` columns, with
  ``last_modified_date``), or a table with a ``path`` column of URIs, or a ``key`` column
  of keys relative to the input prefix. A ``model`` column names each image's bundle in a
  fleet (``--bundle NAME=URI``). Inventory keys are filtered like a listing (image
  suffixes only, nothing under the output); ``path`` rows are taken as they are.
- a **listing** of the input prefix, in parallel: delimiter listings of the first levels
  (Ray tasks, one per prefix) find sub-prefixes until there are :data:`FANOUT` of them,
  then one task lists each recursively. The driver holds sub-prefix names and the
  object refs of the listed blocks, never a path.

Both can be cut to what changed since a time (``since``: S3's ``LastModified``, the
manifest's ``last_modified_date``, a file's mtime). A route template (``--route``) gives
the model from the path (:func:`~mspray.ray.data.routing.route_regex`).
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from mspray import storage
from mspray.artifacts.output import parse_time
from mspray.ray.data.routing import route_regex

#: Rows of the input dataset: the image, its bundle's name (null: none, an error row).
INPUT_SCHEMA = pa.schema(
    [("path", pa.string()), ("model", pa.string()), ("modified", pa.timestamp("us", tz="UTC"))]
)
#: Prefixes the parallel listing aims for before listing each one recursively, and the
#: deepest level it splits (an archive such as ``date/camera/`` splits at level 2).
FANOUT, MAX_DEPTH = 64, 3
#: Column names of a manifest, in the order they are looked for.
TIME_COLUMNS = ("last_modified_date", "last_modified")


@dataclass(frozen=True)
class InputRules:
    """How a listed or manifest row becomes an input row (picklable, for the tasks)."""

    input_root: str
    output: str
    since: dt.datetime | None = None  # only what was modified at or after this time
    model: str | None = None  # every row's model (a single bundle / one named bundle)
    route: str | None = None  # a template naming the model in the path
    named: bool = False  # a fleet: the manifest's ``model`` column counts

    def rows(
        self, paths: pa.Array, models: pa.Array | None = None, times: pa.Array | None = None
    ) -> pa.Table:
        """Input rows of ``paths`` (the models from ``models``, the route or :attr:`model`;
        ``times``: when each was last modified, if known)."""
        paths = paths.cast(pa.string())
        if self.route:
            rx = route_regex(self.route, self.input_root).pattern
            found = pc.extract_regex(paths, f"^(?:{rx})$")
            models = pc.struct_field(found, "model")
        elif models is None or not self.named:
            models = pa.nulls(len(paths), pa.string())
            if self.model is not None:
                models = pa.array([self.model] * len(paths), pa.string())
        times = _utc(times) if times is not None else pa.nulls(len(paths), INPUT_SCHEMA[2].type)
        return pa.table(
            {"path": paths, "model": models.cast(pa.string()), "modified": times},
            schema=INPUT_SCHEMA,
        )

    def recent(self, times: pa.Array | None) -> pa.Array | None:
        """Mask of the rows modified at or after :attr:`since` (None: keep all)."""
        if self.since is None or times is None:
            return None
        ts = pa.scalar(self.since.astimezone(dt.timezone.utc), INPUT_SCHEMA[2].type)
        return pc.fill_null(pc.greater_equal(_utc(times), ts), True)

    def wanted(self, paths: pa.Array) -> pa.Array:
        """Mask of image files (by suffix) outside the output folder."""
        lower = pc.utf8_lower(paths)
        image = pc.or_(*[pc.ends_with(lower, s) for s in storage.IMAGE_SUFFIXES[:2]])
        for s in storage.IMAGE_SUFFIXES[2:]:
            image = pc.or_(image, pc.ends_with(lower, s))
        sep = storage.separator(self.output)
        outside = pc.invert(pc.starts_with(paths, self.output.rstrip(sep) + sep))
        return pc.and_(image, outside)


def _utc(times: pa.Array) -> pa.Array:
    """Times as UTC timestamps (naive ones are taken as UTC; text is parsed)."""
    if pa.types.is_string(times.type) or pa.types.is_large_string(times.type):
        parsed = [parse_time(t) if t else None for t in times.to_pylist()]
        times = pa.array(parsed, INPUT_SCHEMA[2].type)
    if pa.types.is_timestamp(times.type) and times.type.tz is None:
        times = pc.assume_timezone(times, "UTC")
    return pc.cast(times, INPUT_SCHEMA[2].type)


# ---------------------------------------------------------------------------- manifests
def manifest_rows(batch: pa.Table, rules: InputRules, source: str) -> pa.Table:
    """Ray Data task: manifest rows -> input rows (see the module docstring)."""
    names = set(batch.column_names)
    batch = batch.combine_chunks()
    col = {n: batch.column(n).combine_chunks() for n in names}
    if "path" in col:
        paths = col["path"].cast(pa.string())
        relative = pc.invert(pc.or_(pc.match_substring(paths, "://"), pc.starts_with(paths, "/")))
        under = pc.binary_join_element_wise(rules.input_root.rstrip("/"), paths, "/")
        paths = pc.if_else(relative, under, paths)
        keep = pc.is_valid(paths)
    elif "key" in col:
        keys = col["key"].cast(pa.string())
        if "bucket" in col:  # an S3 Inventory report
            head = pc.binary_join_element_wise("s3://", col["bucket"].cast(pa.string()), "")
            paths = pc.binary_join_element_wise(head, keys, "/")
        else:
            paths = pc.binary_join_element_wise(rules.input_root.rstrip("/"), keys, "/")
        keep = pc.fill_null(rules.wanted(paths), False)
    else:
        raise ValueError(
            f"--input-manifest {source}: needs a path column, or bucket and key (an S3 "
            f"Inventory report), or key; has {', '.join(sorted(names))}"
        )
    times = next((col[c] for c in TIME_COLUMNS if c in col), None)
    recent = rules.recent(times)
    if recent is not None:
        keep = pc.and_(keep, recent)
    models = pc.filter(col["model"], keep) if "model" in col else None
    times = pc.filter(times, keep) if times is not None else None
    return rules.rows(pc.filter(paths, keep), models, times)


def manifest_dataset(uri: str, rules: InputRules) -> Any:
    """The manifest ``uri`` (a file or a folder of ``.parquet`` / ``.csv`` files) as a Ray
    dataset of input rows; only the columns mspray uses are read from Parquet."""
    import ray

    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"--input-manifest {uri}: no such file or folder")
    lower = uri.lower().rstrip("/")
    csv = lower.endswith((".csv", ".csv.gz"))
    if info.type == pafs.FileType.File and not (csv or lower.endswith(".parquet")):
        raise ValueError(f"--input-manifest {uri}: expected .parquet or .csv (or a folder)")
    if csv:
        ds = ray.data.read_csv(path, filesystem=fs)
    else:
        names = pads.dataset(path, filesystem=fs, format="parquet").schema.names
        wanted = ["path", "bucket", "key", "model", *TIME_COLUMNS]
        ds = ray.data.read_parquet(path, filesystem=fs, columns=[c for c in wanted if c in names])
    return ds.map_batches(
        manifest_rows, batch_format="pyarrow", fn_kwargs={"rules": rules, "source": uri}
    )


# ---------------------------------------------------------------------------- listing
def list_level(prefix: str, rules: InputRules, recursive: bool) -> tuple[pa.Table, list[str]]:
    """Ray task: one prefix listed (with a delimiter unless ``recursive``): its input rows and its
    sub-prefixes."""
    fs, path = storage.filesystem(prefix)
    b = storage.backend(prefix)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    except FileNotFoundError:
        infos = []
    subs = [i.path for i in infos if i.type == pafs.FileType.Directory]
    if not recursive and any(_odd_segment(s, path) for s in subs):
        # a key with a ".", ".." or empty segment (S3 allows them): listed with the rest of
        # this prefix as one listing, never as a prefix of its own, which clients normalise
        # to another one
        return list_level(prefix, rules, True)
    files = [i for i in infos if i.type == pafs.FileType.File]
    dirs = sorted(b.uri_of(prefix, s) for s in subs)
    files.sort(key=lambda i: i.path)
    paths = pa.array([b.uri_of(prefix, i.path) for i in files], pa.string())
    times = pa.array([i.mtime for i in files], pa.timestamp("us", tz="UTC"))
    keep = rules.wanted(paths)
    recent = rules.recent(times)
    if recent is not None:
        keep = pc.and_(keep, recent)
    rows = rules.rows(pc.filter(paths, keep), None, pc.filter(times, keep))
    return rows, ([] if recursive else dirs)


def _odd_segment(sub: str, parent: str) -> bool:
    segment = sub[len(parent.rstrip("/")) + 1 :] if sub.startswith(parent) else sub
    return segment in ("", ".", "..") or "/" in segment


def listing_dataset(rules: InputRules) -> Any:
    """The input prefix listed by Ray tasks (see the module docstring) as a dataset."""
    import ray

    if not storage.is_dir(rules.input_root):
        raise FileNotFoundError(f"no such folder: {rules.input_root}")
    level = ray.remote(num_returns=2, num_cpus=0.25)(list_level)
    refs: list[Any] = []
    frontier, depth = [rules.input_root], 0
    while frontier and len(frontier) < FANOUT and depth < MAX_DEPTH:
        launched = [level.remote(p, rules, False) for p in frontier]
        nxt = []
        for rows, subs in launched:
            refs.append(rows)
            nxt.extend(ray.get(subs))  # sub-prefix names only; the rows stay in the store
        nxt = [p for p in nxt if not _same_or_under(p, rules.output)]
        frontier, depth = nxt, depth + 1
    refs += [level.remote(p, rules, True)[0] for p in frontier]
    return ray.data.from_arrow_refs(refs)


def _same_or_under(uri: str, folder: str) -> bool:
    return uri.rstrip("/" + os.sep) == folder.rstrip("/" + os.sep) or storage.is_under(uri, folder)

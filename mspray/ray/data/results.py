"""Layout of a scoring output folder (local or ``s3://``), and how a rerun finds what is done.

::

    OUTPUT/
      part-<hash>.parquet   the rows of one work unit; <hash> = sha256 of its sorted paths
      _maps/<image path relative to the input prefix>.png    heatmap panel (with --maps)
      _runs/<UTC time>-<id>.json                             summary of each run
      _lease/<generation>.json   who is scoring into OUTPUT now (see :mod:`mspray.lease`)

Each input image has exactly one row in exactly one part:

- a part is written in one atomic step (local: temp file + rename; S3: an object only
  appears when its upload completes), so a crash never leaves half a part behind;
- a run first reads the ``path`` column of every part and scores only the other images;
- a part's name depends only on the paths in it, so a unit retried by Ray (actor died after
  writing) or an identical overlapping run overwrites the same part instead of adding one.

Names starting with ``_`` or ``.`` are skipped by pyarrow / pandas / Spark dataset discovery
and Ray's ``read_parquet`` only takes ``*.parquet``, so ``pandas.read_parquet(OUTPUT)`` and
``ray.data.read_parquet(OUTPUT)`` return exactly the result rows.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
import uuid

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from mspray import storage

PART_PREFIX = "part-"
MAPS_DIR = "_maps"
RUNS_DIR = "_runs"


def result_schema(scales: tuple[int, ...] | list[int]) -> pa.Schema:
    """Columns of a result row; ``score_<scale>`` is the image score of one scale's map.
    Score columns and ``is_anomalous`` are null on error rows (``error`` set)."""
    return pa.schema(
        [
            ("path", pa.string()),
            ("image_score", pa.float64()),
            ("is_anomalous", pa.bool_()),
            *[(f"score_{s}", pa.float64()) for s in scales],
            ("threshold", pa.float64()),
            ("model_version", pa.string()),
            ("error", pa.string()),
            ("scored_at", pa.timestamp("us", tz="UTC")),
            ("map_path", pa.string()),
            # issue 12: the bundle's name in a multi-model run (null with a single bundle)
            ("model", pa.string()),
        ]
    )


def part_name(paths: list[str]) -> str:
    """Stable file name of the part holding ``paths`` (order does not matter)."""
    digest = hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()[:24]
    return f"{PART_PREFIX}{digest}.parquet"


#: Attempts per output write on I/O errors; after that the error fails the unit (and the
#: job), so a rerun writes it, rather than the image being marked done without its output.
WRITE_ATTEMPTS = 3


def write_output(uri: str, data: bytes) -> None:
    """Write one output file (atomically, see :func:`mspray.storage.write_bytes`), retrying
    transient I/O errors."""
    for attempt in range(WRITE_ATTEMPTS):
        try:
            storage.write_bytes(uri, data)
            return
        except OSError:
            if attempt == WRITE_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * 2**attempt)


def write_part(output: str, table: pa.Table) -> str:
    """Write ``table`` as one part, atomically; returns its URI."""
    uri = storage.join(output, part_name(table.column("path").to_pylist()))
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    write_output(uri, buf.getvalue().to_pybytes())
    return uri


def list_parts(output: str) -> list[str]:
    """URIs of the parts in ``output`` (empty when the folder does not exist yet)."""
    try:
        files = storage.list_files(output, suffixes=(".parquet",), recursive=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [f for f in files if f.replace("\\", "/").rsplit("/", 1)[-1].startswith(PART_PREFIX)]


def read_results(output: str, columns: list[str] | None = None) -> pa.Table:
    """All result rows of ``output`` (optionally only ``columns``); no rows if none yet."""
    parts = list_parts(output)
    if not parts:
        return pa.table({c: pa.array([], pa.string()) for c in columns or ["path"]})
    fs, _ = storage.filesystem(output)
    files = [storage.filesystem(p)[1] for p in parts]
    return pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=columns)


def error_units(output: str) -> list[tuple[list[str], str | None]]:
    """The paths of every part that holds an error row, one list per part (a unit that,
    scored again, rewrites that part under the same name), with the part's model (the
    ``model`` column of a multi-model run, else None)."""
    units = []
    for part in list_parts(output):
        fs, path = storage.filesystem(part)
        names = pq.read_schema(path, filesystem=fs).names
        cols = ["path", "error"] + (["model"] if "model" in names else [])
        t = pq.read_table(path, columns=cols, filesystem=fs)
        if t.column("error").null_count < t.num_rows:
            models = t.column("model").to_pylist() if "model" in cols else [None]
            units.append((t.column("path").to_pylist(), models[0]))
    return units


def map_uri(output: str, input_root: str, path: str) -> str:
    """Where the heatmap of input ``path`` goes: its path under the input prefix, + .png.
    ValueError for a path that would land outside ``output/_maps/``."""
    rel = storage.relative(path, input_root)
    if rel == ".." or rel.startswith("../") or rel.startswith("/"):
        raise ValueError(f"{path}: not under the input prefix {input_root}")
    return storage.join(output, MAPS_DIR, rel + ".png")


def write_run_summary(output: str, summary: dict) -> str:
    """Record one run's summary under ``_runs/``; returns its URI."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    uri = storage.join(output, RUNS_DIR, f"{stamp}-{uuid.uuid4().hex[:6]}.json")
    storage.write_text(uri, json.dumps(summary, indent=2, default=str) + "\n")
    return uri


def expand_date(template: str, date: dt.date | None = None) -> str:
    """Fill ``{date}`` (YYYY-MM-DD), ``{year}``, ``{month}``, ``{day}`` in a URI template;
    ``date`` defaults to today in UTC. Other braces are left alone."""
    d = date or dt.datetime.now(dt.timezone.utc).date()
    for key, value in (
        ("{date}", d.isoformat()),
        ("{year}", f"{d.year:04d}"),
        ("{month}", f"{d.month:02d}"),
        ("{day}", f"{d.day:02d}"),
    ):
        template = template.replace(key, value)
    return template

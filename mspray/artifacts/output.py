"""The layout of a scoring output folder (local or ``s3://``), and its one reader.

::

    OUTPUT/
      part-<hash>.parquet   the rows of one work unit; <hash> = sha256 of its sorted paths
      _maps/<hh>/<image path relative to the input prefix>.png  heatmap panel (with --maps)
      _runs/<UTC time>-<id>.json                             summary of each run
      _report.html                                           the report page (mspray report)
      _lease/<generation>.json   who is scoring into OUTPUT now (see :mod:`mspray.artifacts.lease`)

``<hh>`` is the first two hex digits of a hash of the relative path: S3 serves about
3,500 PUTs per second per prefix, so the panels of a large run are spread over 256
prefixes instead of one; a row's ``map_path`` holds its panel's URI.

A *part* is a top-level file named ``part-*.parquet`` (:func:`is_part`); nothing else in
the folder holds result rows, and every reader (a rerun finding what is done, the report,
the error retry) goes through :func:`read_results`. Each input image has exactly one row
in exactly one part:

- a part is written in one atomic step (local: temp file + rename; S3: an object only
  appears when its upload completes), so a crash never leaves half a part behind;
- a run first reads the ``path`` column of every part and scores only the other images;
- a part's name depends only on the paths in it, so a unit retried by Ray (actor died after
  writing) or an identical overlapping run overwrites the same part instead of adding one.

Names starting with ``_`` or ``.`` are skipped by pyarrow / pandas / Spark dataset discovery
and Ray's ``read_parquet`` only takes ``*.parquet``, so ``pandas.read_parquet(OUTPUT)`` and
``ray.data.read_parquet(OUTPUT)`` return exactly the result rows.

This module is core: it imports no Ray.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from mspray import storage

log = logging.getLogger(__name__)

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
MAPS_DIR = "_maps"
RUNS_DIR = "_runs"
#: The leading ``_`` keeps the page out of Parquet dataset discovery, like every other
#: file beside the parts.
REPORT_NAME = "_report.html"
#: Name of the column :func:`read_results` adds with ``with_part=True``.
PART_COLUMN = "_part"


def result_schema(scales: tuple[int, ...] | list[int]) -> pa.Schema:
    """Columns of a result row; ``score_<scale>`` is the image score of one scale's map.
    Score columns and ``is_anomalous`` are null on error rows (``error`` set); ``model`` is
    the bundle's name in a multi-model run (null with a single bundle)."""
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
            ("model", pa.string()),
        ]
    )


def part_name(paths: list[str]) -> str:
    """Stable file name of the part holding ``paths`` (order does not matter)."""
    digest = hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()[:24]
    return f"{PART_PREFIX}{digest}{PART_SUFFIX}"


def is_part(name: str) -> bool:
    """Whether a file name (not a path) is a part's: ``part-*.parquet``."""
    return name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX)


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
    """Sorted URIs of the parts in ``output`` (empty when the folder does not exist yet)."""
    try:
        files = storage.list_files(output, suffixes=(PART_SUFFIX,), recursive=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [f for f in files if is_part(storage.basename(f))]


def read_results(
    output: str, columns: list[str] | None = None, *, with_part: bool = False
) -> pa.Table:
    """The result rows of every part of ``output`` in one pyarrow dataset scan: parts read
    by parallel threads, only ``columns`` decoded (None = every column of any part).

    Parts of models with other scales (other ``score_<scale>`` columns), or older ones
    without the ``model`` column, mix: the schemas are unified and a column a part lacks is
    null there (a requested column no part has: a null string column). ``with_part`` adds
    :data:`PART_COLUMN`, the name of each row's part file. No parts: no rows.
    """
    parts = list_parts(output)
    extra = [PART_COLUMN] if with_part else []
    if not parts:
        names = (columns if columns is not None else ["path"]) + extra
        return pa.table({c: pa.array([], pa.string()) for c in names})
    fs, _ = storage.filesystem(output)
    paths = [storage.filesystem(p)[1] for p in parts]
    parquet = pads.ParquetFileFormat()
    fragments = [parquet.make_fragment(p, fs) for p in paths]
    schema = _unified_schema(fragments, columns)
    dataset = pads.FileSystemDataset(fragments, schema, parquet, fs)
    scanner = dataset.scanner(columns=columns, use_threads=True)
    if not with_part:
        return scanner.to_table()
    # batches come in part order, each tagged with its part
    tagged = list(scanner.scan_batches())
    table = pa.Table.from_batches([t.record_batch for t in tagged], scanner.projected_schema)
    names = [storage.basename(t.fragment.path) for t in tagged]
    runs = np.repeat(np.arange(len(tagged)), [t.record_batch.num_rows for t in tagged])
    return table.append_column(PART_COLUMN, pa.array(names, pa.string()).take(runs))


#: Threads that read the parts' footers (one request each on S3) for the unified schema.
FOOTER_THREADS = 16


def _footer(fragment: pads.ParquetFileFragment) -> pa.Schema:
    # the footer stays cached on the fragment, so the scan does not read it again
    fragment.ensure_complete_metadata()
    return fragment.physical_schema


def _unified_schema(
    fragments: list[pads.ParquetFileFragment], columns: list[str] | None
) -> pa.Schema:
    """The schema of all parts together. The first part's footer is enough when it has
    every requested column (parts of one output differ only in ``score_<scale>`` columns
    and, for older ones, ``model``); else every footer, read by threads."""
    if columns is not None:
        first = _footer(fragments[0])
        if all(c in first.names for c in columns):
            return first
    with ThreadPoolExecutor(min(FOOTER_THREADS, len(fragments))) as pool:
        schema = pa.unify_schemas(list(pool.map(_footer, fragments)))
    for c in columns or []:
        if c not in schema.names:
            schema = schema.append(pa.field(c, pa.string()))
    return schema


def error_units(output: str) -> list[tuple[list[str], str | None]]:
    """The paths of every part that holds an error row, one list per part (a unit that,
    scored again, rewrites that part under the same name), with the part's model (the
    ``model`` column of a multi-model run, else None)."""
    t = read_results(output, ["path", "error", "model"], with_part=True)
    failed = set(t.filter(pc.is_valid(t.column("error"))).column(PART_COLUMN).to_pylist())
    units: dict[str, tuple[list[str], str | None]] = {}
    for path, model, part in zip(
        *(t.column(c).to_pylist() for c in ("path", "model", PART_COLUMN)), strict=True
    ):
        if part in failed:
            units.setdefault(part, ([], model))[0].append(path)
    return [units[p] for p in sorted(units)]


def map_uri(output: str, input_root: str, path: str) -> str:
    """Where the heatmap of input ``path`` goes: ``_maps/<hh>/`` + its path under the input
    prefix + .png, ``<hh>`` from a hash of that path (see the module docstring). ValueError
    for a path that would land outside ``output/_maps/``."""
    rel = storage.relative(path, input_root)
    if rel == ".." or rel.startswith("../") or rel.startswith("/"):
        raise ValueError(f"{path}: not under the input prefix {input_root}")
    spread = hashlib.sha256(rel.encode()).hexdigest()[:2]
    return storage.join(output, MAPS_DIR, spread, rel + ".png")


def write_run_summary(output: str, summary: dict) -> str:
    """Record one run's summary under ``_runs/``; returns its URI."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    uri = storage.join(output, RUNS_DIR, f"{stamp}-{uuid.uuid4().hex[:6]}.json")
    storage.write_text(uri, json.dumps(summary, indent=2, default=str) + "\n")
    return uri


def read_run_summaries(output: str) -> list[dict]:
    """The run summaries under ``_runs/``, oldest first (names start with a UTC stamp);
    each gets a ``_file`` key (its name). Unreadable ones are skipped with a warning."""
    try:
        files = storage.list_files(
            storage.join(output, RUNS_DIR), suffixes=(".json",), recursive=False
        )
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for f in sorted(files, key=storage.basename):
        try:
            summary = json.loads(storage.read_text(f))
        except (OSError, ValueError) as e:
            log.warning("skipping unreadable run summary %s: %s", f, e)
            continue
        if isinstance(summary, dict):
            out.append({**summary, "_file": storage.basename(f)})
    return out


#: ``--modified-since last-run`` starts this long before where the last run left off: the
#: storage's clock and this machine's may differ, and an image seen twice is only skipped.
LAST_RUN_MARGIN = dt.timedelta(hours=1)


def last_run_until(output: str) -> dt.datetime | None:
    """Where the newest *complete* run of ``output`` (no image left without a row) left
    off: its ``modified_until``; None when there is none. An incomplete run is passed over,
    so the images it missed are in the next run's range."""
    try:
        files = storage.list_files(
            storage.join(output, RUNS_DIR), suffixes=(".json",), recursive=False
        )
    except (FileNotFoundError, NotADirectoryError):
        return None
    for f in sorted(files, key=storage.basename, reverse=True):  # newest first
        try:
            run = json.loads(storage.read_text(f))
        except (OSError, ValueError):
            continue
        if not isinstance(run, dict):
            continue
        complete = run.get("missing") == 0 and not run.get("failed_units")
        if complete and run.get("modified_until"):
            return parse_time(run["modified_until"])
    return None


def parse_time(text: str) -> dt.datetime:
    """An ISO date or date-time as an aware UTC datetime (a date: its midnight UTC; no
    zone: UTC)."""
    t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t


def resolve_since(since: str | dt.datetime | None, output: str) -> dt.datetime | None:
    """``--modified-since``: a datetime or ISO text as UTC, or ``"last-run"``: where the
    output's last complete run left off (:func:`last_run_until`) less
    :data:`LAST_RUN_MARGIN`, or None (everything) before the first run."""
    if since is None or isinstance(since, dt.datetime):
        return since if since is None or since.tzinfo else since.replace(tzinfo=dt.timezone.utc)
    if since.strip() == "last-run":
        until = last_run_until(output)
        return until - LAST_RUN_MARGIN if until is not None else None
    try:
        return parse_time(since)
    except ValueError:
        raise ValueError(
            f"--modified-since {since!r}: expected YYYY-MM-DD, an ISO date-time or last-run"
        ) from None


def expand_date(template: str, date: dt.date | None = None) -> str:
    """Fill ``{date}`` (YYYY-MM-DD), ``{year}``, ``{month}``, ``{day}`` in a URI template
    (a nightly job's input and output); ``date`` defaults to today in UTC. Other braces are
    left alone."""
    d = date or dt.datetime.now(dt.timezone.utc).date()
    for key, value in (
        ("{date}", d.isoformat()),
        ("{year}", f"{d.year:04d}"),
        ("{month}", f"{d.month:02d}"),
        ("{day}", f"{d.day:02d}"),
    ):
        template = template.replace(key, value)
    return template

"""Reading a scoring output: the one dataset scan of :mod:`mspray.artifacts.output` vs the
readers it
replaced (the report read every part and all its columns one after another; the error retry
opened every part again for its ``path``/``error`` columns).

Writes ``--parts`` parts of ``--rows`` result rows (scales 64/32/16, 1 % error rows), then
times, best of ``--repeat``: the report's rows (all columns + the part name) and the error
units, old and new, checks they agree, and prints the ratios.

    python benchmarks/bench_report_read.py [--parts 200] [--rows 256] [--out DIR]

``--out s3://bucket/prefix`` measures on S3 (credentials and ``AWS_ENDPOINT_URL`` from the
environment), where every part costs requests and the threads matter most.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from mspray import storage
from mspray.artifacts.output import (
    PART_COLUMN,
    RUNS_DIR,
    error_units,
    read_results,
    result_schema,
    write_part,
)

SCALES = (64, 32, 16)


def make_output(out: str, parts: int, rows: int, seed: int = 0) -> None:
    """A scoring output of ``parts`` × ``rows`` rows (1 % errors) and the files beside the
    parts that readers must skip: a run summary, a heatmap, a killed write's temp file."""
    rng = np.random.default_rng(seed)
    now = dt.datetime(2024, 3, 8, 2, 30, tzinfo=dt.timezone.utc)
    schema = result_schema(SCALES)
    for p in range(parts):
        paths = [f"/archive/2024-03-07/cam{p % 4}/{p:05d}_{i:04d}.png" for i in range(rows)]
        scores = rng.normal(1.0, 0.1, rows)
        failed = rng.random(rows) < 0.01

        def where_ok(values, failed=failed):  # null on error rows
            return pa.array(values, mask=failed)

        columns = {
            "path": paths,
            "image_score": where_ok(scores),
            "is_anomalous": where_ok(scores > 1.25),
            **{f"score_{s}": where_ok(scores / 3) for s in SCALES},
            "threshold": [1.25] * rows,
            "model_version": ["abc123"] * rows,
            "error": pa.array([f"{q}: cannot decode image" for q in paths], mask=~failed),
            "scored_at": [now] * rows,
            "map_path": where_ok([storage.join(out, "_maps", q[20:] + ".png") for q in paths]),
            "model": pa.nulls(rows, pa.string()),
        }
        write_part(out, pa.table(columns).cast(schema))
    storage.write_text(storage.join(out, RUNS_DIR, "20240308T023000Z-aaaaaa.json"),
                       json.dumps({"scored": parts * rows}))  # fmt: skip
    storage.write_bytes(storage.join(out, "_maps", "a.png.png"), b"\x89PNG")
    storage.write_bytes(storage.join(out, ".part-x.parquet.tmp"), b"half a part")


# ----------------------------------------------------------------------------- the old readers
def old_read_rows(output: str) -> pa.Table:
    """The report's reader before :mod:`mspray.artifacts.output`: every top-level ``*.parquet`` not
    starting with ``_``/``.``, footers then fragments read one after another."""
    try:
        files = storage.list_files(output, suffixes=(".parquet",), recursive=False)
    except (FileNotFoundError, NotADirectoryError):
        files = []
    files = [f for f in files if not storage.basename(f).startswith(("_", "."))]
    if not files:
        return pa.table({"path": pa.array([], pa.string()), "_part": pa.array([], pa.string())})
    fs, _ = storage.filesystem(output)
    paths = [storage.filesystem(f)[1] for f in files]
    schema = pa.unify_schemas([pq.read_schema(p, filesystem=fs) for p in paths])
    dataset = pads.dataset(paths, filesystem=fs, format="parquet", schema=schema)
    tables = []
    for frag in dataset.get_fragments():
        t = frag.to_table(schema=schema)
        tables.append(t.append_column("_part", pa.array([storage.basename(frag.path)] * len(t))))
    return pa.concat_tables(tables)


def old_error_units(output: str) -> list[tuple[list[str], str | None]]:
    """The error retry's reader before :mod:`mspray.artifacts.output`: each part opened in turn."""
    try:
        files = storage.list_files(output, suffixes=(".parquet",), recursive=False)
    except (FileNotFoundError, NotADirectoryError):
        files = []
    units = []
    for part in [f for f in files if storage.basename(f).startswith("part-")]:
        fs, path = storage.filesystem(part)
        names = pq.read_schema(path, filesystem=fs).names
        cols = ["path", "error"] + (["model"] if "model" in names else [])
        t = pq.read_table(path, columns=cols, filesystem=fs)
        if t.column("error").null_count < t.num_rows:
            models = t.column("model").to_pylist() if "model" in cols else [None]
            units.append((t.column("path").to_pylist(), models[0]))
    return units


def best(fn, repeat: int) -> tuple[float, object]:
    """Fastest of ``repeat`` calls, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", type=int, default=200)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None, help="output folder (default: a temp folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or storage.join(tmp, "scores")
        t0 = time.perf_counter()
        make_output(out, args.parts, args.rows)
        print(f"{args.parts} parts x {args.rows} rows written in {time.perf_counter() - t0:.1f} s")
        rows = [
            ("report rows (all columns)", lambda: old_read_rows(out),
             lambda: read_results(out, with_part=True)),
            ("error units", lambda: old_error_units(out), lambda: error_units(out)),
        ]  # fmt: skip
        for name, old, new in rows:
            t_old, r_old = best(old, args.repeat)
            t_new, r_new = best(new, args.repeat)
            if isinstance(r_old, pa.Table):
                assert r_old.rename_columns(r_new.column_names).equals(r_new), name
                assert r_new.column_names[-1] == PART_COLUMN
            else:
                assert r_old == r_new, name
            print(f"{name:28s} old {t_old * 1e3:8.1f} ms  new {t_new * 1e3:8.1f} ms  "
                  f"old/new {t_old / t_new:5.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()

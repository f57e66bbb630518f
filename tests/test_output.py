"""The scoring output's one reader (mspray.artifacts.output) against the readers it replaced."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mspray import storage
from mspray.artifacts.output import (
    PART_COLUMN,
    error_units,
    is_part,
    list_parts,
    map_uri,
    read_results,
    result_schema,
    write_part,
)
from mspray.report import build_report, read_rows

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_report_read.py"


@pytest.fixture(scope="module")
def bench():
    """benchmarks/bench_report_read.py: its output writer and the old readers."""
    spec = importlib.util.spec_from_file_location("bench_report_read", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _other_scales_part(out: str) -> str:
    """A part of a model with other scales, written before parts had a ``model`` column."""
    schema = pa.schema([f for f in result_schema((8,)) if f.name != "model"])
    rows = [{"path": "/archive/x/old.png", "image_score": 3.0, "score_8": 3.0},
            {"path": "/archive/x/bad.png", "error": "/archive/x/bad.png: empty file"}]  # fmt: skip
    return write_part(out, pa.Table.from_pylist(rows, schema=schema))


def test_one_scan_reads_what_the_old_readers_read(tmp_path, bench):
    out = str(tmp_path / "scores")
    bench.make_output(out, parts=7, rows=40)  # + a run summary, a heatmap, a temp file
    _other_scales_part(out)
    # a Parquet file that is not a part: the old report read it, a rerun did not
    pq.write_table(pa.table({"path": ["/elsewhere.png"], "note": ["x"]}), f"{out}/notes.parquet")
    assert len(list_parts(out)) == 8 and not is_part("notes.parquet")

    new = read_results(out, with_part=True)
    old = bench.old_read_rows(out)
    old = old.filter(pa.compute.not_equal(old.column("_part"), "notes.parquet")).drop(["note"])
    assert new.num_rows == old.num_rows == 7 * 40 + 2
    assert set(new.column_names) == set(old.column_names) - {"_part"} | {PART_COLUMN}
    for name in old.column_names:  # same rows in the same order, column by column
        assert new.column(PART_COLUMN if name == "_part" else name).equals(old.column(name)), name
    assert read_rows(out).equals(new)  # what the report reads
    assert "score_8" in new.column_names and "score_64" in new.column_names

    units = error_units(out)
    assert units == bench.old_error_units(out) and len(units) >= 2
    assert (["/archive/x/bad.png", "/archive/x/old.png"], None) in [
        (sorted(p), m) for p, m in units
    ]
    # only the columns asked for; one no part has is null
    t = read_results(out, ["path", "nonexistent"])
    assert t.column_names == ["path", "nonexistent"] and t.column(1).null_count == t.num_rows
    # and the report counts the parts' rows only
    page = storage.read_text(build_report(out, top_k=2))
    assert f'data-stat="rows">{7 * 40 + 2:,}<' in page and "/elsewhere.png" not in page


def test_no_output_yet_reads_as_no_rows(tmp_path):
    assert read_results(str(tmp_path / "none"), ["path"]).num_rows == 0
    assert read_results(str(tmp_path / "none"), with_part=True).column_names == [
        "path",
        PART_COLUMN,
    ]
    assert error_units(str(tmp_path / "none")) == []


def test_heatmaps_spread_over_hashed_prefixes_and_keep_the_input_path():
    inp, out = "s3://archive/line1", "s3://scores/line1"
    paths = [f"{inp}/2024-03-07/cam0/{i:05d}.png" for i in range(2000)]
    maps = [map_uri(out, inp, p) for p in paths]
    # one folder of images: 256 prefixes under _maps/, not one (S3 PUTs/s are per prefix)
    prefixes = {m[len(f"{out}/_maps/") :].split("/", 1)[0] for m in maps}
    assert len(prefixes) == 256 and all(len(h) == 2 for h in prefixes)
    for p, m in zip(paths, maps, strict=True):  # the panel still names its image
        assert m.endswith(f"/{p[len(inp) + 1 :]}.png")
    assert map_uri(out, inp, paths[0]) == maps[0]  # the same path, the same key
    with pytest.raises(ValueError, match="not under the input prefix"):
        map_uri(out, inp, "s3://archive/other/x.png")

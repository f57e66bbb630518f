"""The scoring output's layout (mspray.artifacts.output) as batch scoring uses it (no Ray)."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pyarrow as pa

from mspray.artifacts.output import (
    expand_date,
    list_parts,
    map_uri,
    part_name,
    read_results,
    result_schema,
    write_part,
    write_run_summary,
)
from mspray.ray.data.inputs import InputRules, list_level
from mspray.ray.data.scoring import _write_report
from mspray.report import build_report


def test_part_name_depends_only_on_the_set_of_paths():
    a = part_name(["s3://b/x/1.png", "s3://b/x/2.png"])
    assert a == part_name(["s3://b/x/2.png", "s3://b/x/1.png"])
    assert a != part_name(["s3://b/x/1.png"])
    assert a.startswith("part-") and a.endswith(".parquet")


def test_expand_date_fills_templates_and_leaves_other_text():
    d = dt.date(2024, 3, 7)
    assert expand_date("s3://b/archive/{date}/", d) == "s3://b/archive/2024-03-07/"
    assert expand_date("/x/{year}/{month}/{day}/{other}", d) == "/x/2024/03/07/{other}"
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    assert expand_date("{date}") == today


def test_parts_are_the_only_files_dataset_readers_see(tmp_path):
    out = str(tmp_path / "out")
    schema = result_schema((32, 16))
    now = dt.datetime.now(dt.timezone.utc)
    rows = [
        {
            "path": "/in/a.png",
            "image_score": 1.5,
            "is_anomalous": True,
            "score_32": 0.1,
            "score_16": 0.2,
            "threshold": 1.0,
            "model_version": "v1",
            "scored_at": now,
            "map_path": map_uri(out, "/in", "/in/a.png"),
        },
        {
            "path": "/in/b.png",
            "threshold": 1.0,
            "model_version": "v1",
            "scored_at": now,
            "error": "/in/b.png: empty file",
        },
    ]
    uri = write_part(out, pa.Table.from_pylist(rows, schema=schema))
    write_run_summary(out, {"scored": 2})
    (tmp_path / "out" / "_maps").mkdir(exist_ok=True)
    (tmp_path / "out" / "_maps" / "a.png.png").write_bytes(b"\x89PNG not parquet")
    (tmp_path / "out" / ".part-x.parquet.tmp").write_bytes(b"half a part")  # killed write
    assert list_parts(out) == [uri]
    assert build_report(out).endswith("_report.html")
    df = pd.read_parquet(out)  # dataset discovery skips _maps, _runs, _report.html, temp files
    assert sorted(df["path"]) == ["/in/a.png", "/in/b.png"]
    err = df.set_index("path").loc["/in/b.png"]
    assert pd.isna(err["image_score"]) and err["error"].endswith("empty file")
    assert read_results(out, ["path"]).num_rows == 2
    assert read_results(str(tmp_path / "nothing"), ["path"]).num_rows == 0
    assert map_uri(out, "/in", "/in/sub/c.jpg").startswith(f"{out}/_maps/")
    assert map_uri(out, "/in", "/in/sub/c.jpg").endswith("/sub/c.jpg.png")


def test_a_report_that_cannot_be_written_is_a_warning_not_a_failed_run(tmp_path, caplog):
    _write_report(str(tmp_path / "gone"))  # e.g. the output folder was removed meanwhile
    (rec,) = [r for r in caplog.records if "could not write the report" in r.getMessage()]
    assert rec.levelname == "WARNING" and "mspray report" in rec.getMessage()


def test_output_inside_the_input_prefix_is_not_scored(tmp_path):
    for name in ("a.png", "sub/b.png", "out/_maps/a.png.png", "output2/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    rules = InputRules(str(tmp_path), str(tmp_path / "out"))
    rows, _ = list_level(str(tmp_path), rules, recursive=True)
    found = rows.column("path").to_pylist()
    assert [p[len(str(tmp_path)) + 1 :] for p in found] == ["a.png", "output2/c.png", "sub/b.png"]

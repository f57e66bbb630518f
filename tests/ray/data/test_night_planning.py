"""Planning a night without the driver holding the archive: manifest rows (S3 Inventory,
paths, relative keys) become input rows in Ray Data tasks, the already-scored check is a
hashed anti-join over only the parts that matter, ``--modified-since last-run`` starts
where the last complete run left off. These call the task functions directly (no Ray)."""

from __future__ import annotations

import datetime as dt
import json
import os

import pyarrow as pa
import pytest

from mspray import storage
from mspray.artifacts.output import last_run_until, resolve_since, result_schema, write_part
from mspray.ray.data.inputs import InputRules, manifest_rows
from mspray.ray.data.pending import build_index, part_files, path_hashes, unit_rows

UTC = dt.timezone.utc
DAY1 = dt.datetime(2026, 12, 1, 2, 0, tzinfo=UTC)
DAY2 = dt.datetime(2026, 12, 2, 2, 0, tzinfo=UTC)


def test_an_s3_inventory_report_becomes_image_paths_with_their_times():
    rules = InputRules("s3://line1/archive", "s3://line1/archive/scores", model="default")
    inventory = pa.table(
        {
            "bucket": ["line1"] * 5,
            "key": [
                "archive/cam0/a.png",
                "archive/cam1/b.JPG",
                "archive/readme.txt",
                "archive/scores/_maps/00/cam0/a.png.png",
                "archive/cam0/",
            ],  # fmt: skip
            "size": [10, 10, 10, 10, 0],
            "last_modified_date": [DAY1, DAY2, DAY2, DAY2, DAY1],
        }
    )
    rows = manifest_rows(inventory, rules, "inv.parquet").to_pylist()
    # images only (by suffix), nothing under the output, every row the single bundle's
    want = ["s3://line1/archive/cam0/a.png", "s3://line1/archive/cam1/b.JPG"]
    assert [r["path"] for r in rows] == want
    assert [r["model"] for r in rows] == ["default", "default"]
    assert [r["modified"] for r in rows] == [DAY1, DAY2]
    # --modified-since: only what changed at or after it
    since = InputRules(rules.input_root, rules.output, since=DAY2, model="default")
    assert [r["path"] for r in manifest_rows(inventory, since, "inv").to_pylist()] == [
        "s3://line1/archive/cam1/b.JPG"
    ]


def test_path_and_key_manifests_and_a_fleets_model_column(tmp_path):
    root = str(tmp_path / "in")
    fleet = InputRules(root, str(tmp_path / "out"), named=True)
    table = pa.table(
        {
            "path": ["cam0/a.png", f"{root}/cam1/b.png", "s3://other/c.png"],
            "model": ["screw", "nut", None],
        }  # fmt: skip
    )
    rows = manifest_rows(table, fleet, "m.csv").to_pylist()
    want = [f"{root}/cam0/a.png", f"{root}/cam1/b.png", "s3://other/c.png"]
    assert [r["path"] for r in rows] == want
    assert [r["model"] for r in rows] == ["screw", "nut", None]
    keys = pa.table(
        {"key": ["cam0/a.png", "cam0/notes.json"], "last_modified": ["2026-12-02", None]}
    )
    since = InputRules(root, str(tmp_path / "out"), since=DAY1, model="m")
    got = [r["path"] for r in manifest_rows(keys, since, "k").to_pylist()]
    assert got == [f"{root}/cam0/a.png"]
    with pytest.raises(ValueError, match="needs a path column"):
        manifest_rows(pa.table({"file": ["a.png"]}), since, "bad.csv")


def _part(out: str, paths: list[str], version: str, when: dt.datetime | None = None) -> str:
    schema = result_schema([32])
    rows = [{"path": p, "model_version": version} for p in paths]
    uri = write_part(out, pa.Table.from_pylist(rows, schema=schema))
    if when is not None:
        os.utime(uri, (when.timestamp(), when.timestamp()))
    return uri


def test_the_scored_index_counts_rows_and_reads_only_the_parts_since(tmp_path):
    out = str(tmp_path / "out")
    old = [f"/in/old/{i}.png" for i in range(300)]
    _part(out, old[:200], "v1", DAY1)
    _part(out, old[200:], "v2", DAY1)
    new = _part(out, ["/in/new/0.png", "/in/old/7.png"], "v2", DAY2 + dt.timedelta(hours=1))
    index = build_index(out)
    asked = ["/in/old/3.png", "/in/old/7.png", "/in/new/0.png", "/in/never.png"]
    counts, codes = index.counts(path_hashes(pa.array(asked)))
    assert counts.tolist() == [1, 2, 1, 0]  # old/7 is in two parts: a duplicate
    assert [index.versions[c] if c >= 0 else None for c in codes][0] == "v1"
    assert (index.parts, len(index.hi)) == (3, 302)
    # since DAY2: only the part written after it is read, the old ones are not
    assert part_files(out, DAY2) == [storage.filesystem(new)[1]]
    since = build_index(out, DAY2)
    assert (since.parts, since.counts(path_hashes(pa.array(asked)))[0].tolist()) == (
        1,
        [0, 1, 1, 0],
    )


def test_units_hold_one_model_each_and_at_most_size_paths():
    batch = pa.table(
        {
            "path": [f"p{i}" for i in range(7)],
            "model": ["a", "b", "a", None, "a", "b", "zzz"],
        }  # fmt: skip
    )
    units = unit_rows(batch, 2, {"a": 64, "b": 32}).to_pylist()
    got = sorted((u["model"], tuple(u["paths"]), u["size"]) for u in units if u["model"])
    assert got == [("a", ("p0", "p2"), 64), ("a", ("p4",), 64), ("b", ("p1", "p5"), 32),
                   ("zzz", ("p6",), 0)]  # fmt: skip
    assert [u for u in units if u["model"] is None] == [{"paths": ["p3"], "model": None, "size": 0}]


def _run(out: str, stamp: str, **fields) -> None:
    storage.write_text(f"{out}/_runs/{stamp}-abc.json", json.dumps(fields))


def test_last_run_is_where_the_newest_complete_run_left_off(tmp_path):
    out = str(tmp_path / "out")
    assert last_run_until(out) is None and resolve_since("last-run", out) is None
    _run(out, "20261201T030000Z", missing=0, failed_units=0, modified_until=str(DAY1))
    _run(out, "20261202T030000Z", missing=0, failed_units=0, modified_until=str(DAY2))
    _run(out, "20261203T030000Z", missing=4, failed_units=1, modified_until="2026-12-03")
    # the newest run left 4 images without a row: the next starts where the one before ended
    assert last_run_until(out) == DAY2
    assert resolve_since("last-run", out) == DAY2 - dt.timedelta(hours=1)
    assert resolve_since("2026-12-02", out) == dt.datetime(2026, 12, 2, tzinfo=UTC)
    with pytest.raises(ValueError, match="expected YYYY-MM-DD"):
        resolve_since("yesterday", out)


def test_the_parallel_listing_finds_what_a_recursive_listing_does(ray_local, tmp_path):
    from mspray.ray.data import inputs

    inp, out = tmp_path / "in", tmp_path / "in" / "scores"
    for d in range(3):
        for c in range(3):
            for i in range(4):
                (inp / f"day{d}" / f"cam{c}").mkdir(parents=True, exist_ok=True)
                (inp / f"day{d}" / f"cam{c}" / f"{i}.png").write_bytes(b"x")
    (inp / "top.jpg").write_bytes(b"x")
    (inp / "day0" / "notes.txt").write_bytes(b"x")
    (out / "_maps" / "00").mkdir(parents=True)
    (out / "_maps" / "00" / "a.png.png").write_bytes(b"x")  # the output's own heatmap
    rules = InputRules(str(inp), str(out), model="default")
    want = [p for p in storage.list_files(str(inp)) if not p.startswith(str(out))]
    rows = inputs.listing_dataset(rules).take_all()
    assert sorted(r["path"] for r in rows) == want and len(want) == 37
    assert {r["model"] for r in rows} == {"default"}
    # --modified-since: by the files' own times
    new = inp / "day2" / "cam1" / "0.png"
    for p in (p for p in inp.rglob("*") if p.is_file()):
        os.utime(p, (DAY1.timestamp(), DAY1.timestamp()))
    os.utime(new, (DAY2.timestamp(), DAY2.timestamp()))
    since = InputRules(str(inp), str(out), since=DAY2, model="default")
    assert [r["path"] for r in inputs.listing_dataset(since).take_all()] == [str(new)]


def test_a_dry_run_plans_from_a_manifest_and_writes_nothing(ray_local, tmp_path):
    from mspray.cli import main

    inp, out = tmp_path / "in", tmp_path / "out"
    keys = [f"cam{i % 3}/{i:03d}.png" for i in range(50)]
    pq_path = tmp_path / "manifest.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": keys + ["cam0/readme.txt"]}), pq_path)
    _part(str(out), [f"{inp}/{k}" for k in keys[:20]], "v1")
    before = sorted(p.name for p in out.iterdir())
    summary = tmp_path / "plan.json"
    cli = ["-q", "score", "--bundle", str(tmp_path / "not-read"), "--input", str(inp),
           "--output", str(out), "--input-manifest", str(pq_path), "--dry-run",
           "--part-size", "8", "--summary-json", str(summary)]  # fmt: skip
    assert main(cli) == 0
    s = json.loads(summary.read_text())
    assert (s["images"], s["skipped"], s["pending"], s["units"]) == (50, 20, 30, 4)
    assert (s["scored"], s["parts"]) == (0, 0)
    assert sorted(p.name for p in out.iterdir()) == before  # no lease, no run record

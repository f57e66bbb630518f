"""Two scoring runs on one output never duplicate rows (the output lease), a crashed run's
lease is taken over, and input keys with ``.``/``..`` segments are never followed."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter

import boto3
import pytest

from mspray import storage
from mspray.artifacts.bundle import load_bundle, save_bundle
from mspray.artifacts.lease import Lease, LeaseHeld
from mspray.artifacts.output import map_uri, read_results
from mspray.config import PoolConfig
from mspray.config.runs import ScoreRun
from mspray.ray.data.reading import unsafe_key_error
from mspray.ray.data.scoring import score_prefix


def _inputs(spec: str, base: str, n: int | None = None) -> list[str]:
    """Copy (the first ``n``) synthetic test images under ``base``; returns their URIs."""
    root = spec.split(":", 1)[1]
    good = storage.list_files(os.path.join(root, "synthetic", "test"))[:n]
    out = []
    for i, p in enumerate(good):
        uri = storage.join(base, f"cam{i % 2}", f"{i:03d}.png")
        storage.write_bytes(uri, storage.read_bytes(p))
        out.append(uri)
    return out


@pytest.mark.ray
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_runs_started_at_once_give_one_row_per_image(
    ray_local, tiny_bundle, tmp_path, where, request
):
    bundle, spec = tiny_bundle
    base = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    images = _inputs(spec, storage.join(base, "in"))
    out = storage.join(base, "scores")
    barrier = threading.Barrier(2)
    results: dict[int, object] = {}

    def run(part_size: int) -> None:
        barrier.wait()  # both start together
        try:
            # Different part sizes: without the lease the two runs would write the same
            # images into differently named parts, i.e. duplicate rows.
            results[part_size] = score_prefix(
                ScoreRun(
                    bundle=bundle,
                    input=storage.join(base, "in"),
                    output=out,
                    part_size=part_size,
                    lease_wait=600,
                ),
                pool=PoolConfig(workers=1),
            )
        except BaseException as e:  # reported below
            results[part_size] = e

    threads = [threading.Thread(target=run, args=(n,)) for n in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summaries = list(results.values())
    assert all(not isinstance(s, BaseException) for s in summaries), summaries
    # one run scored everything, the other found it all done
    assert sorted(s.scored for s in summaries) == [0, len(images)]
    assert sorted(s.skipped for s in summaries) == [0, len(images)]
    counts = Counter(read_results(out, ["path"]).column("path").to_pylist())
    assert counts == Counter(storage.normalize(u) for u in images)  # exactly one row each
    assert all(s.duplicates == 0 and s.missing == 0 for s in summaries)
    _, rec = Lease(out).current()
    assert rec.released  # released at the end


def test_a_run_on_a_held_output_exits_naming_the_holder(tiny_bundle, tmp_path, capsys):
    """No Ray needed: the lease is taken before anything is read or started."""
    from mspray.cli import main

    bundle, spec = tiny_bundle
    _inputs(spec, str(tmp_path / "in"))
    out = str(tmp_path / "scores")
    with Lease(out, purpose="the nightly job") as holder:
        args = ["-q", "score", "--bundle", bundle, "--input", str(tmp_path / "in"),
                "--output", out]  # fmt: skip
        assert main(args) == 3
        err = capsys.readouterr().err
        assert holder.owner in err and "the nightly job" in err and "--lease-wait" in err
        with pytest.raises(LeaseHeld):
            score_prefix(
                ScoreRun(bundle=bundle, input=str(tmp_path / "in"), output=out, lease_wait=0.2)
            )
    assert not list((tmp_path / "scores").glob("part-*"))


def test_the_lease_is_released_when_a_run_fails(tiny_bundle, tmp_path):
    bundle, _ = tiny_bundle
    out = str(tmp_path / "scores")
    with pytest.raises(FileNotFoundError, match="no-such-input"):
        score_prefix(ScoreRun(bundle=bundle, input=str(tmp_path / "no-such-input"), output=out))
    gen, rec = Lease(out).current()
    assert gen == 0 and rec.released
    Lease(out).acquire().release()  # the next run starts at once


@pytest.mark.ray
def test_stale_lease_of_a_crashed_run_is_taken_over(ray_local, tiny_bundle, tmp_path):
    bundle, spec = tiny_bundle
    images = _inputs(spec, str(tmp_path / "in"))
    out = tmp_path / "scores"
    crashed = {"owner": "node-7:1234:abcd", "acquired_at": time.time() - 900,
               "expires_at": time.time() - 600, "ttl_s": 300.0,
               "purpose": "killed run", "released": False}  # fmt: skip
    (out / "_lease").mkdir(parents=True)
    record = out / "_lease" / f"{0:012d}.json"
    record.write_text(json.dumps(crashed))
    # last renewed 600 s ago by the storage's clock (the file's mtime), which decides expiry
    os.utime(record, (time.time() - 600, time.time() - 600))
    s = score_prefix(
        ScoreRun(bundle=bundle, input=str(tmp_path / "in"), output=str(out)),
        pool=PoolConfig(workers=1),
    )
    assert s.scored == len(images) and s.duplicates == 0
    gen, rec = Lease(str(out)).current()
    assert gen == 1 and rec.released and rec.owner != crashed["owner"]
    assert [p.name for p in (out / "_lease").iterdir()] == [f"{1:012d}.json"]


def test_unsafe_key_segments():
    root = "s3://b/in"
    assert unsafe_key_error("s3://b/in/cam0/x.png", root) is None
    assert unsafe_key_error("s3://b/in/..x/x..png", root) is None  # dots inside names are fine
    for bad in ("s3://b/in/../x.png", "s3://b/in/a/./x.png", "s3://b/in/a//x.png"):
        assert "rejected" in unsafe_key_error(bad, root)
    assert "not under" in unsafe_key_error("s3://b/other/x.png", root)


@pytest.mark.ray
def test_keys_with_dot_segments_get_error_rows_and_are_never_followed(
    ray_local, tiny_bundle, s3_bucket, s3_server
):
    local_bundle, spec = tiny_bundle
    bundle = f"{s3_bucket}/models/tiny"
    save_bundle(load_bundle(local_bundle), bundle)
    good = _inputs(spec, f"{s3_bucket}/in", n=2)
    png = storage.read_bytes(good[0])
    # S3 keys are plain strings: these exist as listed. pyarrow would read
    # "in/../outside.png" as "outside.png", a real image outside the input prefix.
    s3 = boto3.client("s3", endpoint_url=s3_server)
    name = s3_bucket[len("s3://") :]
    storage.write_bytes(f"{s3_bucket}/outside.png", png)
    for key in ("in/../outside.png", "in/./cam0/dot.png", "in/cam1//double.png"):
        s3.put_object(Bucket=name, Key=key, Body=png)
    out = f"{s3_bucket}/scores"
    s = score_prefix(
        ScoreRun(bundle=bundle, input=f"{s3_bucket}/in", output=out, maps=True),
        pool=PoolConfig(workers=1),
    )
    assert (s.images, s.errors, s.missing, s.duplicates) == (5, 3, 0, 0)
    df = read_results(out).to_pandas().set_index("path")
    bad = df[df["error"].notna()]
    assert sorted(bad.index) == sorted(
        f"{s3_bucket}/{k}"
        for k in ("in/../outside.png", "in/./cam0/dot.png", "in/cam1//double.png")
    )
    assert bad["error"].str.contains("rejected").all() and bad["image_score"].isna().all()
    assert df.loc[good, "error"].isna().all()
    # no heatmap was written outside OUTPUT/_maps/
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=name)["Contents"]]
    assert sorted(k for k in keys if k.endswith(".png.png")) == sorted(
        map_uri(f"{s3_bucket}/scores", f"{s3_bucket}/in", g)[len(s3_bucket) + 1 :] for g in good
    )

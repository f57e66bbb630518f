"""Three nights of a growing archive on a real S3 server (moto), as a nightly job runs them:
an S3 Inventory report of a few thousand keys under several prefixes is scored; the next
night only the keys added since (``--modified-since last-run``); the third night again,
with S3 throttling (503 SlowDown) injected on its keys through the fault-injecting proxy
(``tests/ray/faulty_s3.py``), and nothing is lost or scored twice."""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faulty_s3 import FaultyS3Proxy

from mspray import storage
from mspray.artifacts import output
from mspray.artifacts.output import map_uri, read_results
from mspray.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.slow]

#: Night 1: 2,000 keys: images under 4 prefixes and the sidecar files an archive holds
#: beside them (few images: the planning is what is tested, and CI has 2 cores).
CAMERAS, PER_CAMERA, OTHER_KEYS = 4, 100, 1600
NEW_PER_NIGHT = 40
LATE = 10


def _upload(s3, bucket: str, keys: list[str], images: list[bytes]) -> None:
    def put(i_key: tuple[int, str]) -> None:
        i, key = i_key
        body = images[i % len(images)] if key.endswith(".png") else b'{"exposure": 1}'
        s3.put_object(Bucket=bucket, Key=key, Body=body)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, enumerate(keys)))


def _inventory(s3, bucket: str, name: str) -> str:
    """An S3 Inventory report (Parquet: bucket, key, size, last_modified_date) of the
    archive, written beside it, as S3 delivers one every night."""
    rows = [
        {
            "bucket": bucket,
            "key": o["Key"],
            "size": o["Size"],
            "last_modified_date": o["LastModified"],
        }  # fmt: skip
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="archive/")
        for o in page.get("Contents", [])
    ]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    uri = f"s3://{bucket}/inventory/{name}/data.parquet"
    storage.write_bytes(uri, buf.getvalue())
    return uri


def test_three_nights_from_an_inventory_score_each_image_once(
    ray_exclusive, s3_server, s3_bucket, tiny_bundle, monkeypatch, tmp_path
):
    import ray

    bundle, spec = tiny_bundle
    root = spec.split(":", 1)[1]
    images = [storage.read_bytes(p) for p in storage.list_files(f"{root}/synthetic/test")]
    s3, bucket = boto3.client("s3", endpoint_url=s3_server), s3_bucket[len("s3://") :]
    inp, out = f"{s3_bucket}/archive", f"{s3_bucket}/scores"
    night1 = [f"archive/cam{c}/{i:04d}.png" for c in range(CAMERAS) for i in range(PER_CAMERA)]
    night1 += [f"archive/cam{i % CAMERAS}/{i:04d}.json" for i in range(OTHER_KEYS)]
    assert len(night1) == 2000
    # the night's last LATE images a moment after the rest: the inventory's latest time
    # (where night 2 starts) is theirs alone
    _upload(s3, bucket, night1[LATE:], images)
    time.sleep(1.5)
    _upload(s3, bucket, night1[:LATE], images)
    monkeypatch.setattr(output, "LAST_RUN_MARGIN", output.dt.timedelta(0))  # exact windows

    with FaultyS3Proxy(s3_server) as proxy:
        # the driver and every Ray worker talk to S3 through the proxy
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        ray.init(address="local", num_cpus=8, include_dashboard=False,
                 runtime_env={"env_vars": {"AWS_ENDPOINT_URL": proxy.endpoint}})  # fmt: skip

        def night(name: str, *extra: str) -> dict:
            summary = tmp_path / f"{name}.json"
            cli = ["-q", "score", "--bundle", bundle, "--input", inp, "--output", out,
                   "--input-manifest", _inventory(s3, bucket, name),
                   "--modified-since", "last-run", "--workers", "2",
                   "--summary-json", str(summary), *extra]  # fmt: skip
            assert main(cli) == 0
            s = json.loads(summary.read_text())
            assert (s["missing"], s["duplicates"], s["failed_units"]) == (0, 0, 0)
            return s

        s = night("night1")
        n1 = CAMERAS * PER_CAMERA
        assert (s["images"], s["scored"], s["skipped"], s["errors"]) == (n1, n1, 0, 0)

        # night 2: new keys under an old and a new prefix; only they are scored
        night2 = [
            f"archive/cam{c}/n2-{i:03d}.png" for c in (0, 9) for i in range(NEW_PER_NIGHT // 2)
        ]
        _upload(s3, bucket, night2, images)
        s = night("night2")
        assert s["scored"] == NEW_PER_NIGHT and s["images"] - s["skipped"] == NEW_PER_NIGHT
        # the old keys were not planned again (those of night 1's latest time are, and skipped)
        assert NEW_PER_NIGHT <= s["images"] <= NEW_PER_NIGHT + LATE

        # night 3: throttled. Every key of the night (its images, parts, heatmaps, run
        # record, lease) is answered 503 SlowDown on its first request
        night3 = [f"archive/cam5/n3-{i:03d}.png" for i in range(NEW_PER_NIGHT)]
        _upload(s3, bucket, night3, images)
        proxy.faults = lambda method, key, n: (
            "slowdown" if n == 1 and ("/cam5/" in key or "/scores/" in key) else None
        )
        s = night("night3", "--maps")
        assert s["scored"] == NEW_PER_NIGHT and s["errors"] == 0
        assert proxy.injected["slowdown"] >= 2 * NEW_PER_NIGHT  # the reads and the panels
        ray.shutdown()

    # every image of the three nights has exactly one row; night 3's have their heatmaps
    df = read_results(out).to_pandas()
    want = {f"s3://{bucket}/{k}" for k in night1 + night2 + night3 if k.endswith(".png")}
    assert Counter(df["path"]) == Counter(want)
    for path, map_path in df.dropna(subset=["map_path"])[["path", "map_path"]].values:
        assert "/cam5/" in path and map_path == map_uri(out, inp, path)
        assert storage.read_bytes(map_path)[:4] == b"\x89PNG"
    assert df["map_path"].notna().sum() == NEW_PER_NIGHT

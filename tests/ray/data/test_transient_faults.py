"""Transient faults are retried, never recorded as bad images: reads through a real S3 server
behind a fault-injecting proxy (``tests/ray/faulty_s3.py``: 503 SlowDown, reset
connections, truncated downloads, deterministic by request count), scoring on the
simulated cluster, and model failures (CUDA out of memory) in the scoring actor."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from faulty_s3 import FaultyS3Proxy

from mspray import storage
from mspray.artifacts.output import list_parts, read_results
from mspray.cli import main
from mspray.config import ScoreConfig
from mspray.ray.data import reading
from mspray.ray.data.plan import ScoringPlan
from mspray.ray.data.reading import UNIT_SCHEMA, decode_unit, load_checked, to_uint8
from mspray.ray.data.scorer import UnitScorer
from mspray.storage import S3_ATTEMPTS

pytestmark = pytest.mark.ray

LIMITS = ScoreConfig(max_image_bytes=100_000)
#: More consecutive faults than the S3 client's own attempts (storage.S3_ATTEMPTS), so
#: they reach our retry; fewer than twice that, so our second attempt gets through.
BURST = S3_ATTEMPTS + 1
BAD_ERRORS = {
    "zero.png": "empty file",
    "truncated.png": "cannot decode",
    "not_an_image.jpg": "cannot decode",
    "bomb.png": "decompression bomb",
    "huge.png": "over the limit",
}


def _burst_rule(stuck: set[str]):
    """Each input key's first BURST requests fail, the kind of fault rotating by key (503 on
    the HEAD, reset or truncated GETs); keys in ``stuck`` answer 503 to every request."""
    kinds = ("slowdown", "reset", "truncate")

    def rule(method: str, key: str, n: int) -> str | None:
        name = key.rsplit("/", 1)[-1]
        if "/in/" not in key:
            return None
        if name in stuck:
            return "slowdown"
        kind = kinds[sum(name.encode()) % 3]
        wanted = "HEAD" if kind == "slowdown" else "GET"
        return kind if method == wanted and n <= BURST else None

    return rule


def _upload(bucket: str, png_bytes, bad_inputs, n_good: int) -> tuple[str, list[str]]:
    inp = f"{bucket}/in"
    for i in range(n_good):
        storage.write_bytes(f"{inp}/good{i:02d}.png", png_bytes((40, 30), seed=i))
    for name, data in bad_inputs.items():
        storage.write_bytes(f"{inp}/{name}", data)
    return inp, sorted(storage.list_files(inp))


def test_reads_through_s3_faults_are_retried_and_bad_files_stay_bad(
    s3_server, s3_bucket, bad_inputs, png_bytes, monkeypatch
):
    inp, uris = _upload(s3_bucket, png_bytes, bad_inputs, 6)
    want = {u: load_checked(u, 32, LIMITS) for u in uris if "/good" in u}  # no faults yet
    monkeypatch.setattr(reading, "READ_BACKOFF_S", 0.05)
    with FaultyS3Proxy(s3_server, _burst_rule(stuck={"good05.png"})) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        with ThreadPoolExecutor(8) as pool:
            ok = decode_unit([u for u in uris if "good05" not in u], 32, LIMITS, pool)
            stuck = decode_unit([f"{inp}/good00.png", f"{inp}/good05.png"], 32, LIMITS, pool)
    assert set(proxy.injected) == {"slowdown", "reset", "truncate"}
    # every fault burst outlasted the S3 client's retries: the read layer retried them
    assert ok["failure"] is None
    errors = dict(zip(ok["paths"], ok["errors"], strict=True))
    for name, text in BAD_ERRORS.items():
        assert text in errors.pop(f"{inp}/{name}")  # bad files: their own error, still
    assert all(e is None for e in errors.values())  # good files: never marked bad
    images = np.frombuffer(ok["images"], np.uint8).reshape(-1, 3, 32, 32)
    good = [u for u in ok["paths"] if "/good" in u]
    assert torch.equal(
        torch.from_numpy(images.copy()), to_uint8(torch.stack([want[u] for u in good]))
    )
    # a key that never recovers fails its whole unit (no error row), naming the file
    assert stuck["failure"] is not None and "good05.png" in stuck["failure"]
    assert "503" in stuck["failure"] and stuck["images"] == b""


@pytest.fixture(scope="module")
def faulty_proxy(s3_server):
    """The proxy in front of the session's S3 server; tests set its ``faults``."""
    with FaultyS3Proxy(s3_server) as proxy:
        yield proxy


@pytest.mark.slow
def test_scoring_through_s3_faults_loses_nothing_and_marks_nothing_bad_wrongly(
    sim_connect, faulty_proxy, tiny_bundle, s3_bucket, bad_inputs, png_bytes, tmp_path
):
    bundle, _ = tiny_bundle
    # the bundle's own byte limit (50 MB) applies: huge.png (270 kB) is not bad here
    bad_inputs = {k: v for k, v in bad_inputs.items() if k != "huge.png"}
    inp, uris = _upload(s3_bucket, png_bytes, bad_inputs, 12)
    out = f"{s3_bucket}/out"
    stuck = {"good05.png"}  # its unit (good03-good06) holds no bad file
    faulty_proxy.faults = _burst_rule(stuck)
    # only the cluster's workers (decode tasks, scoring actors) go through the proxy
    env = {"AWS_ENDPOINT_URL": faulty_proxy.endpoint}
    # --shared-fs: the bundle is a local folder, which the simulated nodes share
    cli = ["-q", "score", "--bundle", bundle, "--input", inp, "--output", out,
           "--part-size", "4", "--gpus-per-worker", "1", "--shared-fs"]  # fmt: skip
    summary = tmp_path / "summary.json"
    with sim_connect(env):
        assert main([*cli, "--summary-json", str(summary)]) == 1  # a unit failed: exit 1
        s = json.loads(summary.read_text())
        assert set(faulty_proxy.injected) == {"slowdown", "reset", "truncate"}
        # the unit of the key that never recovered failed: no part, no error rows
        assert s["failed_units"] == 1 and s["missing"] == 4 and s["duplicates"] == 0
        assert s["errors"] == len(bad_inputs) and len(list_parts(out)) == s["parts"]
        df = read_results(out).to_pandas().set_index("path")
        assert f"{inp}/good05.png" not in df.index
        for name in bad_inputs:
            assert BAD_ERRORS[name] in df.loc[f"{inp}/{name}", "error"]
        assert df["error"].notna().sum() == len(bad_inputs)  # no good image marked bad

        stuck.clear()  # S3 recovers: a plain rerun scores the failed unit
        assert main(cli) == 0
        df = read_results(out).to_pandas().set_index("path")
        assert sorted(df.index) == uris and df.index.is_unique  # nothing lost, no duplicate
        assert df["error"].notna().sum() == len(bad_inputs)

        # a bad file is replaced by a good one: --retry-errors rescores the parts with
        # error rows (rewritten under the same names), a plain rerun does not
        storage.write_bytes(f"{inp}/zero.png", png_bytes((40, 30), seed=99))
        parts = sorted(list_parts(out))
        assert main(cli) == 0
        assert read_results(out).to_pandas().set_index("path").loc[f"{inp}/zero.png", "error"]
        assert main([*cli, "--retry-errors"]) == 0
        df = read_results(out).to_pandas().set_index("path")
        assert sorted(list_parts(out)) == parts  # same parts, rewritten
        assert sorted(df.index) == uris and df.index.is_unique
        assert pd.isna(df.loc[f"{inp}/zero.png", "error"])
        assert df.loc[f"{inp}/zero.png", "image_score"] > 0
        assert df["error"].notna().sum() == len(bad_inputs) - 1


class _FailingModel:
    """Fault injection on the real detector: its first ``failures`` forward passes raise
    CUDA out-of-memory, the later ones run the model."""

    def __init__(self, det, failures: int) -> None:
        self.det, self.left, self.calls = det, failures, 0

    def __call__(self, images: torch.Tensor, timings: dict | None = None):
        self.calls += 1
        if self.left:
            self.left -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return self.det.predict_unwrapped(images, timings)


def _unit(uris: list[str], size: int) -> dict:
    with ThreadPoolExecutor(2) as pool:
        row = decode_unit(uris, size, ScoreConfig(), pool)
    row = {**row, "decoder": "local", "model": "default"}
    return pa.Table.from_pylist([row], schema=UNIT_SCHEMA).to_pylist()[0]


def test_model_failures_are_retried_then_fail_the_unit_without_error_rows(
    ray_local, tiny_bundle, tmp_path, png_bytes, monkeypatch
):
    from mspray.ray.data import scorer as scoring

    bundle, _ = tiny_bundle
    uris = []
    for i in range(6):
        (tmp_path / "in" / f"{i}.png").parent.mkdir(exist_ok=True)
        (tmp_path / "in" / f"{i}.png").write_bytes(png_bytes((40, 30), seed=i))
        uris.append(str(tmp_path / "in" / f"{i}.png"))
    monkeypatch.setattr(scoring, "MODEL_BACKOFF_S", 0.01)
    out = tmp_path / "out"
    plan = ScoringPlan.build(bundle, str(tmp_path / "in"), str(out))
    cfg = plan.first.cfg
    scorer = UnitScorer(plan, bundle=plan.first.uri, config_json=cfg.to_json(), cpus=1, gpus=0)
    unit = _unit(uris, cfg.model.image_size)
    det = scorer.det
    det.predict_unwrapped = det.predict

    # the batch and then one image alone fail once: the unit is retried and scores
    det.predict = _FailingModel(det, failures=2)
    summary = scorer.score_unit(unit)
    assert summary["failure"] is None and summary["errors"] == 0 and summary["images"] == 6
    assert read_results(str(out))["error"].null_count == 6

    # the model keeps failing: after MODEL_ATTEMPTS the unit fails, no part, no error rows
    Path(summary["part"]).unlink()
    det.predict = failing = _FailingModel(det, failures=10**6)
    summary = scorer.score_unit(unit)
    assert summary["part"] is None and "OutOfMemoryError" in summary["failure"]
    assert failing.calls == 2 * scoring.MODEL_ATTEMPTS  # batch + first image, per attempt
    assert list_parts(str(out)) == []

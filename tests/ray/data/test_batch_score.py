"""Batch scoring on Ray Data against a real local S3 server: error rows, exact scores, and
exactly one row per image after an interrupted run is rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mspray import storage
from mspray.artifacts.bundle import load_bundle, resolve_bundle, save_bundle
from mspray.artifacts.output import map_uri, read_results
from mspray.config import PoolConfig
from mspray.config.runs import ScoreRun
from mspray.data.images import load_images
from mspray.ray.data.scoring import score_prefix
from mspray.report import REPORT_NAME

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[3]


def test_s3_to_s3_one_row_per_input_errors_marked_scores_equal_core(
    ray_local, tiny_bundle, s3_bucket, bad_inputs
):
    local_bundle, spec = tiny_bundle
    root = spec.split(":", 1)[1]
    bundle = f"{s3_bucket}/models/tiny"
    save_bundle(load_bundle(local_bundle), bundle)
    det = load_bundle(bundle)  # bundle load from S3
    # the day's archive: the synthetic test images (good and defective) plus bad files
    good = storage.list_files(os.path.join(root, "synthetic", "test"))
    inp = f"{s3_bucket}/archive/2024-03-07"
    for i, p in enumerate(good):
        storage.write_bytes(f"{inp}/cam{i % 2}/{i:03d}.png", storage.read_bytes(p))
    for name, data in bad_inputs.items():
        storage.write_bytes(f"{inp}/bad/{name}", data)
    out = f"{s3_bucket}/scores/2024-03-07"

    s = score_prefix(
        ScoreRun(bundle=bundle, input=inp, output=out, maps=True, part_size=4),
        pool=PoolConfig(workers=2),
        overrides={"score.max_image_bytes": 100_000},
    )
    n_in = len(good) + len(bad_inputs)
    assert (s.images, s.scored, s.skipped, s.errors) == (n_in, n_in, 0, len(bad_inputs))
    assert (s.missing, s.duplicates) == (0, 0)

    df = read_results(out).to_pandas().set_index("path")
    assert len(df) == n_in and df.index.is_unique
    bad = df[df.index.str.contains("/bad/")]
    assert bad["error"].notna().all() and bad["image_score"].isna().all()
    assert bad["is_anomalous"].isna().all()
    ok = df[~df.index.str.contains("/bad/")].sort_index()
    assert ok["error"].isna().all()
    assert (ok["model_version"] == det.version).all()
    assert np.allclose(ok["threshold"], det.threshold)
    # the same images through the core, in one batch: same scores
    pred = det.predict(load_images(list(ok.index), 64))
    np.testing.assert_allclose(ok["image_score"], pred.image_scores.numpy(), rtol=1e-4, atol=1e-5)
    for scale in det.scales:
        np.testing.assert_allclose(
            ok[f"score_{scale}"], pred.scale_scores[scale].numpy(), rtol=1e-4, atol=1e-6
        )
    assert (ok["is_anomalous"] == (ok["image_score"] > det.threshold)).all()
    # the run summary shows the flagged count next to what the threshold promises
    assert s.flagged == int(ok["is_anomalous"].sum())
    assert s.promised_fpr == det.meta["calibration"]["promised_fpr"]
    assert f"flagged={s.flagged} " in s.line() and "promised" in s.line()
    # ... and where the actors' time went per image, in evaluate's stage names and order
    from mspray.detector import stage_order

    stages = s.stage_seconds_per_image
    expected_order = [k for k in stage_order(det.scales) if k in stages] + ["write"]
    assert list(stages) == expected_order
    assert {"decode", "maps", "score"} | {f"search_{x}" for x in det.scales} <= set(stages)
    assert all(v > 0 for v in stages.values())
    # a heatmap per good image, next to the rows, under a hashed prefix (see output.map_uri)
    for path, map_path in ok["map_path"].items():
        assert map_path == map_uri(out, inp, path)
        assert map_path.endswith(f"/{path[len(inp) + 1 :]}.png")
        assert storage.read_bytes(map_path)[:4] == b"\x89PNG"
    (run,) = storage.list_files(f"{out}/_runs", suffixes=(".json",))
    # the run records the bundle's calibration, and writes the report page beside the rows
    recorded = json.loads(storage.read_text(run))
    assert recorded["stage_seconds_per_image"] == stages
    calibration = recorded["calibration"]
    assert calibration["version"] == det.version and calibration["threshold"] == det.threshold
    assert calibration["scores"] == det.meta["calibration_scores"]
    report = storage.read_text(f"{out}/{REPORT_NAME}")
    assert f'data-stat="rows">{n_in}<' in report and f'data-stat="errors">{len(bad)}<' in report
    # the calibration of the bundle, recorded by the run, gives the expected anomaly rate
    expected = f"{100 * det.meta['calibration']['promised_fpr']:.1f} %"
    assert f'data-stat="expected_rate" data-group="all">{expected}<' in report
    assert f"Calibration from bundle {resolve_bundle(bundle)}." in report
    top = ok["image_score"].idxmax()
    assert f'src="{map_uri(out, inp, top)[len(out) + 1 :]}"' in report

    # same day again: nothing to do
    again = score_prefix(ScoreRun(bundle=bundle, input=inp, output=out), pool=PoolConfig(workers=2))
    assert (again.scored, again.skipped, again.missing, again.duplicates) == (0, n_in, 0, 0)


def _parts(out: Path) -> list[str]:
    return [p for p in os.listdir(out) if p.startswith("part-")] if out.is_dir() else []


def test_interrupted_run_then_rerun_gives_exactly_one_row_per_image(
    ray_local, tiny_bundle, tmp_path
):
    bundle, spec = tiny_bundle
    src = storage.list_files(os.path.join(spec.split(":", 1)[1], "synthetic", "test"))
    inp = tmp_path / "archive" / "2024-03-07"
    n = 40
    for i in range(n):
        dst = inp / f"batch{i // 10}" / f"{i:03d}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(Path(src[i % len(src)]).read_bytes())
    out = tmp_path / "scores"
    address = ray_local.get_runtime_context().gcs_address
    # the nightly job entrypoint, with the {date} template of a cron line
    cmd = [sys.executable, str(REPO / "ray_jobs" / "score.py"), "-q", "--bundle", bundle,
           "--input", str(tmp_path / "archive" / "{date}"), "--output", str(out),
           "--date", "2024-03-07", "--workers", "1", "--part-size", "1",
           "--address", address, "--lease-ttl", "3"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not _parts(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        proc.send_signal(signal.SIGKILL)  # the driver dies mid-run, as in a crash
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(2)  # let Ray tear the dead job's actor down
    done_before = len(_parts(out))
    print(f"driver killed after {done_before} of {n} parts")
    assert 1 <= done_before < n, f"{done_before} parts: the run was not interrupted part-way"
    # a local write killed before its rename leaves a hidden temp file behind
    (out / ".part-0123.parquet.tmp").write_bytes(b"half a parquet file")

    from mspray.cli import main

    # the killed driver's lease is taken over once it expires (its --lease-ttl)
    assert main(["-q", "score", "--bundle", bundle, "--input", str(inp), "--output",
                 str(out), "--workers", "2", "--part-size", "3",
                 "--lease-wait", "120"]) == 0  # fmt: skip
    rows = read_results(str(out), ["path"]).column("path").to_pylist()
    expected = sorted(storage.list_files(str(inp)))
    assert sorted(rows) == expected  # every image once: none lost, none duplicated
    runs = sorted(os.listdir(out / "_runs"))
    last = json.loads((out / "_runs" / runs[-1]).read_text())
    assert last["skipped"] == done_before and last["scored"] == n - done_before
    assert (last["missing"], last["duplicates"], last["errors"]) == (0, 0, 0)


def test_score_cli_onnx_runtime_scores_like_torch_fp32(ray_local, tiny_bundle, tmp_path):
    """`mspray score --runtime onnx`: the encoders run on ONNX Runtime in the actors, the
    run summary says so, and the scores equal torch fp32's."""
    from mspray.artifacts.bundle import read_config
    from mspray.cli import main

    bundle, spec = tiny_bundle
    inp = os.path.join(spec.split(":", 1)[1], "synthetic", "test")
    out, summary_json = tmp_path / "onnx", tmp_path / "summary.json"
    argv = ["-q", "score", "--bundle", bundle, "--input", inp, "--output", str(out)]
    argv += ["--runtime", "onnx", "--workers", "1", "--summary-json", str(summary_json)]
    assert main(argv) == 0
    assert json.loads(summary_json.read_text())["inference"] == ["onnx/fp32/nchw"]
    df = read_results(str(out)).to_pandas().sort_values("path")
    assert len(df) == len(storage.list_files(inp)) and df["error"].isna().all()
    fp32 = load_bundle(bundle, config=read_config(bundle).replace(**{"score.precision": "fp32"}))
    pred = fp32.predict(load_images(list(df["path"]), 64))
    np.testing.assert_allclose(df["image_score"], pred.image_scores.numpy(), rtol=1e-4, atol=1e-5)

"""The nightly report: its numbers against the Parquet rows, the drift check, and what a
person sees when Chromium renders it (heatmaps load, numbers match)."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mspray import storage
from mspray.decisions.threshold import promise
from mspray.report import ALL, REPORT_NAME, build_report, calibration_from_bundle, error_reason

VERSION = "abc123def456"
QUANTILE = 0.99
SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("image_score", pa.float64()),
        ("is_anomalous", pa.bool_()),
        ("score_32", pa.float64()),
        ("score_16", pa.float64()),
        ("threshold", pa.float64()),
        ("model_version", pa.string()),
        ("error", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
        ("map_path", pa.string()),
    ]
)


def _png(rank: int) -> bytes:
    """A small distinct heatmap-panel stand-in (2:1 like the real image | overlay panel)."""
    rgb = np.zeros((16, 32, 3), np.uint8)
    rgb[:, :16] = (40 + 10 * rank) % 256
    rgb[:, 16:, 0] = 255
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def make_output(
    out: str,
    *,
    shift: float = 0.0,
    n_normal: int = 200,
    n_anomalous: int = 6,
    with_calibration: bool = True,
    seed: int = 0,
    model: str | None = None,
) -> dict:
    """A scoring output folder written by hand: two Parquet parts, heatmaps under _maps/ for
    every scored image (one name with a space and a '#'), three error rows, a run summary
    with a calibration block. ``shift`` moves the night's normal scores. Returns the facts
    the report must show."""
    rng = np.random.default_rng(seed)
    calib = rng.normal(1.0, 0.1, 400)
    threshold = float(np.quantile(calib, QUANTILE))
    normal = rng.normal(1.0 + shift, 0.1, n_normal)
    normal = np.minimum(normal, threshold - 1e-3)  # keep the counts below exact
    anomalous = threshold + 0.2 + rng.random(n_anomalous)
    scores = np.concatenate([normal, anomalous])
    inp = "/archive/2024-03-07"
    names = [f"cam{i % 2}/{i:04d}.png" for i in range(len(scores))]
    top = int(np.argmax(scores))
    names[top] = "cam 1/odd #name.png"  # must be URL-quoted to load
    now = dt.datetime(2024, 3, 8, 2, 30, tzinfo=dt.timezone.utc)
    rows = []
    for i, (name, s) in enumerate(zip(names, scores, strict=True)):
        map_uri = storage.join(out, "_maps", name + ".png")
        storage.write_bytes(map_uri, _png(i))
        rows.append(
            {"path": f"{inp}/{name}", "image_score": float(s), "is_anomalous": bool(s > threshold),
             "score_32": float(s) * 0.6, "score_16": float(s) * 0.4, "threshold": threshold,
             "model_version": VERSION, "error": None, "scored_at": now, "map_path": map_uri}
        )  # fmt: skip
    errors = {
        "bad/zero.png": "empty file",
        "bad/trunc.png": "cannot decode image (OSError: image file is truncated)",
        "bad/trunc2.png": "cannot decode image (SyntaxError: broken PNG file)",
    }
    for name, msg in errors.items():
        p = f"{inp}/{name}"
        rows.append(
            {"path": p, "threshold": threshold, "model_version": VERSION,
             "error": f"{p}: {msg}", "scored_at": now}
        )  # fmt: skip
    schema = SCHEMA
    if model is not None:
        for r in rows:
            r["model"] = model
        schema = schema.append(pa.field("model", pa.string()))
    rows = [rows[i] for i in rng.permutation(len(rows))]
    half = len(rows) // 2
    for k, chunk in enumerate((rows[:half], rows[half:])):
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(chunk, schema=schema), buf)
        storage.write_bytes(storage.join(out, f"part-{k:04d}.parquet"), buf.getvalue().to_pybytes())
    summary = {"input": inp, "output": out, "model_version": VERSION, "images": len(rows),
               "skipped": 17, "scored": len(rows) - 17, "errors": len(errors), "parts": 2,
               "seconds": 12.5, "missing": 0, "duplicates": 0}  # fmt: skip
    if with_calibration:
        summary["calibration"] = {"version": VERSION, "threshold": threshold,
                                  "quantile": QUANTILE, "margin": 1.0,
                                  "scores": calib.tolist(), "source": "bundle /b"}  # fmt: skip
    storage.write_text(
        storage.join(out, "_runs", "20240308T023000Z-aaaaaa.json"), json.dumps(summary)
    )
    return {"threshold": threshold, "top_name": names[top], "errors": errors}


class _Stats(HTMLParser):
    """Text of every ``data-stat`` element (keyed by ``(data-group, data-stat)``), every
    ``data-drift`` box, the ``<img class="map">`` sources and the histogram bar counts."""

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[tuple[str, str], list[str]] = {}
        self.drift: dict[str, str] = {}
        self.imgs: list[str] = []
        self.bars: list[int] = []
        self.body: dict[str, str] = {}
        self._open: tuple[str, str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = {k: v or "" for k, v in a.items()}
        if "data-stat" in a:
            self._open = (a.get("data-group", ""), a["data-stat"])
            self.stats.setdefault(self._open, []).append("")
        if "data-drift" in a:
            self.drift[a.get("data-group", "")] = a["data-drift"]
        if tag == "img" and "map" in (a.get("class") or "").split():
            self.imgs.append(a["src"])
        if tag == "rect" and "bar" in (a.get("class") or "").split():
            self.bars.append(int(a["data-count"]))

    def handle_data(self, data):
        if self._open:
            self.stats[self._open][-1] += data

    def handle_endtag(self, tag):
        if tag == "span":
            self._open = None

    def one(self, key: str, group: str = "") -> str:
        (text,) = self.stats[(group, key)]
        return text

    def num(self, key: str, group: str = "") -> int:
        return int(self.one(key, group).replace(",", ""))


def parse(page: str) -> _Stats:
    p = _Stats()
    p.feed(page)
    return p


def expected_from_parquet(out: str) -> dict:
    """The report's figures computed independently, straight from the Parquet rows."""
    df = pd.read_parquet(out)  # also proves the report does not break dataset discovery
    ok = df[df["error"].isna()]
    return {
        "rows": len(df),
        "scored": len(ok),
        "errors": int(df["error"].notna().sum()),
        "anomalous": int(ok["is_anomalous"].sum()),
        "rate": f"{100 * ok['is_anomalous'].mean():.1f} %",
        "top": ok.sort_values("image_score", ascending=False),
    }


def test_numbers_on_the_page_match_the_parquet(tmp_path):
    out = str(tmp_path / "scores")
    facts = make_output(out)
    uri = build_report(out, top_k=5)
    assert uri == os.path.join(out, REPORT_NAME)
    page = parse(Path(uri).read_text())
    want = expected_from_parquet(out)
    assert want["rows"] == 209 and want["anomalous"] == 6  # the fixture is what we think
    for key in ("rows", "scored", "errors", "anomalous"):
        assert page.num(key) == want[key], key
    assert page.num("skipped") == 17  # from the run summary
    assert page.num("scored", ALL) == want["scored"]
    assert page.num("anomalous", ALL) == want["anomalous"]
    assert page.one("anomaly_rate", ALL) == want["rate"]
    assert page.one("expected_rate", ALL) == "1.0 %"  # 1 - quantile 0.99
    assert float(page.one("threshold", ALL)) == pytest.approx(facts["threshold"], rel=1e-3)
    # errors by reason: the file name and details are not part of the reason
    assert page.num("errors:empty file") == 1
    assert page.num("errors:cannot decode image") == 2
    # the histogram holds every scored image
    assert sum(page.bars) == want["scored"] and len(page.bars) > 10
    # top 5, most anomalous first, each with its own heatmap beside the report
    top = want["top"].head(5)
    shown = [float(s) for s in page.stats[(ALL, "top_score")]]
    np.testing.assert_allclose(shown, top["image_score"], rtol=1e-3)
    assert page.imgs == [
        storage.relative(m, out).replace(" ", "%20").replace("#", "%23") for m in top["map_path"]
    ]
    assert page.imgs[0] == "_maps/cam%201/odd%20%23name.png.png"


def test_drift_warning_for_a_shifted_night_and_not_for_an_unshifted_one(tmp_path):
    same = str(tmp_path / "same")
    make_output(same, shift=0.0, seed=1)
    page = parse(Path(build_report(same)).read_text())
    assert page.drift == {ALL: "no"}
    assert float(page.one("drift_pvalue", ALL)) > 0.05

    shifted = str(tmp_path / "shifted")
    make_output(shifted, shift=0.05, seed=1)  # half a standard deviation up
    text = Path(build_report(shifted)).read_text()
    page = parse(text)
    assert page.drift == {ALL: "yes"}
    assert float(page.one("drift_pvalue", ALL)) < 0.01
    assert float(page.one("drift_statistic", ALL)) >= 0.1
    assert "Drift warning" in text and "Kolmogorov-Smirnov" in text


def test_without_calibration_the_page_says_the_expected_rate_is_unknown(tmp_path):
    out = str(tmp_path / "scores")
    make_output(out, with_calibration=False)
    text = Path(build_report(out)).read_text()
    page = parse(text)
    assert page.one("expected_rate", ALL) == "unknown"
    assert page.drift == {}
    assert "mspray report OUTPUT --bundle URI" in text


def test_calibration_from_a_bundle_overrides_the_run_summary(tmp_path):
    out = str(tmp_path / "scores")
    facts = make_output(out, with_calibration=False, shift=0.05)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    calib = np.random.default_rng(1).normal(1.0, 0.1, 400)
    (bundle / "meta.json").write_text(
        json.dumps({"format": 1, "version": VERSION, "threshold": facts["threshold"],
                    "threshold_quantile": 0.95, "calibration_scores": calib.tolist()})
    )  # fmt: skip
    page = parse(Path(build_report(out, bundles=[str(bundle)])).read_text())
    assert page.one("expected_rate", ALL) == "5.0 %"
    assert page.drift == {ALL: "yes"}
    # a bundle of another model version is not compared with these rows
    meta = json.loads((bundle / "meta.json").read_text())
    (bundle / "meta.json").write_text(json.dumps({**meta, "version": "other"}))
    page = parse(Path(build_report(out, bundles=[str(bundle)])).read_text())
    assert page.one("expected_rate", ALL) == "unknown" and page.drift == {}


def test_expected_rate_is_the_false_alarm_rate_the_bundle_promises(tmp_path):
    """A bundle's ``meta["calibration"]`` (the core Calibration) is what the page states, also
    after a recalibration left an older ``threshold_quantile`` behind; the block a scoring
    run copies into its summary carries it, so the page rebuilt from the output agrees."""
    out = str(tmp_path / "scores")
    facts = make_output(out, with_calibration=False)
    calib = np.random.default_rng(1).normal(1.0, 0.1, 400)
    promised = promise(calib, facts["threshold"], target_fpr=0.03, source="production")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "meta.json").write_text(
        json.dumps({"format": 1, "version": VERSION, "threshold": facts["threshold"],
                    "threshold_quantile": 0.95, "calibration": promised.to_dict(),
                    "calibration_scores": calib.tolist()})
    )  # fmt: skip
    rate = f"{100 * promised.promised_fpr:.1f} %"
    assert rate != "5.0 %"  # not 1 - the stale quantile
    page = parse(Path(build_report(out, bundles=[str(bundle)])).read_text())
    assert page.one("expected_rate", ALL) == rate
    block = calibration_from_bundle(str(bundle)).to_dict()
    assert block["calibration"] == json.loads(json.dumps(promised.to_dict()))
    runs = Path(out, "_runs")
    summary = json.loads(next(runs.iterdir()).read_text())
    (runs / "20240309T023000Z-bbbbbb.json").write_text(
        json.dumps({**summary, "calibration": block})
    )
    page = parse(Path(build_report(out)).read_text())
    assert page.one("expected_rate", ALL) == rate and page.drift == {ALL: "no"}


def test_rows_are_grouped_by_the_model_column(tmp_path):
    out = str(tmp_path / "scores")
    make_output(out, model="bottle")
    other = str(tmp_path / "other")
    make_output(other, model="screw", seed=3, n_anomalous=2)
    for f in os.listdir(other):
        if f.startswith("part-"):
            shutil.copy(os.path.join(other, f), os.path.join(out, "part-screw-" + f))
    page = parse(Path(build_report(out, top_k=3)).read_text())
    df = pd.read_parquet(out)
    assert page.num("rows") == len(df)
    for model in ("bottle", "screw"):
        m = df[(df["model"] == model) & df["error"].isna()]
        assert page.num("scored", model) == len(m)
        assert page.num("anomalous", model) == int(m["is_anomalous"].sum())
        assert len(page.stats[(model, "top_score")]) == 3


def test_report_on_s3(s3_bucket):
    out = f"{s3_bucket}/scores/2024-03-07"
    make_output(out)
    uri = build_report(out, top_k=3)
    assert uri == f"{out}/{REPORT_NAME}"
    page = parse(storage.read_text(uri))
    assert page.num("rows") == 209
    assert page.imgs[0] == "_maps/cam%201/odd%20%23name.png.png"
    assert storage.exists(f"{out}/{page.imgs[0].replace('%20', ' ').replace('%23', '#')}")
    # heatmaps outside the output folder are inlined (the page stays one self-contained file)
    assert all(s.startswith("data:image/png;base64,") for s in parse(
        storage.read_text(build_report(out, top_k=3, inline_images=True))).imgs)  # fmt: skip


def test_cli_rebuilds_the_report_from_the_parquet_alone(tmp_path, capsys):
    from mspray.cli import main

    out = str(tmp_path / "scores")
    make_output(out)
    assert main(["report", out, "--top-k", "3"]) == 0
    assert capsys.readouterr().out.strip() == os.path.join(out, REPORT_NAME)
    page = parse(Path(out, REPORT_NAME).read_text())
    assert len(page.imgs) == 3 and page.num("rows") == 209
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such scoring output folder" in capsys.readouterr().err


def test_a_night_without_images_still_gets_a_page(tmp_path):
    out = tmp_path / "scores"
    (out / "_runs").mkdir(parents=True)
    summary = {"images": 0, "scored": 0, "skipped": 0, "errors": 0, "seconds": 1.0}
    (out / "_runs" / "20240308T023000Z-aaaaaa.json").write_text(json.dumps(summary))
    page = parse(Path(build_report(str(out))).read_text())
    assert (page.num("rows"), page.num("scored"), page.num("skipped")) == (0, 0, 0)
    assert page.one("anomaly_rate", ALL) == "unknown" and page.imgs == []


def test_error_reason():
    assert error_reason("/a/b.png: empty file", "/a/b.png") == "empty file"
    assert error_reason("/a/b.png: OSError: [Errno 5] I/O error", "/a/b.png") == "OSError"
    assert (
        error_reason("/a/b.png: 9000x9000 = 81000000 pixels is over the limit of 5", "/a/b.png")
        == "NxN = N pixels is over the limit of N"
    )


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such scoring output"):
        build_report(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no result rows"):
        build_report(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="top_k"):
        build_report(str(tmp_path / "empty"), top_k=-1)


# ----------------------------------------------------------------------------- in a browser
CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser")) if p), None)
browser = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium on this machine (.ci/run installs the Debian `chromium` package)",
)


def chromium(url: str, tmp_path: Path, *args: str) -> str:
    """Run headless Chromium on ``url``; returns stdout (the DOM with --dump-dom)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           "--virtual-time-budget=10000", *args, url]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@browser
def test_chromium_shows_the_heatmaps_and_the_parquet_numbers(tmp_path):
    out = str(tmp_path / "scores")
    make_output(out)
    uri = build_report(out, top_k=8)
    dom = chromium(Path(uri).as_uri(), tmp_path, "--dump-dom")
    page = parse(dom)
    # the page's load handler counts images that really decoded (naturalWidth > 0)
    assert page.body["data-images-total"] == "8"
    assert page.body["data-images-loaded"] == "8"
    want = expected_from_parquet(out)
    for key in ("rows", "scored", "errors", "anomalous"):
        assert page.num(key) == want[key], key
    assert page.one("anomaly_rate", ALL) == want["rate"]
    np.testing.assert_allclose(
        [float(s) for s in page.stats[(ALL, "top_score")]],
        want["top"]["image_score"].head(8),
        rtol=1e-3,
    )

    # a heatmap gone missing is noticed by the page (and by this test)
    first = want["top"]["map_path"].iloc[0]
    os.remove(first)
    dom = chromium(Path(uri).as_uri(), tmp_path, "--dump-dom")
    page = parse(dom)
    assert page.body["data-images-loaded"] == "7"
    assert "1 of 8 heatmaps could not be loaded" in dom

    # and a screenshot is not blank
    shot = tmp_path / "shot.png"
    chromium(Path(uri).as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1200,1600")
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10

"""One scoring run across product categories: every image is scored by the
bundle its path (route template) or a manifest names, with the same resumable parts and
error rows plus a ``model`` column; a path matching no model gets an error row; the
scoring counters reach Ray's Prometheus endpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from mspray.artifacts.bundle import load_bundle
from mspray.artifacts.output import read_results
from mspray.config import PoolConfig
from mspray.config.runs import ScoreRun
from mspray.data.images import load_images
from mspray.ray.data.routing import NO_MODEL, route_paths
from mspray.ray.data.scoring import score_prefix

pytestmark = pytest.mark.ray


@pytest.fixture
def archive(category_bundles, tmp_path) -> Path:
    """in/<category>/<file>.png for both categories, plus a folder of an unknown category
    and a file outside any category folder."""
    inp = tmp_path / "in"
    for name, (_, cat) in category_bundles.items():
        for p in sorted(Path(cat, "test").glob("*/*.png")):
            dst = inp / name / f"{p.parent.name}_{p.name}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dst)
    (inp / "bolt").mkdir()
    shutil.copy(next((inp / "nut").glob("*.png")), inp / "bolt" / "x.png")
    shutil.copy(next((inp / "nut").glob("*.png")), inp / "loose.png")
    return inp


def _check_rows(out: str, bundles: dict[str, str], inp: Path) -> None:
    df = read_results(out).to_pandas().set_index("path")
    assert df.index.is_unique and len(df) == len(list(inp.rglob("*.png")))
    for name, uri in bundles.items():
        rows = df[df.index.str.startswith(str(inp / name) + "/")].sort_index()
        assert len(rows) == 5 and (rows["model"] == name).all() and rows["error"].isna().all()
        det = load_bundle(uri)
        assert (rows["model_version"] == det.version).all()
        pred = det.predict(load_images(list(rows.index), 64))
        np.testing.assert_allclose(rows["image_score"], pred.image_scores.numpy(), rtol=1e-4)
    for lost in (inp / "bolt" / "x.png", inp / "loose.png"):
        row = df.loc[str(lost)]
        assert NO_MODEL in row["error"] and np.isnan(row["image_score"])


def test_route_scores_each_image_with_its_bundle_and_resumes(
    ray_local, category_bundles, archive, tmp_path
):
    bundles = {n: b for n, (b, _) in category_bundles.items()}
    out = str(tmp_path / "out")
    s = score_prefix(
        ScoreRun(
            bundle=bundles,
            input=str(archive),
            output=out,
            route=f"{archive}/{{model}}/**",
            part_size=3,
        ),
        pool=PoolConfig(workers=1),
    )
    assert (s.images, s.scored, s.errors, s.missing, s.duplicates) == (12, 12, 2, 0, 0)
    assert s.model_versions == {n: load_bundle(b).version for n, b in bundles.items()}
    _check_rows(out, bundles, archive)
    again = score_prefix(
        ScoreRun(bundle=bundles, input=str(archive), output=out, route="{model}/**"),
        pool=PoolConfig(workers=1),
    )  # the same route, relative to the input; nothing left to do
    assert (again.skipped, again.scored, again.stale_version_rows) == (12, 0, 0)


def test_manifest_on_the_command_line(ray_local, category_bundles, archive, tmp_path):
    from mspray.cli import main

    bundles = {n: b for n, (b, _) in category_bundles.items()}
    lines = ["path,model"]
    for p in sorted(archive.rglob("*.png")):
        rel = p.relative_to(archive).as_posix()
        lines.append(f"{rel},{rel.split('/')[0] if '/' in rel else ''}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    argv = [
        "score",
        "--input",
        str(archive),
        "--output",
        out,
        "--manifest",
        str(tmp_path / "m.csv"),
        "--workers",
        "1",
        "-q",
    ]
    for name, uri in bundles.items():
        argv += ["--bundle", f"{name}={uri}"]
    assert main(argv) == 0
    _check_rows(out, bundles, archive)


def test_route_template_matching(tmp_path):
    root = str(tmp_path)
    paths = [f"{root}/a/x.png", f"{root}/b/c/y.png", f"{root}/z.png"]
    got = route_paths(paths, f"{root}/{{model}}/**", root)
    assert got == {paths[0]: "a", paths[1]: "b", paths[2]: None}
    got = route_paths(paths, "{model}/*.png", root)  # one segment only
    assert got == {paths[0]: "a", paths[1]: None, paths[2]: None}
    with pytest.raises(ValueError, match="model"):
        route_paths(paths, f"{root}/**", root)


def test_route_needs_named_bundles(category_bundles, archive, tmp_path):
    bundle = category_bundles["nut"][0]
    with pytest.raises(ValueError, match="named bundles"):
        score_prefix(
            ScoreRun(
                bundle=bundle, input=str(archive), output=str(tmp_path / "o"), route="{model}/**"
            )
        )
    two = {n: b for n, (b, _) in category_bundles.items()}
    with pytest.raises(ValueError, match="--route"):
        score_prefix(ScoreRun(bundle=two, input=str(archive), output=str(tmp_path / "o")))


def test_scoring_counters_reach_rays_prometheus_endpoint(
    ray_local, prometheus, category_bundles, archive, tmp_path
):
    bundles = {n: b for n, (b, _) in category_bundles.items()}
    text = prometheus.text()
    n_scored = prometheus.value("mspray_score_images_total", text, model="nut", outcome="scored")
    n_lost = prometheus.value("mspray_score_errors_total", text, reason="no_model")
    score_prefix(
        ScoreRun(
            bundle=bundles, input=str(archive), output=str(tmp_path / "out"), route="{model}/**"
        ),
        pool=PoolConfig(workers=1),
    )

    def moved(t: str) -> bool:
        v = prometheus.value
        return (
            v("mspray_score_images_total", t, model="nut", outcome="scored") >= n_scored + 5
            and v("mspray_score_errors_total", t, reason="no_model") >= n_lost + 2
        )

    prometheus.wait_until(moved, "the scoring counters")

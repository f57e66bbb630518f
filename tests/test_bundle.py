"""Bundle versions: immutable, checksummed, resolved through a ``latest`` pointer; on local
disk and on a real local S3 server (moto)."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from mspray import storage
from mspray.artifacts.bundle import (
    POINTER,
    BundleError,
    _move_pointer,
    bundle_root,
    load_bundle,
    read_config,
    resolve_bundle,
    save_bundle,
)
from mspray.data.datasets import test_samples, train_paths
from mspray.data.images import load_images
from mspray.decisions.summaries import calibrate


@pytest.fixture(scope="module")
def trained(synthetic_root, tiny_cfg):
    """A detector trained for one epoch (not saved) and a few test images."""
    from mspray.pipeline.steps import fit_detector

    spec = f"mvtec:{synthetic_root}"
    det = fit_detector(tiny_cfg, train_paths(spec, "synthetic"))
    paths = [s.path for s in test_samples(spec, "synthetic")[:3]]
    return det, load_images(paths, 64)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """An empty bundle root, on local disk or on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "bundle")
    return f"{request.getfixturevalue('s3_bucket')}/models/bundle"


def _flip_byte(uri: str, offset: int) -> None:
    data = bytearray(storage.read_bytes(uri))
    data[offset] ^= 0xFF
    storage.write_bytes(uri, bytes(data))


def test_round_trip_via_pointer(trained, root):
    det, images = trained
    version = save_bundle(det, root)
    assert version == storage.join(storage.normalize(root), "versions", det.version)
    assert storage.read_text(storage.join(root, "latest")).strip() == det.version
    assert resolve_bundle(root) == version
    assert resolve_bundle(storage.join(root, "latest")) == version
    assert resolve_bundle(version) == version
    assert bundle_root(version) == storage.normalize(root)
    meta = json.loads(storage.read_text(storage.join(version, "meta.json")))
    assert set(meta["files"]) == {
        "config.json",
        "model.safetensors",
        "bank_32.faiss",
        "bank_16.faiss",
    }
    expected = det.predict(images)
    for uri in (root, storage.join(root, "latest"), version):
        loaded = load_bundle(uri)
        assert loaded.version == det.version
        assert torch.equal(loaded.predict(images).maps, expected.maps)
    # The same content saved again is the same version, and it is not rewritten.
    assert save_bundle(load_bundle(root), root) == version
    assert json.loads(storage.read_text(storage.join(version, "meta.json"))) == meta


def test_one_flipped_byte_fails_the_load_naming_the_file(trained, root):
    det, _ = trained
    version = save_bundle(det, root)
    bank = storage.join(version, "bank_16.faiss")
    _flip_byte(bank, storage.size(bank) // 2)
    with pytest.raises(BundleError, match=r"bank_16\.faiss: corrupted"):
        load_bundle(root)
    load_bundle(root, with_banks=False)  # the encoders alone are intact
    _flip_byte(storage.join(version, "config.json"), 10)
    with pytest.raises(BundleError, match=r"config\.json: corrupted"):
        read_config(root)
    with pytest.raises(BundleError, match=r"config\.json: corrupted"):
        load_bundle(root, with_banks=False)


def test_half_written_version_is_never_current(trained, root, monkeypatch):
    det, _ = trained
    first = save_bundle(det, root)
    det.threshold = det.threshold + 1.0  # other content: another version

    def crash(uri: str, data: bytes) -> bool:
        raise OSError("injected: the writer died before meta.json")

    monkeypatch.setattr(storage, "create_exclusive", crash)
    with pytest.raises(OSError, match="injected"):
        save_bundle(det, root)
    monkeypatch.undo()
    half = [v for v in storage.list_dirs(storage.join(root, "versions")) if v != first]
    assert len(half) == 1 and storage.exists(storage.join(half[0], "model.safetensors"))
    assert resolve_bundle(root) == first  # the pointer still names the complete version
    with pytest.raises(BundleError, match="incomplete bundle version"):
        load_bundle(half[0])
    # A pointer naming it (e.g. written by hand) is refused too.
    storage.write_text(storage.join(root, "latest"), storage.basename(half[0]) + "\n")
    with pytest.raises(BundleError, match="not complete"):
        load_bundle(root)
    # Saving again completes that version and moves the pointer to it.
    assert save_bundle(det, root) == half[0]
    assert load_bundle(root).threshold == pytest.approx(det.threshold)
    assert load_bundle(first).threshold == pytest.approx(det.threshold - 1.0)


def test_flat_bundle_of_the_earlier_layout_still_loads(trained, tmp_path, monkeypatch):
    det, images = trained
    version = Path(save_bundle(det, str(tmp_path / "new")))
    flat = tmp_path / "flat"
    shutil.copytree(version, flat)
    meta = json.loads((flat / "meta.json").read_text())
    meta["format"] = 1
    del meta["files"]
    (flat / "meta.json").write_text(json.dumps(meta))
    assert resolve_bundle(str(flat)) == str(flat)
    old = load_bundle(str(flat))
    assert torch.equal(old.predict(images).maps, det.predict(images).maps)
    # A new version saved into it wins over the flat files from then on.
    old.threshold = old.threshold + 1.0
    new = save_bundle(old, str(flat))
    assert resolve_bundle(str(flat)) == new != str(flat)
    assert load_bundle(str(flat)).meta["parent_version"] == det.version


def test_versions_are_never_overwritten_and_missing_bundles_are_named(trained, tmp_path):
    det, _ = trained
    version = save_bundle(det, str(tmp_path / "b"))
    with pytest.raises(BundleError, match="never rewritten"):
        save_bundle(det, version)
    with pytest.raises(BundleError, match="no such bundle"):
        load_bundle(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="not an mspray bundle"):
        load_bundle(str(tmp_path / "empty"))
    (tmp_path / "b" / "latest").write_text("../../elsewhere\n")
    with pytest.raises(BundleError, match="not a version id"):
        load_bundle(str(tmp_path / "b"))


def _set_format(version: str, fmt: int) -> None:
    """Rewrite a version's meta.json as if an older mspray had written it (checksums kept:
    format 2 had them too)."""
    path = Path(version, "meta.json")
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "format": fmt}))


def test_bundles_from_before_the_enc64_change_are_refused_only_with_a_64px_scale(
    trained, tiny_cfg, tmp_path
):
    from mspray.detector import Detector
    from mspray.model.multiscale import MultiScaleEncoder

    # A 64-px encoder saved now (format 3) loads; the same files marked format 1 or 2 (the
    # layouts written while Enc64's head read pool3) are refused with a clear message.
    cfg64 = tiny_cfg.replace(**{"model.scales": (64,), "model.strides": (8,)})
    det64 = Detector(cfg64, MultiScaleEncoder(cfg64), threshold=1.0)
    v64 = save_bundle(det64, str(tmp_path / "enc64"))
    assert json.loads(Path(v64, "meta.json").read_text())["format"] == 3
    loaded = load_bundle(v64, with_banks=False)
    for k, v in det64.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)
    for fmt in (1, 2):
        _set_format(v64, fmt)
        with pytest.raises(BundleError, match=f"format {fmt} .*re-train: Enc64 changed"):
            load_bundle(v64, with_banks=False)
    # 32/16-px encoders did not change: a format-2 (checksummed) bundle of them still loads.
    det, images = trained
    v = save_bundle(det, str(tmp_path / "enc32-16"))
    _set_format(v, 2)
    assert torch.equal(load_bundle(v).predict(images).maps, det.predict(images).maps)


def test_a_version_without_banks_never_becomes_latest(trained, root, synthetic_root, tiny_cfg):
    """Training saves an encoders-only version before its banks are built (``--no-banks``,
    training on Ray): consumers of the root keep the previous complete version during that
    build and for good when it fails; the pointer moves once a complete version is saved."""
    from mspray.pipeline.steps import fit_detector

    det, images = trained
    complete = save_bundle(det, root)
    want = load_bundle(root).predict(images).image_scores

    uris = train_paths(f"mvtec:{synthetic_root}", "synthetic")
    cfg = tiny_cfg.replace(**{"train.epochs": 0, "train.seed": 7})
    encoders = fit_detector(cfg, uris, out=root, build_banks=False)
    new = storage.join(storage.normalize(root), "versions", encoders.version)
    assert new != complete and storage.is_file(storage.join(new, "meta.json"))
    # during (and after a failed) bank build: still the complete version
    assert resolve_bundle(root) == complete
    assert torch.equal(load_bundle(root).predict(images).image_scores, want)
    # the banks built from the new version (as build-bank does): now it is current
    built = load_bundle(new, with_banks=False)
    train = load_images(uris, 64)
    built.build_banks(train)
    calibrate(built, train, source="bank")
    assert resolve_bundle(save_bundle(built, root)) == resolve_bundle(root) != complete


def test_a_root_with_only_incomplete_versions_names_the_problem(trained, tmp_path):
    det, _ = trained
    bare = load_bundle(save_bundle(det, str(tmp_path / "full")), with_banks=False)
    bare.threshold = None
    root = str(tmp_path / "enc")
    version = save_bundle(bare, root)
    assert not storage.exists(storage.join(root, "latest"))
    with pytest.raises(BundleError, match="no complete version yet"):
        load_bundle(root)
    assert load_bundle(version, with_banks=False).version == bare.version


def test_saves_moving_latest_at_once_never_overwrite_each_other_unseen(root, caplog):
    """Eight saves built from v0 move ``latest`` at the same moment: each move is a
    compare-and-swap, so every move but the first replaces another save's version and says
    so; none is overwritten unseen (as two unconditional writes after two reads of v0 do)."""
    n = 8
    storage.makedirs(root)
    storage.write_text(storage.join(root, POINTER), "v0\n")
    start = threading.Barrier(n)

    def move(i: int) -> None:
        start.wait()
        _move_pointer(root, f"v{i + 1}", parent="v0")

    logger = "mspray.artifacts.bundle"
    with caplog.at_level(logging.WARNING, logger=logger), ThreadPoolExecutor(n) as pool:
        list(pool.map(move, range(n)))
    replaced = [r.args[1] for r in caplog.records if "was built from" in r.getMessage()]
    final = storage.read_text(storage.join(root, POINTER)).strip()
    # one chain v0 -> ... -> final through every version: each replaced exactly once
    assert sorted([*replaced, final]) == sorted(f"v{i + 1}" for i in range(n)), replaced

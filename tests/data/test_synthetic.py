"""Synthetic MVTec-layout datasets: structure, masks, determinism, speed."""

import time

import numpy as np
import pytest

from mspray import storage
from mspray.data.images import decode_image
from mspray.data.synthetic import DEFECTS, make_image, make_synthetic_dataset


def _read(uri: str) -> np.ndarray:
    return decode_image(storage.read_bytes(uri), uri)


def _rel(files: list[str], base: str) -> list[str]:
    return [storage.relative(f, base) for f in files]


def test_structure_and_masks(tmp_path):
    cat = make_synthetic_dataset(
        str(tmp_path), "tex", n_train=3, n_test_good=2, n_test_defect=5, size=48
    )
    assert cat == str(tmp_path / "tex")
    files = _rel(storage.list_files(cat, suffixes=None), cat)
    assert files == sorted(
        [
            "train/good/000.png",
            "train/good/001.png",
            "train/good/002.png",
            "test/good/000.png",
            "test/good/001.png",
            "test/scratch/000.png",
            "test/scratch/001.png",
            "test/stain/000.png",
            "test/stain/001.png",
            "test/hole/000.png",
            "ground_truth/scratch/000_mask.png",
            "ground_truth/scratch/001_mask.png",
            "ground_truth/stain/000_mask.png",
            "ground_truth/stain/001_mask.png",
            "ground_truth/hole/000_mask.png",
        ]
    )
    for f in files:
        a = _read(storage.join(cat, f))
        assert a.shape == (48, 48, 3)
        if f.startswith("ground_truth"):
            assert set(np.unique(a)) == {0, 255}  # binary, and never empty
            frac = (a[:, :, 0] > 0).mean()
            assert 0.001 < frac < 0.25  # a defect, not the whole image


def test_defect_pixels_differ_from_normal_structure():
    size = 64
    for kind in DEFECTS:
        normal, m0 = make_image(kind, size, np.random.default_rng(0))
        assert normal.dtype == np.uint8 and normal.shape == (size, size, 3) and not m0.any()
        for defect in DEFECTS[kind]:
            img, mask = make_image(kind, size, np.random.default_rng(0), defect)
            assert mask.dtype == bool and mask.any()
            # same seed: the defect is the only change outside sensor noise
            diff = np.abs(img.astype(int) - normal.astype(int)).mean(axis=2)
            assert diff[mask].mean() > 3 * diff[~mask].mean() + 10


def test_normal_images_vary_but_share_statistics():
    a, _ = make_image("texture", 64, np.random.default_rng(1))
    b, _ = make_image("texture", 64, np.random.default_rng(2))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5  # different phase / warp
    assert abs(float(a.mean()) - float(b.mean())) < 20  # same fabric


def test_deterministic_in_seed(tmp_path):
    def snapshot(root: str, seed: int) -> dict[str, bytes]:
        cat = make_synthetic_dataset(
            root, n_train=2, n_test_good=1, n_test_defect=3, size=32, seed=seed, kind="object"
        )
        return {
            r: storage.read_bytes(storage.join(cat, r)) for r in _rel(storage.list_files(cat), cat)
        }

    first = snapshot(str(tmp_path / "a"), 7)
    assert first == snapshot(str(tmp_path / "b"), 7)
    other = snapshot(str(tmp_path / "c"), 8)
    assert first.keys() == other.keys() and first != other
    assert {r.split("/")[1] for r in first if r.startswith("test/")} == {
        "good",
        "scratch",
        "stain",
        "chip",
    }


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        make_synthetic_dataset("/tmp/unused", kind="fractal")
    with pytest.raises(ValueError, match="size"):
        make_synthetic_dataset("/tmp/unused", size=8)
    with pytest.raises(ValueError, match="scratch"):
        make_image("object", 64, np.random.default_rng(0), "hole")


def test_default_dataset_is_fast(tmp_path):
    t0 = time.perf_counter()
    make_synthetic_dataset(str(tmp_path))  # 20 + 6 + 6 images (and 6 masks) at 256²
    elapsed = time.perf_counter() - t0
    assert len(storage.list_files(str(tmp_path))) == 38
    assert elapsed < 10, f"{elapsed:.1f}s: vectorised generation takes well under 2 s"

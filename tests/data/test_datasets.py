"""Dataset specs and layouts: MVTec AD, BTAD, plain folders, local and S3."""

import shutil

import numpy as np
import pytest

from mspray import storage
from mspray.data.datasets import (
    DatasetSpec,
    Sample,
    categories,
    parse_spec,
    test_samples,
    train_paths,
)
from mspray.data.images import load_image, load_mask
from mspray.data.synthetic import make_synthetic_dataset, write_png

TINY = np.zeros((4, 4, 3), np.uint8)


def _touch(base: str, *rel: str) -> None:
    for r in rel:
        write_png(storage.join(base, *r.split("/")), TINY)


@pytest.fixture
def btad_root(tmp_path):
    """BTAD layout: bmp and png images; masks share the image stem, in png or bmp."""
    root = str(tmp_path / "btad")
    _touch(
        root,
        "01/train/ok/0000.bmp",
        "01/train/ok/0001.bmp",
        "01/test/ok/0000.bmp",
        "01/test/ko/0000.bmp",
        "01/test/ko/0001.bmp",
        "01/test/ko/0002.bmp",
        "01/ground_truth/ko/0000.png",
        "01/ground_truth/ko/0001.bmp",
        "02/train/ok/0000.png",
        "02/test/ok/0000.png",
    )
    return root


def test_parse_spec_kinds(synthetic_root, tmp_path):
    root = str(synthetic_root)
    assert parse_spec(f"mvtec:{root}") == DatasetSpec("mvtec", root)
    assert parse_spec(f"MVTec:{root}/") == DatasetSpec("mvtec", root)
    assert parse_spec(f"btad:{root}").kind == "btad"
    assert parse_spec(f"folder:{tmp_path}") == DatasetSpec("folder", str(tmp_path))
    spec = DatasetSpec("folder", root)
    assert parse_spec(spec) is spec


def test_parse_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset kind 'imagenet'"):
        parse_spec(f"imagenet:{tmp_path}")
    missing = str(tmp_path / "nowhere")
    for spec in (f"mvtec:{missing}", f"folder:{missing}", missing):
        with pytest.raises(ValueError, match="nowhere"):
            parse_spec(spec)
    with pytest.raises(ValueError, match="no root"):
        parse_spec("mvtec:")


def test_parse_spec_infers_bare_layouts(synthetic_root, btad_root, tmp_path):
    assert parse_spec(str(synthetic_root)).kind == "mvtec"
    assert parse_spec(str(synthetic_root / "synthetic")).kind == "mvtec"  # one category
    assert parse_spec(btad_root).kind == "btad"
    _touch(str(tmp_path / "plain"), "a/x.png", "y.png")
    assert parse_spec(str(tmp_path / "plain")) == DatasetSpec("folder", str(tmp_path / "plain"))
    # a URI's scheme is not a dataset kind: file:// is a bare path with its layout inferred
    assert parse_spec(f"file://{synthetic_root}").kind == "mvtec"


def test_mvtec_layout(synthetic_root):
    spec = f"mvtec:{synthetic_root}"
    assert categories(spec) == ["synthetic"]
    train = train_paths(spec, "synthetic")
    assert len(train) == 12 and train == sorted(train)
    assert all("/synthetic/train/good/" in p for p in train)
    assert train_paths(spec) == train  # the only category is picked
    samples = test_samples(spec, "synthetic")
    assert all(isinstance(s, Sample) for s in samples)
    assert sum(s.label == 0 for s in samples) == 4 and sum(s.label for s in samples) == 6
    assert {s.defect for s in samples} == {"good", "scratch", "stain", "hole"}
    for s in samples:
        assert (s.defect == "good") == (s.label == 0)
        if s.label:
            stem = s.path.rsplit("/", 1)[1][:-4]
            assert s.mask_path == str(
                synthetic_root / "synthetic" / "ground_truth" / s.defect / f"{stem}_mask.png"
            )
            assert int(load_mask(s.mask_path, 64).sum()) > 0
        else:
            assert s.mask_path is None


def test_mvtec_without_ground_truth(synthetic_root, tmp_path):
    root = tmp_path / "nogt"
    shutil.copytree(synthetic_root, root)
    shutil.rmtree(root / "synthetic" / "ground_truth")
    samples = test_samples(f"mvtec:{root}", "synthetic")
    assert len(samples) == 10 and sum(s.label for s in samples) == 6
    assert all(s.mask_path is None for s in samples)


def test_mvtec_category_errors_list_the_choices(synthetic_root, tmp_path):
    with pytest.raises(ValueError, match="'bottle' not found.*synthetic"):
        train_paths(f"mvtec:{synthetic_root}", "bottle")
    root = tmp_path / "two"
    shutil.copytree(synthetic_root / "synthetic", root / "cable")
    shutil.copytree(synthetic_root / "synthetic", root / "screw")
    (root / "license.txt").write_text("not a category")
    assert categories(f"mvtec:{root}") == ["cable", "screw"]
    with pytest.raises(ValueError, match="cable, screw"):
        train_paths(f"mvtec:{root}")
    shutil.rmtree(root / "screw" / "train" / "good")
    with pytest.raises(ValueError, match="train/good"):
        train_paths(f"mvtec:{root}", "screw")


def test_root_that_is_one_category(synthetic_root):
    spec = f"mvtec:{synthetic_root / 'synthetic'}"
    assert categories(spec) == ["synthetic"]
    assert (
        train_paths(spec)
        == train_paths(spec, "synthetic")
        == train_paths(f"mvtec:{synthetic_root}", "synthetic")
    )


def test_btad_layout(btad_root):
    spec = f"btad:{btad_root}"
    assert categories(spec) == ["01", "02"]
    assert [p.rsplit("/", 1)[1] for p in train_paths(spec, "01")] == ["0000.bmp", "0001.bmp"]
    samples = test_samples(spec, "01")
    assert [(s.defect, s.label) for s in samples] == [("ko", 1)] * 3 + [("ok", 0)]
    masks = [s.mask_path and s.mask_path.rsplit("/", 2)[1:] for s in samples]
    assert masks == [["ko", "0000.png"], ["ko", "0001.bmp"], None, None]
    with pytest.raises(ValueError, match="01, 02"):
        test_samples(spec)


def test_folder_layout(tmp_path):
    base = str(tmp_path / "imgs")
    _touch(base, "b.png", "a/c.JPG", "a/deep/d.bmp")
    storage.write_text(storage.join(base, "readme.txt"), "ignored")
    spec = f"folder:{base}"
    assert categories(spec) == []
    paths = train_paths(spec)
    assert [storage.relative(p, base) for p in paths] == ["a/c.JPG", "a/deep/d.bmp", "b.png"]
    samples = test_samples(spec)
    assert [s.path for s in samples] == paths
    assert all(s.label == 0 and s.mask_path is None for s in samples)
    assert train_paths(spec, "a") == paths[:2]  # a category is a sub-folder
    storage.makedirs(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no images.*empty"):
        train_paths(f"folder:{tmp_path / 'empty'}")


def test_s3_dataset(s3_bucket):
    prefix = storage.join(s3_bucket, "datasets", "mv")
    make_synthetic_dataset(prefix, "tex", n_train=3, n_test_good=1, n_test_defect=3, size=32)
    spec = parse_spec(prefix + "/")
    assert spec == DatasetSpec("mvtec", prefix)
    assert parse_spec(f"mvtec:{prefix}") == spec
    assert categories(spec) == ["tex"]
    train = train_paths(spec)
    assert train == [f"{prefix}/tex/train/good/{i:03d}.png" for i in range(3)]
    samples = test_samples(prefix, "tex")
    assert [(s.defect, s.label) for s in samples] == [
        ("good", 0),
        ("hole", 1),
        ("scratch", 1),
        ("stain", 1),
    ]
    assert samples[1].mask_path == f"{prefix}/tex/ground_truth/hole/000_mask.png"
    assert load_image(train[0], 16).shape == (3, 16, 16)
    assert int(load_mask(samples[1].mask_path, 32).sum()) > 0
    with pytest.raises(ValueError, match="nothing-here"):
        parse_spec(storage.join(s3_bucket, "nothing-here"))


def test_test_samples_is_not_collected_as_a_test():
    assert test_samples.__test__ is False

import json

import pytest

from mspray.cli import main


def _train(root, out, *flags: str) -> int:
    """``mspray train`` on the synthetic set, random init at 64 px, plus ``flags``."""
    base = ["-q", "train", "--data", f"mvtec:{root}", "--category", "synthetic"]
    return main([*base, "--out", str(out), "--no-pretrained", "--image-size", "64", *flags])


@pytest.fixture(scope="module")
def bundle(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "bundle"
    rc = _train(synthetic_root, out, "--epochs", "1", "--scales", "32,16",
                "--samples-per-image", "4", "--device", "cpu")  # fmt: skip
    assert rc == 0
    return out


def test_cli_evaluate_writes_the_metrics_contract(bundle, synthetic_root, tmp_path):
    out = tmp_path / "m.json"
    maps = tmp_path / "maps"
    rc = main(
        [
            "-q",
            "evaluate",
            "--bundle",
            str(bundle),
            "--data",
            f"mvtec:{synthetic_root}",
            "--category",
            "synthetic",
            "--json",
            str(out),
            "--maps",
            str(maps),
        ]
    )
    assert rc == 0
    m = json.loads(out.read_text())
    for k in (
        "image_auroc",
        "pixel_auroc",
        "pixel_aupro",
        "f1_max",
        "threshold",
        "n_images",
        "seconds_per_image",
    ):
        assert k in m
    assert 0 <= m["image_auroc"] <= 1 and 0 <= m["pixel_aupro"] <= 1
    assert m["n_images"] == len(list(maps.glob("*.png"))) > 0
    assert m["seconds_per_image"] > 0


def test_cli_evaluate_without_ground_truth_gives_null_pixel_metrics(
    bundle, synthetic_root, tmp_path
):
    import shutil

    root = tmp_path / "nogt"
    shutil.copytree(synthetic_root, root)
    shutil.rmtree(root / "synthetic" / "ground_truth")
    out = tmp_path / "m.json"
    assert (
        main(
            [
                "-q",
                "evaluate",
                "--bundle",
                str(bundle),
                "--data",
                f"mvtec:{root}",
                "--category",
                "synthetic",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    m = json.loads(out.read_text())
    assert m["pixel_auroc"] is None and m["pixel_aupro"] is None
    assert m["image_auroc"] is not None


def test_cli_errors_are_clear(tmp_path, capsys):
    rc = main(
        [
            "-q",
            "train",
            "--data",
            f"folder:{tmp_path / 'missing'}",
            "--out",
            str(tmp_path / "b"),
            "--epochs",
            "-1",
        ]
    )
    assert rc == 2
    assert "train.epochs" in capsys.readouterr().err
    rc = main(
        ["-q", "train", "--data", f"folder:{tmp_path / 'missing'}", "--out", str(tmp_path / "b")]
    )
    assert rc == 2
    assert "missing" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(b"\x89PNG garbage")
    rc = main(
        [
            "-q",
            "train",
            "--data",
            f"folder:{tmp_path / 'imgs'}",
            "--out",
            str(tmp_path / "b"),
            "--no-pretrained",
            "--image-size",
            "64",
            "--scales",
            "16",
        ]
    )
    assert rc == 2
    assert "x.png" in capsys.readouterr().err


def test_cli_train_no_banks_saves_encoders_only(synthetic_root, tmp_path, capsys):
    from mspray.artifacts.bundle import BundleError, load_bundle, resolve_bundle

    out = tmp_path / "enc"
    rc = _train(synthetic_root, out, "--epochs", "0", "--scales", "16", "--no-banks")
    assert rc == 0
    assert not list(out.rglob("bank_*.faiss")) and list(out.glob("versions/*/meta.json"))
    printed = json.loads(capsys.readouterr().out)
    version = printed["version_uri"]
    assert version == resolve_bundle(version) == str(out / "versions" / printed["version"])
    # an encoders-only version never becomes `latest`: the root has no complete version
    with pytest.raises(BundleError, match="no complete version yet"):
        resolve_bundle(str(out))
    assert load_bundle(version, with_banks=False).threshold is None
    with pytest.raises(BundleError, match="bank_16"):
        load_bundle(version)

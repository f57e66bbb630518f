"""ONNX export: encoders equal to torch, a torch-free scorer equal to Detector, runtime=onnx."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from mspray.artifacts.bundle import load_bundle, read_config, save_bundle  # noqa: E402
from mspray.cli import main as cli_main  # noqa: E402
from mspray.config import MSPrayConfig  # noqa: E402
from mspray.data.images import load_image  # noqa: E402
from mspray.data.synthetic import make_synthetic_dataset  # noqa: E402
from mspray.decisions.summaries import calibrate
from mspray.detector import Detector  # noqa: E402
from mspray.model.multiscale import MultiScaleEncoder  # noqa: E402
from mspray.onnx.convert import OnnxEncoders  # noqa: E402
from mspray.onnx.export import export_bundle  # noqa: E402

SIZE = 96


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """An untrained three-scale detector (64 at stride 16 = 2x its network stride) with
    banks and calibration from synthetic 96 px images, saved as a bundle."""
    root = tmp_path_factory.mktemp("exp")
    data = Path(
        make_synthetic_dataset(
            str(root), "s", n_train=6, n_test_good=1, n_test_defect=1, size=SIZE, seed=3
        )
    )
    cfg = MSPrayConfig().replace(
        **{
            "model.image_size": SIZE,
            "model.embed_dim": 16,
            "model.pretrained": False,
            "bank.coreset_ratio": 0.5,
        }
    )
    torch.manual_seed(0)
    det = Detector(cfg, MultiScaleEncoder(cfg))
    paths = sorted(str(p) for p in (data / "train" / "good").glob("*.png"))
    images = torch.stack([load_image(p, SIZE) for p in paths])
    det.build_banks(images[:4])
    calibrate(det, images[4:])
    out = str(root / "bundle")
    save_bundle(det, out)
    test = sorted(str(p) for p in (data / "test").rglob("*.png"))
    return out, test, str(root)


def test_onnx_encoders_match_torch_for_any_batch_and_size(bundle):
    det = load_bundle(bundle[0])
    onnx = OnnxEncoders(det.model, det.scales)
    g = torch.Generator().manual_seed(1)
    for shape in ((1, 3, 96, 96), (3, 3, 80, 112)):  # dynamic batch, height and width
        x = torch.randn(*shape, generator=g)
        for s in det.scales:
            with torch.no_grad():
                ref = det.model.encoder(s)(x).numpy()
            got = onnx[s](x.numpy())
            assert got.shape == ref.shape
            assert np.abs(got - ref).max() < 1e-4, s


def test_runtime_onnx_detector_scores_like_torch(bundle):
    uri, test, _ = bundle
    cfg = read_config(uri)
    # the reference is torch in fp32 (on a CPU with native bf16, "auto" would be bf16)
    det_t = load_bundle(uri, config=cfg.replace(**{"score.precision": "fp32"}))
    det_o = load_bundle(uri, config=cfg.replace(**{"score.runtime": "onnx"}))
    assert det_o.inference_mode["runtime"] == "onnx"
    images = torch.stack([load_image(p, SIZE) for p in test])
    a, b = det_t.predict(images), det_o.predict(images)
    # encoders agree to ~1e-7; sqrt of a near-zero squared distance (a patch on a bank
    # vector) amplifies that to ~1e-4 in a few map pixels, hence the looser map tolerance
    torch.testing.assert_close(b.image_scores, a.image_scores, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.maps, a.maps, rtol=1e-3, atol=2e-3)


def test_cli_export_then_torch_free_scorer_equals_detector(bundle, tmp_path):
    uri, test, _ = bundle
    out = tmp_path / "export"
    assert cli_main(["export", "--bundle", uri, "--format", "onnx", "--out", str(out)]) == 0
    spec = json.loads((out / "mspray_export.json").read_text())
    assert spec["scales"] == [64, 32, 16] and spec["strides"] == [16, 4, 4]
    assert spec["fusion"] == "zscore" and set(spec["fusion_stats"]) == {"64", "32", "16"}
    for s in (64, 32, 16):
        assert (out / f"encoder_{s}.onnx").is_file() and (out / f"bank_{s}.faiss").is_file()

    code = (
        "import json, sys\n"
        "from mspray.onnx.runtime import ExportedScorer, load_rgb\n"
        "sc = ExportedScorer(sys.argv[1])\n"
        "scores, maps = sc.predict(load_rgb(sys.argv[2], sc.spec['image_size'])[None])\n"
        "assert 'torch' not in sys.modules, 'the export runtime imported torch'\n"
        "print(json.dumps({'score': float(scores[0]), 'map': maps[0].ravel()[::97].tolist()}))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(out), test[-1]],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    got = json.loads(res.stdout)
    det = load_bundle(uri, config=read_config(uri).replace(**{"score.precision": "fp32"}))
    pred = det.predict(load_image(test[-1], SIZE)[None])
    assert got["score"] == pytest.approx(float(pred.image_scores[0]), rel=1e-4, abs=1e-4)
    np.testing.assert_allclose(got["map"], pred.maps[0].ravel()[::97].numpy(), rtol=1e-3, atol=2e-3)


def test_export_rejects_unknown_format_and_detector_without_banks(bundle, tmp_path):
    with pytest.raises(ValueError, match="format"):
        export_bundle(bundle[0], str(tmp_path / "x"), fmt="tflite")
    det = load_bundle(bundle[0], with_banks=False)
    with pytest.raises(ValueError, match="no bank"):
        export_bundle(det, str(tmp_path / "y"))


def test_cli_evaluate_runtime_onnx_records_mode_and_matches_torch(bundle, tmp_path):
    uri, _, root = bundle
    runs = {}
    for runtime in ("torch", "onnx"):
        out = tmp_path / f"{runtime}.json"
        argv = ["-q", "evaluate", "--bundle", uri, "--data", f"mvtec:{root}", "--category", "s"]
        assert cli_main([*argv, "--json", str(out), "--runtime", runtime]) == 0
        runs[runtime] = json.loads(out.read_text())
    assert runs["onnx"]["inference"] == {
        "runtime": "onnx",
        "precision": "fp32",
        "channels_last": False,
    }
    assert runs["torch"]["inference"]["runtime"] == "torch"
    for key in ("image_auroc", "pixel_auroc"):
        assert runs["onnx"][key] == pytest.approx(runs["torch"][key], abs=1e-3)

"""One seed and config give bit-identical weights: nothing in training reads the clock."""

from __future__ import annotations

from pathlib import Path

from mspray.bundle import read_meta, resolve_bundle
from mspray.data.datasets import train_paths
from mspray.fit import fit_detector


def test_two_single_process_runs_write_bit_identical_weights(tiny_cfg, synthetic_root, tmp_path):
    cfg = tiny_cfg.replace(**{"train.epochs": 2, "model.scales": (16,), "model.strides": (4,)})
    uris = train_paths(f"mvtec:{synthetic_root}", "synthetic")
    for name in ("a", "b"):
        fit_detector(cfg, uris, out=str(tmp_path / name), progress=False)
    a, b = (Path(resolve_bundle(str(tmp_path / n)), "model.safetensors") for n in "ab")
    assert a.read_bytes() == b.read_bytes()
    meta = read_meta(str(tmp_path / "a"))
    run = meta["training"]["16"]
    assert run["stopped_by"] == "epochs" and run["epochs"] == 2 and run["steps"] > 0
    assert 0 <= run["selected_epoch"] <= 2 and len(run["history"]) == 2
    assert [c["epoch"] for c in run["candidates"]] == [0, 1, 2]  # the selection table

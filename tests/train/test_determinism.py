"""One seed and config give bit-identical weights: nothing in training reads the clock."""

from __future__ import annotations

from pathlib import Path

from mspray.artifacts.bundle import read_meta, resolve_bundle
from mspray.data.datasets import train_paths
from mspray.pipeline.steps import fit_detector


def test_two_single_process_runs_write_bit_identical_weights(tiny_cfg, synthetic_root, tmp_path):
    cfg = tiny_cfg.replace(**{"train.epochs": 2, "model.scales": (16,), "model.strides": (4,)})
    cfg = cfg.replace(**{"train.select_every": 1})
    uris = train_paths(f"mvtec:{synthetic_root}", "synthetic")
    for name in ("a", "b"):
        fit_detector(cfg, uris, out=str(tmp_path / name))
    a, b = (Path(resolve_bundle(str(tmp_path / n)), "model.safetensors") for n in "ab")
    assert a.read_bytes() == b.read_bytes()
    meta = read_meta(str(tmp_path / "a"))
    run = meta["training"]["16"]
    assert run["stopped_by"] == "epochs" and run["epochs"] == 2 and run["steps"] > 0
    assert 0 <= run["selected_epoch"] <= 2 and len(run["history"]) == 2
    assert [c["epoch"] for c in run["candidates"]] == [0, 1, 2]  # the selection table
    fused = meta["selection"]  # the fused detector checked against the untrained encoders
    assert fused["choice"] in ("selected", "untrained")
    for row in fused["fused"].values():
        assert 0 <= row["image_auroc"] <= 1 and set(row["per_scale"]) == {"16"}


def test_same_thread_count_gives_identical_weights():
    # The promise is exact for one device kind and thread count (not across thread counts).
    import torch

    from mspray.config import MSPrayConfig
    from mspray.model.multiscale import build_scale_model
    from mspray.train.loop import ScaleTrainer

    cfg = MSPrayConfig().replace(
        **{
            "train.epochs": 2,
            "train.samples_per_image": 4,
            "train.batch_size": 8,
            "train.n_centers": 4,
            "train.lr": 1e-3,
            "model.image_size": 64,
            "model.scales": (16,),
            "model.strides": (4,),
            "model.embed_dim": 16,
            "model.pretrained": False,
        }
    )
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            states = []
            for _ in range(2):
                tr = ScaleTrainer(cfg, 16, build_scale_model(cfg, 16, None))
                tr.fit(images, images[:2])
                states.append(tr.core.state_dict())
            for k, v in states[0].items():
                assert torch.equal(v, states[1][k]), (threads, k)
    finally:
        torch.set_num_threads(before)

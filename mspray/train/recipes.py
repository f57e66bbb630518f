"""Named training recipes: config presets applied before explicit overrides.

``paper``: the paper's settings for ImageNet-initialised encoders (the config defaults:
Adam lr 1e-5, λ = 1e-3, 100 samples per image, 20 epochs). This is the production path.

``random-init``: for encoders trained from scratch (no ImageNet weights). At lr 1e-5 a
randomly initialised encoder barely moves (the SSL term stays at ln 12 ≈ 2.485, chance, for
whole epochs), so this recipe uses lr 1e-3, refits the K-means centers every epoch (the
embeddings move fast), 128-px images and fewer samples per image so that a scale trains in
minutes on a few CPU cores. ``benchmarks/bench_ablation.py`` measures what it gives.
"""

from __future__ import annotations

from typing import Any

from mspray.config import ConfigError, MSPrayConfig

RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "random-init": {
        "model.pretrained": False,
        "model.image_size": 128,
        "train.lr": 1e-3,
        "train.samples_per_image": 32,
        "train.batch_size": 32,
        "train.epochs": 8,
        "train.center_update_every": 1,
        "train.n_centers": 10,
    },
}


def apply_recipe(cfg: MSPrayConfig, name: str) -> MSPrayConfig:
    """``cfg`` with recipe ``name``'s settings (see :data:`RECIPES`)."""
    if name not in RECIPES:
        raise ConfigError(f"recipe {name!r}: unknown; choose from {sorted(RECIPES)}")
    over = RECIPES[name]
    return cfg.replace(**over) if over else cfg

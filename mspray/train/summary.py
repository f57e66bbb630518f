"""What a scale's training reports: the ``meta.json`` summary and the train log line."""

from __future__ import annotations

import math
from typing import Any

from mspray.config import MSPrayConfig
from mspray.train.sampling import ssl_skip_reason


def run_summary(
    history: list[dict[str, float]],
    cfg: MSPrayConfig,
    candidates: list[dict[str, float]] | None = None,
    scale: int | None = None,
) -> dict[str, Any]:
    """Where a scale's training stopped and why, its per-epoch history and the selection
    table (``candidates``: one row per epoch, 0 included), for ``meta.json`` (non-finite
    numbers become None so the file is strict JSON); with ``scale``, why its SSL term was
    skipped (``ssl_skipped``, None when it ran or was not asked for)."""

    def clean(v: float) -> float | None:
        return float(v) if math.isfinite(v) else None

    last = history[-1] if history else {}
    stopped = bool(last.get("stopped_at_max_steps"))
    return {
        "epochs": int(last.get("epoch", 0)),
        "steps": int(last.get("steps", 0)),
        "stopped_by": "max_steps" if stopped else "epochs",
        "max_steps": cfg.train.max_steps,
        "selection": cfg.train.selection if candidates or history else None,
        "selected_epoch": int(last.get("best_epoch", 0)),
        "candidates": [{k: clean(v) for k, v in c.items()} for c in candidates or []],
        "history": [{k: clean(v) for k, v in h.items()} for h in history],
        "ssl_skipped": None
        if scale is None or "ssl" not in cfg.train.losses
        else ssl_skip_reason(cfg.model.image_size, cfg.model.image_size, scale),
    }


def log_line(m: dict[str, float]) -> str:
    """One epoch's metrics as ``key=value`` pairs for the train log."""
    keys = ("loss", "svdd", "cos", "ssl", "ssl_acc", "kmeans", "spread", "val_score")
    keys += ("val_ssl_acc", "val_spread", "sel_image_auroc", "sel_pixel_auroc", "steps")
    return " ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)

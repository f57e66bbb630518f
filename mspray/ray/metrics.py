"""Live Prometheus metrics of the Serve endpoint and of batch scoring.

Everything goes through Ray's metrics API, so the values show up on each node's metrics
export port next to Ray's own (Prometheus adds the ``ray_`` prefix: ``ray_mspray_...``).
Serve metrics use :mod:`ray.serve.metrics`, which also tags each series with the
application, deployment and replica. Tags are bounded sets only: model names come from the
config (an unknown name requested by a client is counted as ``model="unknown"``), never
from free text.

=====================================  =========  =====================================
metric                                 type       tags
=====================================  =========  =====================================
mspray_serve_request_latency_s         histogram  model, outcome (ok, bad_input,
                                                  unknown_model, load_failed, error)
mspray_serve_batch_size                histogram  model
mspray_serve_images                    counter    model, verdict (normal, anomalous,
                                                  uncalibrated): anomaly rate per model =
                                                  anomalous / all
mspray_serve_model_info                gauge      model, version: 1 while loaded on the
                                                  replica, 0 once unloaded
mspray_score_images                    counter    model, outcome (scored, error)
mspray_score_errors                    counter    model, reason (see :func:`error_reason`)
=====================================  =========  =====================================
"""

from __future__ import annotations

from typing import Any

#: Request latency buckets, seconds (a CPU forward pass of a batch is 0.05 s to a few s).
LATENCY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]
#: Outcome of one predict request (the ``outcome`` tag).
OUTCOMES = ("ok", "bad_input", "unknown_model", "load_failed", "error")


class ServeMetrics:
    """The metrics of one Serve replica (create inside the replica)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.latency = metrics.Histogram(
            "mspray_serve_request_latency_s",
            description="POST /v1/predict latency in the replica, by model and outcome.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("model", "outcome"),
        )
        self.batch_size = metrics.Histogram(
            "mspray_serve_batch_size",
            description="Images per forward pass, by model.",
            boundaries=BATCH_BUCKETS,
            tag_keys=("model",),
        )
        self.images = metrics.Counter(
            "mspray_serve_images",
            description="Images scored, by model and verdict (anomaly rate = anomalous / all).",
            tag_keys=("model", "verdict"),
        )
        self.model_info = metrics.Gauge(
            "mspray_serve_model_info",
            description="1 while a model version is loaded on the replica, 0 once unloaded.",
            tag_keys=("model", "version"),
        )

    def request(self, model: str, outcome: str, seconds: float) -> None:
        self.latency.observe(seconds, tags={"model": model, "outcome": outcome})

    def batch(self, model: str, flags: list[bool | None]) -> None:
        """One executed forward pass of ``len(flags)`` images and their verdicts."""
        self.batch_size.observe(len(flags), tags={"model": model})
        for verdict in ("normal", "anomalous", "uncalibrated"):
            n = sum(_verdict(f) == verdict for f in flags)
            if n:
                self.images.inc(n, tags={"model": model, "verdict": verdict})

    def loaded(self, model: str, version: str, value: int = 1) -> None:
        self.model_info.set(value, tags={"model": model, "version": version})


def _verdict(flag: bool | None) -> str:
    return "uncalibrated" if flag is None else ("anomalous" if flag else "normal")


#: ``reason`` tag of a scoring error row, first match on its message.
ERROR_REASONS = (
    ("no_model", "matches no model"),
    ("missing", "no such file"),
    ("too_large", "over the limit"),
    ("too_large", "decompression bomb"),
    ("empty", "empty"),
    ("decode", "image"),
)


def error_reason(message: str) -> str:
    """A bounded ``reason`` for an error row's message (``other`` when none matches)."""
    low = message.lower()
    return next((reason for reason, needle in ERROR_REASONS if needle in low), "other")


class ScoreMetrics:
    """Counters of a scoring actor (Ray Data workers export them like any Ray process)."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.images = metrics.Counter(
            "mspray_score_images",
            description="Rows written by batch scoring, by model and outcome (scored, error).",
            tag_keys=("model", "outcome"),
        )
        self.errors = metrics.Counter(
            "mspray_score_errors",
            description="Error rows of batch scoring, by model and reason.",
            tag_keys=("model", "reason"),
        )

    def rows(self, model: str, rows: list[dict[str, Any]]) -> None:
        """Count the rows of one written part."""
        errors = [r["error"] for r in rows if r.get("error") is not None]
        if len(rows) > len(errors):
            self.images.inc(len(rows) - len(errors), tags={"model": model, "outcome": "scored"})
        if errors:
            self.images.inc(len(errors), tags={"model": model, "outcome": "error"})
        for reason in {error_reason(e) for e in errors}:
            n = sum(error_reason(e) == reason for e in errors)
            self.errors.inc(n, tags={"model": model, "reason": reason})

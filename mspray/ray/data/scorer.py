"""The model stage of batch scoring: :class:`UnitScorer`, a Ray Data actor that scores
decoded work units (see :func:`mspray.ray.data.reading.decode_units`) and writes one
Parquet part per unit; it never reads or decodes images itself.

Units arrive as uint8 images; the actor scales them to ``[0, 1]`` on its device. Heatmap
panels are encoded and written on the actor's small I/O pool while the model goes on with
the next batch; the part is written once every panel of its unit is out.

Faults: a model failure (e.g. CUDA out of memory) falls back to one image at a time and
the unit is retried :data:`MODEL_ATTEMPTS` times; if it still fails, the unit fails: no
part is written and the summary row says why (a rerun scores it again). A lasting CUDA
hardware fault (illegal memory access, ECC, Xid) ends the actor's process instead
(:meth:`~mspray.ray.runtime.DetectorActor.check_device`): Ray starts a fresh one and retries
the unit there, a bounded number of times; a device error that would recur (no kernel
image for this GPU, a device-side assert), or a unit past its retries, gets error rows.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from concurrent.futures import Future, wait
from typing import Any

import pyarrow as pa
import torch

from mspray import viz
from mspray.artifacts.bundle import load_bundle
from mspray.artifacts.lease import LeaseFence, LeaseLost
from mspray.artifacts.output import map_uri, result_schema, write_output, write_part
from mspray.detector_cache import DetectorCache
from mspray.ray.data.plan import ScoringPlan
from mspray.ray.data.reading import DecodedBatch, TransientError, unpack_unit
from mspray.ray.data.routing import no_model_error
from mspray.ray.metrics import ScoreMetrics
from mspray.ray.runtime import DetectorActor, DeviceError, where_am_i

log = logging.getLogger(__name__)

#: Bundles one scoring actor keeps loaded in a multi-model run (least recently used goes).
MODELS_PER_ACTOR = 2

#: Attempts per unit at the model (a failure of the whole batch and then of an image alone,
#: e.g. CUDA out of memory), with this first backoff in seconds (doubling).
MODEL_ATTEMPTS = 3
MODEL_BACKOFF_S = 1.0

#: What an actor returns per unit (the rows themselves go straight to the part file).
UNIT_SUMMARY = pa.schema(
    [
        ("part", pa.string()),
        ("images", pa.int64()),
        ("errors", pa.int64()),
        ("flagged", pa.int64()),
        ("seconds", pa.float64()),
        ("node", pa.string()),  # Ray node id of the actor
        ("actor", pa.string()),  # Ray actor id
        ("decoder", pa.string()),  # Ray node id of the decode task
        ("failure", pa.string()),  # set when the unit failed: no part was written
        ("inference", pa.string()),  # how the encoders ran (runtime/precision/layout)
        # JSON {stage: seconds} summed over the unit: decode, the model's stages
        # (Detector.predict's timings), write (the part and the heatmap panels)
        ("stage_seconds", pa.string()),
    ]
)


def inference_text(mode: dict) -> str:
    """``Detector.inference_mode`` as one short string: ``runtime/precision/layout``."""
    layout = "channels_last" if mode["channels_last"] else "nchw"
    return f"{mode['runtime']}/{mode['precision']}/{layout}"


class UnitScorer(DetectorActor):
    """Ray Data actor of the plan's models: one unit in, its part written, one summary row
    out. It starts with the plan's first model and loads the others when a unit needs them,
    keeping the :data:`MODELS_PER_ACTOR` most recently used (units come grouped by model,
    so an actor mostly scores a run of units of one model)."""

    def __init__(self, plan: ScoringPlan, fence: LeaseFence | None = None, **actor: Any) -> None:
        super().__init__(**actor)
        self.plan = plan
        self.fence = fence  # the run's hold on the output's lease
        self.schema = result_schema(plan.scales)
        self.models = DetectorCache(MODELS_PER_ACTOR, self._load)
        self.models.put(plan.first.name, self.det)
        self.metrics = ScoreMetrics()
        self.node, self.actor = where_am_i()

    def _load(self, name: str) -> Any:
        model = self.plan.models[name]
        return load_bundle(model.uri, device=self.det.device, config=model.cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(
            [self.score_unit(row) for row in batch.to_pylist()], schema=UNIT_SUMMARY
        )

    def score_unit(self, unit: dict) -> dict:
        """Score one decoded unit with its model and write its part; returns the unit's
        summary row. A transient failure (decode stage or here) writes nothing and sets
        ``failure``."""
        t0 = time.perf_counter()
        name = unit.get("model") or None
        summary = {"part": None, "images": 0, "errors": 0, "flagged": 0, "node": self.node}
        summary.update(actor=self.actor, decoder=unit["decoder"], failure=unit["failure"])
        summary["inference"] = inference_text(self.det.inference_mode)
        timings = {"decode": unit.get("seconds") or 0.0}
        if unit["failure"] is None:
            try:
                rows = self._unit_rows(unit, name, timings)
                if self.fence is not None:
                    self.fence.assert_held()  # taken over: write nothing beside the new holder
                t_write = time.perf_counter()
                part = write_part(self.plan.output, pa.Table.from_pylist(rows, schema=self.schema))
                timings["write"] = timings.get("write", 0.0) + time.perf_counter() - t_write
            except (TransientError, OSError, LeaseLost) as e:  # model, writes, lease
                summary["failure"] = f"{type(e).__name__}: {e}"
            else:
                summary.update(part=part, images=len(rows))
                summary["errors"] = sum(r.get("error") is not None for r in rows)
                summary["flagged"] = sum(r.get("is_anomalous") is True for r in rows)
                self.metrics.rows(name or "default", rows)
        if summary["failure"] is not None:
            log.error("unit of %d images failed, a rerun retries it: %s",
                      len(unit["paths"]), summary["failure"])  # fmt: skip
        summary["seconds"] = time.perf_counter() - t0
        summary["stage_seconds"] = json.dumps(timings)
        return summary

    def _unit_rows(self, unit: dict, name: str | None, timings: dict[str, float]) -> list[dict]:
        if name not in self.plan.models:
            # the driver routed these paths to no model: an error row each
            known, now = sorted(self.plan.models), dt.datetime.now(dt.timezone.utc)
            return [
                {"path": p, "error": no_model_error(p, name, known), "scored_at": now}
                for p in unit["paths"]
            ]
        det = self.models.get(name)
        loaded = unpack_unit(unit, det.cfg.model.image_size)
        for attempt in range(MODEL_ATTEMPTS):
            writes: list[Future] = []
            try:
                rows = [
                    row
                    for chunk in loaded.chunks(det.cfg.score.batch_size)
                    for row in self._score_batch(det, chunk, name, writes, timings)
                ]
            except DeviceError as e:  # would recur: an error row per image, with the reason
                wait(writes)
                now = dt.datetime.now(dt.timezone.utc)
                return [{"path": p, "error": str(e), "scored_at": now} for p in unit["paths"]]
            except TransientError:
                wait(writes)  # the retry writes the same panels again
                if attempt + 1 == MODEL_ATTEMPTS:
                    raise
                self._free_memory()
                time.sleep(MODEL_BACKOFF_S * 2**attempt)
            else:
                t_write = time.perf_counter()  # panels still encoding on the I/O pool
                for f in writes:
                    f.result()  # a panel that could not be written fails the unit
                timings["write"] = time.perf_counter() - t_write
                return rows
        raise AssertionError("unreachable")

    def _free_memory(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _score_batch(
        self,
        det: Any,
        loaded: DecodedBatch,
        name: str | None,
        writes: list[Future],
        timings: dict[str, float],
    ) -> list[dict]:
        """Rows of one forward pass; its heatmap writes are added to ``writes``, its stage
        seconds to ``timings``."""
        now = dt.datetime.now(dt.timezone.utc)
        base = {
            "threshold": det.threshold,
            "model_version": det.version,
            "scored_at": now,
            "model": self.plan.row_model(name),
        }
        ok = loaded.ok
        results: dict[int, dict] = {}
        maps: dict[int, torch.Tensor] = {}
        if ok:
            try:
                results, maps = self._predict(det, loaded.images, ok, timings)
            except Exception as e:  # e.g. out of memory on a big batch: one image at a time
                self.check_device(e, loaded.uris)  # a hardware fault: this process exits here
                log.warning(
                    "batch failed; scoring its %d images one by one", len(ok), exc_info=True
                )
                self._free_memory()
                for j, i in enumerate(ok):
                    try:
                        r, m = self._predict(det, loaded.images[j : j + 1], [i], timings)
                    except Exception as e:  # the model, not the image: fail, retry the unit
                        self.check_device(e, loaded.uris)
                        raise TransientError(
                            f"model failed on one image ({loaded.uris[i]}): {type(e).__name__}: {e}"
                        ) from e
                    results.update(r)
                    maps.update(m)
        if self.plan.maps and ok:
            if self.fence is not None:
                self.fence.assert_held()  # taken over: no panels beside the new holder's
            # an output that cannot be written fails the unit (a rerun scores it again)
            # instead of turning a good image into an error row
            for j, i in enumerate(ok):
                uri = map_uri(self.plan.output, self.plan.input_root, loaded.uris[i])
                results[i]["map_path"] = uri
                job = (uri, det.threshold, loaded.images[j], maps[i])
                writes.append(
                    self.io.submit(write_map, *job) if self.io else _done(write_map, *job)
                )
        rows = []
        for i, uri in enumerate(loaded.uris):
            row = {"path": uri, **base}
            if i in results:
                row.update(results[i])
            else:
                row["error"] = loaded.errors[i]
            rows.append(row)
        return rows

    def _predict(
        self, det: Any, images: torch.Tensor, positions: list[int], timings: dict[str, float]
    ) -> tuple[dict[int, dict], dict[int, torch.Tensor]]:
        """Result columns and fused maps of the good images, keyed by batch position."""
        x = images.to(det.device, non_blocking=True)
        pred = det.predict(x.float().div_(255.0) if x.dtype == torch.uint8 else x, timings)
        rows, maps = {}, {}
        for j, i in enumerate(positions):
            row: dict[str, Any] = {"image_score": float(pred.image_scores[j])}
            if pred.is_anomalous is not None:
                row["is_anomalous"] = bool(pred.is_anomalous[j])
            for s in det.scales:
                row[f"score_{s}"] = float(pred.scale_scores[s][j])
            rows[i] = row
            maps[i] = pred.maps[j]
        return rows, maps


def write_map(uri: str, threshold: float | None, image: torch.Tensor, amap: torch.Tensor) -> None:
    """Write the heatmap panel (image | overlay) of one image (``3×S×S``, uint8 or in
    ``[0, 1]``) to ``uri``."""
    lo, hi = viz.color_range(amap, threshold)
    rgb = image.permute(1, 2, 0).numpy() if image.dtype == torch.uint8 else viz.tensor_to_rgb(image)
    write_output(uri, viz.to_png(viz.overlay(rgb, amap.numpy(), lo, hi)))


def _done(fn: Any, *args: Any) -> Future:
    """``fn(*args)`` run now, as a finished future (an actor without an I/O pool)."""
    f: Future = Future()
    try:
        f.set_result(fn(*args))
    except Exception as e:
        f.set_exception(e)
    return f

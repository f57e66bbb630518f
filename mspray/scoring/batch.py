"""Batch scoring of an image prefix (local or ``s3://``) with Ray Data: streaming, resumable.

The driver lists the input prefix once and reads the ``path`` column of the parts already
in the output (see :mod:`mspray.scoring.results` for the layout); the images without a row
are cut into work units of ``part_size`` paths. Each unit is one row of a Ray dataset; an
actor pool (detector loaded once per actor) reads, decodes and scores a unit batch by batch,
writes its heatmaps and its Parquet part, and returns only a small summary row. Nothing
large ever reaches the driver, and each actor holds at most two decoded batches, so memory
stays flat however many images there are.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import torch

from mspray import storage, viz
from mspray.scoring.inputs import Loaded, error_text, iter_loaded
from mspray.scoring.results import (
    map_uri,
    read_results,
    result_schema,
    write_output,
    write_part,
    write_run_summary,
)
from mspray.scoring.runtime import PoolOptions, bundle_config, init_ray, load_worker_detector

log = logging.getLogger(__name__)

#: What an actor returns per unit (the rows themselves go straight to the part file).
_UNIT_SUMMARY = pa.schema(
    [
        ("part", pa.string()),
        ("images", pa.int64()),
        ("errors", pa.int64()),
        ("flagged", pa.int64()),
        ("seconds", pa.float64()),
    ]
)


@dataclass
class ScoreSummary:
    """Counts of one scoring run; ``missing`` and ``duplicates`` are checked on the output
    after the run and are 0 unless something went wrong (e.g. two runs overlapped)."""

    input: str
    output: str
    model_version: str | None
    images: int = 0  # listed under the input prefix
    skipped: int = 0  # already had a row before this run
    scored: int = 0  # rows written by this run, error rows included
    errors: int = 0  # rows of this run with ``error`` set
    parts: int = 0  # part files written by this run
    seconds: float = 0.0  # the whole run, Ray start-up and listings included
    score_seconds: float = 0.0  # the scoring pipeline alone (what images/s is over)
    first_part_seconds: float = 0.0  # pipeline start to the first part: actor start-up
    missing: int = 0  # listed images without a row after the run
    duplicates: int = 0  # extra rows of images with more than one
    stale_version_rows: int = 0  # skipped rows scored by another model version
    flagged: int = 0  # rows of this run with is_anomalous set
    #: what the bundle's threshold promises on normal images (meta.json "calibration")
    promised_fpr: float | None = None
    promised_fpr_interval: list[float] | None = None

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        rate = self.scored / self.score_seconds if self.score_seconds > 0 else 0.0
        return (
            f"mspray score: {self.images} images: scored={self.scored} "
            f"skipped={self.skipped} errors={self.errors} parts={self.parts} "
            f"missing={self.missing} duplicates={self.duplicates} "
            f"{self.flag_text()}in {self.seconds:.1f}s "
            f"(scoring {self.score_seconds:.1f}s, {rate:.2f} images/s) "
            f"-> {self.output}"
        )

    def flag_text(self) -> str:
        """Flagged share of this run's good rows vs the promised false-alarm rate."""
        good = self.scored - self.errors
        if good <= 0:
            return ""
        text = f"flagged={self.flagged} ({self.flagged / good:.2%}"
        if self.promised_fpr is not None and self.promised_fpr_interval:
            lo, hi = self.promised_fpr_interval
            text += f"; promised {self.promised_fpr:.2%} [{lo:.2%}, {hi:.2%}] on normal images"
        return text + ") "


class UnitScorer:
    """Ray Data actor: scores whole work units and writes one Parquet part per unit."""

    def __init__(
        self,
        bundle: str,
        config_json: str,
        input_root: str,
        output: str,
        maps: bool,
        cpus: float,
        gpus: float,
        io_threads: int,
    ) -> None:
        self.det = load_worker_detector(bundle, config_json, cpus, gpus)
        self.schema = result_schema(self.det.scales)
        self.input_root, self.output, self.maps = input_root, output, maps
        self.pool = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix="mspray-io")

    def __call__(self, batch: pa.Table) -> pa.Table:
        units = batch.column("paths").to_pylist()
        return pa.Table.from_pylist([self.score_unit(u) for u in units], schema=_UNIT_SUMMARY)

    def score_unit(self, paths: list[str]) -> dict:
        """Score ``paths`` and write their part; returns the unit's summary row."""
        t0 = time.perf_counter()
        cfg = self.det.cfg
        rows: list[dict] = []
        for loaded in iter_loaded(
            paths, cfg.score.batch_size, cfg.model.image_size, cfg.score, self.pool
        ):
            rows.extend(self._score_batch(loaded))
        part = write_part(self.output, pa.Table.from_pylist(rows, schema=self.schema))
        errors = sum(r.get("error") is not None for r in rows)
        return {
            "part": part,
            "images": len(rows),
            "errors": errors,
            "flagged": sum(r.get("is_anomalous") is True for r in rows),
            "seconds": time.perf_counter() - t0,
        }

    def _score_batch(self, loaded: Loaded) -> list[dict]:
        det = self.det
        now = dt.datetime.now(dt.timezone.utc)
        base = {"threshold": det.threshold, "model_version": det.version, "scored_at": now}
        errors = list(loaded.errors)
        ok = loaded.ok
        results: dict[int, dict] = {}
        maps: dict[int, torch.Tensor] = {}
        if ok:
            try:
                results, maps = self._predict(loaded.images, ok)
            except Exception:  # e.g. out of memory on a big batch: one image at a time
                log.warning(
                    "batch failed; scoring its %d images one by one", len(ok), exc_info=True
                )
                for j, i in enumerate(ok):
                    try:
                        r, m = self._predict(loaded.images[j : j + 1], [i])
                        results.update(r)
                        maps.update(m)
                    except Exception as e:
                        errors[i] = error_text(loaded.uris[i], e)
        if self.maps:
            # outside the try: an output that cannot be written fails the unit (a rerun
            # scores it again) instead of turning a good image into an error row
            for j, i in enumerate(ok):
                if i in results:
                    results[i]["map_path"] = self._write_map(
                        loaded.uris[i], loaded.images[j], maps[i]
                    )
        rows = []
        for i, uri in enumerate(loaded.uris):
            row = {"path": uri, **base}
            if i in results:
                row.update(results[i])
            else:
                row["error"] = errors[i] or f"{uri}: not scored"
            rows.append(row)
        return rows

    def _predict(
        self, images: torch.Tensor, positions: list[int]
    ) -> tuple[dict[int, dict], dict[int, torch.Tensor]]:
        """Result columns and fused maps of the good images, keyed by batch position."""
        det = self.det
        pred = det.predict(images)
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

    def _write_map(self, uri: str, image: torch.Tensor, amap: torch.Tensor) -> str:
        """The heatmap panel (image | overlay) of one image; returns where it went."""
        lo, hi = viz.color_range(amap, self.det.threshold)
        panel = viz.overlay(viz.tensor_to_rgb(image), amap.numpy(), lo, hi)
        out = map_uri(self.output, self.input_root, uri)
        write_output(out, viz.to_png(panel))
        return out


def bundle_version(bundle: str) -> str | None:
    """The version recorded in a bundle's meta.json."""
    return bundle_meta(bundle).get("version")


def bundle_meta(bundle: str) -> dict:
    """A bundle's meta.json."""
    return json.loads(storage.read_text(storage.join(bundle, "meta.json")))


def list_inputs(input_root: str, output: str) -> list[str]:
    """Images under the input prefix, minus anything under ``output`` (an output folder
    inside the input prefix must not have its heatmaps scored on the next run)."""
    out_prefix = output.rstrip("/") + "/"
    return [p for p in storage.list_files(input_root) if not p.startswith(out_prefix)]


def score_prefix(
    bundle: str,
    input: str,
    output: str,
    *,
    pool: PoolOptions | None = None,
    maps: bool = False,
    part_size: int = 256,
    overrides: dict[str, Any] | None = None,
    io_threads: int = 4,
    progress: bool = True,
    address: str | None = None,
) -> ScoreSummary:
    """Score every image under ``input`` that has no row in ``output`` yet.

    Args:
        bundle: model bundle (local or s3://).
        input, output: folders / prefixes (local or s3://); see :mod:`.results` for the
            output layout.
        pool: actor pool (workers, GPUs and CPUs per worker).
        maps: also write a heatmap PNG per good image under ``output/_maps/``.
        part_size: images per work unit = rows per Parquet part.
        overrides: dotted config overrides of runtime settings (``score.batch_size``,
            ``bank.use_gpu``, ...); the model itself always comes from the bundle.
        io_threads: reader threads per actor (overlap S3 latency with compute).
        progress: Ray Data progress bars and an images progress bar.
        address: Ray cluster address; default ``$RAY_ADDRESS`` or a local Ray.
    """
    from tqdm.auto import tqdm

    if part_size < 1:
        raise ValueError(f"part_size must be >= 1, got {part_size}")
    t0 = time.perf_counter()
    pool = pool or PoolOptions()
    input_root, output = storage.normalize(input), storage.normalize(output)
    cfg = bundle_config(bundle, overrides)
    meta = bundle_meta(bundle)
    version = meta.get("version")
    calibration = meta.get("calibration") or {}
    paths = list_inputs(input_root, output)
    wanted = set(paths)
    before = read_results(output, ["path", "model_version"])
    done = {
        p: v
        for p, v in zip(
            before.column("path").to_pylist(),
            before.column("model_version").to_pylist(),
            strict=True,
        )
        if p in wanted
    }
    pending = [p for p in paths if p not in done]
    summary = ScoreSummary(input_root, output, version, images=len(paths), skipped=len(done))
    summary.stale_version_rows = sum(v != version for v in done.values())
    summary.promised_fpr = calibration.get("promised_fpr")
    summary.promised_fpr_interval = calibration.get("fpr_interval")
    if summary.stale_version_rows:
        log.warning(
            "%d of the already scored images were scored by another model version; "
            "they are kept (use a new output folder to rescore them)",
            summary.stale_version_rows,
        )
    log.info(
        "%d images under %s: %d already scored, %d to score",
        len(paths),
        input_root,
        len(done),
        len(pending),
    )
    units = [pending[i : i + part_size] for i in range(0, len(pending), part_size)]
    if units:
        import ray

        init_ray(address, progress)
        t_pipe = time.perf_counter()
        ds = ray.data.from_items([{"paths": u} for u in units], override_num_blocks=len(units))
        ds = ds.map_batches(
            UnitScorer,
            batch_size=1,  # one unit (= one part file) per call
            batch_format="pyarrow",
            fn_constructor_kwargs={
                "bundle": bundle,
                "config_json": cfg.to_json(),
                "input_root": input_root,
                "output": output,
                "maps": maps,
                "cpus": pool.cpus_per_worker,
                "gpus": pool.gpus_per_worker,
                "io_threads": io_threads,
            },
            **pool.map_batches_args(len(units)),
        )
        with tqdm(total=len(pending), desc="scored", unit="img", disable=not progress) as bar:
            for row in ds.iter_rows():
                if not summary.parts:
                    summary.first_part_seconds = time.perf_counter() - t_pipe
                summary.scored += row["images"]
                summary.errors += row["errors"]
                summary.flagged += row["flagged"]
                summary.parts += 1
                bar.update(row["images"])
        summary.score_seconds = time.perf_counter() - t_pipe
    after = Counter(
        p for p in read_results(output, ["path"]).column("path").to_pylist() if p in wanted
    )
    summary.missing = len(wanted) - len(after)
    summary.duplicates = sum(c - 1 for c in after.values())
    summary.seconds = time.perf_counter() - t0
    write_run_summary(output, asdict(summary))
    log.info("%s", summary.line())
    return summary

"""Batch scoring of an image prefix (local or ``s3://``) with Ray Data: streaming, resumable.

The driver lists the input prefix once and reads the ``path`` column of the parts already
in the output (see :mod:`mspray.ray.data.results` for the layout); the images without a row
are cut into work units of ``part_size`` paths. Each unit is one row of a Ray dataset; an
actor pool (detector loaded once per actor) reads, decodes and scores a unit batch by batch,
writes its heatmaps and its Parquet part, and returns only a small summary row. Nothing
large ever reaches the driver, and each actor holds at most two decoded batches, so memory
stays flat however many images there are.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import torch

from mspray import storage, viz
from mspray.bundle import read_meta, resolve_bundle
from mspray.config import MSPrayConfig, PoolConfig
from mspray.lease import DEFAULT_TTL_S, Lease
from mspray.ray.data.reading import DecodedBatch, error_text, iter_loaded
from mspray.ray.data.results import (
    map_uri,
    read_results,
    result_schema,
    write_output,
    write_part,
    write_run_summary,
)
from mspray.ray.data.routing import no_model_error, read_manifest, route_paths
from mspray.ray.metrics import ScoreMetrics
from mspray.ray.runtime import DetectorActor, bundle_config, init_ray, map_with_detector
from mspray.report import build_report, calibration_from_bundle

log = logging.getLogger(__name__)

#: Bundles one scoring actor keeps loaded in a multi-model run (least recently used goes).
MODELS_PER_ACTOR = 2

#: What an actor returns per unit (the rows themselves go straight to the part file).
_UNIT_SUMMARY = pa.schema(
    [
        ("part", pa.string()),
        ("images", pa.int64()),
        ("errors", pa.int64()),
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
    model_versions: dict[str, str] | None = None  # name -> version (multi-model run)
    bundle: str | None = None  # the bundle version the run used (a root resolves to one)

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        rate = self.scored / self.score_seconds if self.score_seconds > 0 else 0.0
        return (
            f"mspray score: {self.images} images: scored={self.scored} "
            f"skipped={self.skipped} errors={self.errors} parts={self.parts} "
            f"missing={self.missing} duplicates={self.duplicates} "
            f"in {self.seconds:.1f}s (scoring {self.score_seconds:.1f}s, {rate:.2f} images/s) "
            f"-> {self.output}"
        )


class UnitScorer(DetectorActor):
    """Ray Data actor: scores whole work units and writes one Parquet part per unit.

    In a multi-model run (``models``) each unit names its model; the actor starts with the
    first bundle and loads the others when a unit needs them, keeping the
    :data:`MODELS_PER_ACTOR` most recently used (units come grouped by model, so an actor
    mostly scores a run of units of one model)."""

    def __init__(
        self,
        input_root: str,
        output: str,
        maps: bool,
        models: dict[str, str] | None = None,
        overrides: dict[str, Any] | None = None,
        scales: list[int] | None = None,
        **actor: Any,
    ) -> None:
        super().__init__(**actor)
        self.schema = result_schema(scales or self.det.scales)
        self.input_root, self.output, self.maps = input_root, output, maps
        self.models, self.overrides = models or {}, overrides
        # model name -> detector; the constructor's bundle is the first model
        self.dets: OrderedDict[str, Any] = OrderedDict()
        if self.models:
            self.dets[next(iter(self.models))] = self.det
        self.metrics = ScoreMetrics()

    def __call__(self, batch: pa.Table) -> pa.Table:
        units = batch.column("paths").to_pylist()
        names = (
            batch.column("model").to_pylist()
            if "model" in batch.column_names
            else [None] * len(units)
        )
        rows = [self.score_unit(u, m or None) for u, m in zip(units, names, strict=True)]
        return pa.Table.from_pylist(rows, schema=_UNIT_SUMMARY)

    def detector(self, model: str) -> Any:
        """The detector of ``model``, loaded on first use (LRU of :data:`MODELS_PER_ACTOR`)."""
        from mspray.bundle import load_bundle

        if model not in self.dets:
            uri = self.models[model]
            cfg = bundle_config(uri, self.overrides)
            self.dets[model] = load_bundle(uri, device=self.det.device, config=cfg)
            while len(self.dets) > MODELS_PER_ACTOR:
                self.dets.popitem(last=False)
        self.dets.move_to_end(model)
        return self.dets[model]

    def score_unit(self, paths: list[str], model: str | None = None) -> dict:
        """Score ``paths`` (with ``model``'s bundle in a multi-model run) and write their
        part; returns the unit's summary row."""
        t0 = time.perf_counter()
        rows: list[dict] = []
        if self.models and model not in self.models:
            # the driver routed these paths to no model: an error row each
            known = sorted(self.models)
            now = dt.datetime.now(dt.timezone.utc)
            rows = [
                {"path": p, "error": no_model_error(p, model, known), "scored_at": now}
                for p in paths
            ]
        else:
            det = self.detector(model) if model else self.det
            cfg = det.cfg
            now = dt.datetime.now(dt.timezone.utc)
            base = {"threshold": det.threshold, "model_version": det.version, "model": model}
            unsafe = {p: e for p in paths if (e := unsafe_key_error(p, self.input_root))}
            rows = [{"path": p, **base, "scored_at": now, "error": e} for p, e in unsafe.items()]
            safe = [p for p in paths if p not in unsafe]
            for loaded in iter_loaded(
                safe, cfg.score.batch_size, cfg.model.image_size, cfg.score, self.io
            ):
                rows.extend(self._score_batch(det, loaded, model))
        part = write_part(self.output, pa.Table.from_pylist(rows, schema=self.schema))
        self.metrics.rows(model or "default", rows)
        errors = sum(r.get("error") is not None for r in rows)
        return {
            "part": part,
            "images": len(rows),
            "errors": errors,
            "seconds": time.perf_counter() - t0,
        }

    def _score_batch(self, det: Any, loaded: DecodedBatch, model: str | None) -> list[dict]:
        now = dt.datetime.now(dt.timezone.utc)
        base = {
            "threshold": det.threshold,
            "model_version": det.version,
            "scored_at": now,
            "model": model,
        }
        errors = list(loaded.errors)
        ok = loaded.ok
        results: dict[int, dict] = {}
        maps: dict[int, torch.Tensor] = {}
        if ok:
            try:
                results, maps = self._predict(det, loaded.images, ok)
            except Exception:  # e.g. out of memory on a big batch: one image at a time
                log.warning(
                    "batch failed; scoring its %d images one by one", len(ok), exc_info=True
                )
                for j, i in enumerate(ok):
                    try:
                        r, m = self._predict(det, loaded.images[j : j + 1], [i])
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
                        det, loaded.uris[i], loaded.images[j], maps[i]
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
        self, det: Any, images: torch.Tensor, positions: list[int]
    ) -> tuple[dict[int, dict], dict[int, torch.Tensor]]:
        """Result columns and fused maps of the good images, keyed by batch position."""
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

    def _write_map(self, det: Any, uri: str, image: torch.Tensor, amap: torch.Tensor) -> str:
        """The heatmap panel (image | overlay) of one image; returns where it went."""
        lo, hi = viz.color_range(amap, det.threshold)
        panel = viz.overlay(viz.tensor_to_rgb(image), amap.numpy(), lo, hi)
        out = map_uri(self.output, self.input_root, uri)
        write_output(out, viz.to_png(panel))
        return out


def unsafe_key_error(uri: str, input_root: str) -> str | None:
    """The error row text for an input whose key, below the input prefix, has a ``.``,
    ``..`` or empty path segment; None for a normal key.

    S3 keys are plain strings, so ``in/../x.png`` can exist, and clients (pyarrow among
    them) normalise it while reading: the run would score another object than the one
    listed, and its heatmap path would leave the output folder. Such keys are never read.
    """
    path = uri.replace("\\", "/")  # local Windows paths: compare with / separators
    prefix = input_root.replace("\\", "/").rstrip("/") + "/"
    if not path.startswith(prefix):
        return f"{uri}: rejected: not under the input prefix {input_root}"
    segments = path[len(prefix) :].split("/")
    bad = [s for s in segments if s in ("", ".", "..")]
    if bad:
        shown = "empty" if bad[0] == "" else repr(bad[0])
        return f"{uri}: rejected: the key has a {shown} path segment (never followed)"
    return None


def list_inputs(input_root: str, output: str) -> list[str]:
    """Images under the input prefix, minus anything under ``output`` (an output folder
    inside the input prefix must not have its heatmaps scored on the next run)."""
    out_prefix = output.rstrip("/") + "/"
    return [p for p in storage.list_files(input_root) if not p.startswith(out_prefix)]


def _assign_models(
    models: dict[str, str] | None,
    input_root: str,
    output: str,
    route: str | None,
    manifest: str | None,
) -> dict[str, str | None]:
    """``path -> model name`` of a multi-model run (empty for a single bundle)."""
    if not models:
        if route or manifest:
            raise ValueError("route/manifest need named bundles (--bundle NAME=URI)")
        return {}
    if route and manifest:
        raise ValueError("give either a route or a manifest, not both")
    if manifest:
        return read_manifest(manifest, input_root)
    paths = list_inputs(input_root, output)
    if route:
        return route_paths(paths, route, input_root)
    if len(models) == 1:
        return dict.fromkeys(paths, next(iter(models)))
    raise ValueError(
        f"{len(models)} named bundles: say which images each scores with a route "
        "(--route 'PREFIX/{model}/**') or a manifest (--manifest FILE)"
    )


def score_prefix(
    bundle: str | Mapping[str, str],
    input: str,
    output: str,
    *,
    route: str | None = None,
    manifest: str | None = None,
    pool: PoolConfig | None = None,
    maps: bool = False,
    part_size: int = 256,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    address: str | None = None,
    lease_wait: float = 0.0,
    lease_ttl: float = DEFAULT_TTL_S,
) -> ScoreSummary:
    """Score every image under ``input`` that has no row in ``output`` yet.

    Args:
        bundle: model bundle (local or s3://), or several by name (``{name: uri}``): each
            image is then scored by the bundle ``route`` or ``manifest`` gives it, in the
            same run, and its row has the name in ``model`` (a path with no model gets an
            error row).
        route: with named bundles, a template such as ``PREFIX/{model}/**`` (see
            :mod:`mspray.ray.data.routing`).
        manifest: with named bundles, a Parquet/CSV file of ``path, model``: exactly
            these images are scored (instead of listing ``input``).
        input, output: folders / prefixes (local or s3://); see :mod:`.results` for the
            output layout.
        pool: actor pool (size bounds, GPUs and CPUs per actor, reader threads).
        maps: also write a heatmap PNG per good image under ``output/_maps/``.
        part_size: images per work unit = rows per Parquet part.
        overrides: dotted config overrides of runtime settings (``score.batch_size``,
            ``bank.use_gpu``, ...); the model itself always comes from the bundle.
        progress: Ray Data progress bars and an images progress bar.
        address: Ray cluster address; default ``$RAY_ADDRESS`` or a local Ray.
        lease_wait: seconds to wait when another run holds the output's lease (see
            :mod:`mspray.lease`); then :class:`~mspray.lease.LeaseHeld` is raised.
        lease_ttl: seconds after its last renewal that a crashed run's lease can be
            taken over (it is renewed every ``lease_ttl / 3`` seconds while running).
    """

    if part_size < 1:
        raise ValueError(f"part_size must be >= 1, got {part_size}")
    t0 = time.perf_counter()
    pool = pool or PoolConfig()
    input_root, output = storage.normalize(input), storage.normalize(output)
    # one version per bundle for the whole run, even if a pointer moves meanwhile
    if isinstance(bundle, Mapping):
        models: dict[str, str] | None = {n: resolve_bundle(u) for n, u in bundle.items()}
    else:
        models, bundle = None, resolve_bundle(str(bundle))
    if models:
        first = next(iter(models))
        cfgs = {n: bundle_config(u, overrides) for n, u in models.items()}
        versions = {n: read_meta(u).get("version") for n, u in models.items()}
        uri, cfg, version = models[first], cfgs[first], None
        scales = sorted({s for c in cfgs.values() for s in c.model.scales}, reverse=True)
    else:
        uri, cfg = str(bundle), bundle_config(str(bundle), overrides)
        version = read_meta(uri).get("version")
        versions, scales = {}, list(cfg.model.scales)
    # Exclusive use of the output before anything is read from it: a second run on the
    # same output waits (up to lease_wait) or stops, instead of scoring the same images
    # into other parts.
    lease = Lease(
        output,
        ttl_s=lease_ttl,
        wait_s=lease_wait,
        purpose=f"mspray score of {input_root} with {models or bundle}",
    )
    with lease:
        assignment = _assign_models(models, input_root, output, route, manifest)
        paths = list(assignment) if models else list_inputs(input_root, output)
        summary = _score_pending(
            paths,
            assignment,
            uri,
            cfg,
            version,
            versions,
            scales,
            models,
            input_root,
            output,
            lease=lease,
            pool=pool,
            maps=maps,
            part_size=part_size,
            overrides=overrides,
            progress=progress,
            address=address,
        )
    summary.bundle = None if models else uri
    summary.seconds = time.perf_counter() - t0
    calibration = None if models else _calibration_block(uri)
    write_run_summary(output, {**asdict(summary), "calibration": calibration})
    log.info("%s", summary.line())
    _write_report(output)
    return summary


def _score_pending(
    paths: list[str],
    assignment: dict[str, str | None],
    uri: str,
    cfg: MSPrayConfig,
    version: str | None,
    versions: dict[str, str],
    scales: list[int],
    models: dict[str, str] | None,
    input_root: str,
    output: str,
    *,
    lease: Lease,
    pool: PoolConfig,
    maps: bool,
    part_size: int,
    overrides: dict[str, Any] | None,
    progress: bool,
    address: str | None,
) -> ScoreSummary:
    """The body of :func:`score_prefix`, run while holding the output's lease."""
    from tqdm.auto import tqdm

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
    current = set(versions.values()) if models else {version}
    summary.stale_version_rows = sum(v not in current for v in done.values() if v is not None)
    if models:
        summary.model_versions = versions
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
    # units of one model each, grouped by model (so an actor rarely switches bundles)
    groups: dict[str, list[str]] = {}
    for p in pending:
        # a name not in ``models`` (or none): the actor writes error rows for the unit
        groups.setdefault((assignment.get(p) or "") if models else "", []).append(p)
    units = [
        {"paths": group[i : i + part_size], "model": name}
        for name, group in groups.items()
        for i in range(0, len(group), part_size)
    ]
    if units:
        import ray

        init_ray(address, progress)
        t_pipe = time.perf_counter()
        ds = ray.data.from_items(units, override_num_blocks=len(units))
        ds = map_with_detector(
            ds,
            UnitScorer,
            uri,
            cfg,
            pool,
            n_items=len(units),
            batch_size=1,  # one unit (= one part file) per call
            batch_format="pyarrow",
            io_threads=pool.io_threads,
            input_root=input_root,
            output=output,
            maps=maps,
            models=models,
            overrides=overrides,
            scales=scales,
        )
        with tqdm(total=len(pending), desc="scored", unit="img", disable=not progress) as bar:
            for row in ds.iter_rows():
                lease.check()  # taken over (we were presumed dead): stop, do not race it
                if not summary.parts:
                    summary.first_part_seconds = time.perf_counter() - t_pipe
                summary.scored += row["images"]
                summary.errors += row["errors"]
                summary.parts += 1
                bar.update(row["images"])
        summary.score_seconds = time.perf_counter() - t_pipe
    after = Counter(
        p for p in read_results(output, ["path"]).column("path").to_pylist() if p in wanted
    )
    summary.missing = len(wanted) - len(after)
    summary.duplicates = sum(c - 1 for c in after.values())
    lease.check()
    return summary


def _calibration_block(bundle: str) -> dict | None:
    """The bundle's calibration for the run summary, so the report can be rebuilt from
    the output folder alone; None (and a warning) if the bundle's meta cannot say."""
    try:
        return calibration_from_bundle(bundle).to_dict()
    except Exception:
        log.warning("no calibration of %s for the run summary", bundle, exc_info=True)
        return None


def _write_report(output: str) -> None:
    """Write the output's report page; a failure only logs a warning (the rows are the
    product, the page is a view of them that ``mspray report`` can rebuild)."""
    try:
        log.info("report: %s", build_report(output))
    except Exception:
        log.warning(
            "could not write the report of %s; the scores are complete, rebuild it with "
            "`mspray report %s`",
            output,
            output,
            exc_info=True,
        )

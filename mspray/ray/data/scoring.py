"""Batch scoring of an image prefix (local or ``s3://``) with Ray Data: streaming, resumable.

The driver lists the input prefix once and reads the ``path`` column of the parts already
in the output (see :mod:`mspray.ray.data.results` for the layout); the images without a row
are cut into work units of ``part_size`` paths. Each unit is one row of a Ray dataset and
goes through two stages:

1. **decode** (Ray Data tasks, ``decode_cpus`` CPUs each, any node with CPUs): read the
   unit's files (bounded, a few threads for S3 latency) and decode/resize them into one row;
2. **score** (:class:`UnitScorer` actors on an autoscaling pool, the GPU nodes when they
   reserve GPUs): score the unit in ``score.batch_size`` forward passes, write its heatmaps
   and its Parquet part, and return a small summary row (with the node and actor).

So a GPU actor never decodes PNG/JPEG on its one reserved CPU, and the pool grows with the
cluster (see :func:`mspray.ray.runtime.actor_pool`). A unit still maps to exactly one part.
Nothing large reaches the driver; Ray Data's streaming backpressure bounds how many decoded
units (``part_size``×3×S×S float32 each) wait between the stages, so memory stays flat.

Faults: a bad image (:data:`~mspray.ray.data.reading.BAD_INPUT`) is an error row. An I/O
failure is retried (S3 client, then :func:`~mspray.ray.data.reading.load_or_error`), a
model failure falls back to one image at a time and is retried :data:`MODEL_ATTEMPTS` times;
if it still fails, the unit fails: no part is written, the run reports it (``failed_units``,
``missing``) and exits non-zero, and a rerun scores it again. ``retry_errors`` rescores the
parts that hold error rows (each rewritten whole, under the same name).

One run holds the output's lease (:mod:`mspray.lease`); keys with ``.``/``..``/empty path
segments are never read (error rows). Several named bundles can score one run (``route`` or
``manifest``): units hold one model each, and the ``model`` column names it.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import torch

from mspray import storage, viz
from mspray.bundle import read_meta, resolve_bundle
from mspray.config import MSPrayConfig, PoolConfig
from mspray.lease import DEFAULT_TTL_S, Lease
from mspray.ray.data.reading import (
    DecodedBatch,
    TransientError,
    decode_units,
    unpack_unit,
    unsafe_key_error,  # noqa: F401  (re-exported: part of the scoring rules)
)
from mspray.ray.data.results import (
    error_units,
    map_uri,
    read_results,
    result_schema,
    write_output,
    write_part,
    write_run_summary,
)
from mspray.ray.data.routing import no_model_error, read_manifest, route_paths
from mspray.ray.metrics import ScoreMetrics
from mspray.ray.runtime import (
    DetectorActor,
    bundle_config,
    init_ray,
    map_with_detector,
    where_am_i,
)
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
        ("flagged", pa.int64()),
        ("seconds", pa.float64()),
        ("node", pa.string()),  # Ray node id of the actor
        ("actor", pa.string()),  # Ray actor id
        ("decoder", pa.string()),  # Ray node id of the decode task
        ("failure", pa.string()),  # set when the unit failed: no part was written
        ("inference", pa.string()),  # how the encoders ran (runtime/precision/layout)
    ]
)

#: Attempts per unit at the model (a failure of the whole batch and then of an image alone,
#: e.g. CUDA out of memory), with this first backoff in seconds (doubling).
MODEL_ATTEMPTS = 3
MODEL_BACKOFF_S = 1.0


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
    retried_error_rows: int = 0  # error rows of earlier runs rescored (retry_errors)
    failed_units: int = 0  # units that failed on I/O or the model: no part, rerun retries
    actors: int = 0  # distinct model actors that scored a unit in this run
    actor_nodes: list[str] = field(default_factory=list)  # Ray node ids of those actors
    decode_nodes: list[str] = field(default_factory=list)  # where the units were decoded
    #: how the actors' encoders ran, e.g. "torch/bf16/channels_last" (resolved per device)
    inference: list[str] = field(default_factory=list)
    flagged: int = 0  # rows of this run with is_anomalous set
    #: what the bundle's threshold promises on normal images (meta.json "calibration")
    promised_fpr: float | None = None
    promised_fpr_interval: list[float] | None = None
    model_versions: dict[str, str] | None = None  # name -> version (multi-model run)
    bundle: str | None = None  # the bundle version the run used (a root resolves to one)

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        rate = self.scored / self.score_seconds if self.score_seconds > 0 else 0.0
        return (
            f"mspray score: {self.images} images: scored={self.scored} "
            f"skipped={self.skipped} errors={self.errors} parts={self.parts} "
            f"failed_units={self.failed_units} missing={self.missing} "
            f"duplicates={self.duplicates} actors={self.actors} on {len(self.actor_nodes)} nodes "
            f"{self.flag_text()}in {self.seconds:.1f}s "
            f"(scoring {self.score_seconds:.1f}s, {rate:.2f} images/s) -> {self.output}"
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


class UnitScorer(DetectorActor):
    """Ray Data actor: scores decoded work units (see :func:`decode_units`) and writes one
    Parquet part per unit; it never reads or decodes images itself.

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
        self.node, self.actor = where_am_i()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(
            [self.score_unit(row) for row in batch.to_pylist()], schema=_UNIT_SUMMARY
        )

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

    def score_unit(self, unit: dict) -> dict:
        """Score one decoded unit (with its model's bundle in a multi-model run) and write
        its part; returns the unit's summary row. A transient failure (decode stage or
        here) writes nothing and sets ``failure``."""
        t0 = time.perf_counter()
        model = unit.get("model") or None
        summary = {"part": None, "images": 0, "errors": 0, "flagged": 0, "node": self.node}
        summary.update(actor=self.actor, decoder=unit["decoder"], failure=unit["failure"])
        summary["inference"] = inference_text(self.det.inference_mode)
        if unit["failure"] is None:
            try:
                if self.models and model not in self.models:
                    # the driver routed these paths to no model: an error row each
                    known, now = sorted(self.models), dt.datetime.now(dt.timezone.utc)
                    rows = [
                        {"path": p, "error": no_model_error(p, model, known), "scored_at": now}
                        for p in unit["paths"]
                    ]
                else:
                    det = self.detector(model) if model else self.det
                    loaded = unpack_unit(unit, det.cfg.model.image_size)
                    rows = self._score_with_retries(det, loaded, model)
                part = write_part(self.output, pa.Table.from_pylist(rows, schema=self.schema))
            except (TransientError, OSError) as e:  # model, or writes after their retries
                summary["failure"] = f"{type(e).__name__}: {e}"
            else:
                summary.update(part=part, images=len(rows))
                summary["errors"] = sum(r.get("error") is not None for r in rows)
                summary["flagged"] = sum(r.get("is_anomalous") is True for r in rows)
                self.metrics.rows(model or "default", rows)
        if summary["failure"] is not None:
            log.error("unit of %d images failed, a rerun retries it: %s",
                      len(unit["paths"]), summary["failure"])  # fmt: skip
        summary["seconds"] = time.perf_counter() - t0
        return summary

    def _score_with_retries(self, det: Any, loaded: DecodedBatch, model: str | None) -> list[dict]:
        for attempt in range(MODEL_ATTEMPTS):
            try:
                return [
                    row
                    for chunk in loaded.chunks(det.cfg.score.batch_size)
                    for row in self._score_batch(det, chunk, model)
                ]
            except TransientError:
                if attempt + 1 == MODEL_ATTEMPTS:
                    raise
                self._free_memory()
                time.sleep(MODEL_BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    def _free_memory(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _score_batch(self, det: Any, loaded: DecodedBatch, model: str | None) -> list[dict]:
        now = dt.datetime.now(dt.timezone.utc)
        base = {
            "threshold": det.threshold,
            "model_version": det.version,
            "scored_at": now,
            "model": model,
        }
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
                self._free_memory()
                for j, i in enumerate(ok):
                    try:
                        r, m = self._predict(det, loaded.images[j : j + 1], [i])
                    except Exception as e:  # the model, not the image: fail, retry the unit
                        raise TransientError(
                            f"model failed on one image ({loaded.uris[i]}): {type(e).__name__}: {e}"
                        ) from e
                    results.update(r)
                    maps.update(m)
        if self.maps:
            # an output that cannot be written fails the unit (a rerun scores it again)
            # instead of turning a good image into an error row
            for j, i in enumerate(ok):
                results[i]["map_path"] = self._write_map(
                    det, loaded.uris[i], loaded.images[j], maps[i]
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
    retry_errors: bool = False,
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
        retry_errors: also rescore the images that have an error row: every part holding
            one is scored again as a whole and rewritten under its own name.
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
        sizes = {n: c.model.image_size for n, c in cfgs.items()}
    else:
        uri, cfg = str(bundle), bundle_config(str(bundle), overrides)
        meta = read_meta(uri)
        version, calibration = meta.get("version"), meta.get("calibration") or {}
        versions, scales, sizes = {}, list(cfg.model.scales), {}
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
            sizes,
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
            retry_errors=retry_errors,
        )
    summary.bundle = None if models else uri
    if not models:
        summary.promised_fpr = calibration.get("promised_fpr")
        summary.promised_fpr_interval = calibration.get("fpr_interval")
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
    sizes: dict[str, int],
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
    retry_errors: bool,
) -> ScoreSummary:
    """The body of :func:`score_prefix`, run while holding the output's lease."""

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
    # a part with error rows is rescored whole: same paths, same name, so it is replaced
    redo = error_units(output) if retry_errors else []
    in_redo = {p for unit, _ in redo for p in unit}
    for p in in_redo:
        done.pop(p, None)
    pending = [p for p in paths if p not in done and p not in in_redo]
    summary = ScoreSummary(input_root, output, version, images=len(paths), skipped=len(done))
    summary.retried_error_rows = len(in_redo)
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
        "%d images under %s: %d already scored, %d to score, %d in %d parts with errors to rescore",
        len(paths),
        input_root,
        len(done),
        len(pending),
        len(in_redo),
        len(redo),
    )
    # units of one model each, grouped by model (so an actor rarely switches bundles)
    groups: dict[str, list[str]] = {}
    for p in pending:
        # a name not in ``models`` (or none): the actor writes error rows for the unit
        groups.setdefault((assignment.get(p) or "") if models else "", []).append(p)
    units = [
        {"paths": paths_, "model": name or None, "size": sizes.get(name, 0) if models else None}
        for paths_, name in [
            *redo,
            *(
                (group[i : i + part_size], name)
                for name, group in groups.items()
                for i in range(0, len(group), part_size)
            ),
        ]
    ]
    if units:
        init_ray(address, progress)
        _run_units(units, uri, cfg, pool, input_root, output, maps, progress, summary, lease,
                   models=models, overrides=overrides, scales=scales)  # fmt: skip
    after = Counter(
        p for p in read_results(output, ["path"]).column("path").to_pylist() if p in wanted
    )
    summary.missing = len(wanted) - len(after)
    summary.duplicates = sum(c - 1 for c in after.values())
    lease.check()
    return summary


def _run_units(
    units: list[dict[str, Any]],
    bundle: str,
    cfg: MSPrayConfig,
    pool: PoolConfig,
    input_root: str,
    output: str,
    maps: bool,
    progress: bool,
    summary: ScoreSummary,
    lease: Lease,
    **scorer: Any,
) -> None:
    """The two-stage pipeline (decode tasks -> scoring actors) over ``units``; adds its
    counts to ``summary``."""
    import ray
    from tqdm.auto import tqdm

    t_pipe = time.perf_counter()
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(
        decode_units,
        batch_size=1,  # one unit per task: a decoded unit is one block
        batch_format="pyarrow",
        fn_kwargs={
            "size": cfg.model.image_size,
            "cfg_json": cfg.score.model_dump_json(),
            "io_threads": pool.io_threads,
            "input_root": input_root,
        },
        num_cpus=pool.decode_cpus,
    )
    ds = map_with_detector(
        ds,
        UnitScorer,
        bundle,
        cfg,
        pool,
        n_items=len(units),
        batch_size=1,  # one unit (= one part file) per call
        batch_format="pyarrow",
        input_root=input_root,
        output=output,
        maps=maps,
        **scorer,
    )
    actors, nodes, decoders, modes = set(), set(), set(), set()
    total = sum(len(u["paths"]) for u in units)
    with tqdm(total=total, desc="scored", unit="img", disable=not progress) as bar:
        for row in ds.iter_rows():
            lease.check()  # taken over (we were presumed dead): stop, do not race it
            if row["failure"] is not None:
                summary.failed_units += 1
                log.error("a unit failed and has no part (a rerun retries it): %s",
                          row["failure"])  # fmt: skip
                continue
            if not summary.parts:
                summary.first_part_seconds = time.perf_counter() - t_pipe
            summary.scored += row["images"]
            summary.errors += row["errors"]
            summary.flagged += row["flagged"]
            summary.parts += 1
            actors.add(row["actor"])
            nodes.add(row["node"])
            decoders.add(row["decoder"])
            modes.add(row["inference"])
            bar.update(row["images"])
    summary.actors = len(actors)
    summary.actor_nodes, summary.decode_nodes = sorted(nodes), sorted(decoders)
    summary.inference = sorted(modes)
    summary.score_seconds = time.perf_counter() - t_pipe


def inference_text(mode: dict) -> str:
    """``Detector.inference_mode`` as one short string: ``runtime/precision/layout``."""
    layout = "channels_last" if mode["channels_last"] else "nchw"
    return f"{mode['runtime']}/{mode['precision']}/{layout}"


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

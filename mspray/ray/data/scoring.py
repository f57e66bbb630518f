"""Batch scoring of an image prefix (local or ``s3://``) with Ray Data: streaming, resumable.

The driver builds a :class:`~mspray.ray.data.plan.ScoringPlan` (every bundle read once; a
single bundle is a fleet of one), lists the input prefix once and reads the ``path`` column
of the parts already in the output (see :mod:`mspray.artifacts.output` for the layout); the
images without a row are cut into work units of ``part_size`` paths. Each unit is one row of
a Ray dataset and goes through two stages:

1. **decode** (Ray Data tasks, ``decode_cpus`` CPUs each, any node with CPUs): read the
   unit's files (bounded, a few threads for S3 latency) and decode/resize them into one row
   (:func:`~mspray.ray.data.reading.decode_units`);
2. **score** (:class:`~mspray.ray.data.scorer.UnitScorer` actors on an autoscaling pool, the
   GPU nodes when they reserve GPUs): score the unit in ``score.batch_size`` forward passes,
   write its heatmaps and its Parquet part, and return a small summary row.

So a GPU actor never decodes PNG/JPEG on its one reserved CPU, and the pool grows with the
cluster (see :func:`mspray.ray.runtime.actor_pool`). A unit still maps to exactly one part.
Nothing large reaches the driver; Ray Data's streaming backpressure bounds how many decoded
units wait between the stages, so memory stays flat.

Faults: a bad image (:data:`~mspray.ray.data.reading.BAD_INPUT`) is an error row. An I/O
failure is retried (S3 client, then :func:`~mspray.ray.data.reading.load_or_error`), a
model failure as :mod:`~mspray.ray.data.scorer` says; a unit that still fails writes no
part: the run reports it (``failed_units``, ``missing``) and exits non-zero, and a rerun
scores it again. ``retry_errors`` rescores the parts that hold error rows (each rewritten
whole, under the same name).

One run holds the output's lease (:mod:`mspray.artifacts.lease`); keys with ``.``/``..``/empty path
segments are never read (error rows). Several named bundles can score one run (``route`` or
``manifest``): units hold one model each, and the ``model`` column names it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import asdict
from typing import Any

from mspray.artifacts.lease import Lease
from mspray.artifacts.output import error_units, resolve_since, write_run_summary
from mspray.config import PoolConfig
from mspray.config.run import progress_bar
from mspray.config.runs import ScoreRun
from mspray.detector import stage_seconds_per_image
from mspray.ray.data.inputs import InputRules
from mspray.ray.data.pending import check_rows, mark_inputs, units_dataset
from mspray.ray.data.plan import ScoringPlan
from mspray.ray.data.reading import decode_memory, decode_units
from mspray.ray.data.scorer import UnitScorer
from mspray.ray.data.summary import ScoreSummary
from mspray.ray.runtime import (
    ActorResources,
    actor_resources,
    concurrent_actors,
    gpu_nodes_requested,
    init_ray,
    map_with_detector,
    one_local_node,
)
from mspray.report import build_report, calibration_from_bundle

log = logging.getLogger(__name__)

#: Decode tasks running at once, per actor of a pool of known size.
DECODE_AHEAD = 2


def score_prefix(
    run: ScoreRun, *, pool: PoolConfig | None = None, overrides: dict[str, Any] | None = None
) -> ScoreSummary:
    """Score every image under ``run.input`` (or of ``run.input_manifest``) that has no row
    in ``run.output`` yet (``{date}`` templates filled, see :meth:`ScoreRun.dated`).

    ``run`` (:class:`~mspray.config.runs.ScoreRun`) says what to score and how the run
    behaves; its fields document each option:

    - the bundle, or several by name (``models``): each image is then scored by the bundle
      ``route`` or the ``manifest`` gives it (see :mod:`mspray.ray.data.routing`), in the
      same run, and its row has the name in ``model`` (a path with no model gets an error
      row);
    - ``input_manifest``: the images of a manifest instead of a listing of ``input`` (see
      :mod:`mspray.ray.data.inputs`); ``modified_since``: only images modified at or after
      this time (a datetime, an ISO date/time, or ``"last-run"``);
    - ``dry_run``: count the inputs, the skipped and pending images and the units; score
      and write nothing;
    - ``part_size``: images per work unit = rows per Parquet part (default: sized for the
      cluster, see :meth:`ScoringPlan.unit_size`); ``maps``: heatmap PNGs under
      ``output/_maps/`` (see :mod:`mspray.artifacts.output` for the layout);
    - ``lease_wait`` / ``lease_ttl``: the output's lease (:mod:`mspray.artifacts.lease`):
      :class:`~mspray.artifacts.lease.LeaseHeld` after waiting ``lease_wait`` seconds;
    - ``retry_errors``: every part holding an error row is scored again and rewritten.

    ``pool``: the actor pool. ``overrides``: dotted config overrides of runtime settings
    (``score.batch_size``, ``bank.use_gpu``, ...); the model itself always comes from the
    bundle. Progress bars and the Ray cluster come from the run context
    (:mod:`mspray.config.run`).
    """
    run = run.dated()
    t0 = time.perf_counter()
    started = dt.datetime.now(dt.timezone.utc)
    plan = ScoringPlan.build(
        run.bundles(), run.input, run.output, overrides=overrides, maps=run.maps,
        part_size=run.part_size, pool=pool or PoolConfig(),
        since=resolve_since(run.modified_since, run.output), read_bundles=not run.dry_run,
    )  # fmt: skip
    rules = plan.input_rules(run.route, run.manifest or run.input_manifest)
    source = run.manifest or run.input_manifest
    if run.dry_run:
        init_ray()
        summary, _ = _plan(plan, rules, source, [], dry=True)
        summary.seconds = time.perf_counter() - t0
        log.info("%s", summary.plan_line())
        return summary
    # Exclusive use of the output before anything is read from it: a second run on the
    # same output waits (up to lease_wait) or stops, instead of scoring the same images
    # into other parts.
    lease = Lease(
        plan.output,
        ttl_s=run.lease_ttl,
        wait_s=run.lease_wait,
        purpose=f"mspray score of {plan.input_root} with {plan.describe()}",
    )
    with lease:
        init_ray()
        redo = error_units(plan.output) if run.retry_errors else []
        summary, marked = _plan(plan, rules, source, redo)
        _score_pending(plan, marked, summary, redo, lease)
    # where the next `--modified-since last-run` starts: what this run saw of the inputs
    summary.modified_until = str(summary.modified_until or started)
    calibration = None
    if not plan.named:
        summary.bundle = plan.first.uri
        summary.promised_fpr = plan.first.calibration.get("promised_fpr")
        summary.promised_fpr_interval = plan.first.calibration.get("fpr_interval")
        calibration = _calibration_block(plan.first.uri)
    summary.seconds = time.perf_counter() - t0
    write_run_summary(plan.output, {**asdict(summary), "calibration": calibration})
    log.info("%s", summary.line())
    _write_report(plan.output)
    return summary


def _plan(
    plan: ScoringPlan,
    rules: InputRules,
    source: str | None,
    redo: list[tuple[list[str], str | None]],
    dry: bool = False,
) -> tuple[ScoreSummary, Any]:
    """The run's inputs marked against the output (a materialized dataset, see
    :func:`~mspray.ray.data.pending.mark_inputs`) and counted; a dry run also cuts its
    units and counts them."""
    t0 = time.perf_counter()
    in_redo = sorted({p for unit, _ in redo for p in unit})
    marked, counts = mark_inputs(plan, rules, source, in_redo)
    version = None if plan.named else plan.first.version
    summary = ScoreSummary(plan.input_root, plan.output, version, images=counts["images"])
    summary.skipped = counts["done"] - counts["redo"]
    summary.retried_error_rows = len(in_redo)
    summary.pending = counts["images"] - counts["done"]
    summary.modified_since = str(plan.since) if plan.since else None
    if source and counts["latest"] is not None:
        summary.modified_until = str(counts["latest"])
    summary.stale_version_rows = 0 if dry else counts["stale"]
    if plan.named:
        summary.model_versions = plan.versions
    if summary.stale_version_rows:
        log.warning(
            "%d of the already scored images were scored by another model version; "
            "they are kept (use a new output folder to rescore them)",
            summary.stale_version_rows,
        )
    log.info(
        "%d images in %s: %d already scored, %d to score, %d in %d parts with errors to rescore",
        summary.images, source or plan.input_root, summary.skipped, summary.pending,
        len(in_redo), len(redo),
    )  # fmt: skip
    if dry:
        size = plan.unit_size(summary.pending, plan.pool.workers or 1)
        # the units' blocks are counted where they are: none comes to the driver
        for bundle in units_dataset(marked, plan, size).iter_internal_ref_bundles():
            if not summary.units:
                summary.first_unit_seconds = time.perf_counter() - t0
            summary.units += bundle.num_rows() or 0
        summary.units += len(redo)
    summary.plan_seconds = time.perf_counter() - t0
    return summary, marked


def _score_pending(
    plan: ScoringPlan,
    marked: Any,
    summary: ScoreSummary,
    redo: list[tuple[list[str], str | None]],
    lease: Lease,
) -> None:
    """The body of :func:`score_prefix`, run while holding the output's lease: the
    pending images and the ``redo`` parts are scored, then the output is checked."""
    if summary.pending or redo:
        res = actor_resources(plan.pool, [m.cfg for m in plan.models.values()])
        actors = concurrent_actors(plan.pool, res, spare_cpus=plan.pool.decode_cpus)
        if plan.pool.workers is None and one_local_node():
            # a node that cannot grow: no more actors than its cores hold (each loads the
            # model, and more of them than cores only share the cores)
            plan.pool = plan.pool.model_copy(update={"workers": actors})
        size = plan.unit_size(summary.pending, actors)
        log.info("%d actors (%s) can score at once: units of %d images", actors, res, size)
        units = units_dataset(marked, plan, size)
        redo_units = plan.redo_units(redo)
        if redo_units:
            import ray

            units = ray.data.from_items(redo_units).union(units)
        summary.units = -(-summary.pending // size) + len(redo_units)
        largest = max([size, *(len(u["paths"]) for u in redo_units)])
        total = summary.pending + summary.retried_error_rows
        with gpu_nodes_requested(res, actors):  # GPU nodes boot while the pool starts
            _run_units(plan, units, (summary.units, largest, total), res, summary, lease)
    after = check_rows(plan, marked)
    summary.missing, summary.duplicates = after["missing"], after["duplicates"]
    lease.check()


def _run_units(
    plan: ScoringPlan,
    units: Any,
    shape: tuple[int, int, int],
    res: ActorResources,
    summary: ScoreSummary,
    lease: Lease,
) -> None:
    """The two-stage pipeline (decode tasks -> scoring actors reserving ``res``) over the
    ``units`` dataset (``shape``: about how many, the largest, images in all); adds its
    counts to ``summary``."""
    import ray

    t_pipe = time.perf_counter()
    first, pool = plan.first, plan.pool
    n_units, largest, total = shape
    image_size = max(m.image_size for m in plan.models.values())
    ds = units.map_batches(
        decode_units,
        batch_size=1,  # one unit per task: a decoded unit is one block
        batch_format="pyarrow",
        fn_kwargs={
            "size": first.image_size,
            "cfg_json": first.cfg.score.model_dump_json(),
            "io_threads": pool.io_threads,
            "input_root": plan.input_root,
        },
        num_cpus=pool.decode_cpus,
        # memory for a decoded unit is reserved, and a pool of known size gets a few units
        # decoded ahead of each actor; a pool that grows with an autoscaling cluster is not
        # capped by the actors of the moment (its backlog is what makes the cluster grow)
        memory=decode_memory(largest, image_size, pool.io_threads),
        compute=(
            ray.data.TaskPoolStrategy(size=max(1, min(DECODE_AHEAD * pool.workers, n_units)))
            if pool.workers
            else None
        ),
    )
    ds = map_with_detector(
        ds,
        UnitScorer,
        first.uri,
        first.cfg,
        pool,
        n_items=n_units,
        batch_size=1,  # one unit (= one part file) per call
        batch_format="pyarrow",
        io_threads=pool.io_threads,  # heatmap panels are encoded and written there
        resources=res,
        plan=plan,
        fence=lease.fence(),  # actors check it before writing each part
    )
    actors, nodes, decoders, modes = set(), set(), set(), set()
    stages: dict[str, float] = {}
    with progress_bar(total=total, desc="scored", unit="img") as bar:
        for row in ds.iter_rows():
            lease.check()  # taken over (we were presumed dead): stop, do not race it
            if (row["failure"] or "").startswith("LeaseLost"):
                lease.assert_held()  # an actor saw the takeover first: stop now
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
            for stage, seconds in json.loads(row["stage_seconds"]).items():
                stages[stage] = stages.get(stage, 0.0) + seconds
            bar.update(row["images"])
    summary.actors = len(actors)
    summary.actor_nodes, summary.decode_nodes = sorted(nodes), sorted(decoders)
    summary.inference = sorted(modes)
    good = summary.scored - summary.errors
    summary.stage_seconds_per_image = stage_seconds_per_image(stages, good, first.cfg.model.scales)
    summary.score_seconds = time.perf_counter() - t_pipe


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

"""Typed run objects: the per-run options of ``mspray score``, ``calibrate``, ``train`` and
``build-bank``.

A run object says what one run works on (bundles, images, outputs) and how it behaves;
the model's settings stay in :class:`mspray.config.MSPrayConfig` (stored in the bundle)
and the actor pool's in :class:`mspray.config.PoolConfig`. Like those, the fields carry the
command-line flags (:func:`mspray.config.base.option`): :func:`mspray.cli.flags.add_config_flags`
derives each flag, and the checks that span fields are validators here, so a library caller
and the CLI get the same errors.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from pydantic import model_validator

from mspray.artifacts.lease import DEFAULT_TTL_S
from mspray.config.base import DEVICE_HELP, Device, Section, option, setting

DATA_HELP = "mvtec:ROOT, btad:ROOT, folder:PATH or s3://bucket/prefix"


class ScoreRun(Section):
    """One ``mspray score`` run (:func:`mspray.ray.data.scoring.score_prefix`)."""

    bundle_uri: str | None = setting(None, "the one bundle (local or s3://)")
    models: dict[str, str] = setting(
        {}, "several bundles by name; each image is scored by the one route/manifest names"
    )
    input: str = option(
        ..., "folder or s3:// prefix of images (searched recursively; may contain {date})"
    )
    route: str | None = option(
        None,
        "with --bundle NAME=URI ...: which bundle scores an image, from its path: "
        "'PREFIX/{model}/**' ({model} = one path segment naming the bundle, * and ** "
        "wildcards; may contain {date}); a path matching no model gets an error row",
        metavar="TEMPLATE",
    )
    manifest: str | None = option(
        None,
        "with --bundle NAME=URI ...: a Parquet or CSV file of path,model (paths "
        "relative to --input or absolute); exactly these images are scored",
        metavar="FILE",
    )
    input_manifest: str | None = option(
        None,
        "score the images this Parquet/CSV file (or folder of them) names instead of "
        "listing --input: an S3 Inventory report (bucket, key, last_modified_date), a 'path' "
        "column of URIs, or a 'key' column relative to --input; a 'model' column picks the "
        "bundle with --bundle NAME=URI",
        metavar="FILE",
    )
    modified_since: str | dt.datetime | None = option(
        None,
        "only images modified at or after this date / ISO time (S3 LastModified, the "
        "manifest's last_modified_date), or 'last-run': since the output's last complete "
        "run; only the parts written since then are read to skip what is scored",
        metavar="DATE|last-run",
    )
    dry_run: bool = option(
        False,
        "plan only: read the manifest (or listing) and the output, print the pending and "
        "skipped counts and the units (and --summary-json them), score and write nothing",
    )
    output: str = option(
        ...,
        "output folder or s3:// prefix for Parquet parts and heatmaps (may contain {date})",
    )
    date: dt.date | None = option(
        None, "date for {date} templates (default: today, UTC)", metavar="YYYY-MM-DD"
    )
    maps: bool = option(False, "also write a heatmap PNG per image under OUTPUT/_maps/")
    part_size: int | None = option(
        None,
        "images per work unit = rows per Parquet part (default: sized for the cluster, "
        "several units per actor, at most 256)",
        metavar="N",
        ge=1,
    )
    summary_json: str | None = option(
        None, "also write the run summary (counts, timing) here", metavar="FILE"
    )
    lease_wait: float = option(
        0.0,
        "when another run holds the output, wait this long for it to finish, then exit "
        "with status 3 (default: 0.0, exit at once)",
        metavar="SECONDS",
    )
    lease_ttl: float = option(
        DEFAULT_TTL_S,
        "a run renews its lease every TTL/3 s; a crashed run's lease is taken over this "
        f"long after its last renewal (default: {DEFAULT_TTL_S})",
        metavar="SECONDS",
    )
    retry_errors: bool = option(
        False, "also rescore the images that have an error row (their parts are rewritten)"
    )

    @model_validator(mode="before")
    @classmethod
    def _bundle(cls, data: Any) -> Any:
        """``bundle=``: a URI (``bundle_uri``) or bundles by name (``models``)."""
        if isinstance(data, dict) and "bundle" in data:
            data = dict(data)
            bundle = data.pop("bundle")
            named = isinstance(bundle, Mapping)
            data["models" if named else "bundle_uri"] = dict(bundle) if named else bundle
        return data

    @model_validator(mode="after")
    def _one_way(self) -> ScoreRun:
        if not (self.bundle_uri or self.models):
            raise ValueError("--bundle is required")
        if self.bundle_uri and self.models:
            raise ValueError("--bundle: name every bundle (NAME=URI) when giving several")
        if self.manifest and self.input_manifest:
            raise ValueError("give either --manifest or --input-manifest, not both")
        if (self.route or self.manifest) and not self.models:
            raise ValueError("route/manifest need named bundles (--bundle NAME=URI)")
        return self

    def bundles(self) -> str | dict[str, str]:
        """The bundle, or the bundles by name."""
        return dict(self.models) if self.models else str(self.bundle_uri)

    def dated(self) -> ScoreRun:
        """This run with ``{date}`` (and ``{year}``, ...) filled in ``input``, ``output`` and
        ``route`` from ``date`` (default: today, UTC)."""
        from mspray.artifacts.output import expand_date

        paths = {"input": self.input, "output": self.output, "route": self.route}
        filled = {k: expand_date(v, self.date) for k, v in paths.items() if v}
        return self.model_copy(update=filled)


class CalibrateRun(Section):
    """One ``mspray calibrate`` run (:func:`mspray.decisions.calibration.recalibrate_bundle`):
    a new threshold for a bundle from production images."""

    bundle: str = option(..., "bundle directory (local path or s3://)")
    input: str = option(..., "folder / s3:// prefix of production images")
    normal: bool = option(False, "all the input images are normal")
    expected_anomaly_rate: float | None = option(
        None, "at most this fraction of the input images is anomalous", metavar="R"
    )
    target_fpr: float | None = option(
        None,
        "false-alarm rate to promise (default: the bundle's score.target_fpr)",
    )
    out: str | None = option(
        None,
        "bundle root to save the new version under (default: the root of --bundle, whose "
        "`latest` then names it; the version it came from is never modified)",
    )
    device: Device = option("auto", f"where the model runs: {DEVICE_HELP} (default: auto)")

    @model_validator(mode="after")
    def _one_promise(self) -> CalibrateRun:
        if self.normal == (self.expected_anomaly_rate is not None):
            raise ValueError("give exactly one of normal=True or expected_anomaly_rate")
        return self


class TrainRun(Section):
    """One ``mspray train`` run: the data and where the bundle goes (the model's settings
    are the :class:`~mspray.config.MSPrayConfig`)."""

    data: str = option(..., DATA_HELP)
    category: str | None = option(None, "category (sub-folder) of an mvtec/btad dataset")
    out: str = option(..., "bundle directory (local path or s3://)")
    run_name: str | None = option(
        None,
        "Ray Train run name; rerunning with the same name and storage resumes from its "
        "last checkpoint (default: a new name, logged)",
    )
    banks: bool = option(
        True,
        "only train and save the encoders; build the banks and the threshold afterwards "
        "on Ray Data with `mspray build-bank --bundle OUT --data ...`",
        cli="--no-banks",
    )


class BankRun(Section):
    """One ``mspray build-bank`` run: banks (and threshold) of a bundle from normal images."""

    bundle: str = option(..., "model bundle with trained encoders (local or s3://)")
    data: str = option(..., DATA_HELP + " (the training split is used)")
    category: str | None = option(None, "category of an mvtec/btad dataset")
    out: str | None = option(
        None,
        "bundle root to save the new version under (default: the root of --bundle); its "
        "`latest` pointer is moved to the new version",
    )
    append: bool = option(False, "add the images to the existing banks instead of rebuilding them")
    append_all: bool = option(False, "with --append: add every patch, no coreset")
    calibrate: bool = option(
        True,
        "keep the bundle's threshold instead of recalibrating it on the held-out images",
        cli="--no-calibrate",
    )

    @model_validator(mode="after")
    def _append_all_appends(self) -> BankRun:
        if self.append_all and not self.append:
            raise ValueError("--append-all needs --append")
        return self


def run_fields(run: type[Section], *skip: str) -> list[str]:
    """The fields of ``run`` that are flags of their own, in declaration (``--help``) order."""
    return [k for k, f in run.model_fields.items() if k not in skip and _is_flag(f)]


def _is_flag(info: Any) -> bool:
    extra = info.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("cli"))

"""What one scoring run did: :class:`ScoreSummary`, printed as one line at the end of a run
and recorded as JSON under the output's ``_runs/``."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    #: where the actors' time went per scored image: decode, stem, encoder and search per
    #: scale, maps, score, write (as ``mspray evaluate --json`` records it)
    stage_seconds_per_image: dict[str, float] = field(default_factory=dict)
    bundle: str | None = None  # the bundle version the run used (a root resolves to one)
    pending: int = 0  # inputs without a row when the run started (what it set out to score)
    units: int = 0  # work units cut from them (and from the parts rescored whole)
    plan_seconds: float = 0.0  # listing / manifest read and the already-scored check
    first_unit_seconds: float = 0.0  # start of planning to the first unit (a dry run)
    modified_since: str | None = None  # only inputs modified at or after this time
    #: how far this run covered the inputs' modification times: where the next run with
    #: ``--modified-since last-run`` starts (the manifest's latest time, else the start)
    modified_until: str | None = None

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

    def plan_line(self) -> str:
        """The one-line summary of a dry run."""
        since = f" modified since {self.modified_since}" if self.modified_since else ""
        return (
            f"mspray score --dry-run: {self.images} images{since}: pending={self.pending} "
            f"skipped={self.skipped} units={self.units} in {self.plan_seconds:.1f}s "
            f"(first unit {self.first_unit_seconds:.1f}s) -> {self.output}"
        )

    def stages_line(self) -> str:
        """Where the actors' time went, per scored image (empty before any image)."""
        if not self.stage_seconds_per_image:
            return ""
        parts = ", ".join(f"{k} {v:.3f}" for k, v in self.stage_seconds_per_image.items())
        return f"seconds per image: {parts}"

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

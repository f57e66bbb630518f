"""What a scoring run will do, decided once on the driver: a :class:`ScoringPlan`.

A single bundle is a fleet of one (named :data:`DEFAULT`): every bundle of a run is read
once (its version resolved, its config with the run's overrides, its meta), and the
pipeline, the actors and the run summary all take their settings from the plan instead of
long argument lists. Only named fleets (``--bundle NAME=URI``) write the name into the
``model`` column; a single bundle leaves it null.

The plan says which images the run is about (:meth:`ScoringPlan.input_rules`: a listing
or a manifest, a route, a ``since`` time) and how big its work units are: one model per
unit, at most ``part_size`` images each. Without a ``part_size`` the units are sized for
the cluster (:meth:`ScoringPlan.unit_size`): enough of them that every actor that can run
at once gets several, at most :data:`MAX_PART`. The images themselves never come to the
driver (:mod:`~mspray.ray.data.inputs`, :mod:`~mspray.ray.data.pending`).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mspray import storage
from mspray.artifacts.bundle import load_config, read_meta, resolve_bundle
from mspray.config import MSPrayConfig, PoolConfig
from mspray.ray.data.inputs import InputRules

#: Name of the model of a single-bundle run (a fleet of one).
DEFAULT = "default"
#: Unit sizes picked when none is given: at most MAX_PART images (the output's part size of
#: a large run), at least MIN_PART, and UNITS_PER_ACTOR units per concurrent actor when
#: there are fewer images (so the last units do not leave most actors idle).
MAX_PART, MIN_PART, UNITS_PER_ACTOR = 256, 8, 4


@dataclass(frozen=True)
class ModelPlan:
    """One bundle of the run: the version it resolved to, its config and its meta."""

    name: str
    uri: str  # the resolved version: every actor loads exactly this one
    cfg: MSPrayConfig
    meta: dict

    @property
    def version(self) -> str | None:
        return self.meta.get("version")

    @property
    def image_size(self) -> int:
        return self.cfg.model.image_size

    @property
    def calibration(self) -> dict:
        """The bundle's calibration block (what its threshold promises), or empty."""
        return self.meta.get("calibration") or {}


@dataclass
class ScoringPlan:
    """The bundles, folders and knobs of one scoring run (see the module docstring)."""

    input_root: str
    output: str
    models: dict[str, ModelPlan]
    named: bool = False  # named fleet: rows carry the model name
    maps: bool = False
    part_size: int | None = None  # images per unit; None: sized for the cluster
    pool: PoolConfig = field(default_factory=PoolConfig)
    since: dt.datetime | None = None  # only images modified at or after this time

    @classmethod
    def build(
        cls,
        bundle: str | Mapping[str, str],
        input_root: str,
        output: str,
        *,
        overrides: dict[str, Any] | None = None,
        read_bundles: bool = True,
        **knobs: Any,
    ) -> ScoringPlan:
        """Resolve every bundle once (a pointer moving during the run changes nothing) and
        read its config (with ``overrides``) and meta; ``knobs`` are the other fields.
        ``read_bundles=False`` (a dry run) only names them: default configs, no meta."""
        named = isinstance(bundle, Mapping)
        uris = dict(bundle) if named else {DEFAULT: str(bundle)}
        models = {}
        for name, uri in uris.items():
            if not read_bundles:
                models[name] = ModelPlan(name, uri, MSPrayConfig(), {})
                continue
            version = resolve_bundle(uri)
            cfg = load_config(version, overrides)
            models[name] = ModelPlan(name, version, cfg, read_meta(version))
        in_root, out = storage.normalize(input_root), storage.normalize(output)
        return cls(in_root, out, models, named=named, **knobs)

    @property
    def first(self) -> ModelPlan:
        """The model actors load when they start (the only one of a single bundle)."""
        return next(iter(self.models.values()))

    @property
    def scales(self) -> list[int]:
        """Every scale of any model, largest first: the result columns."""
        return sorted({s for m in self.models.values() for s in m.cfg.model.scales}, reverse=True)

    @property
    def versions(self) -> dict[str, str | None]:
        """Model name -> bundle version."""
        return {n: m.version for n, m in self.models.items()}

    def row_model(self, name: str | None) -> str | None:
        """What a row's ``model`` column holds: the name in a named fleet, else null."""
        return name if self.named else None

    def describe(self) -> str:
        """The bundles, for the lease's purpose line and logs."""
        if self.named:
            return str({n: m.uri for n, m in self.models.items()})
        return self.first.uri

    @property
    def image_sizes(self) -> dict[str, int]:
        """Model name -> its image size (a unit of any other name is never read)."""
        return {n: m.image_size for n, m in self.models.items()}

    def input_rules(self, route: str | None, manifest: str | None) -> InputRules:
        """How input rows get their model: every image the single bundle's (or the one
        named bundle's), by ``route``, or by a ``manifest``'s ``model`` column."""
        one = next(iter(self.models)) if len(self.models) == 1 else None
        rules = InputRules(self.input_root, self.output, self.since, one, None, self.named)
        if route and manifest:
            raise ValueError("give either a route or a manifest, not both")
        if route:
            if not self.named:
                raise ValueError("route/manifest need named bundles (--bundle NAME=URI)")
            return InputRules(self.input_root, self.output, self.since, None, route, True)
        if self.named and len(self.models) > 1 and not manifest:
            raise ValueError(
                f"{len(self.models)} named bundles: say which images each scores with a route "
                "(--route 'PREFIX/{model}/**') or a manifest (--manifest FILE)"
            )
        return rules

    def unit_size(self, images: int, actors: int) -> int:
        """Images per unit: ``part_size`` when given, else sized so that ``images`` make
        :data:`UNITS_PER_ACTOR` units per concurrent actor, within the bounds."""
        if self.part_size:
            return self.part_size
        per_unit = math.ceil(images / (UNITS_PER_ACTOR * max(1, actors)))
        return max(MIN_PART, min(MAX_PART, per_unit))

    def redo_units(self, redo: list[tuple[list[str], str | None]]) -> list[dict[str, Any]]:
        """Units of the parts rescored whole (same paths, so the same part name)."""
        units = []
        for paths, model in redo:
            name = model if self.named else DEFAULT
            units.append({"paths": paths, "model": name, "size": self.image_sizes.get(name, 0)})
        return units

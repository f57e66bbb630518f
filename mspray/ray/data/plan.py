"""What a scoring run will do, decided once on the driver: a :class:`ScoringPlan`.

A single bundle is a fleet of one (named :data:`DEFAULT`): every bundle of a run is read
once (its version resolved, its config with the run's overrides, its meta), and the
pipeline, the actors and the run summary all take their settings from the plan instead of
long argument lists. Only named fleets (``--bundle NAME=URI``) write the name into the
``model`` column; a single bundle leaves it null, as it always did.

The plan also cuts the pending images into work units: one model per unit, units grouped
by model (so an actor rarely switches bundles), at most ``part_size`` images each. Without
a ``part_size`` the units are sized for the cluster (:meth:`ScoringPlan.unit_size`): enough
of them that every actor that can run at once gets several, at most :data:`MAX_PART`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mspray import storage
from mspray.bundle import load_config, read_meta, resolve_bundle
from mspray.config import MSPrayConfig, PoolConfig
from mspray.ray.data.routing import read_manifest, route_paths

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

    @classmethod
    def build(
        cls,
        bundle: str | Mapping[str, str],
        input_root: str,
        output: str,
        *,
        overrides: dict[str, Any] | None = None,
        **knobs: Any,
    ) -> ScoringPlan:
        """Resolve every bundle once (a pointer moving during the run changes nothing) and
        read its config (with ``overrides``) and meta; ``knobs`` are the other fields."""
        named = isinstance(bundle, Mapping)
        uris = dict(bundle) if named else {DEFAULT: str(bundle)}
        models = {}
        for name, uri in uris.items():
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

    def assign(self, route: str | None, manifest: str | None) -> dict[str, str | None]:
        """``path -> model name`` of every image the run is about; None (or a name that is
        not in the fleet) gets an error row instead of a score."""
        if not self.named:
            if route or manifest:
                raise ValueError("route/manifest need named bundles (--bundle NAME=URI)")
            return dict.fromkeys(list_inputs(self.input_root, self.output), DEFAULT)
        if route and manifest:
            raise ValueError("give either a route or a manifest, not both")
        if manifest:
            return read_manifest(manifest, self.input_root)
        paths = list_inputs(self.input_root, self.output)
        if route:
            return route_paths(paths, route, self.input_root)
        if len(self.models) == 1:
            return dict.fromkeys(paths, next(iter(self.models)))
        raise ValueError(
            f"{len(self.models)} named bundles: say which images each scores with a route "
            "(--route 'PREFIX/{model}/**') or a manifest (--manifest FILE)"
        )

    def unit_size(self, images: int, actors: int) -> int:
        """Images per unit: ``part_size`` when given, else sized so that ``images`` make
        :data:`UNITS_PER_ACTOR` units per concurrent actor, within the bounds."""
        if self.part_size:
            return self.part_size
        per_unit = math.ceil(images / (UNITS_PER_ACTOR * max(1, actors)))
        return max(MIN_PART, min(MAX_PART, per_unit))

    def units(
        self,
        pending: list[str],
        assignment: dict[str, str | None],
        redo: list[tuple[list[str], str | None]] = (),  # type: ignore[assignment]
        size: int | None = None,
    ) -> list[dict[str, Any]]:
        """Work units: the ``redo`` parts as they are (same paths, so the same part name),
        then ``pending`` grouped by model, ``size`` paths each (default ``part_size``, else
        :data:`MAX_PART`). A unit's ``size`` is its model's image size, 0 for a unit of no
        (known) model, which is never read."""
        size = size or self.part_size or MAX_PART
        groups: dict[str, list[str]] = {}
        for p in pending:
            groups.setdefault(assignment.get(p) or "", []).append(p)
        chunks = [
            *((paths, model if self.named else DEFAULT) for paths, model in redo),
            *(
                (group[i : i + size], name)
                for name, group in groups.items()
                for i in range(0, len(group), size)
            ),
        ]
        return [
            {"paths": paths, "model": name or None, "size": self._image_size(name)}
            for paths, name in chunks
        ]

    def _image_size(self, name: str | None) -> int:
        model = self.models.get(name or "")
        return model.image_size if model is not None else 0


def list_inputs(input_root: str, output: str) -> list[str]:
    """Images under the input prefix, minus anything under ``output`` (an output folder
    inside the input prefix must not have its heatmaps scored on the next run)."""
    return [p for p in storage.list_files(input_root) if not storage.is_under(p, output)]

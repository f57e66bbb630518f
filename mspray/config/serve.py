"""The Serve application's settings (part of the one typed config, :mod:`mspray.config`,
which re-exports them): ``args:`` of serve_config.yaml, ``mspray serve`` flags, and the
reloadable part, the deployment's ``user_config``."""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import AliasChoices, model_validator

from mspray.config.base import DEVICE_HELP, Device, Section, flag
from mspray.config.base import check as _check

#: A served model's name: it travels in the serve_multiplexed_model_id header.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


#: Default batch wait of Serve. Longer than Serve's 10 ms: under load a client's next request
#: takes tens of ms to travel client -> proxy -> replica, and a shorter wait splits the
#: clients into cohorts that never share a batch (measured in benchmarks/bench_serve.py).
BATCH_WAIT_S = 0.02


class ServeConfig(Section):
    """The Serve application: ``args:`` of serve_config.yaml, ``mspray serve`` flags, and
    (the :data:`RELOADABLE` part) the deployment's ``user_config``."""

    bundle_uri: str | None = flag(
        None,
        "model bundle, local path or s3://",
        cli="--bundle",
        validation_alias=AliasChoices("bundle_uri", "bundle"),
    )
    device: Device = flag("auto", f"torch device of a replica: {DEVICE_HELP}")
    bank_gpu: bool = flag(False, "faiss bank search on the GPU", cli="--bank-gpu")
    max_batch_size: int = flag(16, "requests per forward pass", ge=1)
    batch_wait_timeout_s: float = flag(BATCH_WAIT_S, "how long a batch waits to fill up", ge=0)
    max_image_bytes: int | None = flag(
        None, "reject larger bodies with 413 (default: the bundle's score.max_image_bytes)", gt=0
    )
    max_image_pixels: int | None = flag(
        None, "reject larger images with 413 (default: the bundle's score.max_image_pixels)", gt=0
    )
    replicas: int = flag(
        1, "replicas; with --max-replicas, the minimum of the autoscaling range", ge=1
    )
    max_replicas: int | None = flag(
        None, "autoscale between --replicas and this on load (default: a fixed replica count)", ge=1
    )
    target_ongoing_requests: float = flag(16, "autoscaling target of in-flight requests", gt=0)
    max_ongoing_requests: int = flag(
        64, "in-flight requests per replica (must stay above max_batch_size)", ge=1
    )
    max_queued_requests: int = flag(
        128,
        "requests queued at each proxy beyond max_ongoing_requests per replica; more get a "
        "503 at once instead of piling up in memory (-1 = unbounded)",
        ge=-1,
    )
    request_timeout_s: float | None = flag(
        60.0,
        "end-to-end HTTP timeout of a request (408 after it); set when Serve's proxies start",
        gt=0,
    )
    num_cpus: float = flag(1, "CPUs per replica (also its torch threads)", ge=0)
    num_gpus: float = flag(0, "GPUs per replica", ge=0)
    models: dict[str, str] = flag(
        {},
        "named bundles NAME -> URI, picked per request with ?model=NAME or the "
        "serve_multiplexed_model_id header (command line: --bundle NAME=URI, repeated)",
    )
    max_num_models_per_replica: int = flag(
        4, "bundles one replica keeps loaded (least recently used is unloaded first)", ge=1
    )

    #: Name of the bare ``bundle_uri`` among :meth:`named_models`.
    DEFAULT_MODEL: ClassVar[str] = "default"

    #: Fields a running deployment takes through ``user_config`` (no restart).
    RELOADABLE: ClassVar[tuple[str, ...]] = (
        "bundle_uri",
        "models",
        "device",
        "bank_gpu",
        "max_batch_size",
        "batch_wait_timeout_s",
        "max_image_bytes",
        "max_image_pixels",
    )

    @model_validator(mode="after")
    def _batches_can_fill(self) -> ServeConfig:
        if self.max_replicas is not None:
            _check(
                self.max_replicas >= self.replicas,
                "max_replicas",
                self.max_replicas,
                f"below replicas={self.replicas}",
            )
        _check(
            self.max_ongoing_requests >= self.max_batch_size,
            "max_ongoing_requests",
            self.max_ongoing_requests,
            f"below max_batch_size={self.max_batch_size}: batches could never fill up",
        )
        for name in self.models:
            _check(
                MODEL_NAME.fullmatch(name) is not None,
                "models",
                name,
                "model names are letters, digits, '.', '_' and '-' (they travel in a header)",
            )
        _check(
            not (self.bundle_uri and self.DEFAULT_MODEL in self.models),
            "models",
            self.DEFAULT_MODEL,
            "is the name of bundle_uri; set one of them",
        )
        return self

    def user_config(self) -> dict[str, Any]:
        """The reloadable settings (``None`` and an empty ``models`` left out)."""
        data = self.model_dump(include=set(self.RELOADABLE))
        return {k: v for k, v in data.items() if v is not None and v != {}}

    def named_models(self) -> dict[str, str]:
        """Every served bundle by name: ``models`` plus ``bundle_uri`` as ``"default"``."""
        named = dict(self.models)
        if self.bundle_uri:
            named[self.DEFAULT_MODEL] = self.bundle_uri
        return named

    def model_key(self, uri: str | None = None) -> tuple:
        """Settings whose change needs a new model load (the rest apply instantly)."""
        return (uri or self.bundle_uri, self.device, self.bank_gpu)
